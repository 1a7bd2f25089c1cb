//! Connection settings: flags and environment (merged by clap, flag first), then the
//! config file, then defaults, validated once into a [`Connection`].

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use cmk_tls::TlsFiles;
use serde::{Deserialize, Serialize};
use tonic::transport::Uri;

/// The endpoint used when none is configured.
pub const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:8443";

/// Why the connection settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key.
    #[error("config file {path}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line of the problem, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// Settings that have no value anywhere.
    #[error("missing {}{}", .missing.iter().map(Missing::describe).collect::<Vec<_>>().join("; "), where_file(.file))]
    Missing {
        /// Each missing setting.
        missing: Vec<Missing>,
        /// The config file that was read, if any.
        file: Option<PathBuf>,
    },
    /// The endpoint is not an `https://` URL.
    #[error("endpoint {endpoint:?} is not usable: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
}

/// A setting that has to be given somewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// The CA certificate the control plane's certificate must chain to.
    Ca,
    /// The client certificate.
    Cert,
    /// The client certificate's private key.
    Key,
    /// The organisation.
    Org,
}

impl Missing {
    fn describe(&self) -> String {
        let (what, name) = match self {
            Missing::Ca => ("the CA certificate", "ca"),
            Missing::Cert => ("the client certificate", "cert"),
            Missing::Key => ("the client private key", "key"),
            Missing::Org => ("the organisation", "org"),
        };
        format!(
            "{what}: pass --{name}, set CMKCTL_{} or set `{name}` in the config file",
            name.to_uppercase()
        )
    }
}

fn where_file(file: &Option<PathBuf>) -> String {
    match file {
        Some(path) => format!(" (config file read: {})", path.display()),
        None => " (no config file was found; see --config)".to_string(),
    }
}

/// The keys of a config file, which flags and environment variables can give
/// too ([`Flags::settings`]). Relative paths in a file are relative to its own
/// directory (see [`FileConfig::load`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The control plane's URL.
    pub endpoint: Option<String>,
    /// The name the control plane's certificate must have.
    pub server_name: Option<String>,
    /// CA certificate (PEM).
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub key: Option<PathBuf>,
    /// The organisation to act on.
    pub org: Option<String>,
}

impl FileConfig {
    /// Reads and parses `path`, resolving its relative paths against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: FileConfig = toml::from_str(&text).map_err(|err| ConfigError::Parse {
            path: path.to_path_buf(),
            line: err
                .span()
                .map(|span| text[..span.start].matches('\n').count() + 1),
            message: err.message().trim().to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        for file in [&mut config.ca, &mut config.cert, &mut config.key]
            .into_iter()
            .flatten()
        {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
        Ok(config)
    }
}

/// The config file to read: `--config`/`CMKCTL_CONFIG` (which must exist), else the
/// default path when a file is there. `env` reads an environment variable.
pub fn config_file(flag: Option<&Path>, env: impl Fn(&str) -> Option<PathBuf>) -> Option<PathBuf> {
    if let Some(path) = flag {
        return Some(path.to_path_buf());
    }
    default_config_path(env).filter(|path| path.is_file())
}

/// `$XDG_CONFIG_HOME/cmkctl/config.toml`, or `~/.config/cmkctl/config.toml`.
pub fn default_config_path(env: impl Fn(&str) -> Option<PathBuf>) -> Option<PathBuf> {
    // The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    let base = env("XDG_CONFIG_HOME")
        .filter(|dir| dir.is_absolute())
        .or_else(|| env("HOME").map(|home| home.join(".config")))?;
    Some(base.join("cmkctl").join("config.toml"))
}

/// Reads an environment variable as a path, treating an empty one as unset.
pub fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

/// Everything needed to call the control plane, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// `https://host:port`.
    pub endpoint: String,
    /// The name the server's certificate is checked against.
    pub server_name: String,
    /// The TLS files.
    pub tls: TlsFiles,
    /// The organisation every request names.
    pub org: String,
    /// How long to wait for a connection, and for each answer.
    pub timeout: Duration,
}

/// The connection settings given as flags or environment variables (clap has
/// already put the environment under the flags); `None` where neither has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    /// The config file to read instead of the default one.
    pub config: Option<PathBuf>,
    /// The settings a config file can give too; these win over the file's.
    pub settings: FileConfig,
    /// Per-call timeout in seconds.
    pub timeout_secs: u64,
}

