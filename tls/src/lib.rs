//! Mutual TLS for every cmk connection.
//!
//! Servers require a client certificate that chains to the configured CA; a peer
//! without one cannot finish the handshake, so no request of theirs is ever
//! decoded. Only TLS 1.3 is offered, with rustls's aws-lc-rs provider. Handshakes
//! run concurrently, each under a deadline, so a slow or silent peer cannot hold up
//! the accept loop.
//!
//! With client CRLs configured ([`ServerFiles::client_crls`]) a revoked client
//! certificate cannot finish the handshake either. The choices, and why:
//!
//! - A certificate whose revocation status cannot be told (no CRL among the
//!   files was issued by its CA) is refused. rustls's
//!   `allow_unknown_revocation_status` is deliberately not used: it would let
//!   every client of a CA whose CRL was forgotten, or named wrongly, in
//!   unchecked, and nothing would show it. Each CA of the client CA bundle
//!   without a CRL is named in a warning when the files are loaded.
//! - Every certificate of the client's chain below the trust anchor is
//!   checked (rustls's default depth), so a revoked intermediate CA is refused too.
//! - A CRL past its nextUpdate time is treated as no CRL: the clients of its
//!   CA are refused (`enforce_revocation_expiration`). A list that is out of
//!   date cannot vouch that a certificate was not revoked since it was
//!   issued, and a loud failure (a warning when it is loaded, another at every
//!   refused handshake) is better than revocations silently missed. The
//!   operator's CA tooling must renew the file before nextUpdate; a renewed
//!   file is picked up without a restart.
//!
//! CRLs are reloaded with the certificates (see [`watch_server`]).
//!
//! A caller's identity is one string taken from its certificate by the one
//! rule in [`IdentityRule`]; allow-lists and role policies match on it.

#![forbid(unsafe_code)]

use std::{
    fmt, fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
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
    /// A client CRL file holds no usable certificate revocation list.
    #[error("client CRL {path} cannot be used: {reason}")]
    Crl {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
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

/// What a server needs to accept clients: its own certificate and key, the
/// CA their certificates must chain to, and that CA's revocation lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFiles {
    /// The server's certificate and key; `tls.ca` is the client CA.
    pub tls: TlsFiles,
    /// Certificate revocation lists (PEM, one or more `X509 CRL` blocks, or
    /// DER) of the client CA: a client certificate they list, or one whose
    /// status none of them can tell, is refused at the handshake. Empty: no
    /// revocation check.
    pub client_crls: Vec<PathBuf>,
}

impl From<TlsFiles> for ServerFiles {
    fn from(tls: TlsFiles) -> Self {
        Self {
            tls,
            client_crls: Vec::new(),
        }
    }
}

/// Builds a server configuration that demands a client certificate issued by
/// `files.tls.ca` and not revoked by `files.client_crls`, offers only TLS 1.3
/// and advertises HTTP/2 for gRPC.
pub fn server_config(files: &ServerFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cas = load_certs(&files.tls.ca, "client CA")?;
    let crls = load_crls(&files.client_crls)?;
    warn_uncovered(&cas, &crls);
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca)?;
    }
    // Why unknown status is refused and expiry enforced: see the crate docs.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .enforce_revocation_expiration()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs(&files.tls.cert, "certificate")?,
            load_key(&files.tls.key)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// How often [`watch_server`] looks at its files in the servers.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// A server configuration that follows its files, CRLs included: the
/// configuration built from `files` now (so a bad file still stops the
/// start), and a task that re-reads the files every `interval` and publishes
/// a new configuration when their contents change.
///
/// New handshakes use the newest configuration; connections already open keep
/// theirs, so a certificate rotated by cert-manager (or by hand), or a renewed
/// CRL, takes effect without a restart and without failing a request. Files
/// caught half-written, a CRL that does not parse, or a key that does not
/// match its certificate, are refused with a warning and the previous
/// configuration stays in use until the files are whole. The task ends when
/// every receiver is dropped.
pub fn watch_server(
    files: ServerFiles,
    interval: Duration,
) -> Result<tokio::sync::watch::Receiver<Arc<ServerConfig>>, TlsError> {
    follow(files, interval, server_config)
}

