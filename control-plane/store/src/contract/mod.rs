//! The behaviour every [`Store`] implementation must show, written once and
//! run against each (SQLite, PostgreSQL).
//!
//! Each check panics with a message naming what broke. The checks use orgs and
//! handles of their own and look only at those in store-wide lists, so they can
//! share one store; [`all`] needs a store nothing else has used, because there
//! is only one generic default key. [`two_instances`] races writers through
//! two instances on one database, as replicas do. Enabled by the `contract`
//! feature, which only test builds turn on.
//!
//! The checks are grouped by the role trait they exercise, one module each;
//! this module holds the helpers they share and the two entry points.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cmk_control_plane_domain::{
    KekId, KeyId, KeyRecord, KeySource, KeyState, OrgId, Place, ResourceId, Timestamp,
    audit::{self, ChainError, ChainedEvent},
};

use crate::{
    AwsArns, Commit, GenericKey, Intent, IntentKind, JobState, NewAuditEvent, OrgAwsKey, Rewrap,
    RotationChange, RotationJob, Store, StoreError, StoredCheckpoint, StoredKek, StoredKey,
    StoredOrg,
};

mod audit_chain;
mod generic_key;
mod intents;
mod keks;
mod leases;
mod orgs;
mod reopening;

pub use audit_chain::{
    a_changed_audit_row_is_named_by_verify, audit_chains_across_commits_and_appends,
    audit_events_page_in_order, checkpoints_are_kept_once_and_cover_the_newest_event,
    commits_and_appends_from_two_instances_form_one_chain,
    concurrent_appends_all_land_in_one_chain,
};
pub use generic_key::{
    a_generic_key_renewed_and_dropped_meanwhile_is_not_taken,
    generic_key_is_renewed_and_the_old_one_dropped_once_unused, generic_key_is_stored_once,
    orgs_using_a_handle_are_found,
};
pub use intents::{
    commits_record_and_resolve_intents, intents_are_recorded_resolved_and_listed_oldest_first,
    material_repair_claimed_is_never_committed,
};
pub use keks::{
    a_key_required_unreferenced_gains_no_kek_meanwhile, kek_counts_count_each_keys_keks,
    keks_are_stored_once_per_resource, keks_racing_for_one_resource_are_stored_once,
    keys_still_wrapping_keks_cannot_be_required_unreferenced,
    large_batches_are_written_whole_and_counted_exactly,
    pages_of_keks_not_wrapped_by_a_key_cover_each_once,
    rewraps_apply_only_where_the_key_is_unchanged,
    rewraps_conflict_on_a_stale_version_or_a_job_not_running,
    rotation_jobs_start_supersede_and_finish,
};
pub use leases::{leases_have_one_holder_until_released_or_expired, racing_for_a_lease_one_wins};
pub use orgs::{
    a_failed_commit_writes_nothing, an_aws_key_serves_one_org,
    aws_external_ids_are_stored_once_per_org, aws_keys_not_removed_are_listed_with_their_org,
    create_and_load_round_trip_every_field, orgs_with_expired_keys_are_found,
    racing_creates_and_commits_from_one_version_one_wins,
    stale_versions_conflict_and_write_nothing, unknown_org_loads_as_none,
};
pub use reopening::{
    TAMPERING, Written, assert_reopened, unknown_stored_values_are_corruption_naming_the_column,
    write_for_reopening,
};

