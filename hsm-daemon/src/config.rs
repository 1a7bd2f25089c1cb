//! Configuration: a TOML file, command-line flags and environment variables,
//! merged (flag over environment over file over default) and validated once into
//! [`Settings`]. Every bad setting is reported together, each with its name.

use std::{
    collections::BTreeSet,
    fmt, fs,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use cmk_hsm_custody::{ImportKeyBits, RootKey};
use cmk_hsm_pkcs11::{Pkcs11Settings, TokenSelector};
pub use cmk_runtime::LogFormat;
use cmk_runtime::server::{ConnectionLimits, ListenAddrs, RawConnectionLimits};
use cmk_secret::SecretBytes;
use cmk_tls::{IdentityRule, TlsFiles};
use serde::Deserialize;

/// Environment variable that may carry the root key itself (64 hex characters).
pub const ROOT_KEY_ENV: &str = "CMK_HSM_ROOT_KEY";

/// Environment variable that may carry the PKCS#11 user PIN itself.
pub const PKCS11_PIN_ENV: &str = "CMK_HSM_PKCS11_PIN";

/// How to make a root key, quoted in the error when none is configured.
const ROOT_KEY_HOWTO: &str = "make one with `openssl rand -hex 32 > root.key && chmod 600 root.key` \
     and pass --root-key-file root.key, or put the 64 hex characters in CMK_HSM_ROOT_KEY";

/// Settings as read: every field optional, nothing checked yet.
#[derive(Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    /// Address to listen on [default: 127.0.0.1:7443].
    #[arg(long, env = "CMK_HSM_LISTEN")]
    pub listen: Option<String>,
    /// Plaintext address serving only gRPC health, for probes that cannot
    /// present a client certificate (Kubernetes); off unless set.
    #[arg(long, env = "CMK_HSM_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
    /// Plaintext address serving Prometheus metrics at /metrics; off unless set.
    #[arg(long, env = "CMK_HSM_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Where CMKs are kept: software (a keystore directory sealed under a
    /// root key) or pkcs11 (a token) [default: software].
    #[arg(long, env = "CMK_HSM_CUSTODY")]
    pub custody: Option<String>,
    /// Directory of the software keystore.
    #[arg(long, env = "CMK_HSM_KEYSTORE_DIR")]
    pub keystore_dir: Option<PathBuf>,
    /// Where to publish the audit signing key's public half (PEM) at start,
    /// for verifying signed audit checkpoints offline [default: not written].
    #[arg(long, env = "CMK_HSM_AUDIT_PUBLIC_KEY_FILE")]
    pub audit_public_key_file: Option<PathBuf>,
    /// File holding the root key as 64 hex characters (mode 0600 or stricter).
    #[arg(long, env = "CMK_HSM_ROOT_KEY_FILE")]
    pub root_key_file: Option<PathBuf>,
    /// The PKCS#11 module (shared library) of the token, with custody = pkcs11.
    #[arg(long, env = "CMK_HSM_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,
    /// Label of the PKCS#11 token (or set pkcs11_slot).
    #[arg(long, env = "CMK_HSM_PKCS11_TOKEN_LABEL")]
    pub pkcs11_token_label: Option<String>,
    /// Slot id of the PKCS#11 token (or set pkcs11_token_label).
    #[arg(long, env = "CMK_HSM_PKCS11_SLOT")]
    pub pkcs11_slot: Option<u64>,
    /// File holding the token's user PIN (mode 0600 or 0640); or put the PIN
    /// in CMK_HSM_PKCS11_PIN.
    #[arg(long, env = "CMK_HSM_PKCS11_PIN_FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// Most PKCS#11 sessions open at once [default: 8].
    #[arg(long, env = "CMK_HSM_PKCS11_SESSIONS")]
    pub pkcs11_sessions: Option<usize>,
    /// Seconds one token call may wait for a session, then for the token
    /// [default: 10].
    #[arg(long, env = "CMK_HSM_PKCS11_TIMEOUT_SECS")]
    pub pkcs11_timeout_secs: Option<u64>,
    /// Size of a newly generated RSA import key: 3072 or 4096 [default: 3072].
    #[arg(long, env = "CMK_HSM_IMPORT_KEY_BITS")]
    pub import_key_bits: Option<u32>,
    /// Client identity allowed to call (repeat, or comma-separate in the environment).
    #[arg(
        long = "allowed-client",
        env = "CMK_HSM_ALLOWED_CLIENTS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// Server certificate chain, PEM.
    #[arg(long, env = "CMK_HSM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key, PEM.
    #[arg(long, env = "CMK_HSM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA that client certificates must chain to, PEM.
    #[arg(long, env = "CMK_HSM_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Certificate revocation list of the client CA, PEM or DER (repeat, or
    /// comma-separate in the environment); reloaded when it changes. With
    /// CRLs set, a client certificate they list, or whose CA issued none of
    /// them, or whose CRL is past its nextUpdate, is refused at the handshake.
    #[arg(
        long = "tls-client-crl",
        env = "CMK_HSM_TLS_CLIENT_CRLS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub tls_client_crls: Vec<PathBuf>,
    /// Name a client whose certificate has no URI SAN by its one DNS SAN,
    /// else its subject common name; without this, exactly one URI SAN is
    /// required [default: false].
    #[arg(
        long,
        env = "CMK_HSM_ALLOW_COMMON_NAME_IDENTITIES",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_common_name_identities: Option<bool>,
    /// Largest accepted gRPC message, bytes [default: 4194304].
    #[arg(long, env = "CMK_HSM_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Most items in one batch call [default: 1000].
    #[arg(long, env = "CMK_HSM_MAX_BATCH_ITEMS")]
    pub max_batch_items: Option<usize>,
    /// Largest secret accepted by Wrap, bytes [default: 1024].
    #[arg(long, env = "CMK_HSM_MAX_PLAINTEXT_BYTES")]
    pub max_plaintext_bytes: Option<usize>,
    /// Largest associated data, bytes [default: 1024].
    #[arg(long, env = "CMK_HSM_MAX_ASSOCIATED_DATA_BYTES")]
    pub max_associated_data_bytes: Option<usize>,
    /// Seconds a TLS handshake may take [default: 10].
    #[arg(long, env = "CMK_HSM_HANDSHAKE_TIMEOUT_SECS")]
    pub handshake_timeout_secs: Option<u64>,
    /// Seconds a request may take [default: 30].
    #[arg(long, env = "CMK_HSM_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// Connections open at once, TLS handshakes included; one beyond is
    /// closed when accepted [default: 4096].
    #[arg(long, env = "CMK_HSM_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    /// TLS handshakes doing their cryptography at once [default: 64].
    #[arg(long, env = "CMK_HSM_MAX_HANDSHAKES")]
    pub max_handshakes: Option<u64>,
    /// HTTP/2 streams (calls in flight) per connection [default: 128].
    #[arg(long, env = "CMK_HSM_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u64>,
    /// Requests in flight over all connections; one beyond is answered
    /// RESOURCE_EXHAUSTED [default: 2048].
    #[arg(long, env = "CMK_HSM_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<u64>,
    /// Seconds between HTTP/2 keepalive pings; a peer silent as long again
    /// is dropped [default: 60].
    #[arg(long, env = "CMK_HSM_KEEPALIVE_SECS")]
    pub keepalive_secs: Option<u64>,
    /// Seconds after which a connection is asked to close and reconnect
    /// [default: 3600].
    #[arg(long, env = "CMK_HSM_MAX_CONNECTION_AGE_SECS")]
    pub max_connection_age_secs: Option<u64>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "CMK_HSM_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Endpoint for every AWS KMS and STS call instead of AWS's own (an
    /// emulator, a proxy); without it the AWS SDK's conventions apply
    /// (AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL, then the region's endpoint).
    #[arg(long, env = "CMK_HSM_AWS_ENDPOINT")]
    pub aws_endpoint: Option<String>,
    /// Endpoint for the AWS KMS and STS calls of one region, as
    /// region=url (repeat, or comma-separate in the environment): a VPC
    /// endpoint per region.
    #[arg(
        long = "aws-region-endpoint",
        env = "CMK_HSM_AWS_REGION_ENDPOINTS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub aws_region_endpoints: Vec<String>,
    /// Seconds a key's state in AWS KMS (DescribeKey) is trusted before it
    /// is looked up again: how soon a key its owner disabled stops being used
    /// [default: 30].
    #[arg(long, env = "CMK_HSM_AWS_KEY_STATE_TTL_SECS")]
    pub aws_key_state_ttl_secs: Option<u64>,
}

