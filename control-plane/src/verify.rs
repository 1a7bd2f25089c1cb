//! `control-plane verify-audit`: checks every organisation's audit hash chain
//! (or one's), and every signed checkpoint against it, straight from the
//! metadata store, with no server running: the checkpoints' public key comes
//! from a file (the HSM daemon publishes it), not from the store an attacker
//! may have written.

use std::process::ExitCode;

use cmk_control_plane_domain::OrgId;
use cmk_control_plane_store::{PgStoreOptions, StoreError, redact_url};

use crate::service::{AuditKeys, check_audit_chain};

/// Verify the audit hash chain of every organisation (or one); exits 1 if any is broken.
#[derive(Clone, Debug, clap::Args)]
pub struct VerifyAudit {
    /// Metadata store: sqlite://path/to/cmk.db or postgres://host/db.
    #[arg(long, env = "CMK_CP_DATABASE")]
    pub database: String,
    /// Only this organisation.
    #[arg(long)]
    pub org: Option<String>,
    /// The HSM daemon's audit public key (PEM, as GetAuditPublicKey gives it or
    /// the daemon writes to `audit_public_key_file`); repeat for keys used
    /// earlier.
    #[arg(long = "audit-public-key", value_name = "PEM_FILE", required = true)]
    pub audit_public_keys: Vec<std::path::PathBuf>,
}

/// Why the chains could not be checked (as opposed to found broken).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The store could not be opened.
    #[error("cannot open {database}: {}", cmk_runtime::error_chain(.source))]
    Open {
        /// The store's URL, without its password.
        database: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// `--org` is not an organisation id.
    #[error("--org: {0}")]
    Org(String),
    /// An `--audit-public-key` file cannot be read or is not a public key.
    #[error("--audit-public-key {path}: {why}")]
    Key {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// The organisations with an audit log could not be listed.
    #[error("{0}")]
    List(#[source] StoreError),
    /// An organisation's chain could not be read.
    #[error("{org}: {source}")]
    Read {
        /// The organisation.
        org: OrgId,
        /// Why.
        #[source]
        source: StoreError,
    },
}

/// What the check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Chains checked.
    pub checked: usize,
    /// Of which broken.
    pub broken: usize,
}

impl VerifyAudit {
    /// Runs the check on its own runtime. Prints one line per organisation;
    /// exit status 1 if any chain is broken, 2 if the store cannot be read.
    pub fn main(&self) -> ExitCode {
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("control-plane: cannot start the async runtime: {err}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(self.run()) {
            Ok(Verdict { broken: 0, .. }) => ExitCode::SUCCESS,
            Ok(Verdict { checked, broken }) => {
                eprintln!("{broken} of {checked} audit chains are broken");
                ExitCode::FAILURE
            }
            Err(err) => {
                eprintln!("control-plane: {err}");
                ExitCode::from(2)
            }
        }
    }

    /// Checks the chains, printing one line per organisation on stdout as it
    /// goes.
    pub async fn run(&self) -> Result<Verdict, VerifyError> {
        let mut ders = Vec::with_capacity(self.audit_public_keys.len());
        for path in &self.audit_public_keys {
            let key = |why: String| VerifyError::Key {
                path: path.display().to_string(),
                why,
            };
            let pem = std::fs::read_to_string(path).map_err(|e| key(e.to_string()))?;
            ders.push(
                cmk_proto::checkpoint::public_key_der(&pem)
                    .ok_or_else(|| key("not a PUBLIC KEY PEM".into()))?,
            );
        }
        let keys = AuditKeys::new(ders);
        let store = cmk_control_plane_store::open(&self.database, PgStoreOptions::default())
            .await
            .map_err(|source| VerifyError::Open {
                database: redact_url(&self.database),
                source,
            })?;
        let orgs = match &self.org {
            Some(org) => vec![OrgId::parse(org).map_err(VerifyError::Org)?],
            None => store.audited_orgs().await.map_err(VerifyError::List)?,
        };
        let mut broken = 0;
        for org in &orgs {
            let check = check_audit_chain(&*store, org, &keys)
                .await
                .map_err(|source| VerifyError::Read {
                    org: org.clone(),
                    source,
                })?;
            match check.problem {
                None => println!(
                    "{org}: intact, {} events, head {}, {} signed checkpoints, covered through seq {}",
                    check.events,
                    hex::encode(check.head),
                    check.checkpoints,
                    check.covered_through
                ),
                Some(problem) => {
                    broken += 1;
                    println!("{org}: BROKEN: {problem}");
                }
            }
        }
        Ok(Verdict {
            checked: orgs.len(),
            broken,
        })
    }
}
