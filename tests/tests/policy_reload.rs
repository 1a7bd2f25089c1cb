//! The real `control-plane` binary follows its authorisation policy file
//! without a restart: a removed grant stops working within seconds, a file
//! that does not parse leaves the last good policy in force (and the log
//! says why), and SIGHUP reloads at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cmk_proto::control::v1 as pb;
use cmk_tests::{
    ANY_PORT, DaemonProcess, Pki, binary,
    control_plane::{Admin, POLICY, admin_at},
    control_plane_command, logged_in_file, scrape_metrics, wait_healthy,
};
use tonic::Code;

/// The read-only admin's grant in the tests' policy.
const READER_GRANT: &str = r#"[[grant]]
identity = "spiffe://cmk.test/reader/acme"
org = "acme"
role = "read-only"
"#;

/// Not TOML: a table header left open on line 5.
const BROKEN: &str = r#"[[grant]]
identity = "spiffe://cmk.test/admin/acme"
org = "acme"
role = "admin"
[[grant
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_reloads_without_a_restart() {
    let pki = Pki::new();
    let keystore = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&pki, keystore.path(), ANY_PORT).await;
    let log = data.path().join("control-plane.log");
    let mut control_plane = Killed(
        control_plane_command(
            &binary("control-plane"),
            &pki,
            daemon.addr,
            data.path(),
            ANY_PORT,
        )
        .arg("--metrics-listen")
        .arg(ANY_PORT.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let child = &mut control_plane.0;
    let addr = logged_in_file(&log, 0, child, "grpc").await.unwrap();
    let metrics = logged_in_file(&log, 0, child, "metrics").await.unwrap();
    wait_healthy(addr, &pki.client_files("admin-acme")).await;
    let policy = data.path().join("policy.toml");
    let mut admin = admin_at(&pki, addr, "admin-acme").await;
    let mut reader = admin_at(&pki, addr, "reader-acme").await;
    assert_eq!(list(&mut reader).await, Code::Ok);

    // A grant removed from the file stops working within the poll interval
    // (2 s), and nobody else's changes.
    let without_reader = POLICY.replace(READER_GRANT, "");
    assert_ne!(without_reader, POLICY);
    replace(&policy, &without_reader);
    let removed = Instant::now();
    until(
        "the removed grant is refused",
        Duration::from_secs(10),
        async || list(&mut reader).await == Code::PermissionDenied,
    )
    .await;
    assert!(
        removed.elapsed() < Duration::from_secs(5),
        "{:?}",
        removed.elapsed()
    );
    assert_eq!(list(&mut admin).await, Code::Ok);
    assert!(logged(&log).contains("authorisation policy reloaded"));

    // A file that does not parse: refused with its reason; the last good
    // policy stays in force.
    replace(&policy, BROKEN);
    until(
        "the broken file is refused",
        Duration::from_secs(10),
        async || logged(&log).contains("authorisation policy file refused"),
    )
    .await;
    let refusal = logged(&log)
        .lines()
        .find(|l| l.contains("authorisation policy file refused"))
        .unwrap()
        .to_owned();
    assert!(
        refusal.contains(&policy.display().to_string()) && refusal.contains("line 5"),
        "the warning names the file and the line: {refusal}"
    );
    assert_eq!(list(&mut admin).await, Code::Ok, "still served");
    assert_eq!(list(&mut reader).await, Code::PermissionDenied);
    assert!(child.try_wait().unwrap().is_none(), "still running");

    // SIGHUP reloads at once, whether or not a poll got there first: the
    // reload it makes is logged as its own.
    replace(&policy, POLICY);
    let status = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    until(
        "SIGHUP reloads the policy",
        Duration::from_secs(2),
        async || {
            logged(&log)
                .lines()
                .any(|l| l.contains("authorisation policy reloaded") && l.contains("SIGHUP"))
        },
    )
    .await;
    assert_eq!(list(&mut reader).await, Code::Ok, "the grant is back");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP does not stop it"
    );

    let (_, body) = scrape_metrics(metrics);
    let sample = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
    };
    assert!(sample(r#"cmk_authz_policy_reloads_total{outcome="applied"}"#) >= 2.0);
    assert!(sample(r#"cmk_authz_policy_reloads_total{outcome="refused"}"#) >= 1.0);
    assert_eq!(sample("cmk_authz_policy_identities"), 5.0);
}

/// The code `ListKeys` on `acme` answers with.
async fn list(client: &mut Admin) -> Code {
    let request = pb::ListKeysRequest {
        org_id: "acme".into(),
    };
    match client.list_keys(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Replaces `path` with `text` at once, as a deployment tool (or the
/// kubelet's symlink swap) does: a reader never sees it half-written.
fn replace(path: &Path, text: &str) {
    let next = path.with_extension("toml.next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

fn logged(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits until `done`, for up to `limit`.
async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
