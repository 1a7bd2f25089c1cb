//! The org's audit log as the service writes and reads it: a read is audited
//! when it succeeds, every refusal when it is made (a successful change is
//! audited inside its own commit, see [`super::apply`]). Only an enrolled org
//! has a log: a read or a refusal naming an org not enrolled yet writes
//! nothing, and goes to the process log instead.

use std::{future::Future, sync::Arc, time::Duration};

use tokio_stream::wrappers::ReceiverStream;

use cmk_control_plane_domain::{
    KeyId, OrgId,
    audit::{self, ChainedEvent},
};
use cmk_control_plane_store::{NewAuditEvent, Store, StoreError};
use tracing::{info, warn};

use super::{
    KeyService,
    checkpoints::{AuditKeys, CheckpointCheck, CheckpointProblem},
};
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
    /// Signed checkpoints verified against the rows.
    pub checkpoints: u64,
    /// The newest seq a verified checkpoint covers (0: none).
    pub covered_through: u64,
    /// Where the chain or its checkpoints break, if they do.
    pub problem: Option<AuditProblem>,
}

/// What breaks an org's audit log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuditProblem {
    /// The rows do not form a chain.
    #[error(transparent)]
    Chain(#[from] audit::ChainError),
    /// The rows do not match what the signed checkpoints vouch for.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointProblem),
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

    /// Every event of the org after `after_seq`, then each new one as it
    /// commits, until the receiver goes away. The store is read a page at a
    /// time and, once caught up, every [`WATCH_POLL`]: events committed by
    /// any replica arrive within that. Audited as a read when it starts.
    pub async fn watch_events(
        self: &Arc<Self>,
        caller: &Caller,
        after_seq: u64,
    ) -> Result<ReceiverStream<Result<ChainedEvent, ServiceError>>, ServiceError> {
        self.audited(caller, "watch audit events", None, true, async { Ok(()) })
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let (service, org) = (self.clone(), caller.org().clone());
        tokio::spawn(async move {
            let mut after = after_seq;
            loop {
                let page = match service.store.audit_events(&org, after, WATCH_PAGE).await {
                    Ok(page) => page,
                    Err(err) => {
                        // The watcher learns why its stream ends.
                        let _ = tx.send(Err(err.into())).await;
                        return;
                    }
                };
                let caught_up = page.len() < WATCH_PAGE as usize;
                for row in page {
                    after = row.event.seq;
                    if tx.send(Ok(row)).await.is_err() {
                        return;
                    }
                }
                if caught_up {
                    tokio::select! {
                        () = tokio::time::sleep(WATCH_POLL) => {}
                        () = tx.closed() => return,
                    }
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Checks the org's audit chain.
    pub async fn verify_audit(&self, caller: &Caller) -> Result<AuditCheck, ServiceError> {
        // Audited after the check, so the check covers everything before it.
        // An org without checkpoints needs no key (and no daemon).
        let keys = match self.store.checkpoints(caller.org(), 0, 1).await {
            Ok(none) if none.is_empty() => Ok(AuditKeys::default()),
            Ok(_) => self.audit_keys().await,
            Err(err) => Err(err.into()),
        };
        let check = match keys {
            Ok(keys) => check_audit_chain(self.store.as_ref(), caller.org(), &keys)
                .await
                .map_err(ServiceError::from),
            Err(err) => Err(err),
        };
        self.audited(caller, "verify audit log", None, true, async { check })
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
        self.record_refused(org, event).await;
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
    /// (a successful change is audited inside its own commit), in the org's
    /// log if the org is enrolled.
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
        if result.is_err() {
            self.record_refused(caller.org(), event).await;
            return result;
        }
        // A read that cannot be audited is not served.
        match self.append_if_enrolled(caller.org(), event).await? {
            Recorded::InLog => {}
            Recorded::NotEnrolled(event) => {
                info!(org = %caller.org(), actor = %event.actor, action = %event.action,
                      "served a read of an organisation not enrolled yet (it has no audit log before its first change)");
            }
        }
        result
    }

    /// Appends a refusal to the org's log, if the org exists: a stranger's
    /// calls naming made-up orgs must not grow the database nor take the
    /// write lock, so those go to the process log and a counter only. (An
    /// org enrolled while its refusal is recorded may miss that one row.)
    async fn record_refused(&self, org: &OrgId, event: NewAuditEvent) {
        let action = event.action.clone();
        match self.append_if_enrolled(org, event).await {
            Ok(Recorded::InLog) => {}
            Ok(Recorded::NotEnrolled(event)) => {
                self.metrics.refusals_unknown_org.inc();
                info!(%org, actor = %event.actor, action = %event.action, result = %event.result,
                      "refused a call for an organisation that does not exist");
            }
            Err(err) => {
                warn!(error = %chain(&err), %org, action, "cannot audit a refused call");
            }
        }
    }

    /// Appends `event` to the org's log if the org is enrolled; never
    /// creates the log of an org that is not.
    async fn append_if_enrolled(
        &self,
        org: &OrgId,
        event: NewAuditEvent,
    ) -> Result<Recorded, StoreError> {
        if self.store.load_org(org).await?.is_none() {
            return Ok(Recorded::NotEnrolled(event));
        }
        self.store.append_audit(org, vec![event]).await?;
        Ok(Recorded::InLog)
    }
}

/// Where an audit event went.
enum Recorded {
    /// Into the org's log.
    InLog,
    /// Nowhere: the org is not enrolled (the event, for the process log).
    NotEnrolled(NewAuditEvent),
}

/// How often a watch that has caught up looks for new events.
pub const WATCH_POLL: Duration = Duration::from_millis(250);
/// Events a watch reads per page.
const WATCH_PAGE: u32 = 500;
/// Events buffered for a watcher that reads slowly; beyond it, reading the
/// store waits for the watcher.
const WATCH_BUFFER: usize = 64;

/// Reads the whole audit chain of `org` and checks it, with every signed
/// checkpoint (under `keys`) against the rows, a page at a time: memory stays
/// one page, however long the chain. After a break, the rest is still read,
/// to count the events and name the newest hash.
pub async fn check_audit_chain(
    store: &dyn Store,
    org: &OrgId,
    keys: &AuditKeys,
) -> Result<AuditCheck, StoreError> {
    check_audit_chain_in_pages(store, org, keys, MAX_AUDIT_PAGE).await
}

async fn check_audit_chain_in_pages(
    store: &dyn Store,
    org: &OrgId,
    keys: &AuditKeys,
    page_size: u32,
) -> Result<AuditCheck, StoreError> {
    let mut verifier = audit::Verifier::new(org.as_str());
    let mut checkpoints = CheckpointCheck::new(store, org, keys);
    let mut problem: Option<AuditProblem> = None;
    let mut events = 0u64;
    let mut after = 0;
    let mut head = audit::GENESIS;
    loop {
        let page = store.audit_events(org, after, page_size).await?;
        let Some(last) = page.last() else { break };
        (after, head) = (last.event.seq, last.hash);
        events += page.len() as u64;
        for row in &page {
            if problem.is_some() {
                break;
            }
            problem = match verifier.check(row) {
                Err(broken) => Some(broken.into()),
                Ok(()) => checkpoints.row(row).await?.err().map(Into::into),
            };
        }
    }
    if problem.is_none() {
        problem = checkpoints.end(after).await?.err().map(Into::into);
    }
    Ok(AuditCheck {
        events,
        head,
        checkpoints: checkpoints.checked,
        covered_through: checkpoints.covered_through,
        problem,
    })
}

/// How a refusal reads in the audit log: the gRPC code and message the caller got.
pub(crate) fn refusal(err: &ServiceError) -> String {
    let status = err.to_status();
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use cmk_control_plane_domain::{KekId, KeySource, KeyState, Policy, Timestamp};
    use cmk_control_plane_store::{
        AuditStore, Commit, GenericKey, Intent, IntentKind, SqliteStore,
    };

    use super::*;
    use crate::{authz::Denied, clock::SystemClock, hsm::HsmClient, service::ServiceOptions};

    /// A service over a fresh SQLite store whose generic default key is
    /// already generated, with no HSM daemon: nothing here may reach one.
    async fn service_without_hsm() -> (KeyService, Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(dir.path().join("m.db").to_str().unwrap())
                .await
                .unwrap(),
        );
        // As custody intake does it: the intent first, resolved by the put.
        store
            .record_intent(Intent {
                handle: "generic-1".into(),
                kind: IntentKind::Import,
                org: None,
                created_at: Timestamp(1_700_000_000),
            })
            .await
            .unwrap();
        store
            .put_generic_key(GenericKey {
                handle: "generic-1".into(),
                check_value: "0123456789".into(),
                created_at: Timestamp(1_700_000_000),
            })
            .await
            .unwrap();
        let nowhere = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let service = KeyService::new(
            store.clone(),
            HsmClient::over(nowhere),
            Arc::new(SystemClock),
            Policy::default(),
            ServiceOptions::default(),
        );
        (service, store, dir)
    }

    /// Reads of an org not enrolled yet answer as the org would be, and store
    /// nothing: no org, no audit row.
    #[tokio::test]
    async fn reads_of_an_org_not_enrolled_store_nothing() {
        let (service, store, _dir) = service_without_hsm().await;
        let org = OrgId::parse("newcomer").unwrap();
        let reader = Caller::for_tests("spiffe://t/reader", &org);

        let listing = service.list(&reader).await.unwrap();
        assert!(!listing.byok);
        assert_eq!(listing.keys.len(), 1, "{listing:?}");
        let generic = &listing.keys[0].record;
        assert_eq!(generic.source, KeySource::GenericDefault);
        assert_eq!(generic.state, KeyState::Active);
        assert_eq!(generic.check_value, "0123456789");
        assert_eq!(
            listing.active.as_ref().map(|k| &k.record.id),
            Some(&generic.id)
        );
        assert_eq!(
            service.list(&reader).await.unwrap().keys[0].record.id,
            generic.id,
            "the same id at every read"
        );
        let got = service.get(&reader, &generic.id).await.unwrap();
        assert_eq!(got.key.record.id, generic.id);
        let unknown = KeyId("key-0000000000000000".into());
        assert!(matches!(
            service.get(&reader, &unknown).await,
            Err(ServiceError::Lifecycle(_))
        ));
        let preview = service
            .preview_revocation(&reader, &generic.id)
            .await
            .unwrap();
        assert_eq!(preview.keks_wrapped_by_key, 0);
        assert!(
            service
                .audit_events(&reader, AuditPage::new(0, 0))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(service.verify_audit(&reader).await.unwrap().events, 0);
        assert!(matches!(
            service.rotation(&reader).await,
            Err(ServiceError::NoRotation)
        ));

        assert_eq!(store.load_org(&org).await.unwrap(), None, "not enrolled");
        assert!(store.audit_events(&org, 0, 10).await.unwrap().is_empty());
        assert!(store.audited_orgs().await.unwrap().is_empty());
    }

    /// A change enrols the org, under the key id reads showed before; from
    /// then on reads are audited.
    #[tokio::test]
    async fn a_change_enrols_the_org_as_reads_showed_it() {
        let (service, store, _dir) = service_without_hsm().await;
        let org = OrgId::parse("newcomer").unwrap();
        let admin = Caller::for_tests("spiffe://t/admin", &org);
        let shown = service.list(&admin).await.unwrap().keys[0]
            .record
            .id
            .clone();

        let view = service.set_byok(&admin, true).await.unwrap();
        assert!(view.byok);
        let stored = store.load_org(&org).await.unwrap().expect("enrolled");
        assert_eq!(stored.keys.len(), 1);
        assert_eq!(stored.keys[0].record.id, shown, "the id reads showed");
        assert_eq!(stored.keys[0].handle, "generic-1");
        let actions = |events: Vec<audit::ChainedEvent>| {
            events
                .into_iter()
                .map(|e| e.event.action)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            actions(store.audit_events(&org, 0, 10).await.unwrap()),
            [
                "enrol: the generic default key is the master key",
                "byok on"
            ]
        );

        service.list(&admin).await.unwrap();
        assert_eq!(
            actions(store.audit_events(&org, 0, 10).await.unwrap())
                .last()
                .map(String::as_str),
            Some("list keys")
        );
        // Another org enrolled on the same generic key gets another id.
        let other = Caller::for_tests("spiffe://t/admin", &OrgId::parse("other").unwrap());
        assert_ne!(service.list(&other).await.unwrap().keys[0].record.id, shown);
    }

    /// A change the domain refuses, and content calls that find no KEK, on
    /// an org not enrolled yet store nothing either.
    #[tokio::test]
    async fn refused_changes_and_content_reads_do_not_enrol() {
        use crate::service::{ContentContext, KeyOp};
        let (service, store, _dir) = service_without_hsm().await;
        let org = OrgId::parse("newcomer").unwrap();
        let admin = Caller::for_tests("spiffe://t/admin", &org);
        let service_caller = Caller::for_tests("spiffe://t/service", &org);

        let unknown = KeyId("key-0000000000000000".into());
        assert!(matches!(
            service.change(&admin, KeyOp::Activate, &unknown).await,
            Err(ServiceError::Lifecycle(_))
        ));
        let generic = service.list(&admin).await.unwrap().keys[0]
            .record
            .id
            .clone();
        // The generic default key cannot be revoked.
        assert!(
            service
                .change(&admin, KeyOp::Revoke, &generic)
                .await
                .is_err()
        );
        let kek = KekId::from_random([7; 16]);
        let context = ContentContext::new(b"doc-1".to_vec()).unwrap();
        assert!(matches!(
            service
                .generate_data_key(&service_caller, &kek, &context)
                .await,
            Err(ServiceError::UnknownKek(_))
        ));

        assert_eq!(store.load_org(&org).await.unwrap(), None, "not enrolled");
        assert!(store.audited_orgs().await.unwrap().is_empty());
    }

    /// A stranger naming made-up orgs cannot grow the database: the refusal
    /// is counted and logged, and only an existing org's log records it.
    #[tokio::test]
    async fn refusals_are_audited_only_in_orgs_that_exist() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(dir.path().join("m.db").to_str().unwrap())
                .await
                .unwrap(),
        );
        // Refusals never reach the HSM daemon.
        let nowhere = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let service = KeyService::new(
            store.clone(),
            HsmClient::over(nowhere),
            Arc::new(SystemClock),
            Policy::default(),
            ServiceOptions::default(),
        );
        let denied = |org: &OrgId| {
            ServiceError::from(Denied::NotGranted {
                identity: "stranger".into(),
                org: org.clone(),
                needed: "admin",
            })
        };
        let made_up = OrgId::parse("made-up").unwrap();
        service
            .record_refusal("stranger", &made_up, "list keys", None, &denied(&made_up))
            .await;
        assert_eq!(
            store.load_org(&made_up).await.unwrap(),
            None,
            "not enrolled"
        );
        assert!(
            store
                .audit_events(&made_up, 0, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(service.metrics.refusals_unknown_org.get(), 1);

        let acme = OrgId::parse("acme").unwrap();
        store
            .commit(Commit {
                org: acme.clone(),
                expected_version: None,
                byok: false,
                keys: Vec::new(),
                audit: Vec::new(),
                add_intents: Vec::new(),
                resolve_intents: Vec::new(),
                rotation: None,
                require_unreferenced: Vec::new(),
                uses_generic: None,
            })
            .await
            .unwrap();
        service
            .record_refusal("stranger", &acme, "list keys", None, &denied(&acme))
            .await;
        let events = store.audit_events(&acme, 0, 10).await.unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].event.result.starts_with("PermissionDenied"));
        assert_eq!(service.metrics.refusals_unknown_org.get(), 1);
    }

    /// A chain many pages long is checked page by page, to the same head.
    #[tokio::test]
    async fn a_long_chain_is_verified_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("m.db").to_str().unwrap())
            .await
            .unwrap();
        let org = OrgId::parse("acme").unwrap();
        for n in 0..25 {
            let event = NewAuditEvent {
                time: cmk_control_plane_domain::Timestamp(n),
                actor: "admin".into(),
                key: None,
                action: format!("read {n}"),
                result: "ok".into(),
            };
            store.append_audit(&org, vec![event]).await.unwrap();
        }
        let rows = store.audit_events(&org, 0, 100).await.unwrap();
        let whole = audit::verify(org.as_str(), &rows).unwrap();
        for page_size in [1, 7, 25, 1000] {
            let check = check_audit_chain_in_pages(&store, &org, &AuditKeys::default(), page_size)
                .await
                .unwrap();
            assert_eq!(check.events, 25, "pages of {page_size}");
            assert_eq!(check.head, whole, "pages of {page_size}");
            assert_eq!(check.problem, None, "pages of {page_size}");
        }
    }

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