impl RawSettings {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        cmk_runtime::read_toml(path).map_err(|e| ConfigError(vec![e]))
    }

    /// Overlays every field set in `over` onto `self`.
    pub fn overlay(self, over: Self) -> Self {
        let Self {
            listen,
            health_listen,
            metrics_listen,
            custody,
            keystore_dir,
            audit_public_key_file,
            root_key_file,
            pkcs11_module,
            pkcs11_token_label,
            pkcs11_slot,
            pkcs11_pin_file,
            pkcs11_sessions,
            pkcs11_timeout_secs,
            import_key_bits,
            allowed_clients,
            tls_cert,
            tls_key,
            tls_client_ca,
            tls_client_crls,
            allow_common_name_identities,
            max_message_bytes,
            max_batch_items,
            max_plaintext_bytes,
            max_associated_data_bytes,
            handshake_timeout_secs,
            request_timeout_secs,
            max_connections,
            max_handshakes,
            max_concurrent_streams,
            max_in_flight,
            keepalive_secs,
            max_connection_age_secs,
            log_format,
            aws_endpoint,
            aws_region_endpoints,
            aws_key_state_ttl_secs,
        } = over;
        Self {
            listen: listen.or(self.listen),
            health_listen: health_listen.or(self.health_listen),
            metrics_listen: metrics_listen.or(self.metrics_listen),
            custody: custody.or(self.custody),
            keystore_dir: keystore_dir.or(self.keystore_dir),
            audit_public_key_file: audit_public_key_file.or(self.audit_public_key_file),
            root_key_file: root_key_file.or(self.root_key_file),
            pkcs11_module: pkcs11_module.or(self.pkcs11_module),
            pkcs11_token_label: pkcs11_token_label.or(self.pkcs11_token_label),
            pkcs11_slot: pkcs11_slot.or(self.pkcs11_slot),
            pkcs11_pin_file: pkcs11_pin_file.or(self.pkcs11_pin_file),
            pkcs11_sessions: pkcs11_sessions.or(self.pkcs11_sessions),
            pkcs11_timeout_secs: pkcs11_timeout_secs.or(self.pkcs11_timeout_secs),
            import_key_bits: import_key_bits.or(self.import_key_bits),
            allowed_clients: if allowed_clients.is_empty() {
                self.allowed_clients
            } else {
                allowed_clients
            },
            tls_cert: tls_cert.or(self.tls_cert),
            tls_key: tls_key.or(self.tls_key),
            tls_client_ca: tls_client_ca.or(self.tls_client_ca),
            tls_client_crls: if tls_client_crls.is_empty() {
                self.tls_client_crls
            } else {
                tls_client_crls
            },
            allow_common_name_identities: allow_common_name_identities
                .or(self.allow_common_name_identities),
            max_message_bytes: max_message_bytes.or(self.max_message_bytes),
            max_batch_items: max_batch_items.or(self.max_batch_items),
            max_plaintext_bytes: max_plaintext_bytes.or(self.max_plaintext_bytes),
            max_associated_data_bytes: max_associated_data_bytes.or(self.max_associated_data_bytes),
            handshake_timeout_secs: handshake_timeout_secs.or(self.handshake_timeout_secs),
            request_timeout_secs: request_timeout_secs.or(self.request_timeout_secs),
            max_connections: max_connections.or(self.max_connections),
            max_handshakes: max_handshakes.or(self.max_handshakes),
            max_concurrent_streams: max_concurrent_streams.or(self.max_concurrent_streams),
            max_in_flight: max_in_flight.or(self.max_in_flight),
            keepalive_secs: keepalive_secs.or(self.keepalive_secs),
            max_connection_age_secs: max_connection_age_secs.or(self.max_connection_age_secs),
            log_format: log_format.or(self.log_format),
            aws_endpoint: aws_endpoint.or(self.aws_endpoint),
            aws_region_endpoints: if aws_region_endpoints.is_empty() {
                self.aws_region_endpoints
            } else {
                aws_region_endpoints
            },
            aws_key_state_ttl_secs: aws_key_state_ttl_secs.or(self.aws_key_state_ttl_secs),
        }
    }

    /// Checks every field and resolves the root key (from `root_key_env`, the
    /// value of [`ROOT_KEY_ENV`], or the root key file) and, with
    /// `custody = "pkcs11"`, the PIN (from [`PKCS11_PIN_ENV`] in this
    /// process's environment, or the PIN file).
    pub fn validate(self, root_key_env: Option<SecretBytes>) -> Result<Settings, ConfigError> {
        let pkcs11_pin = std::env::var_os(PKCS11_PIN_ENV)
            .map(|value| SecretBytes::new(value.into_encoded_bytes()));
        self.validate_with(SecretInputs {
            root_key: root_key_env,
            pkcs11_pin,
        })
    }

    /// As [`RawSettings::validate`], with the secrets that may come from the
    /// environment given rather than read.
    pub fn validate_with(self, secrets: SecretInputs) -> Result<Settings, ConfigError> {
        let SecretInputs {
            root_key: root_key_env,
            pkcs11_pin,
        } = secrets;
        let mut errors = Vec::new();
        let mut required = |name: &str, value: Option<PathBuf>| {
            if value.is_none() {
                errors.push(format!("{name}: required"));
            }
            value.unwrap_or_default()
        };
        let tls = TlsFiles {
            cert: required("tls_cert", self.tls_cert),
            key: required("tls_key", self.tls_key),
            ca: required("tls_client_ca", self.tls_client_ca),
        };
        for (name, path) in [
            ("tls_cert", &tls.cert),
            ("tls_key", &tls.key),
            ("tls_client_ca", &tls.ca),
        ] {
            if !path.as_os_str().is_empty() && !path.is_file() {
                errors.push(format!("{name}: {} is not a readable file", path.display()));
            }
        }
        let tls_client_crls = self.tls_client_crls;
        for path in &tls_client_crls {
            if !path.is_file() {
                errors.push(format!(
                    "tls_client_crls: {} is not a readable file",
                    path.display()
                ));
            }
        }
        let identities = IdentityRule::new(self.allow_common_name_identities.unwrap_or(false));

        let ListenAddrs {
            listen,
            health: health_listen,
            metrics: metrics_listen,
        } = ListenAddrs::validate(
            self.listen.as_deref(),
            self.health_listen.as_deref(),
            self.metrics_listen.as_deref(),
            7443,
            &mut errors,
        );

        let import_key_bits = match self.import_key_bits {
            None => ImportKeyBits::default(),
            Some(bits) => ImportKeyBits::from_bits(bits).unwrap_or_else(|| {
                errors.push(format!(
                    "import_key_bits: {bits} is not offered; use 3072 or 4096"
                ));
                ImportKeyBits::default()
            }),
        };

        let allowed_clients: BTreeSet<String> = self
            .allowed_clients
            .iter()
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect();
        if allowed_clients.is_empty() {
            errors.push(
                "allowed_clients: at least one client identity (the control plane's) is required"
                    .into(),
            );
        }
        for client in &allowed_clients {
            if let Err(e) = identities.check_configured(client) {
                errors.push(format!("allowed_clients: {e}"));
            }
        }

        let mut bounded = |name: &str, value: Option<usize>, default: usize, max: usize| {
            let v = value.unwrap_or(default);
            if v == 0 || v > max {
                errors.push(format!("{name}: {v} is out of range 1..={max}"));
            }
            v
        };
        let limits = Limits {
            max_message_bytes: bounded(
                "max_message_bytes",
                self.max_message_bytes,
                4 << 20,
                64 << 20,
            ),
            max_batch_items: bounded("max_batch_items", self.max_batch_items, 1000, 100_000),
            max_plaintext_bytes: bounded(
                "max_plaintext_bytes",
                self.max_plaintext_bytes,
                1024,
                64 << 10,
            ),
            max_associated_data_bytes: bounded(
                "max_associated_data_bytes",
                self.max_associated_data_bytes,
                1024,
                64 << 10,
            ),
            handshake_timeout: Duration::from_secs(bounded(
                "handshake_timeout_secs",
                self.handshake_timeout_secs.map(|s| s as usize),
                10,
                300,
            ) as u64),
            request_timeout: Duration::from_secs(bounded(
                "request_timeout_secs",
                self.request_timeout_secs.map(|s| s as usize),
                30,
                3600,
            ) as u64),
        };

        let key_state_ttl = Duration::from_secs(bounded(
            "aws_key_state_ttl_secs",
            self.aws_key_state_ttl_secs.map(|s| s as usize),
            30,
            3600,
        ) as u64);

        let log_format = LogFormat::parse(self.log_format.as_deref()).unwrap_or_else(|e| {
            errors.push(e);
            LogFormat::Text
        });

        let aws = Aws {
            endpoint: self.aws_endpoint.and_then(|url| {
                check_endpoint(&url)
                    .map_err(|e| errors.push(format!("aws_endpoint: {e}")))
                    .ok()
            }),
            region_endpoints: self
                .aws_region_endpoints
                .iter()
                // An empty variable, or a trailing comma, names no region.
                .filter(|entry| !entry.trim().is_empty())
                .filter_map(|entry| {
                    let parsed = entry
                        .split_once('=')
                        .filter(|(region, _)| {
                            !region.is_empty()
                                && region.bytes().all(|b| {
                                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
                                })
                        })
                        .ok_or_else(|| {
                            format!("{entry:?} is not region=url, e.g. eu-west-1=https://…")
                        })
                        .and_then(|(region, url)| Ok((region.to_owned(), check_endpoint(url)?)));
                    parsed
                        .map_err(|e| errors.push(format!("aws_region_endpoints: {e}")))
                        .ok()
                })
                .collect(),
            key_state_ttl,
        };

        let kind = match self.custody.as_deref().map(str::trim) {
            None | Some("software") => CustodyKind::Software,
            Some("pkcs11") => CustodyKind::Pkcs11,
            Some(other) => {
                errors.push(format!(
                    "custody: {other:?} is not a custody backend; use \"software\" or \"pkcs11\""
                ));
                CustodyKind::Software
            }
        };
        let unused = |errors: &mut Vec<String>, name: &str, set: bool, kind: &str| {
            if set {
                errors.push(format!("{name}: only used with custody = \"{kind}\""));
            }
        };
        let custody = match kind {
            CustodyKind::Software => {
                for (name, set) in [
                    ("pkcs11_module", self.pkcs11_module.is_some()),
                    ("pkcs11_token_label", self.pkcs11_token_label.is_some()),
                    ("pkcs11_slot", self.pkcs11_slot.is_some()),
                    ("pkcs11_pin_file", self.pkcs11_pin_file.is_some()),
                    (PKCS11_PIN_ENV, pkcs11_pin.is_some()),
                    ("pkcs11_sessions", self.pkcs11_sessions.is_some()),
                    ("pkcs11_timeout_secs", self.pkcs11_timeout_secs.is_some()),
                ] {
                    unused(&mut errors, name, set, "pkcs11");
                }
                let keystore_dir = self.keystore_dir.unwrap_or_else(|| {
                    errors.push("keystore_dir: required".into());
                    PathBuf::new()
                });
                software_root_key(&mut errors, root_key_env, self.root_key_file.as_deref()).map(
                    |root_key| CustodySettings::Software {
                        keystore_dir,
                        root_key,
                    },
                )
            }
            CustodyKind::Pkcs11 => {
                for (name, set) in [
                    ("keystore_dir", self.keystore_dir.is_some()),
                    ("root_key_file", self.root_key_file.is_some()),
                    (ROOT_KEY_ENV, root_key_env.is_some()),
                ] {
                    unused(&mut errors, name, set, "software");
                }
                pkcs11_settings(
                    &mut errors,
                    Pkcs11Raw {
                        module: self.pkcs11_module,
                        token_label: self.pkcs11_token_label,
                        slot: self.pkcs11_slot,
                        pin_file: self.pkcs11_pin_file,
                        pin_env: pkcs11_pin,
                        sessions: self.pkcs11_sessions,
                        timeout_secs: self.pkcs11_timeout_secs,
                    },
                    import_key_bits,
                )
                .map(|settings| CustodySettings::Pkcs11(Box::new(settings)))
            }
        };

        let connections = ConnectionLimits::validate(
            RawConnectionLimits {
                max_connections: self.max_connections,
                max_handshakes: self.max_handshakes,
                max_concurrent_streams: self.max_concurrent_streams,
                max_in_flight: self.max_in_flight,
                keepalive_secs: self.keepalive_secs,
                max_connection_age_secs: self.max_connection_age_secs,
            },
            &mut errors,
        );
        match custody {
            Some(custody) if errors.is_empty() => Ok(Settings {
                listen,
                health_listen,
                metrics_listen,
                audit_public_key_file: self.audit_public_key_file,
                custody,
                import_key_bits,
                allowed_clients,
                identities,
                tls,
                tls_client_crls,
                limits,
                connections,
                log_format,
                aws,
            }),
            _ => Err(ConfigError(errors)),
        }
    }
}