/// [`watch_server`] without CRLs.
pub fn watch_server_config(
    files: TlsFiles,
    interval: Duration,
) -> Result<tokio::sync::watch::Receiver<Arc<ServerConfig>>, TlsError> {
    watch_server(files.into(), interval)
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
    follow(files, interval, build)
}

/// Files a watcher follows.
trait Watched: Send + 'static {
    /// Every file's contents, or `None` if one cannot be read right now.
    fn read_all(&self) -> Option<Vec<Vec<u8>>>;

    /// The file a change is logged by.
    fn cert(&self) -> &Path;
}

impl Watched for TlsFiles {
    fn read_all(&self) -> Option<Vec<Vec<u8>>> {
        [&self.cert, &self.key, &self.ca]
            .into_iter()
            .map(|path| fs::read(path).ok())
            .collect()
    }

    fn cert(&self) -> &Path {
        &self.cert
    }
}

impl Watched for ServerFiles {
    fn read_all(&self) -> Option<Vec<Vec<u8>>> {
        let mut contents = self.tls.read_all()?;
        for crl in &self.client_crls {
            contents.push(fs::read(crl).ok()?);
        }
        Some(contents)
    }

    fn cert(&self) -> &Path {
        &self.tls.cert
    }
}

/// [`watch_files`] for any [`Watched`] set of files.
fn follow<S, T, F>(
    files: S,
    interval: Duration,
    build: F,
) -> Result<tokio::sync::watch::Receiver<T>, TlsError>
where
    S: Watched,
    T: Send + Sync + 'static,
    F: Fn(&S) -> Result<T, TlsError> + Send + 'static,
{
    let mut loaded = files.read_all();
    let (tx, rx) = tokio::sync::watch::channel(build(&files)?);
    tokio::spawn(async move {
        let mut refused = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = tx.closed() => return,
            }
            let current = files.read_all();
            if current == loaded || current == refused {
                continue;
            }
            match build(&files) {
                Ok(config) => {
                    tracing::info!(cert = %files.cert().display(), "TLS files changed; new connections use them");
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

/// What a server accepts before it knows who is calling: the bounds that
/// keep strangers from growing its tasks and memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptLimits {
    /// The longest a TLS handshake may take, from the TCP accept.
    pub handshake_timeout: Duration,
    /// Most connections open at once, those in their handshake included; a
    /// connection beyond is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Most handshakes doing their cryptography at once. A connection takes
    /// one only once its ClientHello has arrived, so idle or slow clients
    /// hold a connection slot (until `handshake_timeout`) but never this.
    pub max_handshakes: usize,
}

impl AcceptLimits {
    /// Limits with `handshake_timeout` and generous bounds, for tests and
    /// benchmarks.
    pub const fn with_timeout(handshake_timeout: Duration) -> Self {
        Self {
            handshake_timeout,
            max_connections: 4096,
            max_handshakes: 256,
        }
    }
}

/// A TLS connection holding its slot among [`AcceptLimits::max_connections`]
/// until it closes.
#[derive(Debug)]
pub struct Connection {
    stream: TlsStream<TcpStream>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Connection {
    // The TLS stream's own, so that `Request::peer_certs` finds the
    // client's certificate as it would without the slot.
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// Accepts TCP connections on `listener` and yields those whose TLS handshake
/// completed within `limits.handshake_timeout`, holding each to
/// [`AcceptLimits`]. Failed and refused connections are logged and dropped.
///
/// The stream ends when the returned stream is dropped (the server shut down).
pub fn incoming(
    listener: TcpListener,
    config: tokio::sync::watch::Receiver<Arc<ServerConfig>>,
    limits: AcceptLimits,
) -> ReceiverStream<Result<Connection, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes));
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
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Closed at once: the client learns now, and holds nothing.
                debug!(%peer, max = limits.max_connections, "connection refused: too many open");
                continue;
            };
            // gRPC writes small frames; without this, Nagle's algorithm holds a
            // response's tail until the peer's delayed ACK, about 40 ms later.
            if let Err(err) = tcp.set_nodelay(true) {
                debug!(%peer, %err, "cannot set TCP_NODELAY");
            }
            let (tx, config, handshakes) = (tx.clone(), config.clone(), handshakes.clone());
            tokio::spawn(async move {
                let handshake = async {
                    // The ClientHello is read without a handshake permit, so
                    // that clients that send nothing hold none.
                    let start = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        tcp,
                    )
                    .await?;
                    let _permit = handshakes
                        .acquire()
                        .await
                        .map_err(|_| io::Error::other("server stopping"))?;
                    // The newest configuration, for this handshake only.
                    let config = config.borrow().clone();
                    start.into_stream(config).await
                };
                match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                    Ok(Ok(stream)) => {
                        // The receiver is gone only when the server stopped.
                        let _ = tx
                            .send(Ok(Connection {
                                stream,
                                _slot: slot,
                            }))
                            .await;
                    }
                    // A certificate of the client CA that is refused (revoked,
                    // expired, its CRL out of date) is worth the operator's
                    // attention; port scans and the like are not.
                    Ok(Err(err)) if refused_certificate(&err) => {
                        warn!(%peer, %err, "refused a client certificate at the TLS handshake");
                    }
                    Ok(Err(err)) => debug!(%peer, %err, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Whether a failed handshake failed on the client's certificate.
fn refused_certificate(err: &io::Error) -> bool {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|err| matches!(err, rustls::Error::InvalidCertificate(_)))
}

/// Binds a TCP listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, io::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}")))
}

/// Who is calling: one string from the peer's verified certificate, as
/// [`IdentityRule`] reads it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity(String);

impl PeerIdentity {
    /// The identity [`IdentityRule::admit`] recorded for `request`; `None`
    /// if none was admitted (the server runs no identity check), so that a
    /// server that forgot the check refuses rather than guesses.
    pub fn of_request<T>(request: &tonic::Request<T>) -> Option<Self> {
        request.extensions().get::<Self>().cloned()
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

/// How a client's [`PeerIdentity`] is read from its certificate: the one
/// place that decides, for both servers.
///
/// The identity is the certificate's URI SAN (a SPIFFE-style
/// `spiffe://cmk.example/control-plane`), and there must be exactly one: a
/// certificate with several, or none, is refused, never resolved by picking
/// one, so an allow-list entry or an audit record names the same identity
/// every time. Only with the servers' opt-in `allow_common_name_identities`
/// ([`IdentityRule::new`]`(true)`) may a certificate without any URI SAN be
/// named by its DNS SAN, else by its subject common name, again each only
/// when there is exactly one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityRule {
    common_names: bool,
}

impl IdentityRule {
    /// The rule of the setting `allow_common_name_identities`: exactly one
    /// URI SAN when `false` (the default), DNS SAN or common name fallback
    /// for certificates without URI SANs when `true`.
    pub const fn new(allow_common_name_identities: bool) -> Self {
        Self {
            common_names: allow_common_name_identities,
        }
    }

    /// Whether identities may come from a DNS SAN or the common name.
    pub const fn allows_common_names(self) -> bool {
        self.common_names
    }

    /// Whether a configured identity (an allow-list entry, a policy grant)
    /// can ever match a certificate under this rule: without the opt-in,
    /// only a URI can. The error says why not, for the setting's report.
    pub fn check_configured(self, identity: &str) -> Result<(), String> {
        if self.common_names || is_uri(identity) {
            Ok(())
        } else {
            Err(format!(
                "{identity:?} is not a URI (such as spiffe://cmk.example/control-plane); \
                 identities from a DNS SAN or common name match only with \
                 allow_common_name_identities = true"
            ))
        }
    }

    /// The identity of the end-entity certificate `cert`, or why it has none.
    pub fn identify(self, cert: &CertificateDer<'_>) -> Result<PeerIdentity, IdentityError> {
        use x509_parser::{extensions::GeneralName, prelude::FromDer};
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert)
            .map_err(|_| IdentityError::Unparsable)?;
        let names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san.value.general_names.as_slice(),
            Ok(None) => &[],
            // Two SAN extensions, or one that does not parse.
            Err(_) => return Err(IdentityError::Unparsable),
        };
        let uris: Vec<&str> = names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [uri] => return Ok(PeerIdentity((*uri).to_owned())),
            [] if !self.common_names => return Err(IdentityError::NoUri),
            [] => {}
            several => return Err(IdentityError::SeveralUris(several.len())),
        }
        let dns: Vec<&str> = names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(dns) => Some(*dns),
                _ => None,
            })
            .collect();
        match dns.as_slice() {
            [dns] => return Ok(PeerIdentity((*dns).to_owned())),
            [] => {}
            several => return Err(IdentityError::SeveralDnsNames(several.len())),
        }
        let cns: Vec<_> = cert.subject().iter_common_name().collect();
        match cns.as_slice() {
            [cn] => cn
                .as_str()
                .map(|cn| PeerIdentity(cn.to_owned()))
                .map_err(|_| IdentityError::Unparsable),
            [] => Err(IdentityError::NoName),
            several => Err(IdentityError::SeveralCommonNames(several.len())),
        }
    }

    /// Decides the identity of the client that sent `request`, from the
    /// certificate it presented in the TLS handshake, and records it in the
    /// request for [`PeerIdentity::of_request`]. A refusal is logged, with
    /// the peer's address and why.
    pub fn admit<T>(self, request: &mut tonic::Request<T>) -> Result<PeerIdentity, IdentityError> {
        let decided = match request.peer_certs() {
            Some(certs) => match certs.first() {
                Some(cert) => self.identify(cert),
                None => Err(IdentityError::NoCertificate),
            },
            None => Err(IdentityError::NoCertificate),
        };
        match decided {
            Ok(identity) => {
                request.extensions_mut().insert(identity.clone());
                Ok(identity)
            }
            Err(err) => {
                let peer = request.remote_addr();
                warn!(?peer, %err, "refused a client: its certificate names no usable identity");
                Err(err)
            }
        }
    }
}

