//! Configuration: a TOML file, command-line flags and environment variables
//! (`CMK_CP_*`), merged (flag over environment over file over default) and
//! validated once into [`Settings`]. Every bad setting is reported together,
//! each with its name.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use cmk_control_plane_domain::Policy;
use cmk_control_plane_store::{Backend, redact_url};
pub use cmk_runtime::LogFormat;
use cmk_runtime::server::{ConnectionLimits, ListenAddrs, RawConnectionLimits};
use cmk_tls::{IdentityRule, TlsFiles};
use serde::Deserialize;

use crate::authz::AuthzPolicy;

/// Most HSM daemons one control plane may balance over.
const MAX_HSM_ENDPOINTS: usize = 16;

/// Settings as read: every field optional, nothing checked yet.
#[derive(Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    /// Address to listen on [default: 127.0.0.1:8443].
    #[arg(long, env = "CMK_CP_LISTEN")]
    pub listen: Option<String>,
    /// Plaintext address serving only gRPC health, for probes that cannot
    /// present a client certificate (Kubernetes); off unless set.
    #[arg(long, env = "CMK_CP_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
    /// Plaintext address serving Prometheus metrics at /metrics; off unless set.
    #[arg(long, env = "CMK_CP_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Server certificate chain, PEM.
    #[arg(long, env = "CMK_CP_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key, PEM.
    #[arg(long, env = "CMK_CP_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA that client (admin, service) certificates must chain to, PEM.
    #[arg(long, env = "CMK_CP_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Certificate revocation list of the client CA, PEM or DER (repeat, or
    /// comma-separate in the environment); reloaded when it changes. With
    /// CRLs set, a client certificate they list, or whose CA issued none of
    /// them, or whose CRL is past its nextUpdate, is refused at the handshake.
    #[arg(
        long = "tls-client-crl",
        env = "CMK_CP_TLS_CLIENT_CRLS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub tls_client_crls: Vec<PathBuf>,
    /// Name a client whose certificate has no URI SAN by its one DNS SAN,
    /// else its subject common name; without this, exactly one URI SAN is
    /// required [default: false].
    #[arg(
        long,
        env = "CMK_CP_ALLOW_COMMON_NAME_IDENTITIES",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_common_name_identities: Option<bool>,
    /// The HSM daemon, as https://host:port [default: https://127.0.0.1:7443].
    /// Several daemons serving one custody (one PKCS#11 token): repeat the
    /// flag or separate them with commas; calls take turns and fail over.
    #[arg(
        long = "hsm-endpoint",
        env = "CMK_CP_HSM_ENDPOINTS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub hsm_endpoints: Vec<String>,
    /// Name the HSM daemon's certificate must carry [default: localhost].
    #[arg(long, env = "CMK_CP_HSM_SERVER_NAME")]
    pub hsm_server_name: Option<String>,
    /// The control plane's client certificate towards the HSM daemon, PEM.
    #[arg(long, env = "CMK_CP_HSM_TLS_CERT")]
    pub hsm_tls_cert: Option<PathBuf>,
    /// Its private key, PEM.
    #[arg(long, env = "CMK_CP_HSM_TLS_KEY")]
    pub hsm_tls_key: Option<PathBuf>,
    /// CA the HSM daemon's certificate must chain to, PEM.
    #[arg(long, env = "CMK_CP_HSM_TLS_CA")]
    pub hsm_tls_ca: Option<PathBuf>,
    /// The HSM daemon's AWS principal (its IAM role ARN, e.g. its IRSA role),
    /// which an org's role must trust; shown to org admins by GetAwsSetup.
    #[arg(long, env = "CMK_CP_AWS_PRINCIPAL_ARN")]
    pub aws_principal_arn: Option<String>,
    /// A file every signed audit checkpoint this process stores is appended
    /// to, one JSON object per line, for a log shipper to carry to write-once
    /// storage [default: none].
    #[arg(long, env = "CMK_CP_AUDIT_EXPORT_FILE")]
    pub audit_export_file: Option<PathBuf>,
    /// Metadata store: sqlite://path/to/cmk.db, or
    /// postgres://user@host/db (libpq parameters, e.g. sslmode=verify-full).
    #[arg(long, env = "CMK_CP_DATABASE")]
    pub database: Option<String>,
    /// Connections to PostgreSQL this replica may hold [default: 10].
    #[arg(long, env = "CMK_CP_DATABASE_MAX_CONNECTIONS")]
    pub database_max_connections: Option<u64>,
    /// Seconds a replica's claim on a rotation job or the timers lasts unless
    /// renewed; another replica takes over this long after one dies [default: 6].
    #[arg(long, env = "CMK_CP_LEASE_TTL_SECS")]
    pub lease_ttl_secs: Option<u64>,
    /// Authorisation policy file (TOML grants of roles per organisation).
    #[arg(long, env = "CMK_CP_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// Days a deactivated key is kept before it is destroyed [default: 30].
    #[arg(long, env = "CMK_CP_DEACTIVATED_RETENTION_DAYS")]
    pub deactivated_retention_days: Option<u64>,
    /// Days a master key may be active before it is flagged "rotation due";
    /// the generic default key renews itself on this schedule [default: 365].
    #[arg(long, env = "CMK_CP_ROTATION_PERIOD_DAYS")]
    pub rotation_period_days: Option<u64>,
    /// Most unwrapped KEKs held in memory [default: 100000].
    #[arg(long, env = "CMK_CP_KEK_CACHE_ENTRIES")]
    pub kek_cache_entries: Option<u64>,
    /// Seconds an unwrapped KEK stays in memory [default: 300].
    #[arg(long, env = "CMK_CP_KEK_CACHE_TTL_SECS")]
    pub kek_cache_ttl_secs: Option<u64>,
    /// KEKs re-wrapped per batch by rotation jobs [default: 1000].
    #[arg(long, env = "CMK_CP_ROTATION_BATCH")]
    pub rotation_batch: Option<u64>,
    /// Seconds between runs of the timers (expiry, repair) [default: 60].
    #[arg(long, env = "CMK_CP_MAINTENANCE_INTERVAL_SECS")]
    pub maintenance_interval_secs: Option<u64>,
    /// Largest accepted gRPC message, bytes [default: 65536].
    #[arg(long, env = "CMK_CP_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Seconds a TLS handshake may take [default: 10].
    #[arg(long, env = "CMK_CP_HANDSHAKE_TIMEOUT_SECS")]
    pub handshake_timeout_secs: Option<u64>,
    /// Seconds a request may take [default: 30].
    #[arg(long, env = "CMK_CP_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// Connections open at once, TLS handshakes included; one beyond is
    /// closed when accepted [default: 4096].
    #[arg(long, env = "CMK_CP_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    /// TLS handshakes doing their cryptography at once [default: 64].
    #[arg(long, env = "CMK_CP_MAX_HANDSHAKES")]
    pub max_handshakes: Option<u64>,
    /// HTTP/2 streams (calls in flight) per connection [default: 128].
    #[arg(long, env = "CMK_CP_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u64>,
    /// Requests in flight over all connections; one beyond is answered
    /// RESOURCE_EXHAUSTED [default: 2048].
    #[arg(long, env = "CMK_CP_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<u64>,
    /// Seconds between HTTP/2 keepalive pings; a peer silent as long again
    /// is dropped [default: 60].
    #[arg(long, env = "CMK_CP_KEEPALIVE_SECS")]
    pub keepalive_secs: Option<u64>,
    /// Seconds after which a connection is asked to close and reconnect
    /// [default: 3600].
    #[arg(long, env = "CMK_CP_MAX_CONNECTION_AGE_SECS")]
    pub max_connection_age_secs: Option<u64>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "CMK_CP_LOG_FORMAT")]
    pub log_format: Option<String>,
}