/// Which backend `custody` names.
#[derive(Clone, Copy)]
enum CustodyKind {
    Software,
    Pkcs11,
}

/// The secrets that may come from the process environment rather than from
/// a file: each read once by the caller of [`RawSettings::validate_with`].
#[derive(Debug, Default)]
pub struct SecretInputs {
    /// The value of [`ROOT_KEY_ENV`].
    pub root_key: Option<SecretBytes>,
    /// The value of [`PKCS11_PIN_ENV`].
    pub pkcs11_pin: Option<SecretBytes>,
}

/// The root key of the software keystore, from the environment or its file.
fn software_root_key(
    errors: &mut Vec<String>,
    root_key_env: Option<SecretBytes>,
    root_key_file: Option<&Path>,
) -> Option<RootKey> {
    match (root_key_env, root_key_file) {
        (Some(_), Some(_)) => {
            errors.push(format!(
                "root_key_file: set either it or {ROOT_KEY_ENV}, not both"
            ));
            None
        }
        (Some(value), None) => RootKey::from_hex(&value)
            .map_err(|e| errors.push(format!("{ROOT_KEY_ENV}: {e}")))
            .ok(),
        (None, Some(path)) => read_root_key_file(path)
            .map_err(|e| errors.push(format!("root_key_file: {e}")))
            .ok(),
        (None, None) => {
            errors.push(format!("root key: none configured; {ROOT_KEY_HOWTO}"));
            None
        }
    }
}

