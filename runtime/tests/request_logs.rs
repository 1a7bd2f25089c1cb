//! What the metrics layer logs. A test binary of its own: tracing caches
//! whether a call site is enabled process-wide, so a thread-local subscriber
//! only sees every line when no other test runs beside it.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use cmk_runtime::metrics::GrpcMetrics;
use prometheus_client::registry::Registry;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;

use common::{connect, serve_health, with_id};

#[tokio::test]
async fn one_line_per_request_in_its_span_and_never_a_body() {
    // A current-thread runtime runs the server on this thread, so a
    // thread-local subscriber sees its log lines.
    let logs = Logs::default();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("cmk_runtime=debug"))
            .with_writer({
                let logs = logs.clone();
                move || logs.clone()
            })
            .finish(),
    );
    let mut registry = Registry::default();
    let metrics =
        GrpcMetrics::register(&mut registry, &[tonic_health::pb::FILE_DESCRIPTOR_SET]).unwrap();
    let (addr, _stop) = serve_health(&metrics).await;
    let mut health = HealthClient::new(connect(addr).await);

    health
        .check(with_id("cmk.Test", Some("client-id_1.a")))
        .await
        .unwrap();
    let status = health
        .check(with_id("not-a-service", Some("trace-me-42")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    health.check(with_id("cmk.Test", None)).await.unwrap();

    let logs = logs.text();
    let finished: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("request finished"))
        .collect();
    assert_eq!(finished.len(), 3, "{logs}");
    let line = |id: &str| {
        *finished
            .iter()
            .find(|l| l.contains(&format!(r#""request_id":"{id}""#)))
            .unwrap()
    };
    let ok = line("client-id_1.a");
    assert!(ok.contains(r#""level":"DEBUG""#), "{ok}");
    assert!(ok.contains(r#""code":"Ok""#), "{ok}");
    let not_found = line("trace-me-42");
    assert!(not_found.contains(r#""level":"INFO""#), "{not_found}");
    assert!(not_found.contains(r#""code":"NotFound""#), "{not_found}");
    assert!(
        not_found.contains(r#""method":"/grpc.health.v1.Health/Check""#),
        "{not_found}"
    );
    assert!(not_found.contains(r#""latency_ms":"#), "{not_found}");
    assert!(
        finished.iter().all(|l| l.contains(r#""request_id":""#)),
        "{logs}"
    );
    // The service names travel in the request bodies.
    assert!(!logs.contains("not-a-service"), "{logs}");
    assert!(!logs.contains("cmk.Test"), "{logs}");
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
