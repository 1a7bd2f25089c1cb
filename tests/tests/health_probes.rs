//! `health_listen`: both binaries answer gRPC health in plaintext on a second
//! port, for Kubernetes' native probes (which cannot present a client
//! certificate), and serve nothing else there.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;

use cmk_proto::{
    control::v1::{ListKeysRequest, key_admin_service_client::KeyAdminServiceClient},
    hsm::v1::{GetImportPublicKeyRequest, hsm_service_client::HsmServiceClient},
};
use cmk_tests::{ANY_PORT, walkthrough::Setup};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn plaintext(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_answer_in_plaintext_and_serve_nothing_else() {
    let any = ANY_PORT.to_string();
    let setup = Setup::start_with(&["--health-listen", &any], &["--health-listen", &any]).await;
    let hsm_probe = setup.addr("hsm-daemon", "health");
    let cp_probe = setup.addr("control-plane", "health");
    for (probe, service) in [
        (hsm_probe, "cmk.hsm.v1.HsmService"),
        (cp_probe, "cmk.control.v1.KeyAdminService"),
    ] {
        let mut health = HealthClient::new(plaintext(probe).await);
        for name in ["", service] {
            let status = health
                .check(HealthCheckRequest {
                    service: name.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{probe} {name:?}");
        }
    }
    // The probe port is not a way around mutual TLS.
    let refused = HsmServiceClient::new(plaintext(hsm_probe).await)
        .get_import_public_key(GetImportPublicKeyRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    let refused = KeyAdminServiceClient::new(plaintext(cp_probe).await)
        .list_keys(ListKeysRequest {
            org_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
}
