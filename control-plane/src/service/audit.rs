//! The org's audit log as the service writes and reads it: a read is audited
//! when it succeeds, every refusal when it is made (a successful change is
//! audited inside its own commit, see [`super::apply`]).

use std::future::Future;

use cmk_control_plane_domain::{
    KeyId, OrgId,
    audit::{self, ChainedEvent},
};
use cmk_control_plane_store::{NewAuditEvent, Store, StoreError};
use tracing::warn;

use super::KeyService;
use crate::{
    authz::Caller,
    error::{ServiceError, chain},
};

/// Largest audit page.
pub const MAX_AUDIT_PAGE: u32 = 1000;

/// The audit page of a request that names no size.
pub const DEFAULT_AUDIT_PAGE: u32 = 100;

/// The outcome of checking an org's audit chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditCheck {
    /// Events checked.
    pub events: u64,
    /// Hash of the newest event (all zero for an empty log).
    pub head: [u8; 32],
    /// Where the chain breaks, if it does.
    pub problem: Option<audit::ChainError>,
}

/// Which page of the audit log to read: the events after a sequence number,
/// at most [`MAX_AUDIT_PAGE`] of them and at least one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditPage {
    after_seq: u64,
    limit: u32,
}

impl AuditPage {
    /// The events after `after_seq`; a `page_size` of 0 asks for
    /// [`DEFAULT_AUDIT_PAGE`], and one over [`MAX_AUDIT_PAGE`] gets that many.
    pub fn new(after_seq: u64, page_size: u32) -> Self {
        let limit = match page_size {
            0 => DEFAULT_AUDIT_PAGE,
            n => n.min(MAX_AUDIT_PAGE),
        };
        Self { after_seq, limit }
    }

    /// The sequence number the page starts after.
    pub fn after_seq(&self) -> u64 {
        self.after_seq
    }

    /// The most events the page holds.
    pub fn limit(&self) -> u32 {
        self.limit
    }
}

impl KeyService {
    /// A page of the org's audit log.
    pub async fn audit_events(
        &self,
        caller: &Caller,
        page: AuditPage,
    ) -> Result<Vec<ChainedEvent>, ServiceError> {
        self.audited(caller, "list audit events", None, true, async {
            Ok(self
                .store
                .audit_events(caller.org(), page.after_seq, page.limit)
                .await?)
        })
        .await
    }

    /// Checks the org's audit chain.
    pub async fn verify_audit(&self, caller: &Caller) -> Result<AuditCheck, ServiceError> {
        // Audited after the check, so the check covers everything before it.
        let check = check_audit_chain(self.store.as_ref(), caller.org()).await;
        self.audited(caller, "verify audit log", None, true, async { Ok(check?) })
            .await
    }

    /// Records a call refused before it reached an operation (authorisation),
    /// with the key the request named if it is a well-formed id.
    pub async fn record_refusal(
        &self,
        identity: &str,
        org: &OrgId,
        action: &str,
        key: Option<&KeyId>,
        err: &ServiceError,
    ) {
        let event = NewAuditEvent {
            time: self.clock.now(),
            actor: identity.to_owned(),
            key: key.map(|k| k.0.clone()),
            action: action.to_owned(),
            result: refusal(err),
        };
        if let Err(err) = self.store.append_audit(org, vec![event]).await {
            warn!(error = %chain(&err), %org, action, "cannot audit a refused call");
        }
    }

    /// Audits and returns a refusal found before the operation started.
    pub(crate) async fn refuse<T>(
        &self,
        caller: &Caller,
        action: &str,
        err: ServiceError,
    ) -> Result<T, ServiceError> {
        self.audited(caller, action, None, false, async { Err(err) })
            .await
    }

    /// Runs `op`, and audits its refusal, or its success if it is a read
    /// (a successful change is audited inside its own commit).
    pub(crate) async fn audited<T>(
        &self,
        caller: &Caller,
        action: &str,
        key: Option<&KeyId>,
        read: bool,
        op: impl Future<Output = Result<T, ServiceError>>,
    ) -> Result<T, ServiceError> {
        let result = op.await;
        let outcome = match &result {
            Ok(_) if !read => return result,
            Ok(_) => "ok".to_owned(),
            Err(err) => refusal(err),
        };
        let event = NewAuditEvent {
            time: self.clock.now(),
            actor: caller.identity().to_owned(),
            key: key.map(|k| k.0.clone()),
            action: action.to_owned(),
            result: outcome,
        };
        match self.store.append_audit(caller.org(), vec![event]).await {
            // A read that cannot be audited is not served.
            Err(err) if result.is_ok() => Err(err.into()),
            Err(err) => {
                warn!(error = %chain(&err), org = %caller.org(), action, "cannot audit a refused call");
                result
            }
            Ok(()) => result,
        }
    }
}

/// Reads the whole audit chain of `org` and checks it.
pub async fn check_audit_chain(store: &dyn Store, org: &OrgId) -> Result<AuditCheck, StoreError> {
    let mut rows = Vec::new();
    loop {
        let after = rows.last().map_or(0, |r: &ChainedEvent| r.event.seq);
        let page = store.audit_events(org, after, MAX_AUDIT_PAGE).await?;
        if page.is_empty() {
            break;
        }
        rows.extend(page);
    }
    let events = rows.len() as u64;
    Ok(match audit::verify(org.as_str(), &rows) {
        Ok(head) => AuditCheck {
            events,
            head,
            problem: None,
        },
        Err(problem) => AuditCheck {
            events,
            head: rows.last().map_or(audit::GENESIS, |r| r.hash),
            problem: Some(problem),
        },
    })
}

/// How a refusal reads in the audit log: the gRPC code and message the caller got.
fn refusal(err: &ServiceError) -> String {
    let status = err.to_status();
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_audit_page_holds_the_default_when_unsized_and_never_more_than_the_largest() {
        assert_eq!(AuditPage::new(7, 0).limit(), DEFAULT_AUDIT_PAGE);
        assert_eq!(AuditPage::new(7, 0).after_seq(), 7);
        assert_eq!(AuditPage::new(0, 1).limit(), 1);
        assert_eq!(
            AuditPage::new(0, MAX_AUDIT_PAGE + 1).limit(),
            MAX_AUDIT_PAGE
        );
    }
}