/// Why the configuration is unusable: every problem found, one per line.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
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
            tls_cert,
            tls_key,
            tls_client_ca,
            tls_client_crls,
            allow_common_name_identities,
            hsm_endpoints,
            hsm_server_name,
            hsm_tls_cert,
            hsm_tls_key,
            hsm_tls_ca,
            aws_principal_arn,
            audit_export_file,
            database,
            database_max_connections,
            lease_ttl_secs,
            policy_file,
            deactivated_retention_days,
            rotation_period_days,
            kek_cache_entries,
            kek_cache_ttl_secs,
            rotation_batch,
            maintenance_interval_secs,
            max_message_bytes,
            handshake_timeout_secs,
            request_timeout_secs,
            max_connections,
            max_handshakes,
            max_concurrent_streams,
            max_in_flight,
            keepalive_secs,
            max_connection_age_secs,
            log_format,
        } = over;
        Self {
            listen: listen.or(self.listen),
            health_listen: health_listen.or(self.health_listen),
            metrics_listen: metrics_listen.or(self.metrics_listen),
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
            hsm_endpoints: if hsm_endpoints.is_empty() {
                self.hsm_endpoints
            } else {
                hsm_endpoints
            },
            hsm_server_name: hsm_server_name.or(self.hsm_server_name),
            hsm_tls_cert: hsm_tls_cert.or(self.hsm_tls_cert),
            hsm_tls_key: hsm_tls_key.or(self.hsm_tls_key),
            hsm_tls_ca: hsm_tls_ca.or(self.hsm_tls_ca),
            aws_principal_arn: aws_principal_arn.or(self.aws_principal_arn),
            audit_export_file: audit_export_file.or(self.audit_export_file),
            database: database.or(self.database),
            database_max_connections: database_max_connections.or(self.database_max_connections),
            lease_ttl_secs: lease_ttl_secs.or(self.lease_ttl_secs),
            policy_file: policy_file.or(self.policy_file),
            deactivated_retention_days: deactivated_retention_days
                .or(self.deactivated_retention_days),
            rotation_period_days: rotation_period_days.or(self.rotation_period_days),
            kek_cache_entries: kek_cache_entries.or(self.kek_cache_entries),
            kek_cache_ttl_secs: kek_cache_ttl_secs.or(self.kek_cache_ttl_secs),
            rotation_batch: rotation_batch.or(self.rotation_batch),
            maintenance_interval_secs: maintenance_interval_secs.or(self.maintenance_interval_secs),
            max_message_bytes: max_message_bytes.or(self.max_message_bytes),
            handshake_timeout_secs: handshake_timeout_secs.or(self.handshake_timeout_secs),
            request_timeout_secs: request_timeout_secs.or(self.request_timeout_secs),
            max_connections: max_connections.or(self.max_connections),
            max_handshakes: max_handshakes.or(self.max_handshakes),
            max_concurrent_streams: max_concurrent_streams.or(self.max_concurrent_streams),
            max_in_flight: max_in_flight.or(self.max_in_flight),
            keepalive_secs: keepalive_secs.or(self.keepalive_secs),
            max_connection_age_secs: max_connection_age_secs.or(self.max_connection_age_secs),
            log_format: log_format.or(self.log_format),
        }
    }

    /// Checks every field and loads the authorisation policy.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let mut errors = Vec::new();
        let mut file = |name: &str, value: Option<PathBuf>| match value {
            None => {
                errors.push(format!("{name}: required"));
                PathBuf::new()
            }
            Some(path) if !path.is_file() => {
                errors.push(format!("{name}: {} is not a readable file", path.display()));
                path
            }
            Some(path) => path,
        };
        let tls = TlsFiles {
            cert: file("tls_cert", self.tls_cert),
            key: file("tls_key", self.tls_key),
            ca: file("tls_client_ca", self.tls_client_ca),
        };
        let hsm_tls = TlsFiles {
            cert: file("hsm_tls_cert", self.hsm_tls_cert),
            key: file("hsm_tls_key", self.hsm_tls_key),
            ca: file("hsm_tls_ca", self.hsm_tls_ca),
        };
        let policy_file = file("policy_file", self.policy_file);
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
            8443,
            &mut errors,
        );

        let mut hsm_endpoints: Vec<String> = Vec::new();
        for endpoint in self.hsm_endpoints.iter().map(|e| e.trim()) {
            if !endpoint.starts_with("https://") {
                errors.push(format!(
                    "hsm_endpoints: {endpoint:?} must be an https:// URL (the HSM daemon speaks only mutual TLS)"
                ));
            } else if hsm_endpoints.iter().any(|e| e == endpoint) {
                errors.push(format!("hsm_endpoints: {endpoint:?} is listed twice"));
            } else {
                hsm_endpoints.push(endpoint.to_owned());
            }
        }
        if hsm_endpoints.len() > MAX_HSM_ENDPOINTS {
            errors.push(format!(
                "hsm_endpoints: at most {MAX_HSM_ENDPOINTS} daemons, not {}",
                hsm_endpoints.len()
            ));
        }
        if self.hsm_endpoints.is_empty() {
            hsm_endpoints.push("https://127.0.0.1:7443".into());
        }
        let hsm_server_name = self.hsm_server_name.unwrap_or_else(|| "localhost".into());
        let aws_principal_arn = self.aws_principal_arn.filter(|arn| !arn.is_empty());
        if let Some(problem) = aws_principal_arn.as_deref().and_then(principal_problem) {
            errors.push(format!("aws_principal_arn: {problem}"));
        }

        let database = self.database.unwrap_or_default();
        if Backend::of(&database).is_none() {
            errors.push(match database.is_empty() {
                true => "database: required (sqlite://path/to/cmk.db or postgres://host/db)".into(),
                false => format!(
                    "database: {:?} is neither a sqlite:// nor a postgres:// URL",
                    redact_url(&database)
                ),
            });
        }

        let mut bounded = |name: &str, value: Option<u64>, default: u64, max: u64| {
            let v = value.unwrap_or(default);
            if v == 0 || v > max {
                errors.push(format!("{name}: {v} is out of range 1..={max}"));
            }
            v
        };
        let retention_days = bounded(
            "deactivated_retention_days",
            self.deactivated_retention_days,
            30,
            3650,
        );
        let rotation_period_days = bounded(
            "rotation_period_days",
            self.rotation_period_days,
            365,
            36_500,
        );
        let keys = KeySettings {
            kek_cache_entries: bounded(
                "kek_cache_entries",
                self.kek_cache_entries,
                100_000,
                10_000_000,
            ) as usize,
            kek_cache_ttl: Duration::from_secs(bounded(
                "kek_cache_ttl_secs",
                self.kek_cache_ttl_secs,
                300,
                86_400,
            )),
            // The HSM daemon's default batch limit is 1000 items.
            rotation_batch: bounded("rotation_batch", self.rotation_batch, 1000, 100_000) as u32,
        };
        let store = StoreSettings {
            max_connections: bounded(
                "database_max_connections",
                self.database_max_connections,
                10,
                1000,
            ) as u32,
            lease_ttl: Duration::from_secs(bounded("lease_ttl_secs", self.lease_ttl_secs, 6, 600)),
        };
        let maintenance_interval = Duration::from_secs(bounded(
            "maintenance_interval_secs",
            self.maintenance_interval_secs,
            60,
            86_400,
        ));
        let limits = Limits {
            max_message_bytes: bounded(
                "max_message_bytes",
                self.max_message_bytes.map(|v| v as u64),
                64 << 10,
                16 << 20,
            ) as usize,
            handshake_timeout: Duration::from_secs(bounded(
                "handshake_timeout_secs",
                self.handshake_timeout_secs,
                10,
                300,
            )),
            request_timeout: Duration::from_secs(bounded(
                "request_timeout_secs",
                self.request_timeout_secs,
                30,
                3600,
            )),
        };

        let log_format = LogFormat::parse(self.log_format.as_deref()).unwrap_or_else(|e| {
            errors.push(e);
            LogFormat::Text
        });

        let authz = match policy_file.as_os_str().is_empty() {
            true => None,
            false => AuthzPolicy::from_file(&policy_file)
                .map_err(|e| errors.push(format!("policy_file: {e}")))
                .ok(),
        };
        // A grant to a name no certificate can carry would never match.
        if let Some(authz) = &authz {
            for problem in authz.unmatchable_grants(identities) {
                errors.push(format!("policy_file: {}: {problem}", policy_file.display()));
            }
        }

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
        match authz {
            Some(authz) if errors.is_empty() => Ok(Settings {
                listen,
                health_listen,
                metrics_listen,
                tls,
                tls_client_crls,
                identities,
                hsm: HsmSettings {
                    endpoints: hsm_endpoints,
                    server_name: hsm_server_name,
                    tls: hsm_tls,
                },
                aws_principal_arn,
                audit_export_file: self.audit_export_file,
                database: Database(database),
                store,
                authz,
                lifecycle: Policy {
                    deactivated_retention: Duration::from_secs(retention_days * 86_400),
                    rotation_period: Duration::from_secs(rotation_period_days * 86_400),
                    ..Policy::default()
                },
                keys,
                maintenance_interval,
                limits,
                connections,
                log_format,
            }),
            _ => Err(ConfigError(errors)),
        }
    }
}

