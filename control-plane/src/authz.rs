//! Authorisation: which certificate identity may do what to which organisation.
//!
//! The policy file grants roles per organisation:
//!
//! ```toml
//! [[grant]]
//! identity = "spiffe://example.com/admin/alice"   # URI SAN, else DNS SAN, else CN
//! org = "acme"
//! role = "admin"            # admin | read-only | internal-service
//! ```
//!
//! Nothing is allowed unless granted, and a grant names exactly one org: there
//! is no wildcard, so an identity of org A can never act on org B. Service
//! operations take a [`Caller`], which only [`AuthzPolicy::authorize`] makes, so
//! an unauthorised call cannot reach them by construction.

use std::{
    collections::{BTreeSet, HashMap},
    fmt, fs,
    path::Path,
};

use cmk_control_plane_domain::OrgId;
use cmk_tls::PeerIdentity;
use serde::Deserialize;

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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    grant: Vec<Grant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Grant {
    identity: String,
    org: String,
    role: Role,
}

impl AuthzPolicy {
    /// Reads and checks a policy file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a policy; every bad grant is reported.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut policy = Self::default();
        let mut errors = Vec::new();
        for (
            n,
            Grant {
                identity,
                org,
                role,
            },
        ) in (1..).zip(file.grant)
        {
            let identity = identity.trim();
            if identity.is_empty() {
                errors.push(format!("grant {n}: identity is empty"));
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
                Err(e) => errors.push(format!("grant {n}: {e}")),
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
        assert!(err.contains("grant 1: identity is empty"), "{err}");
        assert!(err.contains("grant 2: organisation id"), "{err}");
        let err = AuthzPolicy::from_toml(
            "[[grant]]\nidentity = \"x\"\norg = \"acme\"\nrole = \"owner\"\n",
        )
        .unwrap_err();
        assert!(err.contains("unknown variant `owner`"), "{err}");
    }
}
