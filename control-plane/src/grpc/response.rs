//! The service's answers as `cmk.control.v1` messages: one function per
//! response, each destructuring what it converts without `..`, so that a
//! field added to a view is either sent or named here as withheld.

use cmk_control_plane_domain::{KeyRecord, KeySource, KeyState, Timestamp, audit::ChainedEvent};
use cmk_control_plane_store::{AwsArns, JobState};
use cmk_proto::control::v1 as pb;
use cmk_secret::SecretBytes;

use crate::{
    hsm::ImportPublicKey,
    service::{
        AuditCheck, AuditPage, AwsSetup, DataKey, KekView, KeyDetails, KeyView, OrgView,
        RevocationPreview, RotationView,
    },
};

pub(crate) fn import_public_key(key: ImportPublicKey) -> pb::GetImportPublicKeyResponse {
    let ImportPublicKey {
        public_key_pem,
        key_id,
        algorithm,
        modulus_bits,
    } = key;
    pb::GetImportPublicKeyResponse {
        public_key_pem,
        key_id,
        algorithm,
        modulus_bits,
    }
}

pub(crate) fn aws_setup(setup: AwsSetup) -> pb::GetAwsSetupResponse {
    let AwsSetup {
        service_principal_arn,
        external_id,
        trust_policy_json,
        permissions_policy_json,
        key_arns,
    } = setup;
    pb::GetAwsSetupResponse {
        service_principal_arn,
        external_id,
        trust_policy_json,
        permissions_policy_json,
        key_arns,
    }
}

pub(crate) fn set_byok(view: OrgView) -> pb::SetByokResponse {
    let OrgView {
        byok,
        active,
        rotation_due,
        keys: _,
    } = view;
    pb::SetByokResponse {
        byok_enabled: byok,
        active_key: active.map(|k| key(k, rotation_due)),
    }
}

pub(crate) fn list_keys(view: OrgView) -> pb::ListKeysResponse {
    let OrgView {
        byok,
        keys,
        active,
        rotation_due,
    } = view;
    let due = |k: &KeyDetails| {
        rotation_due && active.as_ref().is_some_and(|a| a.record.id == k.record.id)
    };
    pb::ListKeysResponse {
        keys: keys.iter().map(|k| key(k.clone(), due(k))).collect(),
        active_key_id: active.map(|k| k.record.id.0).unwrap_or_default(),
        byok_enabled: byok,
    }
}

pub(crate) fn audit_events(
    rows: Vec<ChainedEvent>,
    page: AuditPage,
) -> pb::ListAuditEventsResponse {
    // A full page may have more behind it; a short one is the end.
    let next_after_seq = match rows.len() == page.limit() as usize {
        true => rows.last().map_or(0, |r| r.event.seq),
        false => 0,
    };
    pb::ListAuditEventsResponse {
        events: rows.into_iter().map(audit_event).collect(),
        next_after_seq,
    }
}

pub(crate) fn audit_event(row: ChainedEvent) -> pb::AuditEvent {
    let ChainedEvent {
        event,
        prev_hash: _,
        hash,
    } = row;
    pb::AuditEvent {
        seq: event.seq,
        time: Some(timestamp(event.time)),
        actor: event.actor,
        key_id: event.key.unwrap_or_default(),
        action: event.action,
        result: event.result,
        hash: hex::encode(hash),
    }
}

pub(crate) fn verify_audit(check: AuditCheck) -> pb::VerifyAuditLogResponse {
    let AuditCheck {
        events,
        head,
        checkpoints,
        covered_through,
        problem,
    } = check;
    pb::VerifyAuditLogResponse {
        intact: problem.is_none(),
        events,
        head_hash: hex::encode(head),
        problem: problem.map(|p| p.to_string()).unwrap_or_default(),
        checkpoints,
        covered_through_seq: covered_through,
    }
}

pub(crate) fn rotation(view: RotationView) -> pb::Rotation {
    let RotationView {
        job,
        paused,
        rate_per_second,
        eta_seconds,
    } = view;
    let state = match (job.state, paused) {
        (JobState::Running, true) => pb::RotationState::Paused,
        (JobState::Running, false) => pb::RotationState::Running,
        (JobState::Finished, _) => pb::RotationState::Finished,
        (JobState::Superseded, _) => pb::RotationState::Superseded,
    };
    pb::Rotation {
        job_id: job.id,
        state: state.into(),
        target_key_id: job.target.0,
        from_key_ids: job.from.into_iter().map(|k| k.0).collect(),
        total: job.total,
        done: job.done,
        rate_per_second,
        eta_seconds,
        started_at: Some(timestamp(job.started_at)),
        ended_at: job.ended_at.map(timestamp),
    }
}