/// Validated settings of the control plane.
#[derive(Debug)]
pub struct Settings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Plaintext gRPC health only, for probes; off when `None`.
    pub health_listen: Option<SocketAddr>,
    /// Plaintext Prometheus metrics at /metrics; off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// Server certificate, key, and the CA clients must chain to.
    pub tls: TlsFiles,
    /// Revocation lists of the client CA; none: no revocation check.
    pub tls_client_crls: Vec<PathBuf>,
    /// How a client's identity is read from its certificate.
    pub identities: IdentityRule,
    /// How to reach the HSM daemon.
    pub hsm: HsmSettings,
    /// The HSM daemon's AWS principal, shown to orgs setting up a role.
    pub aws_principal_arn: Option<String>,
    /// Where signed checkpoints are exported, one JSON object per line.
    pub audit_export_file: Option<PathBuf>,
    /// Metadata store URL.
    pub database: Database,
    /// How the store is used.
    pub store: StoreSettings,
    /// Who may do what.
    pub authz: AuthzPolicy,
    /// Retention, restore and rotation periods.
    pub lifecycle: Policy,
    /// KEK cache and rotation batches.
    pub keys: KeySettings,
    /// Time between timer runs.
    pub maintenance_interval: Duration,
    /// Bounds on every request.
    pub limits: Limits,
    /// Connections, handshakes, streams and requests in flight.
    pub connections: ConnectionLimits,
    /// How log lines are written.
    pub log_format: LogFormat,
}

