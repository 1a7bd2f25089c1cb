//! `control-plane`: see the library crate for what it does.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use cmk_control_plane::{RawSettings, service::check_audit_chain};
use cmk_control_plane_domain::OrgId;
use cmk_control_plane_store::{PgStoreOptions, redact_url};
use cmk_runtime::{init_logging, shutdown_signal};

#[derive(Parser)]
#[command(
    version,
    about = "Manages organisations' customer master keys: lifecycle, admin API, audit log"
)]
struct Cli {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, short, env = "CMK_CP_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: RawSettings,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Verify the audit hash chain of every organisation (or one); exits 1 if any is broken.
    VerifyAudit {
        /// Metadata store: sqlite://path/to/cmk.db or postgres://host/db.
        #[arg(long, env = "CMK_CP_DATABASE")]
        database: String,
        /// Only this organisation.
        #[arg(long)]
        org: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("control-plane: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::VerifyAudit { database, org }) = cli.command {
        return runtime.block_on(verify_audit(&database, org.as_deref()));
    }
    let file = match &cli.config {
        Some(path) => RawSettings::from_file(path),
        None => Ok(RawSettings::default()),
    };
    let settings = match file.and_then(|file| file.overlay(cli.settings).validate()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("control-plane: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(settings.log_format);
    match runtime.block_on(cmk_control_plane::run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("control-plane: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Prints one line per organisation; exit status 1 if any chain is broken,
/// 2 if the store cannot be read.
async fn verify_audit(database: &str, only: Option<&str>) -> ExitCode {
    let store = match cmk_control_plane_store::open(database, PgStoreOptions::default()).await {
        Ok(store) => store,
        Err(err) => {
            let database = redact_url(database);
            eprintln!(
                "control-plane: cannot open {database}: {}",
                cmk_runtime::error_chain(&err)
            );
            return ExitCode::from(2);
        }
    };
    let orgs = match only {
        Some(org) => match OrgId::parse(org) {
            Ok(org) => Ok(vec![org]),
            Err(err) => {
                eprintln!("control-plane: --org: {err}");
                return ExitCode::from(2);
            }
        },
        None => store.audited_orgs().await,
    };
    let orgs = match orgs {
        Ok(orgs) => orgs,
        Err(err) => {
            eprintln!("control-plane: {err}");
            return ExitCode::from(2);
        }
    };
    let mut broken = 0;
    for org in &orgs {
        match check_audit_chain(&*store, org).await {
            Ok(check) => match check.problem {
                None => println!(
                    "{org}: intact, {} events, head {}",
                    check.events,
                    hex::encode(check.head)
                ),
                Some(problem) => {
                    broken += 1;
                    println!("{org}: BROKEN: {problem}");
                }
            },
            Err(err) => {
                eprintln!("control-plane: {org}: {err}");
                return ExitCode::from(2);
            }
        }
    }
    if broken > 0 {
        eprintln!("{broken} of {} audit chains are broken", orgs.len());
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