pub(crate) fn revocation_preview(preview: RevocationPreview) -> pb::PreviewRevocationResponse {
    let RevocationPreview {
        key: record,
        revocable,
        keks_unreadable,
        keks_wrapped_by_key,
    } = preview;
    pb::PreviewRevocationResponse {
        key: Some(key(record, false)),
        revocable,
        keks_unreadable,
        // One KEK per resource.
        resources_unreadable: keks_unreadable,
        keks_wrapped_by_key,
    }
}

pub(crate) fn key_response(view: KeyView) -> pb::KeyResponse {
    let due = |k: &KeyDetails| {
        view.rotation_due
            && view
                .active
                .as_ref()
                .is_some_and(|a| a.record.id == k.record.id)
    };
    pb::KeyResponse {
        key: Some(key(view.key.clone(), due(&view.key))),
        active_key: view.active.clone().map(|k| key(k, view.rotation_due)),
    }
}

pub(crate) fn create_kek(view: KekView) -> pb::CreateKekResponse {
    let KekView {
        id,
        resource,
        key,
        created_at,
        created,
    } = view;
    pb::CreateKekResponse {
        kek_id: id.as_str().to_owned(),
        resource: resource.as_str().to_owned(),
        key_id: key.0,
        created,
        created_at: Some(timestamp(created_at)),
    }
}

pub(crate) fn generate_data_key(data_key: DataKey) -> pb::GenerateDataKeyResponse {
    let DataKey {
        plaintext,
        wrapped,
        kek,
    } = data_key;
    pb::GenerateDataKeyResponse {
        // The response owns this copy until it is encoded; prost cannot
        // zeroize it.
        plaintext: plaintext.expose().to_vec(),
        wrapped_key: wrapped,
        kek_id: kek.as_str().to_owned(),
    }
}

pub(crate) fn decrypt(
    (plaintext, kek): (SecretBytes, cmk_control_plane_domain::KekId),
) -> pb::DecryptResponse {
    pb::DecryptResponse {
        plaintext: plaintext.expose().to_vec(),
        kek_id: kek.as_str().to_owned(),
    }
}

fn key(details: KeyDetails, rotation_due: bool) -> pb::Key {
    let KeyDetails { record, aws } = details;
    let KeyRecord {
        id,
        source,
        state,
        check_value,
        created_at,
        activated_at,
        revoked_at,
    } = record;
    // A deactivated key its provider disables keeps its removal date.
    let expires_at = match state {
        KeyState::RevokedByProvider { was } => KeyState::from(was).due(),
        state => state.due(),
    };
    pb::Key {
        key_id: id.0,
        source: match source {
            KeySource::Uploaded => pb::KeySource::Uploaded,
            KeySource::AwsKms => pb::KeySource::AwsKms,
            KeySource::GenericDefault => pb::KeySource::GenericDefault,
        }
        .into(),
        state: match state {
            KeyState::Pending => pb::KeyState::Pending,
            KeyState::Active => pb::KeyState::Active,
            KeyState::Rotating => pb::KeyState::Rotating,
            KeyState::Deactivated { .. } => pb::KeyState::Deactivated,
            KeyState::Revoked => pb::KeyState::Revoked,
            KeyState::Deleted { .. } => pb::KeyState::Deleted,
            KeyState::Removed | KeyState::Lost => pb::KeyState::Removed,
            KeyState::RevokedByProvider { .. } => pb::KeyState::RevokedByProvider,
        }
        .into(),
        key_check_value: check_value,
        created_at: Some(timestamp(created_at)),
        activated_at: activated_at.map(timestamp),
        revoked_at: revoked_at.map(timestamp),
        expires_at: expires_at.map(timestamp),
        rotation_due,
        aws: aws.map(|arns| {
            let AwsArns {
                key_arn,
                backup_key_arn,
                role_arn,
            } = arns;
            pb::AwsKey {
                key_arn,
                backup_key_arn: backup_key_arn.unwrap_or_default(),
                role_arn: role_arn.unwrap_or_default(),
            }
        }),
    }
}

fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0,
        nanos: 0,
    }
}
