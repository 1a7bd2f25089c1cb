//! Authorisation: which certificate identity may do what to which organisation.
//!
//! The policy file grants roles per organisation:
//!
//! ```toml
//! [[grant]]
//! identity = "spiffe://example.com/admin/alice"   # the certificate's one URI SAN
//! org = "acme"
//! role = "admin"            # admin | read-only | internal-service
//! ```
//!
//! Nothing is allowed unless granted, and a grant names exactly one org: there
//! is no wildcard, so an identity of org A can never act on org B. Service
//! operations take a [`Caller`], which only [`AuthzPolicy::authorize`] makes, so
//! an unauthorised call cannot reach them by construction.
//!
//! The policy in force is a [`LivePolicy`]: it follows its file, re-read every
//! [`POLICY_POLL_INTERVAL`] and at once on SIGHUP, so a removed grant stops
//! working within that interval of the file changing on each replica's disk.
//! A file that does not parse or check is refused with a warning naming the
//! file, the line and the error, and the previous policy stays in force.

use std::{
    collections::{BTreeSet, HashMap},
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use cmk_control_plane_domain::OrgId;
use cmk_tls::PeerIdentity;
use serde::Deserialize;
use tokio::{
    signal::unix::{Signal, SignalKind},
    sync::watch,
};
use tracing::{info, warn};

use crate::metrics::Metrics;

/// How often a [`LivePolicy`] re-reads its file: the bound on how long a
/// grant removed from a replica's file keeps working there.
pub const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a grant allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Manages the org's master keys (and reads everything an admin reads).
    Admin,
    /// Lists and reads keys and the audit log.
    ReadOnly,
    /// Uses the org's keys through the content-key API.
    InternalService,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Admin => "admin",
            Self::ReadOnly => "read-only",
            Self::InternalService => "internal-service",
        })
    }
}

/// What an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// List and read keys, the public key and the audit log.
    Read,
    /// Change the org's keys or settings.
    Manage,
    /// Use the org's keys for content keys.
    UseKeys,
}

impl Permission {
    fn granted_by(self, role: Role) -> bool {
        matches!(
            (self, role),
            (Self::Read, Role::Admin | Role::ReadOnly)
                | (Self::Manage, Role::Admin)
                | (Self::UseKeys, Role::InternalService)
        )
    }

    fn roles(self) -> &'static str {
        match self {
            Self::Read => "admin or read-only",
            Self::Manage => "admin",
            Self::UseKeys => "internal-service",
        }
    }
}

/// Proof that an identity may act on an org: made only by
/// [`AuthzPolicy::authorize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    identity: String,
    org: OrgId,
}

impl Caller {
    /// The caller's certificate identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The org it was authorised for.
    pub fn org(&self) -> &OrgId {
        &self.org
    }
}

#[cfg(test)]
impl Caller {
    /// A caller as if authorised, for tests of the service itself.
    pub(crate) fn for_tests(identity: &str, org: &OrgId) -> Self {
        Self {
            identity: identity.to_owned(),
            org: org.clone(),
        }
    }
}

/// Why a call was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The client certificate names no identity.
    #[error("the client certificate carries no identity")]
    NoIdentity,
    /// The identity holds no role that allows the call on this org.
    #[error("{identity} may not do this in organisation {org}: it needs the {needed} role")]
    NotGranted {
        /// Who called.
        identity: String,
        /// The org named by the request.
        org: OrgId,
        /// The roles that would allow it.
        needed: &'static str,
    },
}

/// The grants of the policy file, by identity and org.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthzPolicy {
    grants: HashMap<String, HashMap<OrgId, BTreeSet<Role>>>,
    /// The file it was read from, which a [`LivePolicy`] follows.
    source: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    grant: Vec<toml::Spanned<Grant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Grant {
    identity: String,
    org: String,
    role: Role,
}

