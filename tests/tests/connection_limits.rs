//! End-to-end: the limits a server holds callers to before it knows who they
//! are, on the real `hsm-daemon` binary (both binaries share them, in
//! `cmk-runtime` and `cmk-tls`). Idle TCP connections and handshakes that
//! never finish do not keep a normal client out; connections beyond the limit
//! are closed at once; requests beyond the in-flight limit are answered
//! RESOURCE_EXHAUSTED, and the server serves normally afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use cmk_proto::hsm::v1::{
    BatchWrapRequest, Generate, GetImportPublicKeyRequest, ImportRequest, WrapRequest,
    import_request::Source,
};
use cmk_tests::{ANY_PORT, DaemonProcess, Pki};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;

const MAX_CONNECTIONS: usize = 24;

/// Whether the server closes `tcp` within `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_keep_no_one_out_and_extra_connections_are_closed() {
    let pki = Pki::new();
    let store = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start_with(
        &pki,
        store.path(),
        ANY_PORT,
        &[
            ("CMK_HSM_MAX_CONNECTIONS", &MAX_CONNECTIONS.to_string()),
            ("CMK_HSM_MAX_HANDSHAKES", "2"),
            ("CMK_HSM_HANDSHAKE_TIMEOUT_SECS", "3"),
        ],
    )
    .await;

    // 12 connections that send nothing, 6 that start a TLS record and stop:
    // more than the 2 handshake permits, fewer than the connection limit.
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(TcpStream::connect(daemon.addr).await.unwrap());
    }
    for _ in 0..6 {
        let mut slow = TcpStream::connect(daemon.addr).await.unwrap();
        slow.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
        held.push(slow);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let mut client = pki.hsm_client(daemon.addr).await;
    client
        .get_import_public_key(GetImportPublicKeyRequest {})
        .await
        .unwrap();
    let took = start.elapsed();
    println!("a client beside 18 stalled connections was served in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Up to the limit (the client holds one): each further connection is
    // closed as soon as it is accepted.
    while held.len() + 1 < MAX_CONNECTIONS {
        held.push(TcpStream::connect(daemon.addr).await.unwrap());
    }
    for _ in 0..4 {
        let mut extra = TcpStream::connect(daemon.addr).await.unwrap();
        assert!(
            closed_within(&mut extra, Duration::from_secs(1)).await,
            "a connection beyond the limit stays open"
        );
    }
    // The stalled ones are dropped at the handshake timeout; the connected
    // client was never disturbed, and newcomers are served again.
    for tcp in &mut held {
        assert!(
            closed_within(tcp, Duration::from_secs(6)).await,
            "a stalled handshake outlived its timeout"
        );
    }
    client
        .get_import_public_key(GetImportPublicKeyRequest {})
        .await
        .unwrap();
    let mut again = pki.hsm_client(daemon.addr).await;
    again
        .get_import_public_key(GetImportPublicKeyRequest {})
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_in_flight_limit_are_resource_exhausted() {
    let pki = Pki::new();
    let store = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start_with(
        &pki,
        store.path(),
        ANY_PORT,
        &[("CMK_HSM_MAX_IN_FLIGHT", "2")],
    )
    .await;
    let client = pki.hsm_client(daemon.addr).await;
    let handle = client
        .clone()
        .import(ImportRequest {
            source: Some(Source::Generate(Generate { shared: false })),
            import_key_id: String::new(),
            key_handle: String::new(),
            recover: false,
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key_handle;
    let batch = BatchWrapRequest {
        items: (0..1000)
            .map(|i| WrapRequest {
                key_handle: handle.clone(),
                plaintext: vec![i as u8; 32],
                associated_data: b"limits".to_vec(),
                org: cmk_tests::HSM_TEST_ORG.into(),
            })
            .collect(),
    };

    let (mut served, mut exhausted) = (0, 0);
    for _round in 0..5 {
        let calls: Vec<_> = (0..32)
            .map(|_| {
                let (mut client, batch) = (client.clone(), batch.clone());
                tokio::spawn(async move { client.batch_wrap(batch).await })
            })
            .collect();
        for call in calls {
            match call.await.unwrap() {
                Ok(_) => served += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert!(
                        status.message().contains("requests in flight"),
                        "{status:?}"
                    );
                    exhausted += 1;
                }
            }
        }
        if exhausted > 0 {
            break;
        }
    }
    println!("{served} batches served, {exhausted} refused as RESOURCE_EXHAUSTED");
    assert!(served >= 2, "at least the permitted ones are served");
    assert!(
        exhausted > 0,
        "32 concurrent batches never met a limit of 2"
    );
    // Nothing is left held: calls one at a time are all served.
    for _ in 0..5 {
        client.clone().batch_wrap(batch.clone()).await.unwrap();
    }
}
