//! The command line: global connection flags and the command tree.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    config::{FileConfig, Flags},
    error::exit_codes_help,
};

const ABOUT: &str = "Administer an organisation's customer-managed master keys";

fn long_about() -> String {
    format!(
        "{ABOUT}.\n\n\
         cmkctl calls the cmk control plane over mutual TLS. Connection settings come \
         from flags, then CMKCTL_* environment variables, then the config file (TOML \
         with the keys endpoint, server_name, ca, cert, key and org; relative paths are \
         relative to the file), then defaults.\n\n{}",
        exit_codes_help()
    )
}

/// `cmkctl`'s arguments.
#[derive(Debug, Parser)]
#[command(name = "cmkctl", version, about = ABOUT, long_about = long_about())]
pub struct Cli {
    /// Connection and output settings, accepted before or after the command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Settings every command accepts.
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Config file [default: $XDG_CONFIG_HOME/cmkctl/config.toml or
    /// ~/.config/cmkctl/config.toml, when it exists]
    #[arg(long, global = true, env = "CMKCTL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The control plane [default: https://127.0.0.1:8443]
    #[arg(long, global = true, env = "CMKCTL_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,
    /// Name the control plane's certificate must have [default: the endpoint's host]
    #[arg(long, global = true, env = "CMKCTL_SERVER_NAME", value_name = "NAME")]
    pub server_name: Option<String>,
    /// CA certificate (PEM) the control plane's certificate must chain to
    #[arg(long, global = true, env = "CMKCTL_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) naming your identity
    #[arg(long, global = true, env = "CMKCTL_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate
    #[arg(long, global = true, env = "CMKCTL_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Organisation to act on
    #[arg(long, global = true, env = "CMKCTL_ORG", value_name = "ORG")]
    pub org: Option<String>,
    /// Output format
    #[arg(
        long,
        global = true,
        env = "CMKCTL_OUTPUT",
        value_enum,
        default_value_t = OutputFormat::Table
    )]
    pub output: OutputFormat,
    /// Seconds to wait for the connection and for each answer
    #[arg(
        long,
        global = true,
        env = "CMKCTL_TIMEOUT_SECS",
        value_name = "SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub timeout_secs: u64,
}

impl GlobalArgs {
    /// The connection settings among these, for [`crate::config::Merged`].
    pub fn connection(&self) -> Flags {
        Flags {
            config: self.config.clone(),
            settings: FileConfig {
                endpoint: self.endpoint.clone(),
                server_name: self.server_name.clone(),
                ca: self.ca.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
                org: self.org.clone(),
            },
            timeout_secs: self.timeout_secs,
        }
    }
}

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned text for people.
    #[default]
    Table,
    /// One JSON document for scripts (snake_case names, RFC 3339 UTC times).
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download the RSA public key to wrap a new master key for
    PublicKey {
        /// Write the PEM to FILE instead of standard output
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Wrap a 32-byte master key for upload, locally (no server is contacted)
    #[command(
        long_about = "Wrap a 32-byte master key for upload, locally: no server is contacted.\n\n\
        The key is encrypted with RSA-OAEP (SHA-256, MGF1-SHA-256, no label) under the \
        import public key, exactly as `openssl pkeyutl -encrypt -pubin -inkey pub.pem \
        -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 \
        -pkeyopt rsa_mgf1_md:sha256` does. Prints the key's check value, to compare with \
        the one the control plane shows after upload."
    )]
    Wrap(WrapArgs),
    /// Switch bring-your-own-key on or off
    Byok {
        /// `off` makes the generic default key the master key again
        #[arg(value_enum)]
        setting: Toggle,
    },
    /// Upload a wrapped master key
    Upload {
        /// The wrapped key, as written by `cmkctl wrap` or openssl (raw bytes)
        #[arg(long, value_name = "FILE")]
        wrapped: PathBuf,
        /// Activate the key at once, or leave it pending
        #[arg(long, value_enum, default_value_t = Activate::Later)]
        activate: Activate,
        /// The public key id the key was wrapped for, so that a stale one is refused
        #[arg(long, value_name = "ID")]
        import_key_id: Option<String>,
    },
    /// Add a master key that stays in AWS KMS, by ARN
    #[command(long_about = "Add a master key that stays in AWS KMS, by ARN.\n\n\
        The HSM daemon first checks that it can use the key (an Encrypt and Decrypt round \
        trip, for the backup key too); a key it cannot use is refused with AWS's reason. \
        The key is pending unless --activate-now is given. Nothing is ever deleted or \
        disabled in AWS: once a rotation away from the key completes, it leaves the list. \
        A key disabled or scheduled for deletion in AWS is shown as revoked by provider \
        until it is enabled there again.")]
    AddAwsKey(AddAwsKeyArgs),
    /// What your AWS admin needs to create a role the service may assume
    #[command(
        long_about = "What your AWS admin needs to create a role the service may assume.\n\n\
        Prints the service's AWS principal, your organisation's external id (random, made on \
        first request, never changed; the service sends it on every AssumeRole of your \
        roles), the role's trust policy (only that principal, only with that external id) \
        and its permissions policy (Encrypt and Decrypt only under an encryption context \
        naming your organisation, cmk:org; DescribeKey and GetKeyRotationStatus) for your \
        keys already added and the ones named with --key-arn."
    )]
    AwsSetup {
        /// A key the role is for, about to be added (repeatable, at most 16)
        #[arg(long = "key-arn", value_name = "ARN")]
        key_arns: Vec<String>,
    },
    /// Make a pending key the master key (the previous one starts rotating)
    Activate(KeyId),
    /// Remove a pending key
    Cancel(KeyId),
    /// Make a revoked key active again
    Reactivate(KeyId),
    /// Delete a revoked key: it is destroyed after 30 days unless restored
    Delete(KeyId),
    /// Restore a deleted key (revoked again), within 30 days of the deletion
    Restore(KeyId),
    /// Show one key
    Get(KeyId),
    /// List the organisation's keys
    List,
    /// Revoke the active key: the organisation's content becomes unreadable
    Revoke {
        /// The key to revoke
        key_id: String,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
    },
    /// Rotation jobs: re-wrapping KEKs to a new master key
    #[command(subcommand)]
    Rotation(RotationCommand),
    /// The organisation's audit log
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Key-encryption and content keys, as an internal service (needs its certificate)
    #[command(subcommand)]
    Content(ContentCommand),
    /// Show the connection settings in use, without connecting
    Config,
}

