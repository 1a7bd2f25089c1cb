//! End-to-end: the content-key API (KEKs and content keys for internal
//! services) over real mutual TLS, against the in-process HSM daemon: round
//! trips across a restart, every refusal, revocation taking effect at once,
//! the revocation preview, "rotation due" and the generic default key's own
//! renewal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use cmk_proto::control::v1::{self as pb, KeySource, KeyState, RotationState};
use cmk_tests::control_plane::{
    self, Admin, Content, ContentKey, Deployment, assert_all_decrypt, audit_log, create_keks,
    files, generate_data_keys, preview_revocation, set_byok, state_of, upload_new_key,
    wait_for_rotation,
};
use tonic::{Code, Status};

const ORG: &str = "acme";
const GLOBEX: &str = "globex";
const DAY: Duration = Duration::from_secs(86_400);
/// A well-formed KEK id no organisation has.
const NO_SUCH_KEK: &str = "kek-00000000000000000000000000000000";

fn key_req(key_id: &str) -> pb::KeyRequest {
    pb::KeyRequest {
        org_id: ORG.into(),
        key_id: key_id.into(),
    }
}

fn kek_req(org: &str, resource: &str) -> pb::CreateKekRequest {
    pb::CreateKekRequest {
        org_id: org.into(),
        resource: resource.into(),
    }
}

fn gdk_req(org: &str, kek_id: &str, context: &[u8]) -> pb::GenerateDataKeyRequest {
    pb::GenerateDataKeyRequest {
        org_id: org.into(),
        kek_id: kek_id.into(),
        context: context.to_vec(),
    }
}

fn decrypt_req(org: &str, wrapped: &[u8], context: &[u8]) -> pb::DecryptRequest {
    pb::DecryptRequest {
        org_id: org.into(),
        wrapped_key: wrapped.to_vec(),
        context: context.to_vec(),
    }
}

async fn list(admin: &mut Admin) -> pb::ListKeysResponse {
    admin
        .list_keys(pb::ListKeysRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Asserts the refusal's code, and that its message contains `says`.
fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, says: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(says),
        "{says:?} in {:?}",
        status.message()
    );
}