/// The PKCS#11 settings as read.
struct Pkcs11Raw {
    module: Option<PathBuf>,
    token_label: Option<String>,
    slot: Option<u64>,
    pin_file: Option<PathBuf>,
    pin_env: Option<SecretBytes>,
    sessions: Option<usize>,
    timeout_secs: Option<u64>,
}

/// Checks the PKCS#11 settings, naming each bad one in `errors`.
fn pkcs11_settings(
    errors: &mut Vec<String>,
    raw: Pkcs11Raw,
    import_key_bits: ImportKeyBits,
) -> Option<Pkcs11Settings> {
    let module = match raw.module {
        None => {
            errors.push(
                "pkcs11_module: required with custody = \"pkcs11\" (e.g. /usr/lib/softhsm/libsofthsm2.so)"
                    .into(),
            );
            None
        }
        Some(path) if !path.is_file() => {
            errors.push(format!(
                "pkcs11_module: {} is not a readable file",
                path.display()
            ));
            None
        }
        Some(path) => Some(path),
    };
    let token = match (raw.token_label, raw.slot) {
        (Some(label), None) if !label.trim().is_empty() => Some(TokenSelector::Label(label)),
        (None, Some(slot)) => Some(TokenSelector::Slot(slot)),
        (Some(_), Some(_)) => {
            errors.push("pkcs11_token_label: set either it or pkcs11_slot, not both".into());
            None
        }
        (Some(_), None) => {
            errors.push("pkcs11_token_label: empty".into());
            None
        }
        (None, None) => {
            errors.push(
                "pkcs11_token_label: required with custody = \"pkcs11\" (or pkcs11_slot)".into(),
            );
            None
        }
    };
    let pin = match (raw.pin_env, raw.pin_file) {
        (Some(_), Some(_)) => {
            errors.push(format!(
                "pkcs11_pin_file: set either it or {PKCS11_PIN_ENV}, not both"
            ));
            None
        }
        (Some(mut pin), None) => cmk_hsm_pkcs11::pin_from_text(&mut pin)
            .map(|()| pin)
            .map_err(|e| errors.push(format!("{PKCS11_PIN_ENV}: {e}")))
            .ok(),
        (None, Some(path)) => cmk_hsm_pkcs11::read_pin_file(&path)
            .map_err(|e| errors.push(format!("pkcs11_pin_file: {e}")))
            .ok(),
        (None, None) => {
            errors.push(format!(
                "pkcs11 PIN: none configured; put it in a file (chmod 600) named by \
                 pkcs11_pin_file, or in {PKCS11_PIN_ENV}"
            ));
            None
        }
    };
    let sessions = raw.sessions.unwrap_or(Pkcs11Settings::DEFAULT_SESSIONS);
    if !(1..=256).contains(&sessions) {
        errors.push(format!(
            "pkcs11_sessions: {sessions} is out of range 1..=256"
        ));
    }
    let timeout_secs = raw
        .timeout_secs
        .unwrap_or(Pkcs11Settings::DEFAULT_TIMEOUT.as_secs());
    if !(1..=300).contains(&timeout_secs) {
        errors.push(format!(
            "pkcs11_timeout_secs: {timeout_secs} is out of range 1..=300"
        ));
    }
    let (module, token, pin) = (module?, token?, pin?);
    Some(Pkcs11Settings {
        module,
        token,
        pin,
        sessions,
        timeout: Duration::from_secs(timeout_secs),
        import_key_bits,
    })
}