/// Whether `identity` is a URI: a scheme (RFC 3986: a letter, then
/// letters, digits, `+`, `-` or `.`), a colon, and more.
fn is_uri(identity: &str) -> bool {
    identity.split_once(':').is_some_and(|(scheme, rest)| {
        let mut chars = scheme.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            && !rest.is_empty()
    })
}

/// Why a verified client certificate names no identity under the
/// [`IdentityRule`]. The messages say what the certificate carries, never
/// more than counts, and go to the caller as they are.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The connection carries no client certificate (not mutual TLS).
    #[error("no client certificate was presented")]
    NoCertificate,
    /// The certificate or its subject alternative names cannot be read.
    #[error("the client certificate's names cannot be read")]
    Unparsable,
    /// More than one URI SAN: which one is meant cannot be told.
    #[error("client certificate carries {0} URI SANs; exactly one is required")]
    SeveralUris(usize),
    /// No URI SAN, and names of other kinds are not accepted.
    #[error(
        "client certificate carries no URI SAN; exactly one is required (a DNS SAN or \
         common name is accepted only with allow_common_name_identities = true)"
    )]
    NoUri,
    /// No URI SAN, and more than one DNS SAN.
    #[error("client certificate carries no URI SAN and {0} DNS SANs; exactly one is required")]
    SeveralDnsNames(usize),
    /// No SAN, and more than one subject common name.
    #[error(
        "client certificate carries no SAN and {0} subject common names; exactly one is required"
    )]
    SeveralCommonNames(usize),
    /// No name at all.
    #[error("client certificate carries no URI SAN, no DNS SAN and no subject common name")]
    NoName,
}

