//! The real `hsm-daemon` and `control-plane` binaries with client CRLs
//! (`tls_client_crls`) and strict client identities: a revoked certificate
//! cannot finish the handshake while another one of the same identity is
//! served, a renewed CRL takes effect without a restart, and a certificate
//! that names no single URI identity is refused with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    path::Path,
    time::{Duration, Instant},
};

use cmk_pki::Ca;
use cmk_proto::{
    control::v1::{ListKeysRequest, key_admin_service_client::KeyAdminServiceClient},
    hsm::v1::{GetImportPublicKeyRequest, hsm_service_client::HsmServiceClient},
};
use cmk_tests::{
    ANY_PORT, CONTROL_PLANE, ControlPlaneProcess, DaemonProcess, INTRUDER, Pki, ROOT_KEY_HEX,
    control_plane::{ADMIN_ACME, IDENTITIES, SERVICE_ACME},
};
use tonic::{Code, Status};

/// The tests' PKI, as `Pki::new` writes it, but issued by `ca`, which the
/// test keeps to issue CRLs and more certificates.
fn pki_of(ca: &Ca) -> Pki {
    let pki = Pki {
        dir: tempfile::tempdir().unwrap(),
    };
    let dir = pki.dir.path();
    ca.write_cert(&dir.join("ca.crt")).unwrap();
    ca.server(&["localhost"])
        .unwrap()
        .write(dir, "server")
        .unwrap();
    ca.client(CONTROL_PLANE)
        .unwrap()
        .write(dir, "control-plane")
        .unwrap();
    for (identity, name) in IDENTITIES {
        ca.client(identity).unwrap().write(dir, name).unwrap();
    }
    let root = dir.join("root.key");
    std::fs::write(&root, ROOT_KEY_HEX).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o600)).unwrap();
    pki
}

/// A call to the HSM daemon at `addr` with the certificate `<name>.crt`.
async fn call_hsm(pki: &Pki, addr: std::net::SocketAddr, name: &str) -> Result<(), Status> {
    let channel = pki
        .channel(addr, name)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    HsmServiceClient::new(channel)
        .get_import_public_key(GetImportPublicKeyRequest {})
        .await
        .map(drop)
}

/// A call to the control plane at `addr` with the certificate `<name>.crt`.
async fn call_control_plane(
    pki: &Pki,
    addr: std::net::SocketAddr,
    name: &str,
) -> Result<(), Status> {
    let channel = pki
        .channel(addr, name)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    KeyAdminServiceClient::new(channel)
        .list_keys(ListKeysRequest {
            org_id: "acme".into(),
        })
        .await
        .map(drop)
}

/// Refused at the handshake: the call never reached a service, so it
/// failed as a transport error on the client's side (UNAVAILABLE, UNKNOWN or
/// CANCELLED, by when the client saw the server's alert), never with a
/// status a service gives, such as PERMISSION_DENIED.
fn assert_refused_at_handshake(result: Result<(), Status>, what: &str) {
    let status = result.expect_err(what);
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{what}: {status:?}"
    );
}