/// Runs every check of this module against `store`, which must be empty.
pub async fn all(store: &dyn Store) {
    unknown_org_loads_as_none(store).await;
    create_and_load_round_trip_every_field(store).await;
    an_aws_key_serves_one_org(store).await;
    aws_external_ids_are_stored_once_per_org(store).await;
    stale_versions_conflict_and_write_nothing(store).await;
    a_failed_commit_writes_nothing(store).await;
    audit_chains_across_commits_and_appends(store).await;
    audit_events_page_in_order(store).await;
    concurrent_appends_all_land_in_one_chain(store).await;
    checkpoints_are_kept_once_and_cover_the_newest_event(store).await;
    intents_are_recorded_resolved_and_listed_oldest_first(store).await;
    commits_record_and_resolve_intents(store).await;
    generic_key_is_stored_once(store).await;
    a_generic_key_renewed_and_dropped_meanwhile_is_not_taken(store).await;
    material_repair_claimed_is_never_committed(store).await;
    orgs_with_expired_keys_are_found(store).await;
    keks_are_stored_once_per_resource(store).await;
    kek_counts_count_each_keys_keks(store).await;
    pages_of_keks_not_wrapped_by_a_key_cover_each_once(store).await;
    rotation_jobs_start_supersede_and_finish(store).await;
    rewraps_apply_only_where_the_key_is_unchanged(store).await;
    rewraps_conflict_on_a_stale_version_or_a_job_not_running(store).await;
    keys_still_wrapping_keks_cannot_be_required_unreferenced(store).await;
    orgs_using_a_handle_are_found(store).await;
    aws_keys_not_removed_are_listed_with_their_org(store).await;
    generic_key_is_renewed_and_the_old_one_dropped_once_unused(store).await;
    leases_have_one_holder_until_released_or_expired(store).await;
}

/// An org id the check owns.
pub fn org_id(name: &str) -> OrgId {
    OrgId::parse(&format!("contract-{name}")).expect("valid org id")
}

/// A handle (32 lower-case hex) the check owns: `check` tells the checks apart.
pub fn handle(check: u32, n: u32) -> String {
    format!("{check:016x}{n:016x}")
}

/// A pending uploaded key with no optional field set.
pub fn key(id: &str, handle: String) -> StoredKey {
    StoredKey {
        record: KeyRecord::pending(
            KeyId(id.into()),
            KeySource::Uploaded,
            format!("kcv-{id}"),
            Timestamp(1_700_000_000),
        ),
        handle,
        aws: None,
    }
}

/// A pending key in AWS KMS whose ARNs name `id`, with a backup key and a
/// role when `full`.
pub fn aws_key(id: &str, handle: String, full: bool) -> StoredKey {
    // Named by the handle, so that no two tests' orgs share an AWS key.
    let key_arn = format!("arn:aws:kms:eu-west-1:111122223333:key/{handle}");
    let mut key = key(id, handle);
    key.record.source = KeySource::AwsKms;
    key.aws = Some(AwsArns {
        key_arn,
        backup_key_arn: full.then(|| format!("arn:aws:kms:eu-central-1:111122223333:key/{id}")),
        role_arn: full.then(|| "arn:aws:iam::111122223333:role/cmk-ünïcode".to_owned()),
    });
    key
}

/// A key in `state`.
pub fn key_in(id: &str, handle: String, state: KeyState) -> StoredKey {
    let mut key = key(id, handle);
    key.record.state = state;
    key
}

/// An audit event of a service change.
pub fn event(action: &str) -> NewAuditEvent {
    NewAuditEvent {
        time: Timestamp(1_700_000_100),
        actor: "service".into(),
        key: None,
        action: action.into(),
        result: "ok".into(),
    }
}

/// A commit of `keys` and `audit` and nothing else.
pub fn commit(
    org: &OrgId,
    expected_version: Option<u64>,
    keys: Vec<StoredKey>,
    audit: Vec<NewAuditEvent>,
) -> Commit {
    Commit {
        org: org.clone(),
        expected_version,
        byok: true,
        keys,
        audit,
        add_intents: Vec::new(),
        resolve_intents: Vec::new(),
        rotation: None,
        require_unreferenced: Vec::new(),
        uses_generic: None,
    }
}

/// An intent recorded at `created_at`.
pub fn intent(handle: String, kind: IntentKind, org: Option<&OrgId>, created_at: i64) -> Intent {
    Intent {
        handle,
        kind,
        org: org.cloned(),
        created_at: Timestamp(created_at),
    }
}

/// The org's whole audit chain.
pub async fn chain_of(store: &dyn Store, org: &OrgId) -> Vec<ChainedEvent> {
    store
        .audit_events(org, 0, u32::MAX)
        .await
        .expect("audit_events")
}

/// The open intents whose handles are among `handles`, in the store's order.
pub async fn open_among(store: &dyn Store, handles: &[impl AsRef<str>]) -> Vec<Intent> {
    store
        .open_intents()
        .await
        .expect("open_intents")
        .into_iter()
        .filter(|i| handles.iter().any(|h| h.as_ref() == i.handle))
        .collect()
}

