//! The data path is audited: content-key calls, served and refused, reach the
//! org's chained audit log as counts per (caller, KEK, operation, result,
//! minute), within one flush interval while running and at a clean stop.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use cmk_proto::control::v1 as pb;
use cmk_tests::control_plane::{
    self, Deployment, assert_all_decrypt, audit_log, create_keks, generate_data_keys,
};

const ORG: &str = "acme";
const SERVICE: &str = "spiffe://cmk.test/service/acme";

/// The count in an action such as `generate data key ×12`, summed over the
/// rows of `action` by the service with `result` (and the KEK, if given).
fn counted(log: &[pb::AuditEvent], action: &str, kek: Option<&str>, result: &str) -> u64 {
    log.iter()
        .filter(|e| e.actor == SERVICE && e.result.starts_with(result))
        .filter(|e| kek.is_none_or(|k| e.key_id == k))
        .filter_map(|e| e.action.strip_prefix(&format!("{action} ×")))
        .map(|n| n.parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn content_key_calls_are_counted_into_the_audit_log() {
    let mut d = Deployment::start().await;
    let mut admin = d.client("admin-acme").await;
    control_plane::set_byok(&mut admin, ORG, false).await;
    let content = d.content("service-acme").await;

    let keks: Vec<String> = create_keks(&content, ORG, "space-", 3, 3)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let mut made = Vec::new();
    for _ in 0..4 {
        made.extend(generate_data_keys(&content, ORG, &keks).await);
    }
    assert_all_decrypt(&content, ORG, &made).await;
    // Refused after authorisation: a blob that is no content key, and a
    // request whose KEK id is malformed.
    let mut client = content.clone();
    let refused = client
        .decrypt(pb::DecryptRequest {
            org_id: ORG.into(),
            wrapped_key: vec![7; 64],
            context: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let malformed = client
        .generate_data_key(pb::GenerateDataKeyRequest {
            org_id: ORG.into(),
            kek_id: "not a kek id".into(),
            context: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);

    // Within one flush interval (10 s), while the control plane runs.
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = audit_log(&mut admin, ORG).await;
        if counted(&log, "decrypt", None, "ok") == 12 {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "content-key calls not in the log: {log:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(counted(&log, "create KEK", None, "ok"), 3);
    for kek in &keks {
        assert_eq!(
            counted(&log, "generate data key", Some(kek), "ok"),
            4,
            "{kek}"
        );
        assert_eq!(counted(&log, "decrypt", Some(kek), "ok"), 4, "{kek}");
    }
    assert_eq!(
        counted(&log, "decrypt", None, "InvalidArgument"),
        1,
        "{log:#?}"
    );
    assert_eq!(
        counted(&log, "generate data key", None, "InvalidArgument"),
        1,
        "{log:#?}"
    );

    // Calls counted after the last flush are written by a clean stop.
    generate_data_keys(&content, ORG, &keks[..1]).await;
    d.stop_control_plane().await;
    d.start_control_plane().await;
    let mut admin = d.client("admin-acme").await;
    let log = audit_log(&mut admin, ORG).await;
    assert_eq!(counted(&log, "generate data key", Some(&keks[0]), "ok"), 5);
    let verified = admin
        .verify_audit_log(pb::VerifyAuditLogRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(verified.intact, "{}", verified.problem);
}