/// What is wrong with an IAM principal ARN
/// (`arn:<partition>:iam::<account>:role/…`, `user/…` or `root`), if anything.
fn principal_problem(arn: &str) -> Option<String> {
    let fields: Vec<&str> = arn.splitn(6, ':').collect();
    let well_formed = arn.len() <= 2048
        && fields.len() == 6
        && fields[0] == "arn"
        && fields[2] == "iam"
        && fields[3].is_empty()
        && fields[4].len() == 12
        && fields[4].bytes().all(|b| b.is_ascii_digit())
        && (fields[5] == "root"
            || fields[5].starts_with("role/")
            || fields[5].starts_with("user/"))
        && arn
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-:/".contains(&b));
    (!well_formed).then(|| {
        format!(
            "{arn:?} is not an IAM principal ARN \
             (arn:<partition>:iam::<account>:role/<name>, user/<name> or root)"
        )
    })
}

/// The metadata store's URL. Its `Debug` and `Display` hide a password
/// the URL may carry, so that the settings can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Database(pub String);

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_url(&self.0), f)
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// How the metadata store is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreSettings {
    /// PostgreSQL connections this replica may hold.
    pub max_connections: u32,
    /// How long a claim on leased work lasts unless renewed.
    pub lease_ttl: Duration,
}