fn write_crl(path: &Path, crl: cmk_pki::Crl) {
    // Written whole in one step, as a CA tool or cert-manager would.
    let tmp = path.with_extension("tmp");
    crl.write(&tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_clients_are_refused_at_the_handshake_until_a_renewed_crl_lets_them_in() {
    let ca = Ca::new("cmk test CA").unwrap();
    let pki = pki_of(&ca);
    // Certificates of the same identities, since replaced: only their
    // revocation tells them from the current ones.
    let old_control_plane = ca.client(CONTROL_PLANE).unwrap();
    old_control_plane
        .write(pki.dir.path(), "control-plane-old")
        .unwrap();
    let old_admin = ca.client(ADMIN_ACME).unwrap();
    old_admin.write(pki.dir.path(), "admin-acme-old").unwrap();
    let hsm_crl = pki.path("hsm-clients.crl");
    let cp_crl = pki.path("cp-clients.crl");
    write_crl(&hsm_crl, ca.crl(&[&old_control_plane]).unwrap());
    // DER on one side, PEM on the other: both are read.
    std::fs::write(&cp_crl, ca.crl(&[&old_admin]).unwrap().der).unwrap();

    let store = tempfile::tempdir().unwrap();
    let hsm = DaemonProcess::start_with(
        &pki,
        store.path(),
        ANY_PORT,
        &[("CMK_HSM_TLS_CLIENT_CRLS", hsm_crl.to_str().unwrap())],
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::start(
        &pki,
        hsm.addr,
        data.path(),
        ANY_PORT,
        &[("CMK_CP_TLS_CLIENT_CRLS", cp_crl.to_str().unwrap())],
    )
    .await;

    call_hsm(&pki, hsm.addr, "control-plane").await.unwrap();
    assert_refused_at_handshake(
        call_hsm(&pki, hsm.addr, "control-plane-old").await,
        "the HSM daemon refuses the revoked certificate",
    );
    call_control_plane(&pki, cp.addr, "admin-acme")
        .await
        .unwrap();
    assert_refused_at_handshake(
        call_control_plane(&pki, cp.addr, "admin-acme-old").await,
        "the control plane refuses the revoked certificate",
    );

    // Renewed CRLs that revoke nothing: no restart, and within the reload
    // interval (plus the time a call takes) both are served again.
    write_crl(&hsm_crl, ca.crl(&[]).unwrap());
    write_crl(&cp_crl, ca.crl(&[]).unwrap());
    let changed = Instant::now();
    let deadline = cmk_tls::RELOAD_INTERVAL + Duration::from_secs(5);
    let (mut hsm_back, mut cp_back) = (None, None);
    while (hsm_back.is_none() || cp_back.is_none()) && changed.elapsed() < deadline {
        if hsm_back.is_none() && call_hsm(&pki, hsm.addr, "control-plane-old").await.is_ok() {
            hsm_back = Some(changed.elapsed());
        }
        if cp_back.is_none()
            && call_control_plane(&pki, cp.addr, "admin-acme-old")
                .await
                .is_ok()
        {
            cp_back = Some(changed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        hsm_back.is_some(),
        "the HSM daemon still refuses after {deadline:?}"
    );
    assert!(
        cp_back.is_some(),
        "the control plane still refuses after {deadline:?}"
    );
    // The current certificates were never affected.
    call_hsm(&pki, hsm.addr, "control-plane").await.unwrap();
    call_control_plane(&pki, cp.addr, "admin-acme")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_exactly_one_uri_san_is_refused_with_the_reason() {
    let ca = Ca::new("cmk test CA").unwrap();
    let pki = pki_of(&ca);
    let dir = pki.dir.path();
    // Two URI SANs, one of them allowed or granted.
    ca.client_with_names(CONTROL_PLANE, &[CONTROL_PLANE, INTRUDER], &[])
        .unwrap()
        .write(dir, "two-uris-hsm")
        .unwrap();
    ca.client_with_names(ADMIN_ACME, &[SERVICE_ACME, ADMIN_ACME], &[])
        .unwrap()
        .write(dir, "two-uris-cp")
        .unwrap();
    // No SAN, and the allowed identity as its common name: once taken as
    // the identity, now refused unless common names are allowed.
    ca.client_with_common_name(CONTROL_PLANE)
        .unwrap()
        .write(dir, "cn-hsm")
        .unwrap();
    ca.client_with_common_name(ADMIN_ACME)
        .unwrap()
        .write(dir, "cn-cp")
        .unwrap();

    let store = tempfile::tempdir().unwrap();
    let hsm = DaemonProcess::start(&pki, store.path(), ANY_PORT).await;
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::start(&pki, hsm.addr, data.path(), ANY_PORT, &[]).await;

    let two = "client certificate carries 2 URI SANs; exactly one is required";
    let none = "client certificate carries no URI SAN; exactly one is required";
    for (result, message) in [
        (call_hsm(&pki, hsm.addr, "two-uris-hsm").await, two),
        (call_hsm(&pki, hsm.addr, "cn-hsm").await, none),
        (call_control_plane(&pki, cp.addr, "two-uris-cp").await, two),
        (call_control_plane(&pki, cp.addr, "cn-cp").await, none),
    ] {
        let status = result.expect_err(message);
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().starts_with(message), "{status:?}");
    }
    call_hsm(&pki, hsm.addr, "control-plane").await.unwrap();
    call_control_plane(&pki, cp.addr, "admin-acme")
        .await
        .unwrap();
}