/// `wrap`'s arguments.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("master_key").required(true).args(["key_file", "generate"])))]
pub struct WrapArgs {
    /// The import public key (PEM), from `cmkctl public-key`
    #[arg(long, value_name = "PEM_FILE")]
    pub public_key: PathBuf,
    /// Wrap the master key in FILE: exactly 32 raw bytes
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Generate a new random master key and save it to FILE (created, mode 0600)
    #[arg(long, value_name = "FILE")]
    pub generate: Option<PathBuf>,
    /// Where to write the wrapped key (raw bytes)
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `add-aws-key`'s arguments.
#[derive(Debug, Args)]
pub struct AddAwsKeyArgs {
    /// The key: arn:aws:kms:REGION:ACCOUNT:key/KEY_ID (not an alias)
    #[arg(long, value_name = "ARN")]
    pub key_arn: String,
    /// A backup key, normally a replica in another region, used when the
    /// primary key's region fails
    #[arg(long, value_name = "ARN")]
    pub backup_key_arn: Option<String>,
    /// An IAM role the service assumes to use the keys (without it, a key
    /// policy or grant must allow the service's own identity)
    #[arg(long, value_name = "ARN")]
    pub role_arn: Option<String>,
    /// Activate the key at once (the current master key starts rotating)
    /// instead of leaving it pending
    #[arg(long)]
    pub activate_now: bool,
}

/// A key named by its id.
#[derive(Debug, Args)]
pub struct KeyId {
    /// The key, `key-…`
    pub key_id: String,
}

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Toggle {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// When an uploaded key becomes active.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Activate {
    /// At once: the current master key starts rotating.
    Now,
    /// Later, with `cmkctl activate`; the key stays pending.
    Later,
}

/// `rotation …`.
#[derive(Debug, Subcommand)]
pub enum RotationCommand {
    /// Show the latest rotation job
    Show,
    /// Follow the latest rotation job until it finishes
    Watch {
        /// How often to ask for progress, in milliseconds
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..))]
        interval_ms: u64,
    },
}

/// `audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit events, oldest first
    List {
        /// Only events after this sequence number
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
        /// At most this many events [default: all]
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
    },
    /// Recompute the audit hash chain (exit code 8 when broken)
    Verify,
    /// Print audit events as they are written (key state changes, rotations,
    /// revocations, counted content-key calls), one per line, until stopped
    Follow {
        /// Start after this sequence number (0: from the first event; resume
        /// with the last one printed)
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
    },
}

/// `content …`.
#[derive(Debug, Subcommand)]
pub enum ContentCommand {
    /// Get (or create) the KEK of a resource
    Kek {
        /// The resource, e.g. space:42
        #[arg(long)]
        resource: String,
    },
    /// Generate a content key under a KEK; prints it wrapped, and a fingerprint
    Generate {
        /// The KEK, `kek-…`
        #[arg(long, value_name = "KEK_ID")]
        kek: String,
        /// Context bound to the wrapped key; decrypt must give the same
        #[arg(long, value_name = "TEXT", default_value = "")]
        context: String,
    },
    /// Decrypt a wrapped content key; prints its fingerprint, never the key
    Decrypt {
        /// The wrapped content key, base64
        #[arg(long, value_name = "BASE64")]
        wrapped: String,
        /// The context it was generated with
        #[arg(long, value_name = "TEXT", default_value = "")]
        context: String,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn add_aws_key_takes_the_arns_and_stays_pending_unless_told() {
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd";
        let cli = Cli::try_parse_from(["cmkctl", "add-aws-key", "--key-arn", arn]).expect("parses");
        let Command::AddAwsKey(args) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(args.key_arn, arn);
        assert_eq!((args.backup_key_arn, args.role_arn), (None, None));
        assert!(!args.activate_now);

        let cli = Cli::try_parse_from([
            "cmkctl",
            "add-aws-key",
            "--key-arn",
            arn,
            "--backup-key-arn",
            "arn:aws:kms:eu-central-1:111122223333:key/1234abcd",
            "--role-arn",
            "arn:aws:iam::111122223333:role/cmk",
            "--activate-now",
        ])
        .expect("parses");
        let Command::AddAwsKey(args) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(
            args.backup_key_arn.as_deref(),
            Some("arn:aws:kms:eu-central-1:111122223333:key/1234abcd")
        );
        assert_eq!(
            args.role_arn.as_deref(),
            Some("arn:aws:iam::111122223333:role/cmk")
        );
        assert!(args.activate_now);

        let missing = Cli::try_parse_from(["cmkctl", "add-aws-key"]).expect_err("no key ARN");
        assert_eq!(
            missing.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
    }
}