fn is_kek_id(id: &str) -> bool {
    id.len() == 36
        && id.starts_with("kek-")
        && id[4..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[tokio::test(flavor = "multi_thread")]
async fn data_keys_round_trip_and_survive_a_restart() {
    let mut d = Deployment::start().await;
    let mut svc = d.content("service-acme").await;
    let mut admin = d.client("admin-acme").await;

    let kek = svc
        .create_kek(kek_req(ORG, "space:1"))
        .await
        .unwrap()
        .into_inner();
    assert!(is_kek_id(&kek.kek_id), "{}", kek.kek_id);
    assert!(kek.created);
    assert_eq!(kek.resource, "space:1");
    let listing = list(&mut admin).await;
    assert_eq!(
        kek.key_id, listing.active_key_id,
        "wrapped by the active key"
    );
    assert_eq!(
        listing.keys[0].source(),
        KeySource::GenericDefault,
        "an org without BYOK: the generic default key"
    );

    // One KEK per resource.
    let again = svc
        .create_kek(kek_req(ORG, "space:1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(
        (&again.kek_id, &again.key_id, again.created_at),
        (&kek.kek_id, &kek.key_id, kek.created_at)
    );
    // Callers racing for one resource all get the same KEK, made once.
    let raced = control_plane::run_concurrently(8, 8, {
        let svc = svc.clone();
        move |_| {
            let mut svc = svc.clone();
            async move {
                svc.create_kek(kek_req(ORG, "space:raced"))
                    .await
                    .unwrap()
                    .into_inner()
            }
        }
    })
    .await;
    assert_eq!(raced.iter().filter(|k| k.created).count(), 1, "{raced:?}");
    assert!(raced.iter().all(|k| k.kek_id == raced[0].kek_id));
    let other = svc
        .create_kek(kek_req(ORG, "meeting/2024-05-01_a.b"))
        .await
        .unwrap()
        .into_inner();
    assert!(other.created);
    assert_ne!(other.kek_id, kek.kek_id);

    let context = b"space:1/doc:7".to_vec();
    let made = svc
        .generate_data_key(gdk_req(ORG, &kek.kek_id, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.plaintext.len(), 32);
    assert_eq!(made.kek_id, kek.kek_id);
    assert!(!made.wrapped_key.is_empty());
    let second = svc
        .generate_data_key(gdk_req(ORG, &kek.kek_id, &context))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(second.plaintext, made.plaintext, "a fresh key every time");
    assert_ne!(second.wrapped_key, made.wrapped_key);

    let opened = svc
        .decrypt(decrypt_req(ORG, &made.wrapped_key, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, made.plaintext);
    assert_eq!(opened.kek_id, kek.kek_id);
    // The empty context and the longest one are both fine.
    for context in [Vec::new(), vec![0xa5; 4096]] {
        let made = svc
            .generate_data_key(gdk_req(ORG, &other.kek_id, &context))
            .await
            .unwrap()
            .into_inner();
        let opened = svc
            .decrypt(decrypt_req(ORG, &made.wrapped_key, &context))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(opened.plaintext, made.plaintext);
    }

    // KEK creation is audited once; content-key calls are not audited.
    let events = audit_log(&mut admin, ORG).await;
    let created: Vec<_> = events
        .iter()
        .filter(|e| e.action.starts_with("create KEK"))
        .collect();
    assert_eq!(created.len(), 3, "{created:?}");
    assert_eq!(
        created[0].action,
        format!("create KEK {} for resource space:1", kek.kek_id)
    );
    assert_eq!(created[0].actor, control_plane::SERVICE_ACME);
    assert_eq!(created[0].key_id, kek.key_id);

    // No key was ever rotated away from.
    refused(
        d.client("reader-acme")
            .await
            .get_rotation(pb::GetRotationRequest { org_id: ORG.into() })
            .await,
        Code::NotFound,
        "the organisation has no rotation job",
    );

    // A restart empties the KEK cache: the KEK is unwrapped through the HSM again.
    d.restart().await;
    let mut svc = d.content("service-acme").await;
    let opened = svc
        .decrypt(decrypt_req(ORG, &made.wrapped_key, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, made.plaintext);
    let opened = svc
        .decrypt(decrypt_req(ORG, &second.wrapped_key, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, second.plaintext);
    let after = svc
        .create_kek(kek_req(ORG, "space:1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((after.kek_id, after.created), (kek.kek_id, false));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_and_wrong_callers_are_refused_and_change_nothing() {
    let d = Deployment::start().await;
    let mut svc = d.content("service-acme").await;
    let mut admin = d.client("admin-acme").await;
    let kek = svc
        .create_kek(kek_req(ORG, "space:1"))
        .await
        .unwrap()
        .into_inner()
        .kek_id;
    let context = b"space:1/doc:1";
    let made = svc
        .generate_data_key(gdk_req(ORG, &kek, context))
        .await
        .unwrap()
        .into_inner();
    let blob = made.wrapped_key.clone();
    let keys_before = list(&mut admin).await;
    let preview_before = preview_revocation(&mut admin, ORG, &keys_before.active_key_id).await;

    // Wrong context, tampered and truncated blobs, unknown versions.
    const NOT_AUTHENTIC: &str = "does not authenticate";
    let bad = InvalidArgument;
    bad.decrypt(&mut svc, &blob, b"space:1/doc:2", NOT_AUTHENTIC)
        .await;
    bad.decrypt(&mut svc, &blob, b"", NOT_AUTHENTIC).await;
    for at in [40, 60, blob.len() - 1] {
        let mut tampered = blob.clone();
        tampered[at] ^= 0x01;
        bad.decrypt(&mut svc, &tampered, context, NOT_AUTHENTIC)
            .await;
    }
    // A header naming another (well-formed, unknown) KEK.
    let mut renamed = blob.clone();
    renamed[1 + 4] = if renamed[1 + 4] == b'0' { b'1' } else { b'0' };
    bad.decrypt(&mut svc, &renamed, context, NOT_AUTHENTIC)
        .await;
    let mut bad_id = blob.clone();
    bad_id[1 + 4] = b'X';
    bad.decrypt(&mut svc, &bad_id, context, "does not name a valid KEK id")
        .await;
    for len in [1, 37, 60, blob.len() - 1] {
        bad.decrypt(
            &mut svc,
            &blob[..len],
            context,
            &format!("is {len} bytes; format version 2 is exactly {}", blob.len()),
        )
        .await;
    }
    let mut longer = blob.clone();
    longer.push(0);
    bad.decrypt(&mut svc, &longer, context, "format version 2 is exactly")
        .await;
    // Over the server's message limit: refused before it is read.
    refused(
        svc.decrypt(decrypt_req(ORG, &vec![1; 100_000], context))
            .await,
        Code::ResourceExhausted,
        "message length too large",
    );
    bad.decrypt(&mut svc, &[], context, "wrapped content key is empty")
        .await;
    for version in [0u8, 3, 0xff] {
        let mut other = blob.clone();
        other[0] = version;
        bad.decrypt(
            &mut svc,
            &other,
            context,
            &format!("format version {version}; only versions 1 and 2 are supported"),
        )
        .await;
    }
    // Format 1's length with format 2's version: refused by its length.
    let mut relabelled = blob[..97].to_vec();
    relabelled[0] = 2;
    bad.decrypt(
        &mut svc,
        &relabelled,
        context,
        "is 97 bytes; format version 2 is exactly 117",
    )
    .await;

    // A content key of another org.
    let mut globex = d.content("service-globex").await;
    let globex_kek = globex
        .create_kek(kek_req(GLOBEX, "space:1"))
        .await
        .unwrap()
        .into_inner()
        .kek_id;
    let foreign = globex
        .generate_data_key(gdk_req(GLOBEX, &globex_kek, context))
        .await
        .unwrap()
        .into_inner();
    bad.decrypt(&mut svc, &foreign.wrapped_key, context, NOT_AUTHENTIC)
        .await;
    // ... which its own org opens.
    let opened = globex
        .decrypt(decrypt_req(GLOBEX, &foreign.wrapped_key, context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, foreign.plaintext);
    // Nor can acme make content keys under globex's KEK, or globex open acme's.
    refused(
        svc.generate_data_key(gdk_req(ORG, &globex_kek, context))
            .await,
        Code::NotFound,
        &format!("the organisation has no KEK {globex_kek}"),
    );
    refused(
        globex.decrypt(decrypt_req(GLOBEX, &blob, context)).await,
        Code::InvalidArgument,
        NOT_AUTHENTIC,
    );

    // Unknown and malformed KEK ids, resources, contexts and orgs.
    refused(
        svc.generate_data_key(gdk_req(ORG, NO_SUCH_KEK, context))
            .await,
        Code::NotFound,
        &format!("the organisation has no KEK {NO_SUCH_KEK}"),
    );
    for kek_id in [
        "",
        "kek-123",
        "KEK-00000000000000000000000000000000",
        &kek.to_uppercase(),
    ] {
        refused(
            svc.generate_data_key(gdk_req(ORG, kek_id, context)).await,
            Code::InvalidArgument,
            "kek_id: KEK id must",
        );
    }
    let long_resource = "r".repeat(129);
    for (resource, says) in [
        ("", "resource: resource is empty"),
        ("space 1", "resource: resource may contain only"),
        ("space:é", "resource: resource may contain only"),
        ("space\n1", "resource: resource may contain only"),
        (
            &long_resource,
            "resource: resource is 129 bytes, over the limit of 128",
        ),
    ] {
        refused(
            svc.create_kek(kek_req(ORG, resource)).await,
            Code::InvalidArgument,
            says,
        );
    }
    assert!(
        svc.create_kek(kek_req(ORG, &"r".repeat(128)))
            .await
            .unwrap()
            .into_inner()
            .created,
        "128 characters are fine"
    );
    let oversize = vec![0u8; 4097];
    refused(
        svc.generate_data_key(gdk_req(ORG, &kek, &oversize)).await,
        Code::InvalidArgument,
        "context is 4097 bytes, over the limit of 4096",
    );
    bad.decrypt(
        &mut svc,
        &blob,
        &oversize,
        "context is 4097 bytes, over the limit of 4096",
    )
    .await;
    refused(
        svc.create_kek(kek_req("no such org!", "space:1")).await,
        Code::InvalidArgument,
        "org_id:",
    );

    // Only the internal-service role uses the content-key API, and only for
    // its own org; it cannot use the admin API.
    for name in ["admin-acme", "reader-acme"] {
        let mut wrong = d.content(name).await;
        denied(wrong.create_kek(kek_req(ORG, "space:9")).await);
        denied(wrong.generate_data_key(gdk_req(ORG, &kek, context)).await);
        denied(wrong.decrypt(decrypt_req(ORG, &blob, context)).await);
    }
    denied(svc.create_kek(kek_req(GLOBEX, "space:9")).await);
    denied(
        svc.generate_data_key(gdk_req(GLOBEX, &globex_kek, context))
            .await,
    );
    denied(
        svc.decrypt(decrypt_req(GLOBEX, &foreign.wrapped_key, context))
            .await,
    );
    denied(globex.decrypt(decrypt_req(ORG, &blob, context)).await);
    let mut as_admin = d.client("service-acme").await;
    let active = keys_before.active_key_id.clone();
    denied(
        as_admin
            .list_keys(pb::ListKeysRequest { org_id: ORG.into() })
            .await,
    );
    denied(as_admin.get_key(key_req(&active)).await);
    denied(as_admin.revoke_key(key_req(&active)).await);
    denied(as_admin.preview_revocation(key_req(&active)).await);
    denied(
        as_admin
            .get_rotation(pb::GetRotationRequest { org_id: ORG.into() })
            .await,
    );
    denied(
        as_admin
            .set_byok(pb::SetByokRequest {
                org_id: ORG.into(),
                enabled: true,
            })
            .await,
    );
    denied(
        as_admin
            .list_audit_events(pb::ListAuditEventsRequest {
                org_id: ORG.into(),
                after_seq: 0,
                page_size: 10,
            })
            .await,
    );

    // Nothing changed: the keys, the KEKs, and the content key still opens.
    assert_eq!(list(&mut admin).await, keys_before);
    let preview_after = preview_revocation(&mut admin, ORG, &active).await;
    assert_eq!(
        preview_after.keks_wrapped_by_key,
        preview_before.keks_wrapped_by_key + 1,
        "only the 128-character resource's KEK was added"
    );
    let opened = svc
        .decrypt(decrypt_req(ORG, &blob, context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, made.plaintext);

    // Refused authorisation is audited in the org named by the request.
    let events = audit_log(&mut admin, ORG).await;
    for (actor, action) in [
        (control_plane::ADMIN_ACME, "create KEK"),
        (control_plane::READER_ACME, "decrypt"),
        (control_plane::SERVICE_ACME, "list keys"),
        (control_plane::SERVICE_GLOBEX, "decrypt"),
    ] {
        assert!(
            events.iter().any(|e| e.actor == actor
                && e.action == action
                && e.result.starts_with("PermissionDenied")),
            "refused {action} by {actor} audited"
        );
    }
}

/// Asserts a PERMISSION_DENIED that names the role needed.
fn denied<T: std::fmt::Debug>(result: Result<T, Status>) {
    let status = result.expect_err("denied");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("needs the"),
        "{}",
        status.message()
    );
}

/// Decrypt refusals with INVALID_ARGUMENT.
struct InvalidArgument;

impl InvalidArgument {
    async fn decrypt(&self, svc: &mut Content, blob: &[u8], context: &[u8], says: &str) {
        refused(
            svc.decrypt(decrypt_req(ORG, blob, context)).await,
            Code::InvalidArgument,
            says,
        );
    }
}

/// The three content-key calls on `kek` (one per `resource` for CreateKek), and
/// a Decrypt of `sample`; `Ok` only if all four succeed.
async fn content_calls(
    svc: &mut Content,
    kek: &str,
    resource: &str,
    sample: &ContentKey,
) -> Vec<Result<(), Status>> {
    vec![
        svc.generate_data_key(gdk_req(ORG, kek, b"new"))
            .await
            .map(drop),
        svc.decrypt(decrypt_req(ORG, &sample.wrapped, &sample.context))
            .await
            .map(drop),
        svc.create_kek(kek_req(ORG, resource)).await.map(drop),
        svc.create_kek(kek_req(ORG, "space:1")).await.map(drop),
    ]
}

fn all_blocked(results: Vec<Result<(), Status>>, state: &str) {
    for result in results {
        let status = result.expect_err("blocked");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let message = status.message();
        assert!(
            message.contains("master key") && message.contains(&format!("is {state}")),
            "{message}"
        );
        assert!(
            message.contains("nothing can be encrypted or decrypted"),
            "{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_blocks_content_keys_at_once_and_reactivation_restores_them() {
    let d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();
    let mut admin = d.client("admin-acme").await;
    set_byok(&mut admin, ORG, true).await;
    let master = upload_new_key(&mut admin, ORG, work.path(), "master", true).await;
    assert_eq!(master.state(), KeyState::Active);
    let master = master.key_id;

    let mut svc = d.content("service-acme").await;
    let keks: Vec<String> = create_keks(&svc, ORG, "space:", 3, 3)
        .await
        .into_iter()
        .map(|k| {
            assert_eq!(k.key_id, master);
            k.kek_id
        })
        .collect();
    let samples = generate_data_keys(&svc, ORG, &keks).await;
    // Every KEK is in the cache now.
    assert_all_decrypt(&svc, ORG, &samples).await;
    // A second replica on the same database, its cache warm too.
    let replica = d.start_replica().await;
    let mut other = replica.content("service-acme").await;
    assert_all_decrypt(&other, ORG, &samples).await;

    admin.revoke_key(key_req(&master)).await.unwrap();
    let revoked = Instant::now();
    let first = svc.generate_data_key(gdk_req(ORG, &keks[0], b"x")).await;
    let latency = revoked.elapsed();
    refused(first, Code::FailedPrecondition, "is revoked");
    assert!(
        latency < Duration::from_secs(1),
        "refused {latency:?} after the revocation returned"
    );
    all_blocked(
        content_calls(&mut svc, &keks[1], "space:new", &samples[2]).await,
        "revoked",
    );
    // The other replica's cache is emptied too (within its state TTL).
    let elsewhere = loop {
        match other.generate_data_key(gdk_req(ORG, &keks[0], b"x")).await {
            Err(status) => break (status, revoked.elapsed()),
            Ok(_) => {
                assert!(
                    revoked.elapsed() < Duration::from_secs(30),
                    "the other replica never saw the revocation"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    println!(
        "revocation: refused by this replica after {latency:?}, by the other after {:?}",
        elsewhere.1
    );
    refused(
        Err::<(), _>(elsewhere.0),
        Code::FailedPrecondition,
        "is revoked",
    );
    all_blocked(
        content_calls(&mut other, &keks[1], "space:new", &samples[2]).await,
        "revoked",
    );

    // Reactivation: everything works again, old content keys included.
    admin.reactivate_key(key_req(&master)).await.unwrap();
    for result in content_calls(&mut svc, &keks[1], "space:new", &samples[2]).await {
        result.unwrap();
    }
    assert_all_decrypt(&svc, ORG, &samples).await;
    let again = poll_until_ok(&mut other, &keks[0]).await;
    println!("reactivation seen by the other replica after {again:?}");
    assert_all_decrypt(&other, ORG, &samples).await;

    // Deleted: still blocked; restored (revoked): still blocked; reactivated: back.
    admin.revoke_key(key_req(&master)).await.unwrap();
    admin.delete_key(key_req(&master)).await.unwrap();
    all_blocked(
        content_calls(&mut svc, &keks[1], "space:newer", &samples[0]).await,
        "deleted",
    );
    admin.restore_key(key_req(&master)).await.unwrap();
    all_blocked(
        content_calls(&mut svc, &keks[1], "space:newer", &samples[0]).await,
        "revoked",
    );
    admin.reactivate_key(key_req(&master)).await.unwrap();
    assert_all_decrypt(&svc, ORG, &samples).await;
    let newer = svc
        .create_kek(kek_req(ORG, "space:newer"))
        .await
        .unwrap()
        .into_inner();
    assert!(newer.created, "nothing was created while blocked");
    assert_eq!(newer.key_id, master);
    poll_until_ok(&mut other, &keks[0]).await;
    assert_all_decrypt(&other, ORG, &samples).await;
    replica.stop().await;
}

/// Retries GenerateDataKey on `kek` until it succeeds (at most 30 s); returns
/// how long it took.
async fn poll_until_ok(svc: &mut Content, kek: &str) -> Duration {
    let start = Instant::now();
    loop {
        match svc.generate_data_key(gdk_req(ORG, kek, b"x")).await {
            Ok(_) => return start.elapsed(),
            Err(status) => {
                assert!(start.elapsed() < Duration::from_secs(30), "{status:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// KEKs wrapped by a rotating key and by the active key at once: two KEKs of
/// the old key are made unreadable in the database (their ciphertexts
/// swapped), so the rotation job re-wraps the others, leaves those two, and
/// stays running.
#[tokio::test(flavor = "multi_thread")]
async fn preview_revocation_counts_what_would_be_unreadable_and_changes_nothing() {
    let d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();
    let mut admin = d.client("admin-acme").await;
    let mut reader = d.client("reader-acme").await;
    let svc = d.content("service-acme").await;

    // The generic default key cannot be revoked.
    let generic = list(&mut admin).await.active_key_id;
    let preview = preview_revocation(&mut reader, ORG, &generic).await;
    assert!(!preview.revocable);
    assert_eq!(preview.key.unwrap().source(), KeySource::GenericDefault);

    set_byok(&mut admin, ORG, true).await;
    let old = upload_new_key(&mut admin, ORG, work.path(), "old", true)
        .await
        .key_id;
    let old_keks = create_keks(&svc, ORG, "old/", 6, 6).await;
    assert!(old_keks.iter().all(|k| k.key_id == old));
    swap_ciphertexts(&d, &old_keks[0].kek_id, &old_keks[1].kek_id).await;
    let new = upload_new_key(&mut admin, ORG, work.path(), "new", false)
        .await
        .key_id;
    admin.activate_key(key_req(&new)).await.unwrap();
    let job = wait_for_rotation(&mut reader, ORG, Duration::from_secs(30), |j| j.done == 4).await;
    assert_eq!(job.state(), RotationState::Running);
    assert_eq!((job.total, job.target_key_id.as_str()), (6, new.as_str()));
    let new_keks = create_keks(&svc, ORG, "new/", 3, 3).await;
    assert!(new_keks.iter().all(|k| k.key_id == new));
    let pending = upload_new_key(&mut admin, ORG, work.path(), "pending", false)
        .await
        .key_id;
    let listing = list(&mut admin).await;
    assert_eq!(state_of(&listing, &old), Some(KeyState::Rotating));

    let active = preview_revocation(&mut reader, ORG, &new).await;
    assert!(active.revocable);
    assert_eq!(active.key.as_ref().unwrap().state(), KeyState::Active);
    assert_eq!(active.keks_unreadable, 9, "the whole org is blocked");
    assert_eq!(active.resources_unreadable, 9);
    assert_eq!(active.keks_wrapped_by_key, 7);

    let rotating = preview_revocation(&mut reader, ORG, &old).await;
    assert!(!rotating.revocable, "only the active key can be revoked");
    assert_eq!(rotating.key.as_ref().unwrap().state(), KeyState::Rotating);
    assert_eq!(rotating.keks_unreadable, 0);
    assert_eq!(rotating.keks_wrapped_by_key, 2);

    let waiting = preview_revocation(&mut admin, ORG, &pending).await;
    assert!(!waiting.revocable);
    assert_eq!(waiting.key.as_ref().unwrap().state(), KeyState::Pending);
    assert_eq!(
        (waiting.keks_unreadable, waiting.keks_wrapped_by_key),
        (0, 0)
    );

    refused(
        reader
            .preview_revocation(key_req("key-0000000000000000"))
            .await,
        Code::NotFound,
        "the organisation has no key key-0000000000000000",
    );
    refused(
        reader.preview_revocation(key_req("no such key")).await,
        Code::InvalidArgument,
        "key_id:",
    );

    // Nothing changed: the keys, the job, and the counts.
    assert_eq!(list(&mut admin).await, listing);
    let job_after = admin
        .get_rotation(pb::GetRotationRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            job_after.job_id,
            job_after.state,
            job_after.done,
            job_after.total
        ),
        (job.job_id, job.state, job.done, job.total)
    );
    assert_eq!(preview_revocation(&mut reader, ORG, &new).await, active);
    assert_eq!(preview_revocation(&mut reader, ORG, &old).await, rotating);

    // The re-wrapped KEKs and the new ones serve content keys.
    let keks: Vec<String> = old_keks[2..]
        .iter()
        .chain(&new_keks)
        .map(|k| k.kek_id.clone())
        .collect();
    let samples = generate_data_keys(&svc, ORG, &keks).await;
    assert_all_decrypt(&svc, ORG, &samples).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_active_key_older_than_the_policy_is_flagged_rotation_due() {
    let d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();
    let mut admin = d.client("admin-acme").await;
    set_byok(&mut admin, ORG, true).await;
    let first = upload_new_key(&mut admin, ORG, work.path(), "first", true)
        .await
        .key_id;
    let second = upload_new_key(&mut admin, ORG, work.path(), "second", false)
        .await
        .key_id;
    let due = |listing: &pb::ListKeysResponse| -> Vec<String> {
        listing
            .keys
            .iter()
            .filter(|k| k.rotation_due)
            .map(|k| k.key_id.clone())
            .collect()
    };
    assert!(due(&list(&mut admin).await).is_empty());

    d.clock.advance(364 * DAY);
    assert!(due(&list(&mut admin).await).is_empty(), "not yet");
    d.clock.advance(2 * DAY);
    let listing = list(&mut admin).await;
    assert_eq!(due(&listing), vec![first.clone()], "only the active key");
    assert_eq!(listing.active_key_id, first);
    let got = admin.get_key(key_req(&first)).await.unwrap().into_inner();
    assert!(got.key.unwrap().rotation_due);
    assert!(got.active_key.unwrap().rotation_due);
    let got = admin.get_key(key_req(&second)).await.unwrap().into_inner();
    assert!(!got.key.unwrap().rotation_due, "a pending key is never due");
    assert!(got.active_key.unwrap().rotation_due);

    // Rotating to the pending key clears the flag: its age counts from now.
    let activated = admin
        .activate_key(key_req(&second))
        .await
        .unwrap()
        .into_inner();
    assert!(!activated.key.unwrap().rotation_due);
    let listing = list(&mut admin).await;
    assert_eq!(listing.active_key_id, second);
    assert!(due(&listing).is_empty(), "{listing:?}");
}

/// An org without BYOK (and a second one) on the generic default key: once it
/// is older than the rotation period the timers generate new material, move
/// both orgs onto it, re-wrap their KEKs, and destroy the old material only
/// then.
#[tokio::test(flavor = "multi_thread")]
async fn the_generic_default_key_renews_itself_and_rewraps_every_kek() {
    let d = Deployment::start().await;
    let mut admin = d.client("admin-acme").await;
    let svc = d.content("service-acme").await;
    let globex = d.content("service-globex").await;
    let keks: Vec<String> = create_keks(&svc, ORG, "space:", 6, 3)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let samples = generate_data_keys(&svc, ORG, &keks).await;
    let globex_keks: Vec<String> = create_keks(&globex, GLOBEX, "space:", 2, 2)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let globex_samples = generate_data_keys(&globex, GLOBEX, &globex_keks).await;
    let before = list(&mut admin).await;
    assert!(!before.byok_enabled);
    let old = before.keys[0].clone();
    assert_eq!(old.source(), KeySource::GenericDefault);
    let destroyed = tombstones(&d);

    d.advance(366 * DAY).await;
    let renewed = poll(Duration::from_secs(30), || {
        let (mut admin, old) = (admin.clone(), old.key_id.clone());
        async move {
            let listing = list(&mut admin).await;
            (listing.keys.len() == 1 && listing.active_key_id != old).then_some(listing)
        }
    })
    .await;
    let new = renewed.keys[0].clone();
    assert_eq!(new.source(), KeySource::GenericDefault);
    assert_eq!(new.state(), KeyState::Active);
    assert_ne!(new.key_check_value, old.key_check_value, "new material");
    assert!(!new.rotation_due);

    let job = wait_for_rotation(&mut admin, ORG, Duration::from_secs(30), |j| {
        j.state() == RotationState::Finished
    })
    .await;
    assert_eq!(job.target_key_id, new.key_id);
    assert_eq!(job.from_key_ids, vec![old.key_id.clone()]);
    assert_eq!((job.done, job.total), (6, 6));
    assert_eq!(
        preview_revocation(&mut admin, ORG, &new.key_id)
            .await
            .keks_wrapped_by_key,
        6
    );
    assert_all_decrypt(&svc, ORG, &samples).await;
    assert_all_decrypt(&globex, GLOBEX, &globex_samples).await;
    let fresh = generate_data_keys(&svc, ORG, &keks).await;
    assert_all_decrypt(&svc, ORG, &fresh).await;
    let kek = svc
        .clone()
        .create_kek(kek_req(ORG, "space:after"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kek.key_id, new.key_id);

    // Globex moved too, to the same material.
    let globex_keys = d
        .client("admin-globex")
        .await
        .list_keys(pb::ListKeysRequest {
            org_id: GLOBEX.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(globex_keys.keys.len(), 1);
    assert_eq!(globex_keys.keys[0].key_check_value, new.key_check_value);

    // The old material is destroyed once no org needs it.
    poll(Duration::from_secs(30), || async {
        (tombstones(&d) == destroyed + 1).then_some(())
    })
    .await;

    let events = audit_log(&mut admin, ORG).await;
    let service = |action: &str| {
        events
            .iter()
            .any(|e| e.actor == "service" && e.action == action && e.result == "ok")
    };
    for action in [
        "renew the generic default key".to_owned(),
        format!(
            "rotation started: re-wrapping the KEKs of {} to {}",
            old.key_id, new.key_id
        ),
        format!(
            "rotation finished for key {}: 0 KEKs wrapped by it (counted)",
            old.key_id
        ),
        format!(
            "rotation job {} finished: 6 of 6 KEKs re-wrapped to {}",
            job.job_id, new.key_id
        ),
    ] {
        assert!(service(&action), "{action:?} in {events:#?}");
    }
    let check = admin
        .verify_audit_log(pb::VerifyAuditLogRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(check.intact, "{}", check.problem);
}

/// Swaps the stored ciphertexts of two KEKs of the org, so that neither
/// unwraps any more (each is bound to its own id).
async fn swap_ciphertexts(d: &Deployment, a: &str, b: &str) {
    use sqlx::{Connection, Row, SqliteConnection};
    let url = format!("sqlite://{}", d.database().display());
    let mut db = SqliteConnection::connect(&url).await.unwrap();
    let mut tx = db.begin().await.unwrap();
    let mut wrapped = Vec::new();
    for kek in [a, b] {
        let row = sqlx::query("SELECT wrapped FROM keks WHERE org = ?1 AND kek_id = ?2")
            .bind(ORG)
            .bind(kek)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        wrapped.push(row.get::<Vec<u8>, _>("wrapped"));
    }
    assert_ne!(wrapped[0], wrapped[1]);
    for (kek, ciphertext) in [(a, &wrapped[1]), (b, &wrapped[0])] {
        let done = sqlx::query("UPDATE keks SET wrapped = ?3 WHERE org = ?1 AND kek_id = ?2")
            .bind(ORG)
            .bind(kek)
            .bind(ciphertext.as_slice())
            .execute(&mut *tx)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }
    tx.commit().await.unwrap();
    db.close().await.unwrap();
}

/// Destroyed keys leave a tombstone in the software keystore.
fn tombstones(d: &Deployment) -> usize {
    files(d.hsm.store.path())
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "destroyed"))
        .count()
}

/// Calls `check` every 50 ms until it returns something, for at most `limit`.
async fn poll<T, F, Fut>(limit: Duration, check: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(start.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stored KEK changed outside the service (its ciphertext swapped with
/// another KEK's) is the service's problem, not the caller's: INTERNAL, with
/// no detail, and the other content keys are unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_stored_kek_is_an_internal_error() {
    let mut d = Deployment::start().await;
    let svc = d.content("service-acme").await;
    let keks: Vec<String> = create_keks(&svc, ORG, "space:", 3, 1)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let samples = generate_data_keys(&svc, ORG, &keks).await;
    d.stop_control_plane().await;
    swap_ciphertexts(&d, &keks[0], &keks[1]).await;
    d.start_control_plane().await;
    let mut svc = d.content("service-acme").await;
    let sample = &samples[0];
    for result in [
        svc.decrypt(decrypt_req(ORG, &sample.wrapped, &sample.context))
            .await
            .map(drop),
        svc.generate_data_key(gdk_req(ORG, &keks[0], b"x"))
            .await
            .map(drop),
    ] {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert_eq!(
            status.message(),
            "internal error in the control plane; see its log"
        );
    }
    assert_all_decrypt(&svc, ORG, &samples[2..]).await;
}

/// A master key the HSM daemon no longer holds (destroyed there behind the
/// control plane's back, as a keystore restored from an older backup would
/// leave it): content-key calls get FAILED_PRECONDITION naming the key and
/// what brings it back, never INTERNAL.
#[tokio::test(flavor = "multi_thread")]
async fn a_master_key_gone_from_the_hsm_is_named_not_internal() {
    use sqlx::{Connection, Row, SqliteConnection};
    let mut d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();
    let mut admin = d.client("admin-acme").await;
    set_byok(&mut admin, ORG, true).await;
    let master = upload_new_key(&mut admin, ORG, work.path(), "master", true).await;
    let content = d.content("service-acme").await;
    let keks = create_keks(&content, ORG, "space:", 1, 1).await;
    let made = generate_data_keys(&content, ORG, &[keks[0].kek_id.clone()]).await;

    let url = format!("sqlite://{}", d.database().display());
    let mut db = SqliteConnection::connect(&url).await.unwrap();
    let handle: String = sqlx::query("SELECT handle FROM keys WHERE org = ?1 AND key_id = ?2")
        .bind(ORG)
        .bind(&master.key_id)
        .fetch_one(&mut db)
        .await
        .unwrap()
        .get("handle");
    db.close().await.unwrap();
    let mut hsm = d.hsm.pki.hsm_client(d.hsm.daemon.addr).await;
    hsm.destroy(cmk_proto::hsm::v1::DestroyRequest {
        key_handle: handle,
        org: ORG.into(),
    })
    .await
    .unwrap();
    // A fresh control plane: no KEK in its cache.
    d.restart().await;
    let mut content = d.content("service-acme").await;

    let opened = content
        .decrypt(pb::DecryptRequest {
            org_id: ORG.into(),
            wrapped_key: made[0].wrapped.clone(),
            context: made[0].context.clone(),
        })
        .await
        .unwrap_err();
    let created = content
        .create_kek(pb::CreateKekRequest {
            org_id: ORG.into(),
            resource: "space:new".into(),
        })
        .await
        .unwrap_err();
    for status in [opened, created] {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(&format!(
                "master key {} is no longer held by the HSM daemon",
                master.key_id
            )) && status
                .message()
                .contains("original material is uploaded again"),
            "{}",
            status.message()
        );
    }
}

/// Content keys wrapped in format 1 (under the KEK itself, before format 2
/// derived a key per content key) still decrypt through the API: one is made
/// here from the KEK, unwrapped through the HSM daemon as the control plane
/// does, exactly as the earlier format prescribes.
#[tokio::test(flavor = "multi_thread")]
async fn content_keys_wrapped_in_format_1_still_decrypt() {
    use aes_gcm::{
        Aes256Gcm, Nonce,
        aead::{AeadInOut, KeyInit},
    };
    use cmk_control_plane::envelope::kek_associated_data;
    use cmk_control_plane_domain::{KekId, OrgId};
    use sqlx::{Connection, Row, SqliteConnection};

    let d = Deployment::start().await;
    let mut content = d.content("service-acme").await;
    let kek = content
        .create_kek(pb::CreateKekRequest {
            org_id: ORG.into(),
            resource: "space:format-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let made = generate_data_keys(&content, ORG, std::slice::from_ref(&kek.kek_id)).await;
    assert_eq!(made[0].wrapped[0], 2, "new content keys are format 2");
    assert_eq!(made[0].wrapped.len(), 117);

    let url = format!("sqlite://{}", d.database().display());
    let mut db = SqliteConnection::connect(&url).await.unwrap();
    let wrapped_kek: Vec<u8> =
        sqlx::query("SELECT wrapped FROM keks WHERE org = ?1 AND kek_id = ?2")
            .bind(ORG)
            .bind(&kek.kek_id)
            .fetch_one(&mut db)
            .await
            .unwrap()
            .get("wrapped");
    db.close().await.unwrap();
    let org = OrgId::parse(ORG).unwrap();
    let kek_id = KekId::parse(&kek.kek_id).unwrap();
    let mut hsm = d.hsm.pki.hsm_client(d.hsm.daemon.addr).await;
    let kek_bytes = hsm
        .unwrap(cmk_proto::hsm::v1::UnwrapRequest {
            ciphertext: wrapped_kek,
            associated_data: kek_associated_data(&org, &kek_id),
            org: ORG.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;

    // Format 1: version, KEK id, random nonce, AES-256-GCM under the KEK; the
    // associated data a label, version and KEK id, and the length-prefixed org
    // and context.
    let content_key = [0x5a; 32];
    let context = b"doc/format-1".to_vec();
    let nonce = [7u8; 12];
    let mut blob = vec![1u8];
    blob.extend_from_slice(kek.kek_id.as_bytes());
    let mut aad = b"cmk/content-key/v1\0".to_vec();
    aad.extend_from_slice(&blob);
    for field in [ORG.as_bytes(), &context[..]] {
        aad.extend_from_slice(&(field.len() as u64).to_be_bytes());
        aad.extend_from_slice(field);
    }
    let mut body = content_key.to_vec();
    let tag = Aes256Gcm::new_from_slice(&kek_bytes)
        .unwrap()
        .encrypt_inout_detached(&Nonce::from(nonce), &aad, body.as_mut_slice().into())
        .unwrap();
    blob.extend_from_slice(&nonce);
    blob.extend_from_slice(&body);
    blob.extend_from_slice(&tag);
    assert_eq!(blob.len(), 97);

    let opened = content
        .decrypt(pb::DecryptRequest {
            org_id: ORG.into(),
            wrapped_key: blob.clone(),
            context: context.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, content_key);
    assert_eq!(opened.kek_id, kek.kek_id);
    // Bound to its context like any content key.
    let refused = content
        .decrypt(pb::DecryptRequest {
            org_id: ORG.into(),
            wrapped_key: blob,
            context: b"doc/other".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_all_decrypt(&content, ORG, &made).await;
}