/// An endpoint URL the AWS SDK can use: http or https, nothing else.
fn check_endpoint(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{url:?} has no host, or has blanks in it"));
    }
    Ok(url.to_owned())
}

fn read_root_key_file(path: &Path) -> Result<RootKey, String> {
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Group read is allowed: on Kubernetes a Secret mounted into a pod with an
    // fsGroup always gets it (mode 0440, group = the pod's own fsGroup), and
    // that group is the daemon's. Anything more open is refused.
    if meta.mode() & 0o037 != 0 {
        return Err(format!(
            "{} is open to other users (mode {:o}); chmod 600 (or 640) it",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    let bytes = SecretBytes::new(fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?);
    RootKey::from_hex(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Validated settings of the daemon.
#[derive(Debug)]
pub struct Settings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Plaintext gRPC health only, for probes; off when `None`.
    pub health_listen: Option<SocketAddr>,
    /// Plaintext Prometheus metrics at /metrics; off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the audit public key is published at start.
    pub audit_public_key_file: Option<PathBuf>,
    /// Where CMKs are kept.
    pub custody: CustodySettings,
    /// Size of a newly generated RSA import key.
    pub import_key_bits: ImportKeyBits,
    /// Client identities (see `cmk_tls::PeerIdentity`) allowed to call.
    pub allowed_clients: BTreeSet<String>,
    /// How a client's identity is read from its certificate.
    pub identities: IdentityRule,
    /// Server certificate, key, and the CA clients must chain to.
    pub tls: TlsFiles,
    /// Revocation lists of the client CA; none: no revocation check.
    pub tls_client_crls: Vec<PathBuf>,
    /// Bounds on every request.
    pub limits: Limits,
    /// Connections, handshakes, streams and requests in flight.
    pub connections: ConnectionLimits,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// How AWS KMS is reached for the keys it holds references to.
    pub aws: Aws,
}

/// The custody backend and what it needs.
#[derive(Debug)]
pub enum CustodySettings {
    /// The software keystore.
    Software {
        /// Directory of the keystore.
        keystore_dir: PathBuf,
        /// The key every keystore file is sealed under.
        root_key: RootKey,
    },
    /// A PKCS#11 token.
    Pkcs11(Box<Pkcs11Settings>),
}

/// How the daemon reaches AWS KMS. Its own AWS identity comes from the SDK's
/// default chain: the environment, the shared profile, web identity (EKS),
/// the ECS or EC2 metadata service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Aws {
    /// Every KMS and STS call goes here when set.
    pub endpoint: Option<String>,
    /// Per region, overrides `endpoint`.
    pub region_endpoints: std::collections::BTreeMap<String, String>,
    /// How long a key's state is trusted.
    pub key_state_ttl: Duration,
}

/// Bounds on requests, so that no caller can make the daemon do unbounded work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest gRPC message accepted.
    pub max_message_bytes: usize,
    /// Most items in one batch call.
    pub max_batch_items: usize,
    /// Largest secret Wrap accepts.
    pub max_plaintext_bytes: usize,
    /// Largest associated data.
    pub max_associated_data_bytes: usize,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for one request.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            max_batch_items: 1000,
            max_plaintext_bytes: 1024,
            max_associated_data_bytes: 1024,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Every problem found in the configuration, one per line.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for problem in &self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn every_bad_setting_is_named_at_once() {
        let raw = RawSettings {
            listen: Some("nowhere".into()),
            import_key_bits: Some(2048),
            max_batch_items: Some(0),
            log_format: Some("xml".into()),
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_client_crls: vec!["/nonexistent/client.crl".into()],
            allowed_clients: vec!["control-plane".into()],
            aws_endpoint: Some("ftp://kms".into()),
            aws_region_endpoints: vec!["eu-west-1".into(), "EU=http://x".into()],
            aws_key_state_ttl_secs: Some(0),
            ..RawSettings::default()
        };
        let err = raw.validate(None).expect_err("invalid");
        let text = err.to_string();
        for name in [
            "listen:",
            "keystore_dir: required",
            "tls_key: required",
            "tls_client_ca: required",
            "tls_cert: /nonexistent/cert.pem is not a readable file",
            "import_key_bits: 2048",
            "tls_client_crls: /nonexistent/client.crl is not a readable file",
            "allowed_clients: \"control-plane\" is not a URI",
            "max_batch_items: 0",
            "log_format:",
            "root key: none configured; make one with `openssl rand -hex 32",
            "aws_endpoint: \"ftp://kms\" is not an http:// or https:// URL",
            "aws_region_endpoints: \"eu-west-1\" is not region=url",
            "aws_region_endpoints: \"EU=http://x\" is not region=url",
            "aws_key_state_ttl_secs: 0",
        ] {
            assert!(text.contains(name), "missing {name:?} in:\n{text}");
        }
    }

    #[test]
    fn every_bad_pkcs11_setting_is_named_at_once() {
        let raw = RawSettings {
            custody: Some("pkcs11".into()),
            keystore_dir: Some("/var/lib/cmk".into()),
            pkcs11_module: Some("/nonexistent/libvendor.so".into()),
            pkcs11_token_label: Some("cmk".into()),
            pkcs11_slot: Some(3),
            pkcs11_sessions: Some(0),
            pkcs11_timeout_secs: Some(0),
            ..RawSettings::default()
        };
        let text = raw
            .validate_with(SecretInputs::default())
            .expect_err("invalid")
            .to_string();
        for name in [
            "keystore_dir: only used with custody = \"software\"",
            "pkcs11_module: /nonexistent/libvendor.so is not a readable file",
            "pkcs11_token_label: set either it or pkcs11_slot, not both",
            "pkcs11 PIN: none configured",
            "pkcs11_sessions: 0",
            "pkcs11_timeout_secs: 0",
        ] {
            assert!(text.contains(name), "missing {name:?} in:\n{text}");
        }
        assert!(!text.contains("root key"), "no root key needed:\n{text}");

        let raw = RawSettings {
            custody: Some("hsm".into()),
            ..RawSettings::default()
        };
        let text = raw.validate(None).expect_err("invalid").to_string();
        assert!(
            text.contains("custody: \"hsm\" is not a custody backend"),
            "{text}"
        );

        let raw = RawSettings {
            pkcs11_module: Some("/usr/lib/softhsm/libsofthsm2.so".into()),
            ..RawSettings::default()
        };
        let text = raw
            .validate_with(SecretInputs::default())
            .expect_err("invalid")
            .to_string();
        assert!(
            text.contains("pkcs11_module: only used with custody = \"pkcs11\""),
            "{text}"
        );
    }

    #[test]
    fn pkcs11_settings_take_the_pin_without_ever_printing_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let module = dir.path().join("libvendor.so");
        fs::write(&module, b"").expect("write");
        for file in ["server.crt", "server.key", "ca.crt"] {
            fs::write(dir.path().join(file), b"").expect("write");
        }
        let raw = RawSettings {
            custody: Some("pkcs11".into()),
            pkcs11_module: Some(module.clone()),
            pkcs11_token_label: Some("cmk".into()),
            allowed_clients: vec!["spiffe://cmk.test/control-plane".into()],
            tls_cert: Some(dir.path().join("server.crt")),
            tls_key: Some(dir.path().join("server.key")),
            tls_client_ca: Some(dir.path().join("ca.crt")),
            ..RawSettings::default()
        };
        let settings = raw
            .validate_with(SecretInputs {
                root_key: None,
                pkcs11_pin: Some(SecretBytes::copy_from(b"pin-4711\n")),
            })
            .expect("valid");
        let CustodySettings::Pkcs11(pkcs11) = &settings.custody else {
            panic!("not pkcs11: {:?}", settings.custody);
        };
        assert_eq!(pkcs11.module, module);
        assert_eq!(pkcs11.token, TokenSelector::Label("cmk".into()));
        assert_eq!(pkcs11.pin.expose(), b"pin-4711");
        assert_eq!(pkcs11.sessions, Pkcs11Settings::DEFAULT_SESSIONS);
        assert!(!format!("{settings:?}").contains("4711"));
    }

    #[test]
    fn root_key_errors_never_echo_the_key() {
        let secret = "not-hex-but-secret-0123456789abcdef0123456789abcdef0123456789abc";
        let raw = RawSettings::default();
        let err = raw
            .validate(Some(SecretBytes::copy_from(secret.as_bytes())))
            .expect_err("invalid");
        assert!(
            err.to_string()
                .contains("CMK_HSM_ROOT_KEY: root key must be"),
            "{err}"
        );
        assert!(!err.to_string().contains(secret));
    }

    #[test]
    fn a_root_key_file_open_beyond_its_group_reading_it_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root.key");
        fs::write(&path, HEX).expect("write");
        let problem = |mode: u32| {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            let raw = RawSettings {
                root_key_file: Some(path.clone()),
                ..RawSettings::default()
            };
            let err = raw.validate(None).expect_err("other settings are missing");
            err.0.into_iter().find(|e| e.contains("root.key"))
        };
        for mode in [0o644, 0o604, 0o660, 0o620] {
            let err = problem(mode).unwrap_or_else(|| panic!("mode {mode:o} accepted"));
            assert!(
                err.contains(&format!("open to other users (mode {mode:o}); chmod 600")),
                "{err}"
            );
        }
        // 0440 is how Kubernetes mounts a Secret into a pod with an fsGroup.
        for mode in [0o600, 0o400, 0o640, 0o440] {
            assert_eq!(problem(mode), None, "mode {mode:o}");
        }
    }

    #[test]
    fn identities_are_uris_unless_common_names_are_allowed_and_crls_are_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        for file in [
            "server.crt",
            "server.key",
            "ca.crt",
            "a.crl",
            "b.crl",
            "root.key",
        ] {
            fs::write(dir.path().join(file), b"").expect("write");
        }
        let raw = |allow: Option<bool>| RawSettings {
            keystore_dir: Some(dir.path().join("keystore")),
            allowed_clients: vec!["spiffe://cmk.test/control-plane".into(), "legacy".into()],
            tls_cert: Some(dir.path().join("server.crt")),
            tls_key: Some(dir.path().join("server.key")),
            tls_client_ca: Some(dir.path().join("ca.crt")),
            tls_client_crls: vec![dir.path().join("a.crl"), dir.path().join("b.crl")],
            allow_common_name_identities: allow,
            ..RawSettings::default()
        };
        let root_key = || Some(SecretBytes::copy_from(HEX.as_bytes()));
        for allow in [None, Some(false)] {
            let ConfigError(problems) = raw(allow).validate(root_key()).expect_err("legacy");
            assert_eq!(
                problems,
                ["allowed_clients: \"legacy\" is not a URI (such as \
                  spiffe://cmk.example/control-plane); identities from a DNS SAN or common \
                  name match only with allow_common_name_identities = true"]
            );
        }
        let settings = raw(Some(true)).validate(root_key()).expect("valid");
        assert_eq!(settings.identities, IdentityRule::new(true));
        assert_eq!(
            settings.tls_client_crls,
            [dir.path().join("a.crl"), dir.path().join("b.crl")]
        );
    }

    #[test]
    fn the_tls_flags_parse() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            raw: RawSettings,
        }
        let parse = |args: &[&str]| {
            <Flags as clap::Parser>::try_parse_from(
                std::iter::once("hsm-daemon").chain(args.iter().copied()),
            )
            .map(|flags| flags.raw)
        };
        let raw = parse(&[
            "--tls-client-crl",
            "a.crl",
            "--tls-client-crl",
            "b.crl",
            "--allow-common-name-identities",
        ])
        .expect("flags");
        assert_eq!(
            raw.tls_client_crls,
            [PathBuf::from("a.crl"), "b.crl".into()]
        );
        assert_eq!(raw.allow_common_name_identities, Some(true));
        let raw = parse(&["--allow-common-name-identities=false"]).expect("flags");
        assert_eq!(raw.allow_common_name_identities, Some(false));
        let Err(err) = parse(&["--allow-common-name-identities=yes"]) else {
            panic!("not a bool");
        };
        let err = err.to_string();
        assert!(err.contains("--allow-common-name-identities"), "{err}");
    }

    #[test]
    fn the_example_configuration_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/hsm-daemon.example.toml");
        let raw = RawSettings::from_file(&path).expect("example parses");
        assert_eq!(raw.import_key_bits, Some(3072));
        assert_eq!(
            raw.allowed_clients,
            vec!["spiffe://cmk.example/control-plane".to_string()]
        );
        assert_eq!(raw.log_format.as_deref(), Some("json"));
        assert_eq!(raw.aws_key_state_ttl_secs, Some(30));
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        fs::write(&path, "listen = \"127.0.0.1:1\"\nlisen = 1\n").expect("write");
        let err = RawSettings::from_file(&path).expect_err("typo").to_string();
        assert!(err.contains("unknown field `lisen`"), "{err}");
    }

    #[test]
    fn later_sources_override_earlier_ones() {
        let file = RawSettings {
            listen: Some("127.0.0.1:1".into()),
            allowed_clients: vec!["a".into()],
            max_batch_items: Some(5),
            ..RawSettings::default()
        };
        let flags = RawSettings {
            listen: Some("127.0.0.1:2".into()),
            ..RawSettings::default()
        };
        let merged = file.overlay(flags);
        assert_eq!(merged.listen.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(merged.allowed_clients, vec!["a".to_string()]);
        assert_eq!(merged.max_batch_items, Some(5));
    }
}
