//! Mutual TLS for every cmk connection.
//!
//! Servers require a client certificate that chains to the configured CA; a peer
//! without one cannot finish the handshake, so no request of theirs is ever
//! decoded. Only TLS 1.3 is offered, with rustls's aws-lc-rs provider. Handshakes
//! run concurrently, each under a deadline, so a slow or silent peer cannot hold up
//! the accept loop.
//!
//! A caller's identity is one string taken from its certificate (see
//! [`PeerIdentity`]); allow-lists and role policies match on it.

#![forbid(unsafe_code)]

use std::{fmt, fs, io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        /// Which setting the file belongs to.
        what: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file held no usable PEM item of the expected kind.
    #[error("{what} in {path} is not valid PEM: {reason}")]
    Pem {
        /// Which setting the file belongs to.
        what: &'static str,
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the certificates or key.
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client CA bundle could not be used to verify clients.
    #[error("invalid client CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A client could not be set up with the files.
    #[error("TLS client: {0}")]
    Client(String),
}

/// Paths of the PEM files one side of a mutual-TLS connection needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate chain.
    pub cert: std::path::PathBuf,
    /// This side's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
    /// The CA that the peer's certificate must chain to.
    pub ca: std::path::PathBuf,
}

/// Builds a server configuration that demands a client certificate issued by
/// `files.ca`, offers only TLS 1.3 and advertises HTTP/2 for gRPC.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = Arc::new(load_roots(&files.ca, "client CA")?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs(&files.cert, "certificate")?,
            load_key(&files.key)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// How often [`watch_server_config`] looks at its files in the servers.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// A server configuration that follows its files: the configuration built
/// from `files` now (so a bad file still stops the start), and a task that
/// re-reads the files every `interval` and publishes a new configuration when
/// their contents change.
///
/// New handshakes use the newest configuration; connections already open keep
/// theirs, so a certificate rotated by cert-manager (or by hand) takes effect
/// without a restart and without failing a request. Files caught half-written,
/// or a key that does not match its certificate, are refused with a warning
/// and the previous configuration stays in use until the files are whole. The
/// task ends when every receiver is dropped.
pub fn watch_server_config(
    files: TlsFiles,
    interval: Duration,
) -> Result<tokio::sync::watch::Receiver<Arc<ServerConfig>>, TlsError> {
    watch_files(files, interval, server_config)
}

/// What `build` makes of `files`, following the files as
/// [`watch_server_config`] does: built now (an error stops the caller's
/// start), then rebuilt and published whenever the files' contents change
/// and build cleanly. For a client, `build` makes a new connection with the
/// renewed certificate (see the control plane's HSM client).
pub fn watch_files<T, F>(
    files: TlsFiles,
    interval: Duration,
    build: F,
) -> Result<tokio::sync::watch::Receiver<T>, TlsError>
where
    T: Send + Sync + 'static,
    F: Fn(&TlsFiles) -> Result<T, TlsError> + Send + 'static,
{
    let mut loaded = read_all(&files);
    let (tx, rx) = tokio::sync::watch::channel(build(&files)?);
    tokio::spawn(async move {
        let mut refused = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = tx.closed() => return,
            }
            let current = read_all(&files);
            if current == loaded || current == refused {
                continue;
            }
            match build(&files) {
                Ok(config) => {
                    tracing::info!(cert = %files.cert.display(), "TLS files changed; new connections use them");
                    loaded = current;
                    refused = None;
                    if tx.send(config).is_err() {
                        return;
                    }
                }
                Err(err) => {
                    warn!(%err, "TLS files changed but cannot be used; keeping the previous ones");
                    refused = current;
                }
            }
        }
    });
    Ok(rx)
}

/// The three files' contents, or `None` if any cannot be read right now.
fn read_all(files: &TlsFiles) -> Option<[Vec<u8>; 3]> {
    Some([
        fs::read(&files.cert).ok()?,
        fs::read(&files.key).ok()?,
        fs::read(&files.ca).ok()?,
    ])
}

