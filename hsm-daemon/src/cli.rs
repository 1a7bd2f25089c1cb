//! The command line: a configuration file, then flags and environment
//! variables over it, validated into [`Settings`].

use std::path::PathBuf;

use cmk_secret::SecretBytes;

use crate::config::{ConfigError, ROOT_KEY_ENV, RawSettings, Settings};

/// `hsm-daemon`'s arguments.
#[derive(Debug, clap::Parser)]
#[command(
    version,
    about = "Holds customer master keys and serves Import/Wrap/Unwrap/Destroy over mutual TLS"
)]
pub struct Cli {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, short, env = "CMK_HSM_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: RawSettings,
}

impl Cli {
    /// The file's settings under the flags' and environment's, with the root
    /// key from [`ROOT_KEY_ENV`] when it is set there, validated.
    pub fn settings(self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => RawSettings::from_file(path)?,
            None => RawSettings::default(),
        };
        let root_key_env = std::env::var_os(ROOT_KEY_ENV)
            .map(|value| SecretBytes::new(value.into_encoded_bytes()));
        // The variable stays in this process's environment (removing it needs
        // `unsafe` under edition 2024), which is why docs/design.md prefers root_key_file.
        file.overlay(self.settings).validate(root_key_env)
    }
}
