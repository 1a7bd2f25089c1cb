//! The command line: serve (the default), or verify the audit log.

use std::path::PathBuf;

use clap::Subcommand;

use crate::{
    config::{ConfigError, RawSettings, Settings},
    verify::VerifyAudit,
};

/// `control-plane`'s arguments.
#[derive(Debug, clap::Parser)]
#[command(
    version,
    about = "Manages organisations' customer master keys: lifecycle, admin API, audit log"
)]
pub struct Cli {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, short, env = "CMK_CP_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: RawSettings,
    #[command(subcommand)]
    command: Option<Command>,
}

/// What to do instead of serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify the audit hash chain of every organisation (or one); exits 1 if any is broken.
    VerifyAudit(VerifyAudit),
}

impl Cli {
    /// What to do instead of serving, if anything.
    pub fn command(&self) -> Option<&Command> {
        self.command.as_ref()
    }

    /// The file's settings under the flags' and environment's, validated.
    pub fn settings(self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => RawSettings::from_file(path)?,
            None => RawSettings::default(),
        };
        file.overlay(self.settings).validate()
    }
}