impl AuthzPolicy {
    /// Reads and checks a policy file; the policy remembers the file, so that
    /// [`LivePolicy::follow`] can follow it.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        parse(path, &read(path)?)
    }

    /// Parses and checks a policy; every bad grant is reported, with its line.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => format!("line {}: {}", line_at(text, span.start), e.message()),
            None => e.message().to_owned(),
        })?;
        let mut policy = Self::default();
        let mut errors = Vec::new();
        for (n, grant) in (1..).zip(file.grant) {
            let line = line_at(text, grant.span().start);
            let Grant {
                identity,
                org,
                role,
            } = grant.into_inner();
            let identity = identity.trim();
            if identity.is_empty() {
                errors.push(format!("line {line}: grant {n}: identity is empty"));
                continue;
            }
            match OrgId::parse(&org) {
                Ok(org) => {
                    policy
                        .grants
                        .entry(identity.to_owned())
                        .or_default()
                        .entry(org)
                        .or_default()
                        .insert(role);
                }
                Err(e) => errors.push(format!("line {line}: grant {n}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(policy)
        } else {
            Err(errors.join("; "))
        }
    }

    /// Whether `peer` may act on `org` with `permission`.
    pub fn authorize(
        &self,
        peer: Option<&PeerIdentity>,
        org: &OrgId,
        permission: Permission,
    ) -> Result<Caller, Denied> {
        self.authorize_identity(peer.map(PeerIdentity::as_str), org, permission)
    }

    fn authorize_identity(
        &self,
        identity: Option<&str>,
        org: &OrgId,
        permission: Permission,
    ) -> Result<Caller, Denied> {
        let identity = identity.ok_or(Denied::NoIdentity)?;
        let granted = self
            .grants
            .get(identity)
            .and_then(|orgs| orgs.get(org))
            .is_some_and(|roles| roles.iter().any(|&role| permission.granted_by(role)));
        if granted {
            Ok(Caller {
                identity: identity.to_owned(),
                org: org.clone(),
            })
        } else {
            Err(Denied::NotGranted {
                identity: identity.to_owned(),
                org: org.clone(),
                needed: permission.roles(),
            })
        }
    }

    /// How many identities hold a grant (for the start-up log line).
    pub fn identities(&self) -> usize {
        self.grants.len()
    }

    /// Why some grants could never match a certificate under `rule` (one
    /// problem per such identity, in order), if any: a grant to a name no
    /// certificate can carry is a mistake in the file.
    pub fn unmatchable_grants(&self, rule: cmk_tls::IdentityRule) -> Vec<String> {
        let mut granted: Vec<&str> = self.grants.keys().map(String::as_str).collect();
        granted.sort_unstable();
        granted
            .into_iter()
            .filter_map(|identity| rule.check_configured(identity).err())
            .collect()
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The authorisation policy in force. Each request reads the newest one (an
/// `Arc` behind a `watch` channel: a shared read lock held for two map
/// lookups, no file access); a reload replaces it whole, so a request sees
/// either the old grants or the new ones, never a mix. Clones share the same
/// policy.
#[derive(Clone, Debug)]
pub struct LivePolicy(watch::Receiver<Arc<AuthzPolicy>>);

impl LivePolicy {
    /// `policy`, for good: nothing reloads it.
    pub fn fixed(policy: AuthzPolicy) -> Self {
        // The receiver keeps the last value after the sender is gone.
        Self(watch::channel(Arc::new(policy)).1)
    }

    /// `policy`, following the file it was read from: re-read every
    /// `interval` and on SIGHUP, and replaced when it parses and passes
    /// `check` (the checks start-up makes beyond parsing, such as that every
    /// granted identity can match a certificate); a file that does not is
    /// refused with a warning and the previous policy stays in force. Reloads
    /// are counted in `metrics`. A policy read from no file stays fixed. The
    /// task ends when every clone is dropped.
    pub fn follow(
        policy: AuthzPolicy,
        interval: Duration,
        metrics: Metrics,
        check: impl Fn(&AuthzPolicy) -> Result<(), String> + Send + 'static,
    ) -> Self {
        metrics.authz_identities.set(gauge_value(&policy));
        let Some(path) = policy.source.clone() else {
            return Self::fixed(policy);
        };
        let mut reloader = Reloader::new(path.clone(), &policy, Box::new(check));
        let (tx, rx) = watch::channel(Arc::new(policy));
        let mut hangups = match tokio::signal::unix::signal(SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(err) => {
                warn!(%err, "cannot listen for SIGHUP; the authorisation policy reloads only when its file is polled");
                None
            }
        };
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                let trigger = tokio::select! {
                    _ = ticks.tick() => Trigger::Poll,
                    Some(()) = hangup(&mut hangups) => Trigger::Hangup,
                    () = tx.closed() => return,
                };
                let file = path.display();
                match reloader.check(trigger) {
                    Reload::Unchanged => {}
                    Reload::Applied(policy) => {
                        let identities = policy.identities();
                        info!(%file, identities, trigger = trigger.name(), "authorisation policy reloaded");
                        metrics.authz_identities.set(gauge_value(&policy));
                        metrics.policy_reload(true);
                        tx.send_replace(Arc::new(policy));
                    }
                    Reload::Refused(error) => {
                        warn!(%file, %error, trigger = trigger.name(),
                              "authorisation policy file refused; the previous policy stays in force");
                        metrics.policy_reload(false);
                    }
                }
            }
        });
        Self(rx)
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<AuthzPolicy> {
        self.0.borrow().clone()
    }

    /// Whether `peer` may act on `org` with `permission`, under the policy in
    /// force now.
    pub fn authorize(
        &self,
        peer: Option<&PeerIdentity>,
        org: &OrgId,
        permission: Permission,
    ) -> Result<Caller, Denied> {
        self.0.borrow().authorize(peer, org, permission)
    }
}

impl From<AuthzPolicy> for LivePolicy {
    fn from(policy: AuthzPolicy) -> Self {
        Self::fixed(policy)
    }
}

impl From<Arc<AuthzPolicy>> for LivePolicy {
    fn from(policy: Arc<AuthzPolicy>) -> Self {
        Self(watch::channel(policy).1)
    }
}

/// The next SIGHUP, or never without a listener.
async fn hangup(hangups: &mut Option<Signal>) -> Option<()> {
    match hangups {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

fn gauge_value(policy: &AuthzPolicy) -> i64 {
    i64::try_from(policy.identities()).unwrap_or(i64::MAX)
}

/// What made the policy file be read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// The poll interval: the file is parsed again only if it changed.
    Poll,
    /// SIGHUP: the file is parsed again, changed or not, so the operator
    /// gets an answer.
    Hangup,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Self::Poll => "file changed",
            Self::Hangup => "SIGHUP",
        }
    }
}

/// What one look at the policy file found.
#[derive(Debug, PartialEq, Eq)]
enum Reload {
    /// The file is as it was when last applied or refused.
    Unchanged,
    /// A policy that parses and checks: it replaces the one in force.
    Applied(AuthzPolicy),
    /// Why the file cannot be used: file, line and error.
    Refused(String),
}

/// The file's bytes, or why it cannot be read.
type Snapshot = Result<Vec<u8>, String>;

/// What a reloaded policy must pass beyond parsing; the error says why not.
type Check = Box<dyn Fn(&AuthzPolicy) -> Result<(), String> + Send>;

/// Follows one policy file: what was applied last, and what was refused.
struct Reloader {
    path: PathBuf,
    check: Check,
    applied: Snapshot,
    refused: Option<Snapshot>,
}

impl Reloader {
    /// A reloader for `path`, whose policy in force is `policy`. If the file
    /// changed since `policy` was read, the first poll applies it.
    fn new(path: PathBuf, policy: &AuthzPolicy, check: Check) -> Self {
        let applied = read(&path).and_then(|bytes| match parse(&path, &bytes) {
            Ok(read) if read == *policy => Ok(bytes),
            _ => Err("changed since it was read".to_owned()),
        });
        Self {
            path,
            check,
            applied,
            refused: None,
        }
    }

    fn check(&mut self, trigger: Trigger) -> Reload {
        let current = read(&self.path);
        if trigger == Trigger::Poll
            && (current == self.applied || Some(&current) == self.refused.as_ref())
        {
            return Reload::Unchanged;
        }
        let parsed = match &current {
            Ok(bytes) => parse(&self.path, bytes).and_then(|policy| {
                (self.check)(&policy)
                    .map(|()| policy)
                    .map_err(|e| format!("{}: {e}", self.path.display()))
            }),
            Err(err) => Err(err.clone()),
        };
        match parsed {
            Ok(policy) => {
                self.applied = current;
                self.refused = None;
                Reload::Applied(policy)
            }
            Err(err) => {
                self.refused = Some(current);
                Reload::Refused(err)
            }
        }
    }
}

fn read(path: &Path) -> Snapshot {
    fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The policy in `bytes`, read from `path`.
fn parse(path: &Path, bytes: &[u8]) -> Result<AuthzPolicy, String> {
    let text =
        std::str::from_utf8(bytes).map_err(|e| format!("{}: not UTF-8: {e}", path.display()))?;
    let policy = AuthzPolicy::from_toml(text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(AuthzPolicy {
        source: Some(path.to_owned()),
        ..policy
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [[grant]]
        identity = "spiffe://t/alice"
        org = "acme"
        role = "admin"

        [[grant]]
        identity = "spiffe://t/auditor"
        org = "acme"
        role = "read-only"

        [[grant]]
        identity = "spiffe://t/meetings"
        org = "acme"
        role = "internal-service"
    "#;

    #[test]
    fn roles_grant_exactly_their_permissions_on_their_org() {
        let policy = AuthzPolicy::from_toml(POLICY).unwrap();
        let acme = OrgId::parse("acme").unwrap();
        let other = OrgId::parse("globex").unwrap();
        let cases = [
            ("spiffe://t/alice", [true, true, false]),
            ("spiffe://t/auditor", [true, false, false]),
            ("spiffe://t/meetings", [false, false, true]),
            ("spiffe://t/nobody", [false, false, false]),
        ];
        for (identity, expected) in cases {
            for (permission, allowed) in [Permission::Read, Permission::Manage, Permission::UseKeys]
                .into_iter()
                .zip(expected)
            {
                let on_acme = policy.authorize_identity(Some(identity), &acme, permission);
                assert_eq!(on_acme.is_ok(), allowed, "{identity} {permission:?}");
                let on_other = policy.authorize_identity(Some(identity), &other, permission);
                assert!(
                    matches!(on_other, Err(Denied::NotGranted { .. })),
                    "{identity} on another org"
                );
            }
        }
        assert_eq!(
            policy.authorize(None, &acme, Permission::Read),
            Err(Denied::NoIdentity)
        );
    }

    #[test]
    fn bad_policies_name_every_problem() {
        let err = AuthzPolicy::from_toml(
            r#"
            [[grant]]
            identity = " "
            org = "acme"
            role = "admin"
            [[grant]]
            identity = "x"
            org = "a/b"
            role = "admin"
            "#,
        )
        .unwrap_err();
        assert!(err.contains("line 2: grant 1: identity is empty"), "{err}");
        assert!(err.contains("line 6: grant 2: organisation id"), "{err}");
        let err = AuthzPolicy::from_toml(
            "[[grant]]\nidentity = \"x\"\norg = \"acme\"\nrole = \"owner\"\n",
        )
        .unwrap_err();
        assert!(err.contains("line 4: unknown variant `owner`"), "{err}");
    }

    const WITHOUT_ALICE: &str = r#"
        [[grant]]
        identity = "spiffe://t/auditor"
        org = "acme"
        role = "read-only"
    "#;

    /// Not TOML: a table header left open on line 3.
    const BROKEN: &str = "[[grant]]\nidentity = \"spiffe://t/alice\"\n[[grant\n";

    /// The start-up check without `allow_common_name_identities`.
    fn uris_only(policy: &AuthzPolicy) -> Result<(), String> {
        match policy
            .unmatchable_grants(cmk_tls::IdentityRule::new(false))
            .as_slice()
        {
            [] => Ok(()),
            problems => Err(problems.join("; ")),
        }
    }

    fn may_manage(policy: &AuthzPolicy, identity: &str) -> bool {
        let acme = OrgId::parse("acme").unwrap();
        policy
            .authorize_identity(Some(identity), &acme, Permission::Manage)
            .is_ok()
    }

    #[test]
    fn a_good_change_is_applied_and_a_bad_one_refused_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        fs::write(&path, POLICY).unwrap();
        let policy = AuthzPolicy::from_file(&path).unwrap();
        let mut reloader = Reloader::new(path.clone(), &policy, Box::new(uris_only));
        assert_eq!(reloader.check(Trigger::Poll), Reload::Unchanged);

        fs::write(&path, WITHOUT_ALICE).unwrap();
        let Reload::Applied(applied) = reloader.check(Trigger::Poll) else {
            panic!("a change that parses is applied");
        };
        assert!(!may_manage(&applied, "spiffe://t/alice"));
        assert_eq!(applied.identities(), 1);
        assert_eq!(applied.source.as_deref(), Some(path.as_path()));
        assert_eq!(reloader.check(Trigger::Poll), Reload::Unchanged);

        fs::write(&path, BROKEN).unwrap();
        let Reload::Refused(why) = reloader.check(Trigger::Poll) else {
            panic!("a file that does not parse is refused");
        };
        assert!(
            why.starts_with(&format!("{}: line 3: ", path.display())),
            "{why}"
        );
        // Refused once, not at every poll; SIGHUP asks again and is told again.
        assert_eq!(reloader.check(Trigger::Poll), Reload::Unchanged);
        assert_eq!(reloader.check(Trigger::Hangup), Reload::Refused(why));

        fs::write(
            &path,
            "[[grant]]\nidentity = \"x\"\norg = \"a/b\"\nrole = \"admin\"\n",
        )
        .unwrap();
        let Reload::Refused(why) = reloader.check(Trigger::Poll) else {
            panic!("a grant that does not check is refused");
        };
        assert!(why.contains("line 1: grant 1: organisation id"), "{why}");

        fs::write(
            &path,
            "[[grant]]\nidentity = \"alice\"\norg = \"acme\"\nrole = \"admin\"\n",
        )
        .unwrap();
        let Reload::Refused(why) = reloader.check(Trigger::Poll) else {
            panic!("a policy that fails the start-up checks is refused");
        };
        assert!(why.contains("\"alice\" is not a URI"), "{why}");

        fs::remove_file(&path).unwrap();
        assert!(matches!(reloader.check(Trigger::Poll), Reload::Refused(_)));

        // SIGHUP re-reads a file even unchanged since it was applied.
        fs::write(&path, POLICY).unwrap();
        assert_eq!(
            reloader.check(Trigger::Poll),
            Reload::Applied(policy.clone())
        );
        assert_eq!(reloader.check(Trigger::Hangup), Reload::Applied(policy));
    }

    #[test]
    fn a_file_changed_since_the_policy_was_read_is_applied_at_the_first_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        fs::write(&path, POLICY).unwrap();
        let policy = AuthzPolicy::from_file(&path).unwrap();
        fs::write(&path, WITHOUT_ALICE).unwrap();
        let mut reloader = Reloader::new(path, &policy, Box::new(uris_only));
        assert!(matches!(reloader.check(Trigger::Poll), Reload::Applied(_)));
    }

    /// Waits up to 5 s for `done`.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not within 5 s: {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_live_policy_follows_its_file_and_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        fs::write(&path, POLICY).unwrap();
        let metrics = Metrics::default();
        let live = LivePolicy::follow(
            AuthzPolicy::from_file(&path).unwrap(),
            Duration::from_millis(20),
            metrics.clone(),
            uris_only,
        );
        assert!(may_manage(&live.current(), "spiffe://t/alice"));
        assert_eq!(metrics.authz_identities.get(), 3);

        fs::write(&path, WITHOUT_ALICE).unwrap();
        eventually("the removed grant stops working", || {
            !may_manage(&live.current(), "spiffe://t/alice")
        })
        .await;
        assert_eq!(metrics.authz_identities.get(), 1);

        fs::write(&path, BROKEN).unwrap();
        let refused = || {
            metrics
                .policy_reloads
                .get_or_create(&crate::metrics::PolicyReload { outcome: "refused" })
                .get()
        };
        eventually("the broken file is refused", || refused() == 1).await;
        let kept = live.current();
        assert_eq!(kept.identities(), 1, "the last good policy stays");
        let acme = OrgId::parse("acme").unwrap();
        assert!(
            kept.authorize_identity(Some("spiffe://t/auditor"), &acme, Permission::Read)
                .is_ok()
        );
        let applied = metrics
            .policy_reloads
            .get_or_create(&crate::metrics::PolicyReload { outcome: "applied" })
            .get();
        assert_eq!(applied, 1);
    }

    /// An hour's poll interval: only SIGHUP can make the change show.
    #[tokio::test]
    async fn sighup_reloads_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        fs::write(&path, POLICY).unwrap();
        let live = LivePolicy::follow(
            AuthzPolicy::from_file(&path).unwrap(),
            Duration::from_secs(3600),
            Metrics::default(),
            uris_only,
        );
        fs::write(&path, WITHOUT_ALICE).unwrap();
        let status = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(std::process::id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        eventually("SIGHUP reloads the policy", || {
            !may_manage(&live.current(), "spiffe://t/alice")
        })
        .await;
    }

    #[test]
    fn a_policy_read_from_no_file_stays_fixed() {
        let live = LivePolicy::from(AuthzPolicy::from_toml(POLICY).unwrap());
        assert_eq!(live.current().identities(), 3);
        let acme = OrgId::parse("acme").unwrap();
        assert_eq!(
            live.authorize(None, &acme, Permission::Read),
            Err(Denied::NoIdentity)
        );
    }
}