/// The one wire form of an identity refusal, for both servers: the
/// certificate was valid, but its holder cannot be named, so it may do
/// nothing (PERMISSION_DENIED, as for an identity that is not allowed).
impl From<IdentityError> for tonic::Status {
    fn from(err: IdentityError) -> Self {
        tonic::Status::permission_denied(err.to_string())
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

/// The CRLs of every file of `paths`.
fn load_crls(paths: &[PathBuf]) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut crls = Vec::new();
    for path in paths {
        crls.extend(parse_crls(&read_file(path, "client CRL")?, path)?);
    }
    Ok(crls)
}

/// The CRLs of a file's contents `bytes` (read from `path`): PEM with one or
/// more `X509 CRL` blocks, or one DER CRL. Each is parsed now, so that a
/// file caught half-written is refused by name; one past its nextUpdate is
/// used (it refuses its CA's clients) with a warning.
fn parse_crls(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    use x509_parser::{prelude::FromDer, revocation_list::CertificateRevocationList};
    let crl_err = |reason: String| TlsError::Crl {
        path: path.display().to_string(),
        reason,
    };
    let crls = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| crl_err(format!("not valid PEM: {err}")))?;
        if crls.is_empty() {
            return Err(crl_err("no X509 CRL block found".into()));
        }
        crls
    } else {
        vec![CertificateRevocationListDer::from(bytes.to_vec())]
    };
    for der in &crls {
        let crl = match CertificateRevocationList::from_der(der) {
            Ok(([], crl)) => crl,
            Ok(_) => return Err(crl_err("bytes after the CRL".into())),
            Err(err) => return Err(crl_err(format!("not a CRL: {err}"))),
        };
        if let Some(next) = crl.next_update()
            && next < x509_parser::time::ASN1Time::now()
        {
            warn!(
                crl = %path.display(),
                issuer = %crl.issuer(),
                next_update = %next,
                "client CRL is past its nextUpdate: every client certificate of its CA \
                 is refused until a renewed CRL replaces it"
            );
        }
    }
    Ok(crls)
}

