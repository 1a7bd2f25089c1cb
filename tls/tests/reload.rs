//! Certificates rotated on disk take effect for new connections without a
//! restart, open connections keep working, and unusable files are ignored.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{path::Path, sync::Arc, time::Duration};

use cmk_pki::{Ca, CertifiedKey};
use cmk_tls::TlsFiles;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_stream::StreamExt;

const INTERVAL: Duration = Duration::from_millis(50);

/// Long enough for the watcher to have looked at the files a few times.
async fn settle() {
    tokio::time::sleep(INTERVAL * 6).await;
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

async fn connect(
    addr: std::net::SocketAddr,
    ca: &Ca,
    client: &CertifiedKey,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(ca.cert_pem())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![der(&client.cert_pem)],
            PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut stream = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    // Under TLS 1.3 the server's verdict on the client certificate arrives
    // after the client's handshake ends: a round trip makes it visible.
    stream.write_all(b"ping").await?;
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await?;
    assert_eq!(&echo, b"ping");
    Ok(stream)
}

fn served_cert(stream: &TlsStream<tokio::net::TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

fn write(dir: &Path, ca: &Ca, server: &CertifiedKey) {
    server.write(dir, "server").unwrap();
    ca.write_cert(&dir.join("ca.crt")).unwrap();
}

#[tokio::test]
async fn rotated_files_serve_new_connections_and_spare_open_ones() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: dir.path().join("server.crt"),
        key: dir.path().join("server.key"),
        ca: dir.path().join("ca.crt"),
    };
    let ca = Ca::new("first CA").unwrap();
    let first = ca.server(&["localhost"]).unwrap();
    let client = ca.client("spiffe://cmk.test/client").unwrap();
    write(dir.path(), &ca, &first);

    let config = cmk_tls::watch_server_config(files.clone(), INTERVAL).unwrap();
    let listener = cmk_tls::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = cmk_tls::incoming(
        listener,
        config,
        cmk_tls::AcceptLimits::with_timeout(Duration::from_secs(5)),
    );
    tokio::spawn(async move {
        while let Some(Ok(mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                while stream.read_exact(&mut buf).await.is_ok() {
                    if stream.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    let mut open = connect(addr, &ca, &client).await.unwrap();
    assert_eq!(served_cert(&open), der(&first.cert_pem));

    // A renewed certificate from the same CA.
    let second = ca.server(&["localhost"]).unwrap();
    write(dir.path(), &ca, &second);
    settle().await;
    let renewed = connect(addr, &ca, &client).await.unwrap();
    assert_eq!(served_cert(&renewed), der(&second.cert_pem));
    open.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    open.read_exact(&mut echo).await.unwrap();
    assert_eq!(
        &echo, b"ping",
        "the connection opened before the change still works"
    );

    // Files caught half-written are not used; the last good ones stay.
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\ntruncat").unwrap();
    settle().await;
    let during = connect(addr, &ca, &client).await.unwrap();
    assert_eq!(served_cert(&during), der(&second.cert_pem));

    // A new CA for everything: clients of the new CA get in, the old one's do not.
    let new_ca = Ca::new("second CA").unwrap();
    let third = new_ca.server(&["localhost"]).unwrap();
    let new_client = new_ca.client("spiffe://cmk.test/client").unwrap();
    write(dir.path(), &new_ca, &third);
    settle().await;
    let rotated = connect(addr, &new_ca, &new_client).await.unwrap();
    assert_eq!(served_cert(&rotated), der(&third.cert_pem));
    assert!(
        connect(addr, &new_ca, &client).await.is_err(),
        "a client certificate of the retired CA is refused"
    );
}
