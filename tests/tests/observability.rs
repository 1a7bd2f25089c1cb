//! End-to-end: both real binaries with Prometheus metrics and JSON logs on,
//! as a deployment runs them. Requests are counted by method and status
//! code on both sides, the control plane's HSM calls, KEK cache and
//! rotations have their own series, every log line is JSON, a request's
//! lines carry its request id, and no key material reaches a log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cmk_proto::control::v1::{
    self as pb, content_key_service_client::ContentKeyServiceClient,
    key_admin_service_client::KeyAdminServiceClient,
};
use cmk_tests::{ANY_PORT, channel, scrape_metrics as scrape, walkthrough::Setup};
use tonic::{Code, Request};

const ORG: &str = "acme";

/// The value of the series `series` (name and labels, exactly as exposed).
fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{metrics}"))
        .parse()
        .unwrap()
}

fn with_id<T>(message: T, id: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn both_processes_expose_metrics_and_log_json_lines_with_request_ids() {
    let any = ANY_PORT.to_string();
    let setup = Setup::start_with(
        &["--metrics-listen", &any, "--log-format", "json"],
        &["--metrics-listen", &any, "--log-format", "json"],
    )
    .await;
    let hsm_metrics = setup.addr("hsm-daemon", "metrics");
    let cp_metrics = setup.addr("control-plane", "metrics");
    let files = |stem: &str| cmk_tls::TlsFiles {
        cert: setup.dev.join(format!("pki/{stem}.crt")),
        key: setup.dev.join(format!("pki/{stem}.key")),
        ca: setup.dev.join("pki/ca.crt"),
    };
    let mut admin =
        KeyAdminServiceClient::new(channel(setup.listen, &files("admin")).await.unwrap());
    let mut reader =
        KeyAdminServiceClient::new(channel(setup.listen, &files("reader")).await.unwrap());
    let mut service =
        ContentKeyServiceClient::new(channel(setup.listen, &files("service")).await.unwrap());

    // A request id the caller gives comes back, and names its log lines.
    let listed = admin
        .list_keys(with_id(
            pb::ListKeysRequest { org_id: ORG.into() },
            "obs-list-1",
        ))
        .await
        .unwrap();
    assert_eq!(listed.metadata().get("x-request-id").unwrap(), "obs-list-1");
    let denied = reader
        .set_byok(with_id(
            pb::SetByokRequest {
                org_id: ORG.into(),
                enabled: true,
            },
            "obs-denied-2",
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        denied.metadata().get("x-request-id").unwrap(),
        "obs-denied-2"
    );
    // One is made up when the caller gives none.
    let made = admin
        .list_keys(pb::ListKeysRequest { org_id: ORG.into() })
        .await
        .unwrap();
    let id = made
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(id.len(), 32, "{id}");

    // Content keys: a KEK, a data key, and two decryptions, which find the
    // unwrapped KEK in the cache.
    let kek = service
        .create_kek(pb::CreateKekRequest {
            org_id: ORG.into(),
            resource: "space:obs".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let data_key = service
        .generate_data_key(pb::GenerateDataKeyRequest {
            org_id: ORG.into(),
            kek_id: kek.kek_id.clone(),
            context: b"doc/obs".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let opened = service
            .decrypt(pb::DecryptRequest {
                org_id: ORG.into(),
                wrapped_key: data_key.wrapped_key.clone(),
                context: b"doc/obs".to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(opened.plaintext == data_key.plaintext);
    }

    let (status, cp) = scrape(cp_metrics);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let admin_api = "/cmk.control.v1.KeyAdminService";
    let content_api = "/cmk.control.v1.ContentKeyService";
    for (series, expected) in [
        (
            format!("cmk_grpc_requests_total{{method=\"{admin_api}/ListKeys\",code=\"Ok\"}}"),
            2.0,
        ),
        (
            format!(
                "cmk_grpc_requests_total{{method=\"{admin_api}/SetByok\",code=\"PermissionDenied\"}}"
            ),
            1.0,
        ),
        (
            format!("cmk_grpc_requests_total{{method=\"{content_api}/Decrypt\",code=\"Ok\"}}"),
            2.0,
        ),
        (
            format!("cmk_grpc_request_duration_seconds_count{{method=\"{admin_api}/ListKeys\"}}"),
            2.0,
        ),
        ("cmk_rotation_jobs_active".into(), 0.0),
    ] {
        assert_eq!(value(&cp, &series), expected, "{series}");
    }
    assert!(value(&cp, "cmk_kek_cache_lookups_total{result=\"hit\"}") >= 2.0);
    // CreateKek had the HSM daemon wrap the new KEK; content keys are
    // wrapped here, under the unwrapped KEK.
    assert_eq!(
        value(
            &cp,
            "cmk_hsm_call_duration_seconds_count{method=\"Wrap\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert!(cp.contains("cmk_grpc_request_duration_seconds_bucket{le=\"0.005\",method=\"/cmk.control.v1.KeyAdminService/ListKeys\"}")
        || cp.contains("cmk_grpc_request_duration_seconds_bucket{method=\"/cmk.control.v1.KeyAdminService/ListKeys\",le=\"0.005\"}"),
        "{cp}");
    assert!(cp.contains("cmk_rotation_keks_rewrapped_total 0"), "{cp}");
    assert!(cp.trim_end().ends_with("# EOF"), "{cp}");

    let (status, hsm) = scrape(hsm_metrics);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        value(
            &hsm,
            "cmk_grpc_requests_total{method=\"/cmk.hsm.v1.HsmService/Wrap\",code=\"Ok\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &hsm,
            "cmk_grpc_requests_total{method=\"/grpc.health.v1.Health/Check\",code=\"Ok\"}"
        ) >= 1.0
    );

    logs_checked(&setup, &data_key.plaintext);
}

/// Every line of both processes' logs is a JSON object; the refused
/// request's line carries its id, method and code; no content key appears.
fn logs_checked(setup: &Setup, content_key: &[u8]) {
    let secrets = [
        hex::encode(content_key),
        hex::encode_upper(content_key),
        format!("{content_key:?}"),
    ];
    let mut denied_line = None;
    for program in ["hsm-daemon", "control-plane"] {
        let path = setup.dev.join(format!("logs/{program}.err.log"));
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(!log.is_empty(), "{program} logged nothing");
        for line in log.lines() {
            let json: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{program}: not a JSON line ({e}): {line}"));
            for secret in &secrets {
                assert!(
                    !line.contains(secret.as_str()),
                    "{program} logged a content key: {line}"
                );
            }
            if json["span"]["request_id"] == "obs-denied-2" && json["fields"].get("code").is_some()
            {
                denied_line = Some(json);
            }
        }
    }
    let line = denied_line.expect("a log line of the refused request with its id");
    assert_eq!(
        line["span"]["method"], "/cmk.control.v1.KeyAdminService/SetByok",
        "{line}"
    );
    assert_eq!(line["fields"]["code"], "PermissionDenied", "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
}