/// A KEK id the check owns: `check` tells the checks apart.
pub fn kek_id(check: u32, n: u32) -> KekId {
    let mut bytes = [0; 16];
    bytes[..4].copy_from_slice(&check.to_be_bytes());
    bytes[12..].copy_from_slice(&n.to_be_bytes());
    KekId::from_random(bytes)
}

/// KEK `n` of the check, for `resource`, wrapped by `key`.
pub fn kek(check: u32, n: u32, resource: &str, key: &str) -> StoredKek {
    StoredKek {
        id: kek_id(check, n),
        resource: ResourceId::parse(resource).expect("valid resource"),
        key: KeyId(key.into()),
        // Distinct per KEK and per wrapping key, so a lost or misplaced write shows.
        wrapped: format!("wrapped {check}/{n} by {key}").into_bytes(),
        created_at: Timestamp(1_700_000_000 + i64::from(n)),
    }
}

/// `kek` re-wrapped from its key to `to`.
pub fn rewrap(kek: &StoredKek, to: &str) -> Rewrap {
    Rewrap {
        kek: kek.id.clone(),
        from: kek.key.clone(),
        to: KeyId(to.into()),
        wrapped: format!("{} re-wrapped by {to}", kek.id).into_bytes(),
    }
}

/// `kek` as `rewrap` leaves it.
pub fn rewrapped(kek: &StoredKek, rewrap: &Rewrap) -> StoredKek {
    StoredKek {
        key: rewrap.to.clone(),
        wrapped: rewrap.wrapped.clone(),
        ..kek.clone()
    }
}

/// A commit that starts a rotation job towards `target`.
pub fn start_rotation(org: &OrgId, version: u64, target: &str, from: &[&str], at: i64) -> Commit {
    Commit {
        rotation: Some(RotationChange::Start {
            target: KeyId(target.into()),
            from: from.iter().map(|k| KeyId((*k).into())).collect(),
            at: Timestamp(at),
        }),
        ..commit(
            org,
            Some(version),
            Vec::new(),
            vec![event("rotation started")],
        )
    }
}

/// A commit that finishes the org's job `job`.
pub fn finish_rotation(org: &OrgId, version: u64, job: u64, at: i64) -> Commit {
    Commit {
        rotation: Some(RotationChange::Finish {
            job,
            at: Timestamp(at),
        }),
        ..commit(
            org,
            Some(version),
            Vec::new(),
            vec![event("rotation finished")],
        )
    }
}

/// Creates an org with `keys` (id and state), each with a handle of the
/// check's own; returns its version.
pub async fn org_with_keys(
    store: &dyn Store,
    check: u32,
    org: &OrgId,
    keys: &[(&str, KeyState)],
) -> u64 {
    let keys = (0u32..)
        .zip(keys)
        .map(|(n, (id, state))| key_in(id, handle(check, 1000 + n), *state))
        .collect();
    store
        .commit(commit(org, None, keys, Vec::new()))
        .await
        .expect("create org")
}

/// Every KEK of the org not wrapped by `target`, paged through `limit` at a time.
pub async fn all_not_wrapped_by(
    store: &dyn Store,
    org: &OrgId,
    target: &str,
    limit: u32,
) -> Vec<StoredKek> {
    let target = KeyId(target.into());
    let mut all: Vec<StoredKek> = Vec::new();
    loop {
        let after = all.last().map(|k| k.id.clone());
        let page = store
            .keks_not_wrapped_by(org, &target, after.as_ref(), limit)
            .await
            .expect("keks_not_wrapped_by");
        assert!(page.len() <= limit as usize, "a page holds at most `limit`");
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Runs the checks of writers racing through two instances of a store that
/// share one database, as replicas do (for SQLite, two pools on one file).
/// The checks use orgs of their own, so the instances may have run [`all`].
pub async fn two_instances(a: &dyn Store, b: &dyn Store) {
    racing_creates_and_commits_from_one_version_one_wins(a, b).await;
    commits_and_appends_from_two_instances_form_one_chain(a, b).await;
    keks_racing_for_one_resource_are_stored_once(a, b).await;
    a_key_required_unreferenced_gains_no_kek_meanwhile(a, b).await;
    racing_for_a_lease_one_wins(a, b).await;
}
