//! The gRPC metrics layer on a real tonic server, read back through a real
//! `GET /metrics`.

#![allow(clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use cmk_runtime::metrics::{GrpcMetrics, OPENMETRICS_CONTENT_TYPE, serve_metrics};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tonic::{
    Code, Request, codegen::http::uri::PathAndQuery, metadata::MetadataMap, transport::Server,
};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response, health_client::HealthClient,
};

use common::{connect, serve_health, with_id};

const CHECK: &str = "/grpc.health.v1.Health/Check";
const WATCH: &str = "/grpc.health.v1.Health/Watch";

#[tokio::test]
async fn counts_times_and_labels_every_request() {
    let mut registry = Registry::default();
    let metrics =
        GrpcMetrics::register(&mut registry, &[tonic_health::pb::FILE_DESCRIPTOR_SET]).unwrap();
    let scrape = serve_metrics(Some(([127, 0, 0, 1], 0).into()), Arc::new(registry))
        .await
        .unwrap()
        .unwrap();
    let (grpc, _stop) = serve_health(&metrics).await;
    let channel = connect(grpc).await;
    let mut health = HealthClient::new(channel.clone());

    // Ok, with its status in the trailers; a valid id comes back as sent.
    let response = health
        .check(with_id("cmk.Test", Some("client-id_1.a")))
        .await
        .unwrap();
    assert_eq!(request_id(response.metadata()), "client-id_1.a");

    // Invalid ids are replaced, not echoed.
    for invalid in ["has space", &"x".repeat(65)] {
        let response = health
            .check(with_id("cmk.Test", Some(invalid)))
            .await
            .unwrap();
        assert_generated(request_id(response.metadata()));
    }

    // NotFound, trailers-only: the status and the id are in the headers.
    let status = health
        .check(with_id("not-a-service", Some("trace-me-42")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(request_id(status.metadata()), "trace-me-42");
    let status = health
        .check(with_id("not-a-service", None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_generated(request_id(status.metadata()));

    // A path the server does not have.
    let mut raw = tonic::client::Grpc::new(channel.clone());
    raw.ready().await.unwrap();
    let status = raw
        .unary(
            with_id("", None),
            PathAndQuery::from_static("/nope.Service/Method"),
            tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_generated(request_id(status.metadata()));

    // A stream the client walks away from.
    let mut watch = health
        .watch(with_id("cmk.Test", None))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(
        first.status(),
        health_check_response::ServingStatus::Serving
    );
    drop(watch);

    let cancelled = format!(r#"cmk_grpc_requests_total{{method="{WATCH}",code="Cancelled"}} 1"#);
    let text = scrape_until(scrape.addr, &cancelled).await;
    for line in [
        "# TYPE cmk_grpc_requests counter".to_owned(),
        format!(r#"cmk_grpc_requests_total{{method="{CHECK}",code="Ok"}} 3"#),
        format!(r#"cmk_grpc_requests_total{{method="{CHECK}",code="NotFound"}} 2"#),
        r#"cmk_grpc_requests_total{method="unknown",code="Unimplemented"} 1"#.to_owned(),
        cancelled,
        "# TYPE cmk_grpc_request_duration_seconds histogram".to_owned(),
        "# UNIT cmk_grpc_request_duration_seconds seconds".to_owned(),
        format!(r#"cmk_grpc_request_duration_seconds_count{{method="{CHECK}"}} 5"#),
        format!(r#"cmk_grpc_request_duration_seconds_count{{method="{WATCH}"}} 1"#),
        r#"cmk_grpc_request_duration_seconds_count{method="unknown"} 1"#.to_owned(),
        format!(r#"cmk_grpc_request_duration_seconds_bucket{{le="+Inf",method="{CHECK}"}} 5"#),
        format!(r#"cmk_grpc_request_duration_seconds_bucket{{le="10.0",method="{CHECK}"}} 5"#),
        "# EOF".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line}\nnot in\n{text}");
    }
    assert!(!text.contains("nope"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("cmk_grpc_requests_total"))
            .count(),
        4,
        "{text}"
    );
}

#[tokio::test]
async fn metrics_endpoint_serves_only_get_metrics() {
    let mut registry = Registry::default();
    GrpcMetrics::register(&mut registry, &[]).unwrap();
    let server = serve_metrics(Some(([127, 0, 0, 1], 0).into()), Arc::new(registry))
        .await
        .unwrap()
        .unwrap();

    let (status, head, body) = http(server.addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("\r\ncontent-type: {OPENMETRICS_CONTENT_TYPE}\r\n")),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(http(server.addr, "GET", "/other").await.0, 404);
    assert_eq!(http(server.addr, "GET", "/").await.0, 404);
    assert_eq!(http(server.addr, "POST", "/metrics").await.0, 405);

    let addr = server.addr;
    drop(server);
    tokio::task::yield_now().await;
    assert!(TcpStream::connect(addr).await.is_err(), "stopped on drop");

    assert!(serve_metrics(None, Arc::default()).await.unwrap().is_none());
}

#[tokio::test]
async fn counts_requests_refused_by_inner_layers() {
    let mut registry = Registry::default();
    let metrics =
        GrpcMetrics::register(&mut registry, &[tonic_health::pb::FILE_DESCRIPTOR_SET]).unwrap();
    let scrape = serve_metrics(Some(([127, 0, 0, 1], 0).into()), Arc::new(registry))
        .await
        .unwrap()
        .unwrap();
    let (_reporter, service) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // As the binaries stack it: metrics outermost, then authorisation.
    let router = Server::builder()
        .timeout(Duration::from_secs(5))
        .layer(metrics.layer())
        .layer(tonic::service::InterceptorLayer::new(
            |_: Request<()>| -> Result<Request<()>, tonic::Status> {
                Err(tonic::Status::permission_denied("not on the allow list"))
            },
        ))
        .add_service(service);
    let server = tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mut health = HealthClient::new(connect(addr).await);
    let status = health
        .check(with_id("", Some("denied-1")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(request_id(status.metadata()), "denied-1");

    let (_, _, text) = http(scrape.addr, "GET", "/metrics").await;
    let line = format!(r#"cmk_grpc_requests_total{{method="{CHECK}",code="PermissionDenied"}} 1"#);
    assert!(text.lines().any(|l| l == line), "{line}\nnot in\n{text}");
    server.abort();
}

fn request_id(metadata: &MetadataMap) -> &str {
    metadata.get("x-request-id").unwrap().to_str().unwrap()
}

fn assert_generated(id: &str) {
    assert_eq!(id.len(), 32, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{id}"
    );
}

/// Scrapes until `line` appears: the server learns of a cancelled stream a
/// moment after the client drops it.
async fn scrape_until(addr: SocketAddr, line: &str) -> String {
    for _ in 0..100 {
        let (status, _, body) = http(addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        if body.lines().any(|l| l == line) {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{line} never appeared");
}

/// One HTTP/1.1 request over a fresh connection: status, head, body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}
