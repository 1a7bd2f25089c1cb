//! Client certificates revoked by the configured CRLs cannot finish the
//! handshake; renewed CRLs take effect without a restart, and unusable CRL
//! files are ignored.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{path::Path, sync::Arc, time::Duration};

use cmk_pki::{Ca, CertifiedKey};
use cmk_tls::{ServerFiles, TlsFiles};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_stream::StreamExt;

const INTERVAL: Duration = Duration::from_millis(50);

/// Long enough for the watcher to have looked at the files a few times.
async fn settle() {
    tokio::time::sleep(INTERVAL * 6).await;
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// Whether `client` gets through a handshake and a round trip with the echo
/// server at `addr`, whose certificate `server_ca` issued.
async fn served(addr: std::net::SocketAddr, server_ca: &Ca, client: &CertifiedKey) -> bool {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(server_ca.cert_pem())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![der(&client.cert_pem)],
            PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let round_trip = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut stream = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        // Under TLS 1.3 the server's verdict on the client certificate
        // arrives after the client's handshake ends: a round trip shows it.
        stream.write_all(b"ping").await?;
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).await?;
        std::io::Result::Ok(echo == *b"ping")
    };
    round_trip.await.unwrap_or(false)
}

/// An echo server on the files `files`, followed every [`INTERVAL`].
async fn echo_server(files: ServerFiles) -> std::net::SocketAddr {
    let config = cmk_tls::watch_server(files, INTERVAL).unwrap();
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
    addr
}

/// Server files in `dir`: a server certificate of `ca`, the client CA bundle
/// `client_cas`, and one CRL file, `client.crl`.
fn files(dir: &Path, ca: &Ca, client_cas: &[&Ca]) -> ServerFiles {
    ca.server(&["localhost"])
        .unwrap()
        .write(dir, "server")
        .unwrap();
    let bundle: String = client_cas.iter().map(|ca| ca.cert_pem()).collect();
    std::fs::write(dir.join("ca.crt"), bundle).unwrap();
    ServerFiles {
        tls: TlsFiles {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            ca: dir.join("ca.crt"),
        },
        client_crls: vec![dir.join("client.crl")],
    }
}

#[tokio::test]
async fn a_revoked_client_is_refused_until_a_renewed_crl_lets_it_in() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("client CA").unwrap();
    let files = files(dir.path(), &ca, &[&ca]);
    let crl = &files.client_crls[0];
    let revoked = ca.client("spiffe://cmk.test/control-plane").unwrap();
    // The same identity, a new certificate: only revocation tells them apart.
    let renewed = ca.client("spiffe://cmk.test/control-plane").unwrap();
    ca.crl(&[&revoked]).unwrap().write(crl).unwrap();
    let addr = echo_server(files.clone()).await;

    assert!(!served(addr, &ca, &revoked).await, "revoked: refused");
    assert!(served(addr, &ca, &renewed).await, "not revoked: served");

    // A CRL caught half-written is not used; the last good one stays.
    std::fs::write(crl, "-----BEGIN X509 CRL-----\ntruncat").unwrap();
    settle().await;
    assert!(!served(addr, &ca, &revoked).await, "still refused");
    assert!(served(addr, &ca, &renewed).await, "still served");

    // A renewed CRL that revokes nothing: new handshakes follow it.
    ca.crl(&[]).unwrap().write(crl).unwrap();
    settle().await;
    assert!(served(addr, &ca, &revoked).await, "no longer revoked");

    // DER works as well as PEM; now the other one is revoked.
    std::fs::write(crl, ca.crl(&[&renewed]).unwrap().der).unwrap();
    settle().await;
    assert!(served(addr, &ca, &revoked).await);
    assert!(!served(addr, &ca, &renewed).await);
}

#[tokio::test]
async fn with_crls_a_client_whose_status_cannot_be_told_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("client CA").unwrap();
    let other = Ca::new("client CA without a CRL").unwrap();
    let files = files(dir.path(), &ca, &[&ca, &other]);
    let crl = &files.client_crls[0];
    ca.crl(&[]).unwrap().write(crl).unwrap();
    let addr = echo_server(files.clone()).await;
    let client = ca.client("spiffe://cmk.test/a").unwrap();
    let uncovered = other.client("spiffe://cmk.test/b").unwrap();

    assert!(
        served(addr, &ca, &client).await,
        "its CA's CRL lists nothing"
    );
    assert!(
        !served(addr, &ca, &uncovered).await,
        "no CRL of its CA: its status is unknown"
    );

    // A CRL past its nextUpdate vouches for nothing.
    let day = Duration::from_secs(86_400);
    let now = std::time::SystemTime::now();
    ca.crl_between(&[], now - 2 * day, now - day)
        .unwrap()
        .write(crl)
        .unwrap();
    settle().await;
    assert!(!served(addr, &ca, &client).await, "the CRL expired");
}

#[tokio::test]
async fn a_bad_crl_file_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("client CA").unwrap();
    let files = files(dir.path(), &ca, &[&ca]);
    std::fs::write(&files.client_crls[0], "not a CRL").unwrap();
    let err = cmk_tls::watch_server(files.clone(), INTERVAL)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "client CRL {} cannot be used: not a CRL",
            files.client_crls[0].display()
        )),
        "{err}"
    );
    std::fs::remove_file(&files.client_crls[0]).unwrap();
    let err = cmk_tls::watch_server(files.clone(), INTERVAL)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("cannot read client CRL from "), "{err}");
}
