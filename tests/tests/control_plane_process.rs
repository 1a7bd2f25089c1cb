//! The real `control-plane` binary, started as a user or Kubernetes would,
//! against the real `hsm-daemon` binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use cmk_proto::control::v1::{self as pb, key_admin_service_client::KeyAdminServiceClient};
use cmk_tests::{
    ANY_PORT, DaemonProcess, Pki, binary, control_plane_command, spawn_server, wait_healthy,
};

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_serves_the_admin_api_and_stops_on_sigterm() {
    let pki = Pki::new();
    let keystore = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&pki, keystore.path(), ANY_PORT).await;
    let (child, mut listeners) = spawn_server(&mut control_plane_command(
        &binary("control-plane"),
        &pki,
        daemon.addr,
        data.path(),
        ANY_PORT,
    ));
    let mut child = Killed(child);
    let addr = listeners.addr("grpc").await;
    wait_healthy(addr, &pki.client_files("admin-acme")).await;

    let listing = KeyAdminServiceClient::new(pki.channel(addr, "admin-acme").await.unwrap())
        .list_keys(pb::ListKeysRequest {
            org_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listing.keys.len(), 1, "the generic default key");
    assert_eq!(listing.active_key_id, listing.keys[0].key_id);

    // Reflection v1alpha, as grpcurl uses it (Python grpcio stands in for it).
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/reflection_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(addr.to_string())
        .arg(pki.path("ca.crt"))
        .arg(pki.path("reader-acme.crt"))
        .arg(pki.path("reader-acme.key"))
        .arg("cmk.control.v1.KeyAdminService")
        .arg(r#"{"org_id": "acme"}"#)
        .output()
        .expect("python3 (with grpcio and grpcio-reflection) is required");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reflection client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "service cmk.control.v1.KeyAdminService",
        "service grpc.health.v1.Health",
        "method UploadKey",
        "method RestoreKey",
        "method VerifyAuditLog",
        "key_id ",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("cmk.hsm"), "only its own API: {stdout}");

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.0.wait().unwrap().success(), "a clean exit on SIGTERM");
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_bad_configuration_is_refused_with_every_problem_named() {
    let out = Command::new(binary("control-plane"))
        .arg("--listen")
        .arg("nowhere")
        .arg("--hsm-endpoint")
        .arg("http://127.0.0.1:7443")
        .arg("--database")
        .arg("mysql://db")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for expected in [
        "tls_cert: required",
        "hsm_tls_key: required",
        "policy_file: required",
        "listen: invalid socket address",
        "hsm_endpoints: \"http://127.0.0.1:7443\" must be an https:// URL",
        "database: \"mysql://db\" is neither a sqlite:// nor a postgres:// URL",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
    }
}