/// How to reach the HSM daemon.
#[derive(Clone, Debug)]
pub struct HsmSettings {
    /// Each daemon's `https://host:port`: one, or several serving one
    /// custody.
    pub endpoints: Vec<String>,
    /// Name its certificate must carry.
    pub server_name: String,
    /// The control plane's client certificate and key, and the daemon's CA.
    pub tls: TlsFiles,
}

/// How KEKs are cached and rotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySettings {
    /// Most unwrapped KEKs in memory.
    pub kek_cache_entries: usize,
    /// How long one stays.
    pub kek_cache_ttl: Duration,
    /// KEKs per rotation batch.
    pub rotation_batch: u32,
}

/// Bounds on requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest gRPC message accepted.
    pub max_message_bytes: usize,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for one request.
    pub request_timeout: Duration,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_parses() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let raw = RawSettings::from_file(&deploy.join("control-plane.example.toml")).unwrap();
        assert_eq!(
            raw.database.as_deref(),
            Some("sqlite:///var/lib/cmk-cp/cmk.db")
        );
        assert_eq!(raw.hsm_endpoints, ["https://cmk-hsm:7443"]);
        assert_eq!(raw.rotation_period_days, Some(365));
        assert_eq!(raw.rotation_batch, Some(1000));
        let policy =
            AuthzPolicy::from_file(&deploy.join("control-plane.policy.example.toml")).unwrap();
        assert_eq!(policy.identities(), 3);
    }

    #[test]
    fn every_bad_setting_is_named() {
        let raw = RawSettings {
            listen: Some("nowhere".into()),
            deactivated_retention_days: Some(0),
            rotation_batch: Some(0),
            kek_cache_ttl_secs: Some(86_401),
            log_format: Some("xml".into()),
            ..RawSettings::default()
        };
        let ConfigError(problems) = raw.validate().unwrap_err();
        for expected in [
            "tls_cert: required",
            "policy_file: required",
            "database: required",
            "listen: ",
            "deactivated_retention_days: 0 is out of range",
            "rotation_batch: 0 is out of range",
            "kek_cache_ttl_secs: 86401 is out of range",
            "log_format: \"xml\"",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected} in {problems:?}"
            );
        }
    }

    #[test]
    fn hsm_endpoints_are_https_distinct_and_default_to_the_local_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, "").unwrap();
            Some(path)
        };
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, "").unwrap();
        let raw = |endpoints: &[&str]| RawSettings {
            tls_cert: file("c"),
            tls_key: file("k"),
            tls_client_ca: file("ca"),
            hsm_tls_cert: file("hc"),
            hsm_tls_key: file("hk"),
            hsm_tls_ca: file("hca"),
            policy_file: Some(policy.clone()),
            database: Some("sqlite:///var/lib/cmk/cmk.db".into()),
            hsm_endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            ..RawSettings::default()
        };
        let endpoints = |list: &[&str]| raw(list).validate().unwrap().hsm.endpoints;
        assert_eq!(endpoints(&[]), ["https://127.0.0.1:7443"]);
        assert_eq!(
            endpoints(&["https://hsm-0.cmk-hsm:7443", " https://hsm-1.cmk-hsm:7443"]),
            ["https://hsm-0.cmk-hsm:7443", "https://hsm-1.cmk-hsm:7443"]
        );
        let ConfigError(problems) = raw(&["https://a:1", "http://b:1", "https://a:1"])
            .validate()
            .unwrap_err();
        assert_eq!(
            problems,
            [
                "hsm_endpoints: \"http://b:1\" must be an https:// URL (the HSM daemon speaks only mutual TLS)",
                "hsm_endpoints: \"https://a:1\" is listed twice",
            ]
        );
        let many: Vec<String> = (0..17).map(|i| format!("https://hsm-{i}:7443")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let ConfigError(problems) = raw(&many).validate().unwrap_err();
        assert_eq!(problems, ["hsm_endpoints: at most 16 daemons, not 17"]);
    }

    #[test]
    fn the_store_is_chosen_by_its_url_and_a_password_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, "").unwrap();
            Some(path)
        };
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, "").unwrap();
        let raw = |database: &str| RawSettings {
            tls_cert: file("c"),
            tls_key: file("k"),
            tls_client_ca: file("ca"),
            hsm_tls_cert: file("hc"),
            hsm_tls_key: file("hk"),
            hsm_tls_ca: file("hca"),
            policy_file: Some(policy.clone()),
            database: Some(database.into()),
            ..RawSettings::default()
        };
        let url = "postgres://cmk:s3cr3t@db.internal/cmk?sslmode=verify-full";
        let settings = raw(url).validate().unwrap();
        assert_eq!(settings.database.0, url);
        assert_eq!(settings.store.max_connections, 10);
        assert_eq!(settings.store.lease_ttl, Duration::from_secs(6));
        let shown = format!("{settings:?} {}", settings.database);
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("postgres://cmk:***@db.internal/cmk?sslmode=verify-full"));

        assert!(raw("sqlite:///var/lib/cmk/cmk.db").validate().is_ok());
        let ConfigError(problems) = raw("mysql://cmk:s3cr3t@db/cmk").validate().unwrap_err();
        assert_eq!(
            problems,
            vec![
                "database: \"mysql://cmk:***@db/cmk\" is neither a sqlite:// nor a postgres:// URL"
                    .to_string()
            ]
        );
    }

    #[test]
    fn policy_identities_are_uris_unless_common_names_are_allowed_and_crls_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, "").unwrap();
            Some(path)
        };
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            "[[grant]]\nidentity = \"spiffe://t/alice\"\norg = \"acme\"\nrole = \"admin\"\n\
             [[grant]]\nidentity = \"legacy-admin\"\norg = \"acme\"\nrole = \"admin\"\n",
        )
        .unwrap();
        let crl = file("client.crl").unwrap();
        let raw = |allow: Option<bool>, crls: Vec<PathBuf>| RawSettings {
            tls_cert: file("c"),
            tls_key: file("k"),
            tls_client_ca: file("ca"),
            tls_client_crls: crls,
            allow_common_name_identities: allow,
            hsm_tls_cert: file("hc"),
            hsm_tls_key: file("hk"),
            hsm_tls_ca: file("hca"),
            policy_file: Some(policy.clone()),
            database: Some("sqlite:///var/lib/cmk/cmk.db".into()),
            ..RawSettings::default()
        };
        let ConfigError(problems) = raw(None, vec![dir.path().join("nonexistent.crl")])
            .validate()
            .unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("tls_client_crls: ")
                && problems[0].ends_with("nonexistent.crl is not a readable file"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with(&format!(
                "policy_file: {}: \"legacy-admin\" is not a URI",
                policy.display()
            )),
            "{problems:?}"
        );
        let settings = raw(Some(true), vec![crl.clone()]).validate().unwrap();
        assert_eq!(settings.identities, IdentityRule::new(true));
        assert_eq!(settings.tls_client_crls, [crl]);
        let settings = raw(None, vec![]).validate();
        assert!(settings.is_err(), "legacy-admin needs the opt-in");
    }
}
