//! `docs/walkthrough.md`, step by step, against the real binaries started from
//! the quickstart's files: once with `grpcurl` (server reflection, no stubs)
//! and once with `cmkctl`, with the real `openssl` CLI for the wrap step. Each
//! run leaves its transcript in cargo's target tmp directory.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use cmk_tests::walkthrough::{Setup, Shell};
use serde_json::Value;

const KEY_ADMIN: &str = "cmk.control.v1.KeyAdminService";
const CONTENT: &str = "cmk.control.v1.ContentKeyService";

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// The key check value of a raw key file, computed with the OpenSSL CLI the
/// way docs/api.md shows it.
fn local_check_value(shell: &mut Shell, file: &str) -> String {
    let out = shell
        .run(&format!(
            "head -c16 /dev/zero | openssl mac -cipher AES-256-CBC \
             -macopt hexkey:$(od -An -tx1 -v {file} | tr -d ' \\n') CMAC | cut -c1-10"
        ))
        .ok();
    let kcv = out.trim().to_owned();
    assert_eq!(kcv.len(), 10, "{out}");
    kcv
}

fn openssl_wrap(shell: &mut Shell, name: &str) {
    shell.run(&format!("openssl rand -out {name}.bin 32")).ok();
    shell
        .run(&format!(
            "openssl pkeyutl -encrypt -pubin -inkey pub.pem -in {name}.bin -out {name}.wrapped \
             -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256"
        ))
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walkthrough_with_grpcurl() {
    let setup = Setup::start().await;
    let mut sh = setup.shell();
    let dev = setup.dev.display().to_string();
    let grpcurl = |stem: &str| {
        format!(
            "grpcurl -cacert {dev}/pki/ca.crt -cert {dev}/pki/{stem}.crt -key {dev}/pki/{stem}.key"
        )
    };
    sh.set("ADMIN", &grpcurl("admin"));
    sh.set("SERVICE", &grpcurl("service"));
    sh.set("READER", &grpcurl("reader"));

    // Reflection lists both services.
    let listed = sh.run("$ADMIN $CP list").ok();
    assert!(
        listed.contains(KEY_ADMIN) && listed.contains(CONTENT),
        "{listed}"
    );

    // A new org starts on the generic default key.
    let keys = json(
        &sh.run(&format!(
            "$ADMIN -d '{{\"org_id\":\"acme\"}}' $CP {KEY_ADMIN}/ListKeys"
        ))
        .ok(),
    );
    assert_eq!(keys["keys"][0]["source"], "KEY_SOURCE_GENERIC_DEFAULT");
    assert_eq!(keys["keys"][0]["state"], "KEY_STATE_ACTIVE");
    let generic = keys["activeKeyId"].as_str().unwrap().to_owned();

    // BYOK on; the public key; a key of one's own, wrapped with OpenSSL.
    let byok = json(
        &sh.run(&format!(
            "$ADMIN -d '{{\"org_id\":\"acme\",\"enabled\":true}}' $CP {KEY_ADMIN}/SetByok"
        ))
        .ok(),
    );
    assert_eq!(byok["byokEnabled"], true);
    let public = json(
        &sh.run(&format!(
            "$ADMIN -d '{{\"org_id\":\"acme\"}}' $CP {KEY_ADMIN}/GetImportPublicKey | tee pub.json"
        ))
        .ok(),
    );
    assert_eq!(public["algorithm"], "RSAES_OAEP_SHA_256");
    sh.run("jq -j .publicKeyPem pub.json > pub.pem").ok();
    openssl_wrap(&mut sh, "cmk1");
    let kcv1 = local_check_value(&mut sh, "cmk1.bin");

    // Upload (pending), then activate: the server's check value is ours.
    let uploaded = json(
        &sh.run(&format!(
            "$ADMIN -d \"{{\\\"org_id\\\":\\\"acme\\\",\\\"wrapped_key\\\":\\\"$(base64 -w0 cmk1.wrapped)\\\"}}\" \
             $CP {KEY_ADMIN}/UploadKey"
        ))
        .ok(),
    );
    assert_eq!(uploaded["key"]["state"], "KEY_STATE_PENDING");
    assert_eq!(uploaded["key"]["keyCheckValue"], kcv1.as_str());
    assert_eq!(uploaded["activeKey"]["keyId"], generic.as_str());
    let key1 = uploaded["key"]["keyId"].as_str().unwrap().to_owned();
    let request = |key: &str| format!("-d '{{\"org_id\":\"acme\",\"key_id\":\"{key}\"}}'");
    let activated = json(
        &sh.run(&format!(
            "$ADMIN {} $CP {KEY_ADMIN}/ActivateKey",
            request(&key1)
        ))
        .ok(),
    );
    assert_eq!(activated["key"]["state"], "KEY_STATE_ACTIVE");

    // Content, as the org's internal service.
    let kek = json(
        &sh.run(&format!(
            "$SERVICE -d '{{\"org_id\":\"acme\",\"resource\":\"meeting-1\"}}' $CP {CONTENT}/CreateKek"
        ))
        .ok(),
    );
    assert_eq!(kek["keyId"], key1.as_str());
    let kek_id = kek["kekId"].as_str().unwrap().to_owned();
    let data_key = json(
        &sh.run(&format!(
            "$SERVICE -d '{{\"org_id\":\"acme\",\"kek_id\":\"{kek_id}\",\"context\":\"'$(printf doc-7 | base64)'\"}}' \
             $CP {CONTENT}/GenerateDataKey | tee data-key.json"
        ))
        .ok(),
    );
    let plaintext = data_key["plaintext"].as_str().unwrap().to_owned();
    let decrypt = format!(
        "$SERVICE -d \"{{\\\"org_id\\\":\\\"acme\\\",\\\"wrapped_key\\\":\\\"$(jq -r .wrappedKey data-key.json)\\\",\\\"context\\\":\\\"$(printf doc-7 | base64)\\\"}}\" \
         $CP {CONTENT}/Decrypt"
    );
    let opened = json(&sh.run(&decrypt).ok());
    assert_eq!(opened["plaintext"], plaintext.as_str());

    // Rotate to a second key, activated at upload.
    openssl_wrap(&mut sh, "cmk2");
    let uploaded = json(
        &sh.run(&format!(
            "$ADMIN -d \"{{\\\"org_id\\\":\\\"acme\\\",\\\"wrapped_key\\\":\\\"$(base64 -w0 cmk2.wrapped)\\\",\\\"activate_now\\\":true}}\" \
             $CP {KEY_ADMIN}/UploadKey"
        ))
        .ok(),
    );
    assert_eq!(uploaded["key"]["state"], "KEY_STATE_ACTIVE");
    let key2 = uploaded["key"]["keyId"].as_str().unwrap().to_owned();
    let rotation = format!("$ADMIN -d '{{\"org_id\":\"acme\"}}' $CP {KEY_ADMIN}/GetRotation");
    wait_for(&mut sh, &rotation, "ROTATION_STATE_FINISHED");
    let job = json(&sh.run(&rotation).ok());
    assert_eq!(job["targetKeyId"], key2.as_str());
    assert_eq!(job["fromKeyIds"][0], key1.as_str());
    assert_eq!(
        (job["total"].as_str(), job["done"].as_str()),
        (Some("1"), Some("1"))
    );
    let listed = json(
        &sh.run(&format!(
            "$READER -d '{{\"org_id\":\"acme\"}}' $CP {KEY_ADMIN}/ListKeys"
        ))
        .ok(),
    );
    let state_of = |listed: &Value, key: &str| {
        listed["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["keyId"] == key)
            .map(|k| k["state"].as_str().unwrap().to_owned())
            .unwrap()
    };
    assert_eq!(state_of(&listed, &key1), "KEY_STATE_DEACTIVATED");
    assert_eq!(
        json(&sh.run(&decrypt).ok())["plaintext"],
        plaintext.as_str()
    );

    // Revoke: preview first, then the org's content is unreadable until reactivation.
    let preview = json(
        &sh.run(&format!(
            "$ADMIN {} $CP {KEY_ADMIN}/PreviewRevocation",
            request(&key2)
        ))
        .ok(),
    );
    assert_eq!(preview["revocable"], true);
    assert_eq!(preview["keksUnreadable"], "1");
    let revoked = json(
        &sh.run(&format!(
            "$ADMIN {} $CP {KEY_ADMIN}/RevokeKey",
            request(&key2)
        ))
        .ok(),
    );
    assert_eq!(revoked["key"]["state"], "KEY_STATE_REVOKED");
    let refused = sh.run(&decrypt);
    assert_eq!(refused.code, 64 + 9, "{refused:?}");
    assert!(
        refused.stderr.contains("Code: FailedPrecondition") && refused.stderr.contains("revoked"),
        "{refused:?}"
    );
    let reactivated = json(
        &sh.run(&format!(
            "$ADMIN {} $CP {KEY_ADMIN}/ReactivateKey",
            request(&key2)
        ))
        .ok(),
    );
    assert_eq!(reactivated["key"]["state"], "KEY_STATE_ACTIVE");
    assert_eq!(
        json(&sh.run(&decrypt).ok())["plaintext"],
        plaintext.as_str()
    );

    // Delete (after revoking) and restore within the 30 days.
    sh.run(&format!(
        "$ADMIN {} $CP {KEY_ADMIN}/RevokeKey",
        request(&key2)
    ))
    .ok();
    let deleted = json(
        &sh.run(&format!(
            "$ADMIN {} $CP {KEY_ADMIN}/DeleteKey",
            request(&key2)
        ))
        .ok(),
    );
    assert_eq!(deleted["key"]["state"], "KEY_STATE_DELETED");
    assert!(deleted["key"]["expiresAt"].is_string(), "{deleted}");
    let restored = json(
        &sh.run(&format!(
            "$ADMIN {} $CP {KEY_ADMIN}/RestoreKey",
            request(&key2)
        ))
        .ok(),
    );
    assert_eq!(restored["key"]["state"], "KEY_STATE_REVOKED");
    sh.run(&format!(
        "$ADMIN {} $CP {KEY_ADMIN}/ReactivateKey",
        request(&key2)
    ))
    .ok();
    assert_eq!(
        json(&sh.run(&decrypt).ok())["plaintext"],
        plaintext.as_str()
    );

    // The audit log has every step, and its chain is intact.
    let audit = json(
        &sh.run(&format!(
            "$READER -d '{{\"org_id\":\"acme\",\"page_size\":100}}' $CP {KEY_ADMIN}/ListAuditEvents"
        ))
        .ok(),
    );
    let actions: Vec<_> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default().to_owned())
        .collect();
    for verb in [
        "upload",
        "activate",
        "revoke",
        "reactivate",
        "delete",
        "restore",
    ] {
        assert!(
            actions.iter().any(|a| a.to_lowercase().contains(verb)),
            "no {verb} in {actions:?}"
        );
    }
    let verified = json(
        &sh.run(&format!(
            "$READER -d '{{\"org_id\":\"acme\"}}' $CP {KEY_ADMIN}/VerifyAuditLog"
        ))
        .ok(),
    );
    assert_eq!(verified["intact"], true);

    // The read-only identity may not revoke.
    let denied = sh.run(&format!(
        "$READER {} $CP {KEY_ADMIN}/RevokeKey",
        request(&key2)
    ));
    assert_eq!(denied.code, 64 + 7, "{denied:?}");
    sh.save(env!("CARGO_TARGET_TMPDIR"), "walkthrough-grpcurl");
}

/// Repeats `script` (unrecorded) until its output contains `needle`.
fn wait_for(sh: &mut Shell, script: &str, needle: &str) {
    for _ in 0..100 {
        if sh.quiet(script).stdout.contains(needle) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{script} never printed {needle}");
}

/// Every KEK id cmkctl printed in `text`, and the key ids, in order.
fn ids(text: &str, prefix: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walkthrough_with_cmkctl() {
    let setup = Setup::start().await;
    let mut sh = setup.shell();
    sh.set(
        "CMKCTL_CONFIG",
        &setup.dev.join("cmkctl.toml").display().to_string(),
    );
    let service = "cmkctl --config $DEV/cmkctl-service.toml";

    let listed = sh.run("cmkctl list").ok();
    assert!(
        listed.contains("generic_default") && listed.contains("BYOK off"),
        "{listed}"
    );
    let byok = sh.run("cmkctl byok on").ok();
    assert!(byok.contains("on"), "{byok}");
    sh.run("cmkctl public-key --out pub.pem").ok();
    let pem = std::fs::read_to_string(sh.work.join("pub.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");

    // The first key is wrapped by OpenSSL, exactly as docs/api.md ("Uploading a key") gives the recipe.
    openssl_wrap(&mut sh, "cmk1");
    let kcv1 = local_check_value(&mut sh, "cmk1.bin");
    let uploaded = sh.run("cmkctl upload --wrapped cmk1.wrapped").ok();
    assert!(
        uploaded.contains("pending") && uploaded.contains(&kcv1),
        "{uploaded}"
    );
    let key1 = ids(&uploaded, "key-")[0].clone();
    let activated = sh.run(&format!("cmkctl activate {key1}")).ok();
    assert!(
        activated.contains(&format!("active key    {key1}")),
        "{activated}"
    );

    // Content: 50 resources, each with a KEK, and one content key.
    let kek = sh
        .run(&format!("{service} content kek --resource meeting-1"))
        .ok();
    let kek_id = ids(&kek, "kek-")[0].clone();
    sh.run(&format!(
        "for i in $(seq 2 50); do {service} content kek --resource meeting-$i > /dev/null; done"
    ))
    .ok();
    let data_key = json(
        &sh.run(&format!(
            "{service} content generate --kek {kek_id} --context doc-7 --output json | tee data-key.json"
        ))
        .ok(),
    );
    let fingerprint = data_key["content_key_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let decrypt = format!(
        "{service} content decrypt --wrapped $(jq -r .wrapped_key data-key.json) --context doc-7"
    );
    assert!(sh.run(&decrypt).ok().contains(&fingerprint));

    // The second key is wrapped by cmkctl, and activated at upload: a rotation.
    sh.run("openssl rand -out cmk2.bin 32").ok();
    let wrapped = sh
        .run("cmkctl wrap --public-key pub.pem --key-file cmk2.bin --out cmk2.wrapped")
        .ok();
    let kcv2 = local_check_value(&mut sh, "cmk2.bin");
    assert!(wrapped.contains(&kcv2), "{wrapped}");
    let uploaded = sh
        .run("cmkctl upload --wrapped cmk2.wrapped --activate now")
        .ok();
    assert!(uploaded.contains(&kcv2), "{uploaded}");
    let key2 = ids(&uploaded, "key-")[0].clone();
    let watched = sh.run("cmkctl rotation watch").ok();
    assert!(
        watched.contains(&format!("finished: 50 of 50 KEKs re-wrapped to {key2}")),
        "{watched}"
    );
    let listed = sh.run("cmkctl list").ok();
    let line_of = |listed: &str, key: &str| {
        listed
            .lines()
            .find(|line| line.contains(key))
            .unwrap()
            .to_owned()
    };
    assert!(line_of(&listed, &key1).contains("deactivated"), "{listed}");
    assert!(sh.run(&decrypt).ok().contains(&fingerprint));

    // Revoke: the preview, a refusal at the prompt, then the real thing.
    let declined = sh.run_with_input(&format!("cmkctl revoke {key2}"), "no\n");
    assert_eq!(declined.code, 9, "{declined:?}");
    assert!(
        declined.stderr.contains("50 KEKs of 50 resources"),
        "{declined:?}"
    );
    assert!(line_of(&sh.quiet("cmkctl list").ok(), &key2).contains("active"));
    let revoked = sh
        .run_with_input(&format!("cmkctl revoke {key2}"), "yes\n")
        .ok();
    assert!(revoked.contains("state         revoked"), "{revoked}");
    let refused = sh.run(&decrypt);
    assert_eq!(refused.code, 6, "{refused:?}");
    assert!(
        refused.stderr.starts_with(&format!(
            "cmkctl: FAILED_PRECONDITION: the organisation's master key {key2} is revoked"
        )),
        "{refused:?}"
    );
    sh.run(&format!("cmkctl reactivate {key2}")).ok();
    assert!(sh.run(&decrypt).ok().contains(&fingerprint));

    // Delete and restore.
    sh.run(&format!("cmkctl revoke {key2} --yes")).ok();
    let deleted = sh.run(&format!("cmkctl delete {key2}")).ok();
    assert!(deleted.contains("state         deleted"), "{deleted}");
    let restored = sh.run(&format!("cmkctl restore {key2}")).ok();
    assert!(restored.contains("state         revoked"), "{restored}");
    sh.run(&format!("cmkctl reactivate {key2}")).ok();
    assert!(sh.run(&decrypt).ok().contains(&fingerprint));

    // The audit log, its chain, and a reader who may not revoke.
    let audit = sh.run("cmkctl audit list").ok();
    for action in ["restore", "reactivate", "rotation job 2 finished"] {
        assert!(audit.contains(action), "no {action:?} in:\n{audit}");
    }
    let verified = sh.run("cmkctl audit verify").ok();
    let field = |name: &str| {
        verified
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field("intact"), "yes", "{verified}");
    assert!(
        field("signed checkpoints").parse::<u64>().unwrap() > 0,
        "every key-state change is checkpointed: {verified}"
    );
    let denied = sh.run(&format!(
        "cmkctl --config $DEV/cmkctl-reader.toml revoke {key2} --yes"
    ));
    assert_eq!(denied.code, 5, "{denied:?}");
    assert!(
        denied.stderr.starts_with("cmkctl: PERMISSION_DENIED: "),
        "{denied:?}"
    );
    sh.save(env!("CARGO_TARGET_TMPDIR"), "walkthrough-cmkctl");
}