/// The settings before validation: each one from the first place that has it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Merged {
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
    /// The control plane's URL.
    pub endpoint: String,
    /// The name the server's certificate must have.
    pub server_name: Option<String>,
    /// CA certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Client private key.
    pub key: Option<PathBuf>,
    /// The organisation.
    pub org: Option<String>,
    /// Per-call timeout in seconds.
    pub timeout_secs: u64,
}

impl Merged {
    /// Merges flags (clap has already put the environment under them) over the
    /// config file over the defaults.
    pub fn new(args: &Flags, file: FileConfig, config_file: Option<PathBuf>) -> Self {
        // Destructured, so that a new key cannot be forgotten here.
        let FileConfig {
            endpoint,
            server_name,
            ca,
            cert,
            key,
            org,
        } = file;
        let over = &args.settings;
        Merged {
            config_file,
            endpoint: over
                .endpoint
                .clone()
                .or(endpoint)
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            server_name: over.server_name.clone().or(server_name),
            ca: over.ca.clone().or(ca),
            cert: over.cert.clone().or(cert),
            key: over.key.clone().or(key),
            org: over.org.clone().or(org),
            timeout_secs: args.timeout_secs,
        }
    }

    /// Reads the config file the flags or environment name, then merges.
    pub fn load(args: &Flags) -> Result<Self, ConfigError> {
        let path = config_file(args.config.as_deref(), env_path);
        let file = match &path {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Ok(Merged::new(args, file, path))
    }

    /// Checks that everything needed is there and the endpoint is usable; every
    /// missing setting is reported at once.
    pub fn validate(self) -> Result<Connection, ConfigError> {
        let Merged {
            config_file,
            endpoint,
            server_name,
            ca,
            cert,
            key,
            org,
            timeout_secs,
        } = self;
        let (endpoint, host) = parse_endpoint(&endpoint)?;
        let missing = [
            (ca.is_none(), Missing::Ca),
            (cert.is_none(), Missing::Cert),
            (key.is_none(), Missing::Key),
            (org.as_deref().is_none_or(str::is_empty), Missing::Org),
        ]
        .into_iter()
        .filter_map(|(missing, what)| missing.then_some(what))
        .collect::<Vec<_>>();
        match (ca, cert, key, org) {
            (Some(ca), Some(cert), Some(key), Some(org)) if missing.is_empty() => Ok(Connection {
                endpoint,
                server_name: server_name.unwrap_or(host),
                tls: TlsFiles { cert, key, ca },
                org,
                timeout: Duration::from_secs(timeout_secs),
            }),
            _ => Err(ConfigError::Missing {
                missing,
                file: config_file,
            }),
        }
    }
}

/// The endpoint as a URL string (with `https://` added when no scheme is given) and
/// its host, for the default server name.
fn parse_endpoint(endpoint: &str) -> Result<(String, String), ConfigError> {
    let bad = |reason: &str| ConfigError::Endpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("https://{endpoint}")
    };
    let uri: Uri = url
        .parse()
        .map_err(|_| bad("expected a URL such as https://cmk.example:8443"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the control plane is only reachable over https://"));
    }
    let host = uri
        .host()
        .ok_or_else(|| bad("it names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((url, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags as clap would give them, built directly so that CMKCTL_* variables in
    /// the test's environment cannot interfere.
    fn args() -> Flags {
        Flags {
            timeout_secs: 30,
            ..Flags::default()
        }
    }

    fn full() -> Flags {
        Flags {
            settings: FileConfig {
                ca: Some("c".into()),
                cert: Some("a".into()),
                key: Some("k".into()),
                org: Some("acme".into()),
                ..FileConfig::default()
            },
            ..args()
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    const QUICKSTART: &str = r#"
endpoint = "https://127.0.0.1:8443"
server_name = "localhost"
ca = "pki/ca.crt"
cert = "pki/admin.crt"
key = "/abs/admin.key"
org = "acme"
"#;

    #[test]
    fn relative_paths_in_the_file_are_relative_to_its_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "cmkctl.toml", QUICKSTART);
        let file = FileConfig::load(&path).expect("load");
        assert_eq!(file.ca, Some(dir.path().join("pki/ca.crt")));
        assert_eq!(file.cert, Some(dir.path().join("pki/admin.crt")));
        assert_eq!(file.key, Some(PathBuf::from("/abs/admin.key")));
        assert_eq!(file.server_name.as_deref(), Some("localhost"));
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "cmkctl.toml", QUICKSTART);
        let file = FileConfig::load(&path).expect("load");

        let conn = Merged::new(&args(), file.clone(), Some(path.clone()))
            .validate()
            .expect("valid");
        assert_eq!(conn.endpoint, "https://127.0.0.1:8443");
        assert_eq!(conn.server_name, "localhost");
        assert_eq!(conn.org, "acme");
        assert_eq!(conn.tls.ca, dir.path().join("pki/ca.crt"));
        assert_eq!(conn.timeout, Duration::from_secs(30));

        let flags = Flags {
            settings: FileConfig {
                endpoint: Some("https://cmk.example:9443".into()),
                org: Some("globex".into()),
                ca: Some("ca.pem".into()),
                ..FileConfig::default()
            },
            timeout_secs: 5,
            ..args()
        };
        let conn = Merged::new(&flags, file, Some(path))
            .validate()
            .expect("valid");
        assert_eq!(conn.endpoint, "https://cmk.example:9443");
        assert_eq!(conn.server_name, "localhost", "from the file");
        assert_eq!(conn.org, "globex");
        // A relative path given as a flag stays relative to the working directory.
        assert_eq!(conn.tls.ca, PathBuf::from("ca.pem"));
        assert_eq!(conn.tls.cert, dir.path().join("pki/admin.crt"));
        assert_eq!(conn.timeout, Duration::from_secs(5));
    }

    #[test]
    fn defaults_fill_in_the_endpoint_and_server_name() {
        let conn = Merged::new(&full(), FileConfig::default(), None)
            .validate()
            .expect("valid");
        assert_eq!(conn.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(conn.server_name, "127.0.0.1");

        let mut flags = full();
        flags.settings.endpoint = Some("cmk.example:8443".into());
        let conn = Merged::new(&flags, FileConfig::default(), None)
            .validate()
            .expect("valid");
        assert_eq!(conn.endpoint, "https://cmk.example:8443");
        assert_eq!(conn.server_name, "cmk.example");
    }

    #[test]
    fn every_missing_setting_is_named_with_its_flag_variable_and_key() {
        let flags = Flags {
            settings: FileConfig {
                cert: Some("a".into()),
                ..FileConfig::default()
            },
            ..args()
        };
        let err = Merged::new(&flags, FileConfig::default(), None)
            .validate()
            .expect_err("missing");
        let text = err.to_string();
        for expected in [
            "--ca, set CMKCTL_CA or set `ca`",
            "--key, set CMKCTL_KEY or set `key`",
            "--org, set CMKCTL_ORG or set `org`",
        ] {
            assert!(text.contains(expected), "{text}");
        }
        assert!(!text.contains("--cert"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn plain_http_is_refused() {
        let mut flags = full();
        flags.settings.endpoint = Some("http://127.0.0.1:8443".into());
        let err = Merged::new(&flags, FileConfig::default(), None)
            .validate()
            .expect_err("http");
        assert!(err.to_string().contains("https://"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "c.toml",
            "org = \"acme\"\ncertificate = \"x\"\n",
        );
        let err = FileConfig::load(&path).expect_err("unknown key");
        let text = err.to_string();
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("certificate"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn the_default_file_follows_xdg_then_home() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| PathBuf::from(value))
            }
        };
        assert_eq!(
            default_config_path(env(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")])),
            Some(PathBuf::from("/x/cmkctl/config.toml"))
        );
        assert_eq!(
            default_config_path(env(&[("XDG_CONFIG_HOME", "rel"), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.config/cmkctl/config.toml"))
        );
        assert_eq!(default_config_path(env(&[])), None);
        // An explicit file is used whether or not it exists (reading it reports it).
        assert_eq!(
            config_file(Some(Path::new("/nope.toml")), env(&[])),
            Some(PathBuf::from("/nope.toml"))
        );
        // The default file is used only when it exists.
        assert_eq!(config_file(None, env(&[("HOME", "/nonexistent")])), None);
    }
}