/// Warns of each client CA that none of `crls` was issued by: with CRLs
/// configured, every client certificate it issued is refused (its status
/// cannot be told).
fn warn_uncovered(cas: &[CertificateDer<'_>], crls: &[CertificateRevocationListDer<'_>]) {
    use x509_parser::{
        certificate::X509Certificate, prelude::FromDer, revocation_list::CertificateRevocationList,
    };
    if crls.is_empty() {
        return;
    }
    let issuers: Vec<Vec<u8>> = crls
        .iter()
        .filter_map(|der| CertificateRevocationList::from_der(der).ok())
        .map(|(_, crl)| crl.issuer().as_raw().to_vec())
        .collect();
    for ca in cas {
        let Ok((_, ca)) = X509Certificate::from_der(ca) else {
            continue;
        };
        if !issuers.iter().any(|issuer| issuer == ca.subject().as_raw()) {
            warn!(
                ca = %ca.subject(),
                "no client CRL was issued by this client CA: every client certificate it \
                 issued is refused while CRLs are configured"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM")
    }

    /// What `rule` makes of a certificate with these names.
    fn identify(
        rule: IdentityRule,
        cn: &str,
        uris: &[&str],
        dns: &[&str],
    ) -> Result<String, IdentityError> {
        let ca = cmk_pki::Ca::new("test CA").expect("CA");
        let cert = ca.client_with_names(cn, uris, dns).expect("cert");
        rule.identify(&der(&cert.cert_pem)).map(|i| i.to_string())
    }

    const STRICT: IdentityRule = IdentityRule::new(false);
    const LENIENT: IdentityRule = IdentityRule::new(true);

    #[test]
    fn the_one_uri_san_is_the_identity() {
        for rule in [STRICT, LENIENT] {
            assert_eq!(
                identify(rule, "cn", &["spiffe://cmk.test/a"], &["a.cmk.test"]),
                Ok("spiffe://cmk.test/a".into())
            );
        }
        assert_eq!(IdentityRule::default(), STRICT);
    }

    #[test]
    fn a_certificate_with_several_uri_sans_has_no_identity() {
        let uris = ["spiffe://cmk.test/a", "spiffe://cmk.test/b"];
        for rule in [STRICT, LENIENT] {
            let refused = identify(rule, "cn", &uris, &[]).expect_err("ambiguous");
            assert_eq!(refused, IdentityError::SeveralUris(2));
            assert_eq!(
                refused.to_string(),
                "client certificate carries 2 URI SANs; exactly one is required"
            );
        }
    }

    #[test]
    fn without_the_opt_in_a_certificate_without_uri_san_is_refused() {
        // A DNS name only (a server certificate), a common name only.
        for (dns, cn) in [(&["hsm.cmk.test"][..], "hsm.cmk.test"), (&[][..], "legacy")] {
            let refused = identify(STRICT, cn, &[], dns).expect_err("no URI");
            assert_eq!(refused, IdentityError::NoUri);
            assert!(
                refused
                    .to_string()
                    .contains("only with allow_common_name_identities = true"),
                "{refused}"
            );
        }
    }

    #[test]
    fn with_the_opt_in_one_dns_san_else_one_common_name_names_the_certificate() {
        assert_eq!(
            identify(LENIENT, "cn", &[], &["hsm.cmk.test"]),
            Ok("hsm.cmk.test".into())
        );
        assert_eq!(
            identify(LENIENT, "legacy-client", &[], &[]),
            Ok("legacy-client".into())
        );
        assert_eq!(
            identify(LENIENT, "cn", &[], &["a.cmk.test", "b.cmk.test"]),
            Err(IdentityError::SeveralDnsNames(2))
        );
    }

    #[test]
    fn configured_identities_must_be_uris_without_the_opt_in() {
        for uri in ["spiffe://cmk.test/control-plane", "urn:cmk:admin"] {
            assert_eq!(STRICT.check_configured(uri), Ok(()));
        }
        for name in ["legacy-client", "hsm.cmk.test", ":x", "1a:b", "spiffe:"] {
            let err = STRICT.check_configured(name).expect_err(name);
            assert!(err.contains("is not a URI"), "{err}");
            assert_eq!(LENIENT.check_configured(name), Ok(()));
        }
    }

    #[test]
    fn a_refusal_is_permission_denied_with_its_reason() {
        let status = tonic::Status::from(IdentityError::SeveralUris(3));
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "client certificate carries 3 URI SANs; exactly one is required"
        );
    }

    #[test]
    fn only_an_admitted_identity_is_the_requests() {
        // No TLS connection, no certificate: refused, and nothing recorded.
        let mut request = tonic::Request::new(());
        assert_eq!(
            STRICT.admit(&mut request),
            Err(IdentityError::NoCertificate)
        );
        assert_eq!(PeerIdentity::of_request(&request), None);
    }

    #[test]
    fn crl_files_are_pem_or_der_and_anything_else_is_refused_by_name() {
        let ca = cmk_pki::Ca::new("test CA").expect("CA");
        let client = ca.client("spiffe://cmk.test/a").expect("cert");
        let crl = ca.crl(&[&client]).expect("CRL");
        let path = Path::new("/etc/cmk/client.crl");
        let two = format!("{}{}", crl.pem, ca.crl(&[]).expect("CRL").pem);
        assert_eq!(parse_crls(crl.pem.as_bytes(), path).expect("PEM").len(), 1);
        assert_eq!(parse_crls(two.as_bytes(), path).expect("PEM").len(), 2);
        assert_eq!(parse_crls(&crl.der, path).expect("DER").len(), 1);

        let half = &crl.pem[..crl.pem.len() / 2];
        for bad in [
            half.as_bytes(),
            &crl.der[..crl.der.len() - 1],
            client.cert_pem.as_bytes(),
            b"",
        ] {
            let err = parse_crls(bad, path).expect_err("not a CRL").to_string();
            assert!(
                err.starts_with("client CRL /etc/cmk/client.crl cannot be used: "),
                "{err}"
            );
        }
    }
}