/// Builds the tonic client TLS settings: trust `files.ca`, present `files.cert`.
pub fn client_config(
    files: &TlsFiles,
    server_name: &str,
) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    let ca = read_file(&files.ca, "server CA")?;
    let cert = read_file(&files.cert, "certificate")?;
    let key = read_file(&files.key, "private key")?;
    // tonic parses these only at the first handshake: check now that they
    // parse and that the key is the certificate's, so that a bad file (or a
    // pair caught half-renewed) fails here, where it can be refused.
    let certs = parse_certs(&cert, &files.cert, "certificate")?;
    let private = parse_key(&key, &files.key)?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(certs, private, &provider)?;
    parse_certs(&ca, &files.ca, "server CA")?;
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .domain_name(server_name))
}

/// Accepts TCP connections on `listener` and yields those whose TLS handshake
/// completed within `handshake_timeout`. Failed handshakes are logged and dropped.
///
/// The stream ends when the returned stream is dropped (the server shut down).
pub fn incoming(
    listener: TcpListener,
    config: tokio::sync::watch::Receiver<Arc<ServerConfig>>,
    handshake_timeout: Duration,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        // Out of file descriptors and the like: back off briefly
                        // rather than spin; the listener itself stays open.
                        warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            // gRPC writes small frames; without this, Nagle's algorithm holds a
            // response's tail until the peer's delayed ACK, about 40 ms later.
            if let Err(err) = tcp.set_nodelay(true) {
                debug!(%peer, %err, "cannot set TCP_NODELAY");
            }
            // The newest configuration, for this handshake only.
            let acceptor = TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        // The receiver is gone only when the server stopped.
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(err)) => debug!(%peer, %err, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Binds a TCP listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, io::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}")))
}

/// Who is calling: one string from the peer's verified certificate.
///
/// The first URI subject alternative name (a SPIFFE-style
/// `spiffe://cmk.example/control-plane`), else the first DNS name, else the
/// subject common name. Exactly one value is chosen, so an allow-list entry or an
/// audit record names the same identity every time.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity(String);

impl PeerIdentity {
    /// The identity of the end-entity certificate `cert`, if it names one.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Option<Self> {
        use x509_parser::{extensions::GeneralName, prelude::FromDer};
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            let names = &san.value.general_names;
            let uri = names.iter().find_map(|n| match n {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            });
            let dns = names.iter().find_map(|n| match n {
                GeneralName::DNSName(dns) => Some(*dns),
                _ => None,
            });
            if let Some(name) = uri.or(dns) {
                return Some(Self(name.to_owned()));
            }
        }
        let cn = cert.subject().iter_common_name().next()?;
        Some(Self(cn.as_str().ok()?.to_owned()))
    }

    /// The identity of the client that sent `request`, taken from the certificate
    /// it presented in the TLS handshake.
    pub fn of_request<T>(request: &tonic::Request<T>) -> Option<Self> {
        let certs = request.peer_certs()?;
        Self::from_certificate(certs.first()?)
    }

    /// The identity as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerIdentity({})", self.0)
    }
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(&read_file(path, what)?, path, what)
}

/// The certificates of a PEM file's contents `bytes` (read from `path`).
fn parse_certs(
    bytes: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_err(err.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(&read_file(path, "private key")?, path)
}

/// The private key of a PEM file's contents `bytes` (read from `path`).
fn parse_key(bytes: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The parse error can quote the input, and the input is a private key: report
    // only that it failed.
    PrivateKeyDer::from_pem_slice(bytes).map_err(|_| TlsError::Pem {
        what: "private key",
        path: path.display().to_string(),
        reason: "no PKCS#8, PKCS#1 or SEC1 private key block found".into(),
    })
}

fn load_roots(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, what)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_prefers_uri_then_falls_back_to_common_name() {
        let ca = cmk_pki::Ca::new("test CA").expect("CA");
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM");

        let uri = ca.client("spiffe://cmk.test/control-plane").expect("cert");
        assert_eq!(
            PeerIdentity::from_certificate(&der(&uri.cert_pem)).map(|i| i.to_string()),
            Some("spiffe://cmk.test/control-plane".to_string())
        );

        let server = ca.server(&["hsm.cmk.test"]).expect("cert");
        assert_eq!(
            PeerIdentity::from_certificate(&der(&server.cert_pem)).map(|i| i.to_string()),
            Some("hsm.cmk.test".to_string())
        );

        let cn = ca.client_with_common_name("legacy-client").expect("cert");
        assert_eq!(
            PeerIdentity::from_certificate(&der(&cn.cert_pem)).map(|i| i.to_string()),
            Some("legacy-client".to_string())
        );
    }
}
