//! What each command prints: one view type per result, rendered as aligned text for
//! people or as JSON for scripts.
//!
//! The JSON is a stable interface: snake_case field names, enums as lower-case
//! words (`"active"`, `"uploaded"`), times as RFC 3339 UTC with milliseconds, absent
//! values as `null`. No view holds a secret: content keys appear only as a
//! fingerprint. Conversions from the protocol destructure every message without
//! `..`, so a new field breaks the build here until it is shown (or consciously
//! not).

use std::{
    fmt,
    io::{self, Write},
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use cmk_proto::control::v1::{
    AuditEvent, AwsKey, GetAwsSetupResponse, Key, KeyResponse, KeySource, KeyState,
    ListKeysResponse, PreviewRevocationResponse, Rotation, RotationState, SetByokResponse,
    VerifyAuditLogResponse,
};
use serde::{Serialize, Serializer};

use crate::{cli::OutputFormat, config::Merged, error::Error};

/// A result that can be shown either way.
pub trait Render: Serialize {
    /// Aligned text, ending in a newline.
    fn table(&self) -> String;
}

/// Prints `view` on standard output in `format`.
pub fn print(format: OutputFormat, view: &impl Render) -> Result<(), Error> {
    match format {
        OutputFormat::Table => write_stdout(&view.table()),
        OutputFormat::Json => write_stdout(&json(view)),
    }
}

/// `value` as pretty JSON with a final newline.
pub fn json(value: &impl Serialize) -> String {
    // The views hold only strings, numbers, booleans, options and lists of them,
    // which always serialize.
    let mut text = serde_json::to_string_pretty(value).expect("views serialize to JSON");
    text.push('\n');
    text
}

/// Writes `text` to standard output. A reader that went away (`cmkctl … | head`)
/// is not an error.
pub fn write_stdout(text: &str) -> Result<(), Error> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => Err(Error::Output(err)),
        _ => Ok(()),
    }
}

/// A protocol timestamp: RFC 3339 UTC, to the second in tables and to the
/// millisecond in JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Time(prost_types::Timestamp);

impl Time {
    /// Wraps a protocol timestamp, if there is one.
    pub fn from_proto(time: Option<prost_types::Timestamp>) -> Option<Self> {
        time.map(Self)
    }

    /// The time, if humantime can format it (from 1970 to 9999).
    fn system_time(&self) -> Option<SystemTime> {
        let time = SystemTime::try_from(self.0).ok()?;
        let max = UNIX_EPOCH + Duration::from_secs(253_402_300_799); // 9999-12-31T23:59:59Z
        (time >= UNIX_EPOCH && time <= max).then_some(time)
    }

    /// Seconds from `self` to `later`.
    fn seconds_until(&self, later: &Time) -> Option<f64> {
        let (start, end) = (self.system_time()?, later.system_time()?);
        Some(end.duration_since(start).ok()?.as_secs_f64())
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.system_time() {
            Some(time) => write!(f, "{}", humantime::format_rfc3339_seconds(time)),
            None => write!(f, "{}", self.0),
        }
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.system_time() {
            Some(time) => serializer.collect_str(&humantime::format_rfc3339_millis(time)),
            None => serializer.collect_str(&self.0),
        }
    }
}

fn or_dash(value: Option<impl fmt::Display>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn on_off(value: bool) -> &'static str {
    if value { "on" } else { "off" }
}

/// A key state as a lower-case word.
pub fn state_name(state: i32) -> &'static str {
    match KeyState::try_from(state) {
        Ok(KeyState::Unspecified) => "unspecified",
        Ok(KeyState::Pending) => "pending",
        Ok(KeyState::Active) => "active",
        Ok(KeyState::Rotating) => "rotating",
        Ok(KeyState::Deactivated) => "deactivated",
        Ok(KeyState::Revoked) => "revoked",
        Ok(KeyState::Deleted) => "deleted",
        Ok(KeyState::RevokedByProvider) => "revoked_by_provider",
        Ok(KeyState::Removed) => "removed",
        Err(_) => "unknown",
    }
}

/// A key state as people read it: `revoked by provider` rather than the
/// JSON's `revoked_by_provider`.
fn state_words(state: &str) -> String {
    state.replace('_', " ")
}

/// A key source as a lower-case word.
pub fn source_name(source: i32) -> &'static str {
    match KeySource::try_from(source) {
        Ok(KeySource::Unspecified) => "unspecified",
        Ok(KeySource::Uploaded) => "uploaded",
        Ok(KeySource::AwsKms) => "aws_kms",
        Ok(KeySource::GenericDefault) => "generic_default",
        Err(_) => "unknown",
    }
}

/// A rotation state as a lower-case word.
pub fn rotation_state_name(state: i32) -> &'static str {
    match RotationState::try_from(state) {
        Ok(RotationState::Unspecified) => "unspecified",
        Ok(RotationState::Running) => "running",
        Ok(RotationState::Paused) => "paused",
        Ok(RotationState::Finished) => "finished",
        Ok(RotationState::Superseded) => "superseded",
        Err(_) => "unknown",
    }
}

/// A duration for people: "1.2 s", "42 s", "3 min 5 s", "2 h 10 min".
pub fn human_duration(seconds: f64) -> String {
    if seconds < 10.0 {
        return format!("{seconds:.1} s");
    }
    // Whole seconds from here on; the fraction no longer matters.
    let whole = seconds.round() as u64;
    match whole {
        0..60 => format!("{whole} s"),
        60..3600 => format!("{} min {} s", whole / 60, whole % 60),
        _ => format!("{} h {} min", whole / 3600, whole % 3600 / 60),
    }
}

/// Rows of `label  value`, labels padded to one width.
fn fields(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(label, value)| format!("{label:<width$}  {value}\n"))
        .collect()
}

/// Columns padded to their widest cell, two spaces apart; no trailing spaces.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, width) in cells.zip(&widths) {
            text.push_str(cell);
            text.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
        }
        let mut text = text.trim_end().to_string();
        text.push('\n');
        text
    };
    let mut text = line(&mut headers.iter().copied());
    for row in rows {
        text.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    text
}

/// One master key.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeyView {
    /// `key-…`.
    pub key_id: String,
    /// `byok`, `aws_kms` or `generic_default`.
    pub source: &'static str,
    /// `pending`, `active`, `rotating`, ….
    pub state: &'static str,
    /// 10 upper-case hex characters.
    pub key_check_value: String,
    /// When it was created.
    pub created_at: Option<Time>,
    /// When it last became active.
    pub activated_at: Option<Time>,
    /// When it was last revoked.
    pub revoked_at: Option<Time>,
    /// When it will be removed from the HSM.
    pub expires_at: Option<Time>,
    /// Active for longer than the rotation policy.
    pub rotation_due: bool,
    /// Where the key is in AWS KMS; `null` for any other key.
    pub aws: Option<AwsKeyView>,
}

/// Where a key in AWS KMS is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AwsKeyView {
    /// The key's ARN.
    pub key_arn: String,
    /// The backup key's ARN; `null` when none.
    pub backup_key_arn: Option<String>,
    /// The IAM role assumed to use the keys; `null` when none.
    pub role_arn: Option<String>,
}

impl From<AwsKey> for AwsKeyView {
    fn from(aws: AwsKey) -> Self {
        let AwsKey {
            key_arn,
            backup_key_arn,
            role_arn,
        } = aws;
        let given = |arn: String| Some(arn).filter(|a| !a.is_empty());
        AwsKeyView {
            key_arn,
            backup_key_arn: given(backup_key_arn),
            role_arn: given(role_arn),
        }
    }
}

impl From<Key> for KeyView {
    fn from(key: Key) -> Self {
        let Key {
            key_id,
            source,
            state,
            key_check_value,
            created_at,
            activated_at,
            revoked_at,
            expires_at,
            rotation_due,
            aws,
        } = key;
        KeyView {
            key_id,
            source: source_name(source),
            state: state_name(state),
            key_check_value,
            created_at: Time::from_proto(created_at),
            activated_at: Time::from_proto(activated_at),
            revoked_at: Time::from_proto(revoked_at),
            expires_at: Time::from_proto(expires_at),
            rotation_due,
            aws: aws.map(AwsKeyView::from),
        }
    }
}

impl KeyView {
    fn rows(&self) -> Vec<(&'static str, String)> {
        let mut rows = vec![
            ("key", self.key_id.clone()),
            ("source", self.source.to_string()),
            ("state", state_words(self.state)),
            ("check value", self.key_check_value.clone()),
            ("created", or_dash(self.created_at.as_ref())),
            ("activated", or_dash(self.activated_at.as_ref())),
            ("revoked", or_dash(self.revoked_at.as_ref())),
            ("expires", or_dash(self.expires_at.as_ref())),
            (
                "rotation due",
                if self.rotation_due {
                    "yes: activate a new key".to_string()
                } else {
                    "no".to_string()
                },
            ),
        ];
        if let Some(aws) = &self.aws {
            rows.push(("aws key arn", aws.key_arn.clone()));
            rows.push(("aws backup key arn", or_dash(aws.backup_key_arn.as_ref())));
            rows.push(("aws role arn", or_dash(aws.role_arn.as_ref())));
        }
        rows
    }

    /// "key-… (check value …)".
    fn short(&self) -> String {
        format!("{} (check value {})", self.key_id, self.key_check_value)
    }
}

fn active_line(active: Option<&KeyView>) -> String {
    match active {
        Some(key) => key.short(),
        None => "none: the master key is revoked".to_string(),
    }
}

/// A key and the organisation's active key beside it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeyResponseView {
    /// The key acted on.
    pub key: Option<KeyView>,
    /// The active key; `null` while the master key is revoked.
    pub active_key: Option<KeyView>,
}

impl From<KeyResponse> for KeyResponseView {
    fn from(response: KeyResponse) -> Self {
        let KeyResponse { key, active_key } = response;
        KeyResponseView {
            key: key.map(KeyView::from),
            active_key: active_key.map(KeyView::from),
        }
    }
}

impl Render for KeyResponseView {
    fn table(&self) -> String {
        let mut rows = self.key.as_ref().map(KeyView::rows).unwrap_or_default();
        rows.push(("active key", active_line(self.active_key.as_ref())));
        fields(&rows)
    }
}

/// The organisation's keys.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ListView {
    /// Whether bring-your-own-key is on.
    pub byok_enabled: bool,
    /// The key wrapping new KEKs; `null` while the master key is revoked.
    pub active_key_id: Option<String>,
    /// Every key that is not removed.
    pub keys: Vec<KeyView>,
}

impl From<ListKeysResponse> for ListView {
    fn from(response: ListKeysResponse) -> Self {
        let ListKeysResponse {
            keys,
            active_key_id,
            byok_enabled,
        } = response;
        ListView {
            byok_enabled,
            active_key_id: Some(active_key_id).filter(|id| !id.is_empty()),
            keys: keys.into_iter().map(KeyView::from).collect(),
        }
    }
}

impl Render for ListView {
    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .keys
            .iter()
            .map(|key| {
                let active = self.active_key_id.as_deref() == Some(key.key_id.as_str());
                vec![
                    if active { "*" } else { "" }.to_string(),
                    key.key_id.clone(),
                    key.source.to_string(),
                    state_words(key.state),
                    key.key_check_value.clone(),
                    or_dash(key.created_at.as_ref()),
                    or_dash(key.activated_at.as_ref()),
                    or_dash(key.expires_at.as_ref()),
                    if key.rotation_due { "rotation due" } else { "" }.to_string(),
                ]
            })
            .collect();
        let headers = [
            "",
            "KEY ID",
            "SOURCE",
            "STATE",
            "CHECK VALUE",
            "CREATED",
            "ACTIVATED",
            "EXPIRES",
            "NOTE",
        ];
        let mut text = if rows.is_empty() {
            "no keys\n".to_string()
        } else {
            table(&headers, &rows)
        };
        let aws: Vec<Vec<String>> = self
            .keys
            .iter()
            .filter_map(|key| {
                let aws = key.aws.as_ref()?;
                Some(vec![
                    key.key_id.clone(),
                    aws.key_arn.clone(),
                    or_dash(aws.backup_key_arn.as_ref()),
                ])
            })
            .collect();
        if !aws.is_empty() {
            text.push('\n');
            text.push_str(&table(&["AWS KMS KEY", "KEY ARN", "BACKUP KEY ARN"], &aws));
        }
        let active = match &self.active_key_id {
            Some(id) => format!("active key {id} (*)"),
            None => format!("no active key: the master key is {}", self.blocked_by()),
        };
        text.push_str(&format!("\nBYOK {}; {active}\n", on_off(self.byok_enabled)));
        text
    }
}

impl ListView {
    /// Why no key is active: a master key revoked by an admin is listed as
    /// revoked, deleted or removed; otherwise the listed key revoked by its
    /// provider is the master.
    fn blocked_by(&self) -> &'static str {
        let state = |names: &[&str]| self.keys.iter().any(|k| names.contains(&k.state));
        if !state(&["revoked", "deleted", "removed"]) && state(&["revoked_by_provider"]) {
            "revoked by its provider: enable it in AWS KMS again"
        } else {
            "revoked"
        }
    }
}

/// What an org's AWS admin needs to create the role.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AwsSetupView {
    /// The principal the role's trust policy names.
    pub service_principal_arn: String,
    /// The external id the trust policy requires.
    pub external_id: String,
    /// The role's trust policy.
    pub trust_policy: serde_json::Value,
    /// The role's permissions policy.
    pub permissions_policy: serde_json::Value,
    /// The keys the permissions policy names.
    pub key_arns: Vec<String>,
}

impl From<GetAwsSetupResponse> for AwsSetupView {
    fn from(response: GetAwsSetupResponse) -> Self {
        let GetAwsSetupResponse {
            service_principal_arn,
            external_id,
            trust_policy_json,
            permissions_policy_json,
            key_arns,
        } = response;
        // Shown as sent should a policy not parse; the service writes JSON.
        let parsed =
            |text: String| serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        AwsSetupView {
            service_principal_arn,
            external_id,
            trust_policy: parsed(trust_policy_json),
            permissions_policy: parsed(permissions_policy_json),
            key_arns,
        }
    }
}

impl Render for AwsSetupView {
    fn table(&self) -> String {
        let policy =
            |value: &serde_json::Value| serde_json::to_string_pretty(value).unwrap_or_default();
        let mut out = fields(&[
            ("service principal", self.service_principal_arn.clone()),
            ("external id", self.external_id.clone()),
            ("keys", self.key_arns.join(", ")),
        ]);
        out.push_str("\ntrust policy (the role's trust relationship):\n");
        out.push_str(&policy(&self.trust_policy));
        out.push_str("\n\npermissions policy (attach to the role):\n");
        out.push_str(&policy(&self.permissions_policy));
        out.push('\n');
        out
    }
}

/// The result of switching BYOK.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ByokView {
    /// Whether bring-your-own-key is on now.
    pub byok_enabled: bool,
    /// The master key after the change.
    pub active_key: Option<KeyView>,
}

impl From<SetByokResponse> for ByokView {
    fn from(response: SetByokResponse) -> Self {
        let SetByokResponse {
            byok_enabled,
            active_key,
        } = response;
        ByokView {
            byok_enabled,
            active_key: active_key.map(KeyView::from),
        }
    }
}

impl Render for ByokView {
    fn table(&self) -> String {
        fields(&[
            ("BYOK", on_off(self.byok_enabled).to_string()),
            ("active key", active_line(self.active_key.as_ref())),
        ])
    }
}

/// The import public key.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PublicKeyView {
    /// Hex SHA-256 of the DER; pass to `upload --import-key-id`.
    pub key_id: String,
    /// `RSAES_OAEP_SHA_256`.
    pub algorithm: String,
    /// 3072 or 4096.
    pub modulus_bits: u32,
    /// SubjectPublicKeyInfo, PEM, as served.
    pub public_key_pem: String,
    /// The file it was written to, if any.
    pub written_to: Option<PathBuf>,
}

impl Render for PublicKeyView {
    fn table(&self) -> String {
        let mut rows = vec![
            ("import key id", self.key_id.clone()),
            ("algorithm", self.algorithm.clone()),
            ("modulus bits", self.modulus_bits.to_string()),
        ];
        if let Some(path) = &self.written_to {
            rows.push(("written to", path.display().to_string()));
        }
        fields(&rows)
    }
}

/// What `wrap` did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WrapView {
    /// The file holding the master key.
    pub key_file: PathBuf,
    /// Whether that key was generated now.
    pub generated: bool,
    /// The master key's check value, to compare after upload.
    pub key_check_value: String,
    /// The public key's id.
    pub import_key_id: String,
    /// Its modulus size.
    pub modulus_bits: usize,
    /// Where the wrapped key was written.
    pub wrapped_to: PathBuf,
    /// Its length.
    pub wrapped_bytes: usize,
}

impl Render for WrapView {
    fn table(&self) -> String {
        let mut text = String::new();
        if self.generated {
            text.push_str(&format!(
                "generated a new master key in {} (mode 0600): keep it safe, cmk never \
                 gives it back\n",
                self.key_file.display()
            ));
        }
        text.push_str(&format!(
            "wrapped the master key in {} for import key {} (RSA-{}, OAEP SHA-256)\n\
             wrote {} bytes to {}\n\
             key check value: {}  (compare with the one `cmkctl upload` shows)\n\
             next: cmkctl upload --wrapped {} --import-key-id {}\n",
            self.key_file.display(),
            self.import_key_id,
            self.modulus_bits,
            self.wrapped_bytes,
            self.wrapped_to.display(),
            self.key_check_value,
            self.wrapped_to.display(),
            self.import_key_id,
        ));
        text
    }
}

/// What revoking a key would make unreadable.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PreviewView {
    /// The key as it is now.
    pub key: Option<KeyView>,
    /// Whether it can be revoked now.
    pub revocable: bool,
    /// KEKs that become unreadable.
    pub keks_unreadable: u64,
    /// Resources that become unreadable.
    pub resources_unreadable: u64,
    /// Of those KEKs, the ones the key wraps itself.
    pub keks_wrapped_by_key: u64,
}

impl From<PreviewRevocationResponse> for PreviewView {
    fn from(response: PreviewRevocationResponse) -> Self {
        let PreviewRevocationResponse {
            key,
            revocable,
            keks_unreadable,
            resources_unreadable,
            keks_wrapped_by_key,
        } = response;
        PreviewView {
            key: key.map(KeyView::from),
            revocable,
            keks_unreadable,
            resources_unreadable,
            keks_wrapped_by_key,
        }
    }
}

impl PreviewView {
    /// What revoking blocks, in one sentence.
    pub fn consequence(&self) -> String {
        let rotating = self
            .keks_unreadable
            .saturating_sub(self.keks_wrapped_by_key);
        let split = if rotating > 0 {
            format!(
                " ({} wrapped by this key, {rotating} by keys still rotating)",
                self.keks_wrapped_by_key
            )
        } else {
            String::new()
        };
        format!(
            "This blocks the whole organisation until the key is reactivated: {} KEKs{split} \
             of {} resources become unreadable.",
            self.keks_unreadable, self.resources_unreadable
        )
    }
}

/// A revocation: what it blocked, and the key after it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RevokeView {
    /// The preview shown before revoking.
    pub preview: PreviewView,
    /// The key as it is now, and the active key (none after a revocation).
    pub revoked: KeyResponseView,
}

impl Render for RevokeView {
    fn table(&self) -> String {
        let mut text = format!(
            "revoked: {} KEKs of {} resources are unreadable until the key is reactivated\n",
            self.preview.keks_unreadable, self.preview.resources_unreadable
        );
        text.push_str(&self.revoked.table());
        text
    }
}

/// A rotation job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RotationView {
    /// Numbered from 1 within the organisation.
    pub job_id: u64,
    /// `running`, `paused`, `finished` or `superseded`.
    pub state: &'static str,
    /// The key every KEK is re-wrapped to.
    pub target_key_id: String,
    /// The keys rotating when the job started.
    pub from_key_ids: Vec<String>,
    /// KEKs to re-wrap.
    pub total: u64,
    /// KEKs re-wrapped so far.
    pub done: u64,
    /// KEKs per second since the job started.
    pub rate_per_second: f64,
    /// Estimated seconds left; 0 when not running.
    pub eta_seconds: u64,
    /// When the job started.
    pub started_at: Option<Time>,
    /// When it ended.
    pub ended_at: Option<Time>,
}

impl From<Rotation> for RotationView {
    fn from(rotation: Rotation) -> Self {
        let Rotation {
            job_id,
            state,
            target_key_id,
            from_key_ids,
            total,
            done,
            rate_per_second,
            eta_seconds,
            started_at,
            ended_at,
        } = rotation;
        RotationView {
            job_id,
            state: rotation_state_name(state),
            target_key_id,
            from_key_ids,
            total,
            done,
            rate_per_second,
            eta_seconds,
            started_at: Time::from_proto(started_at),
            ended_at: Time::from_proto(ended_at),
        }
    }
}

impl RotationView {
    /// Done as a percentage of total (100 when there is nothing to do).
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            self.done as f64 * 100.0 / self.total as f64
        }
    }

    /// "1200 KEKs/s, ETA 3 s", or less when unknown.
    pub fn speed(&self) -> String {
        let mut text = format!("{:.0} KEKs/s", self.rate_per_second);
        if self.eta_seconds > 0 {
            text.push_str(&format!(
                ", ETA {}",
                human_duration(self.eta_seconds as f64)
            ));
        }
        text
    }

    /// How long the job ran, when it has ended.
    pub fn elapsed(&self) -> Option<f64> {
        self.started_at
            .as_ref()?
            .seconds_until(self.ended_at.as_ref()?)
    }

    /// `rotation job 2 finished: 3000 of 3000 KEKs re-wrapped to key-… in 1.2 s`.
    pub fn finished_line(&self) -> String {
        let took = self
            .elapsed()
            .map(|secs| format!(" in {}", human_duration(secs)))
            .unwrap_or_default();
        format!(
            "rotation job {} finished: {} of {} KEKs re-wrapped to {}{took}\n",
            self.job_id, self.done, self.total, self.target_key_id
        )
    }

    /// `rotation job 2: 1500 of 3000 KEKs re-wrapped (50%), 1200 KEKs/s, ETA 2 s`.
    pub fn progress_line(&self) -> String {
        format!(
            "rotation job {}: {} of {} KEKs re-wrapped to {} ({:.0}%), {}",
            self.job_id,
            self.done,
            self.total,
            self.target_key_id,
            self.percent(),
            self.speed()
        )
    }
}

impl Render for RotationView {
    fn table(&self) -> String {
        fields(&[
            ("job", self.job_id.to_string()),
            ("state", self.state.to_string()),
            ("target key", self.target_key_id.clone()),
            ("from keys", self.from_key_ids.join(", ")),
            (
                "progress",
                format!(
                    "{} of {} KEKs ({:.1}%)",
                    self.done,
                    self.total,
                    self.percent()
                ),
            ),
            ("rate", format!("{:.0} KEKs/s", self.rate_per_second)),
            (
                "eta",
                if self.eta_seconds > 0 {
                    human_duration(self.eta_seconds as f64)
                } else {
                    "-".to_string()
                },
            ),
            ("started", or_dash(self.started_at.as_ref())),
            ("ended", or_dash(self.ended_at.as_ref())),
        ])
    }
}

/// One audit event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditEventView {
    /// Position in the chain.
    pub seq: u64,
    /// When.
    pub time: Option<Time>,
    /// Who: a certificate identity or `service`.
    pub actor: String,
    /// The key concerned, if any.
    pub key_id: String,
    /// What.
    pub action: String,
    /// `ok`, or the refusal's code and message.
    pub result: String,
    /// Chain hash, hex.
    pub hash: String,
}

impl From<AuditEvent> for AuditEventView {
    fn from(event: AuditEvent) -> Self {
        let AuditEvent {
            seq,
            time,
            actor,
            key_id,
            action,
            result,
            hash,
        } = event;
        AuditEventView {
            seq,
            time: Time::from_proto(time),
            actor,
            key_id,
            action,
            result,
            hash,
        }
    }
}

/// One audit event as a line of its own: its fields separated by two
/// spaces, or a JSON object.
pub fn event_line(format: OutputFormat, event: &AuditEventView) -> String {
    match format {
        OutputFormat::Json => {
            // A view of strings and numbers always serializes.
            let mut line = serde_json::to_string(event).unwrap_or_default();
            line.push('\n');
            line
        }
        OutputFormat::Table => {
            let key = if event.key_id.is_empty() {
                "-"
            } else {
                &event.key_id
            };
            format!(
                "{}  {}  {}  {}  {}  {}\n",
                event.seq,
                or_dash(event.time.as_ref()),
                event.actor,
                key,
                event.action,
                event.result
            )
        }
    }
}

/// A run of audit events.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditListView {
    /// The events, oldest first.
    pub events: Vec<AuditEventView>,
    /// Pass as `--after` to continue; `null` when there are no more.
    pub next_after_seq: Option<u64>,
}

impl Render for AuditListView {
    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .events
            .iter()
            .map(|event| {
                vec![
                    event.seq.to_string(),
                    or_dash(event.time.as_ref()),
                    event.actor.clone(),
                    if event.key_id.is_empty() {
                        "-".to_string()
                    } else {
                        event.key_id.clone()
                    },
                    event.action.clone(),
                    event.result.clone(),
                ]
            })
            .collect();
        let mut text = if rows.is_empty() {
            "no events\n".to_string()
        } else {
            table(&["SEQ", "TIME", "ACTOR", "KEY", "ACTION", "RESULT"], &rows)
        };
        if let Some(next) = self.next_after_seq {
            text.push_str(&format!(
                "\nmore events: cmkctl audit list --after {next}\n"
            ));
        }
        text
    }
}

/// The audit chain check.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerifyView {
    /// Whether the chain is intact.
    pub intact: bool,
    /// Events checked.
    pub events: u64,
    /// Hash of the newest event.
    pub head_hash: String,
    /// Where and how it breaks; `null` when intact.
    pub problem: Option<String>,
    /// Signed checkpoints verified against the events.
    pub checkpoints: u64,
    /// The newest seq a verified checkpoint covers.
    pub covered_through_seq: u64,
}

impl From<VerifyAuditLogResponse> for VerifyView {
    fn from(response: VerifyAuditLogResponse) -> Self {
        let VerifyAuditLogResponse {
            intact,
            events,
            head_hash,
            problem,
            checkpoints,
            covered_through_seq,
        } = response;
        VerifyView {
            intact,
            events,
            head_hash,
            problem: Some(problem).filter(|p| !p.is_empty()),
            checkpoints,
            covered_through_seq,
        }
    }
}

impl Render for VerifyView {
    fn table(&self) -> String {
        let mut rows = vec![
            ("intact", yes_no(self.intact).to_string()),
            ("events", self.events.to_string()),
            ("head hash", self.head_hash.clone()),
            ("signed checkpoints", self.checkpoints.to_string()),
            ("covered through seq", self.covered_through_seq.to_string()),
        ];
        if let Some(problem) = &self.problem {
            rows.push(("problem", problem.clone()));
        }
        fields(&rows)
    }
}

/// A resource's KEK.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KekView {
    /// `kek-…`.
    pub kek_id: String,
    /// The resource it belongs to.
    pub resource: String,
    /// The master key that wraps it now.
    pub key_id: String,
    /// Whether this call created it.
    pub created: bool,
    /// When it was created.
    pub created_at: Option<Time>,
}

impl Render for KekView {
    fn table(&self) -> String {
        fields(&[
            ("kek", self.kek_id.clone()),
            ("resource", self.resource.clone()),
            ("master key", self.key_id.clone()),
            ("created now", yes_no(self.created).to_string()),
            ("created", or_dash(self.created_at.as_ref())),
        ])
    }
}

/// A new content key: wrapped, and a fingerprint of the plaintext.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataKeyView {
    /// The KEK that wraps it.
    pub kek_id: String,
    /// The wrapped content key, standard base64.
    pub wrapped_key: String,
    /// First 8 bytes of the SHA-256 of the content key, hex.
    pub content_key_fingerprint: String,
}

impl Render for DataKeyView {
    fn table(&self) -> String {
        fields(&[
            ("kek", self.kek_id.clone()),
            ("wrapped key", self.wrapped_key.clone()),
            (
                "content key fingerprint",
                self.content_key_fingerprint.clone(),
            ),
        ])
    }
}

/// A decrypted content key, shown only by its fingerprint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecryptView {
    /// The KEK that wrapped it.
    pub kek_id: String,
    /// First 8 bytes of the SHA-256 of the content key, hex.
    pub content_key_fingerprint: String,
}

impl Render for DecryptView {
    fn table(&self) -> String {
        fields(&[
            ("kek", self.kek_id.clone()),
            (
                "content key fingerprint",
                self.content_key_fingerprint.clone(),
            ),
        ])
    }
}

impl Render for Merged {
    fn table(&self) -> String {
        let path = |p: &Option<PathBuf>| or_dash(p.as_ref().map(|p| p.display()));
        fields(&[
            ("config file", path(&self.config_file)),
            ("endpoint", self.endpoint.clone()),
            (
                "server name",
                self.server_name
                    .clone()
                    .unwrap_or_else(|| "(the endpoint's host)".to_string()),
            ),
            ("ca", path(&self.ca)),
            ("cert", path(&self.cert)),
            ("key", path(&self.key)),
            ("org", or_dash(self.org.as_ref())),
            ("timeout", format!("{} s", self.timeout_secs)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use prost_types::Timestamp;

    use super::*;

    fn ts(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    fn sample() -> ListKeysResponse {
        ListKeysResponse {
            keys: vec![
                Key {
                    key_id: "key-0001".into(),
                    source: KeySource::GenericDefault as i32,
                    state: KeyState::Rotating as i32,
                    key_check_value: "0A1B2C3D4E".into(),
                    created_at: ts(1_735_689_600), // 2025-01-01T00:00:00Z
                    activated_at: ts(1_735_689_600),
                    revoked_at: None,
                    expires_at: None,
                    rotation_due: false,
                    aws: None,
                },
                Key {
                    key_id: "key-0002".into(),
                    source: KeySource::Uploaded as i32,
                    state: KeyState::Active as i32,
                    key_check_value: "1A0B2DF267".into(),
                    created_at: ts(1_767_225_600), // 2026-01-01T00:00:00Z
                    activated_at: ts(1_767_229_200),
                    revoked_at: None,
                    expires_at: None,
                    rotation_due: true,
                    aws: None,
                },
            ],
            active_key_id: "key-0002".into(),
            byok_enabled: true,
        }
    }

    #[test]
    fn list_renders_an_aligned_table_marking_the_active_key() {
        let text = ListView::from(sample()).table();
        let expected = "   KEY ID    SOURCE           STATE     CHECK VALUE  CREATED               ACTIVATED             EXPIRES  NOTE
   key-0001  generic_default  rotating  0A1B2C3D4E   2025-01-01T00:00:00Z  2025-01-01T00:00:00Z  -
*  key-0002  uploaded         active    1A0B2DF267   2026-01-01T00:00:00Z  2026-01-01T01:00:00Z  -        rotation due

BYOK on; active key key-0002 (*)
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn list_says_when_there_is_no_active_key() {
        let mut response = sample();
        response.active_key_id.clear();
        response.byok_enabled = false;
        let text = ListView::from(response).table();
        assert!(
            text.ends_with("BYOK off; no active key: the master key is revoked\n"),
            "{text}"
        );
        assert!(!text.contains('*'), "{text}");
    }

    #[test]
    fn list_json_has_stable_snake_case_fields() {
        let value: serde_json::Value =
            serde_json::from_str(&json(&ListView::from(sample()))).expect("JSON");
        assert_eq!(value["byok_enabled"], true);
        assert_eq!(value["active_key_id"], "key-0002");
        let key = &value["keys"][1];
        let mut names: Vec<&str> = key
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "activated_at",
                "aws",
                "created_at",
                "expires_at",
                "key_check_value",
                "key_id",
                "revoked_at",
                "rotation_due",
                "source",
                "state",
            ]
        );
        assert_eq!(key["source"], "uploaded");
        assert_eq!(key["state"], "active");
        assert_eq!(key["created_at"], "2026-01-01T00:00:00.000Z");
        assert_eq!(key["revoked_at"], serde_json::Value::Null);
        assert_eq!(key["rotation_due"], true);
        assert_eq!(value["keys"][0]["source"], "generic_default");
        assert_eq!(value["keys"][0]["state"], "rotating");
    }

    /// `sample` with an AWS key as the master (its backup key given, no role),
    /// and a pending AWS key of the same account that AWS reports disabled.
    fn with_aws_keys() -> ListKeysResponse {
        let mut response = sample();
        response.keys[1].state = KeyState::Rotating as i32;
        response.keys[1].rotation_due = false;
        response.keys.push(Key {
            key_id: "key-0003".into(),
            source: KeySource::AwsKms as i32,
            state: KeyState::Active as i32,
            key_check_value: "5E6F7A8B9C".into(),
            created_at: ts(1_767_312_000), // 2026-01-02T00:00:00Z
            activated_at: ts(1_767_312_000),
            revoked_at: None,
            expires_at: None,
            rotation_due: false,
            aws: Some(AwsKey {
                key_arn: "arn:aws:kms:eu-west-1:111122223333:key/1234abcd".into(),
                backup_key_arn: "arn:aws:kms:eu-central-1:111122223333:key/1234abcd".into(),
                role_arn: String::new(),
            }),
        });
        response.keys.push(Key {
            key_id: "key-0004".into(),
            source: KeySource::AwsKms as i32,
            state: KeyState::RevokedByProvider as i32,
            key_check_value: "0123456789".into(),
            created_at: ts(1_767_398_400), // 2026-01-03T00:00:00Z
            activated_at: None,
            revoked_at: None,
            expires_at: None,
            rotation_due: false,
            aws: Some(AwsKey {
                key_arn: "arn:aws:kms:eu-west-1:111122223333:key/5678efgh".into(),
                backup_key_arn: String::new(),
                role_arn: "arn:aws:iam::111122223333:role/cmk".into(),
            }),
        });
        response.active_key_id = "key-0003".into();
        response
    }

    #[test]
    fn list_shows_where_aws_keys_are_and_which_one_aws_disabled() {
        let text = ListView::from(with_aws_keys()).table();
        let expected = "   KEY ID    SOURCE           STATE                CHECK VALUE  CREATED               ACTIVATED             EXPIRES  NOTE
   key-0001  generic_default  rotating             0A1B2C3D4E   2025-01-01T00:00:00Z  2025-01-01T00:00:00Z  -
   key-0002  uploaded         rotating             1A0B2DF267   2026-01-01T00:00:00Z  2026-01-01T01:00:00Z  -
*  key-0003  aws_kms          active               5E6F7A8B9C   2026-01-02T00:00:00Z  2026-01-02T00:00:00Z  -
   key-0004  aws_kms          revoked by provider  0123456789   2026-01-03T00:00:00Z  -                     -

AWS KMS KEY  KEY ARN                                          BACKUP KEY ARN
key-0003     arn:aws:kms:eu-west-1:111122223333:key/1234abcd  arn:aws:kms:eu-central-1:111122223333:key/1234abcd
key-0004     arn:aws:kms:eu-west-1:111122223333:key/5678efgh  -

BYOK on; active key key-0003 (*)
";
        assert_eq!(text, expected, "\n{text}");

        let value: serde_json::Value =
            serde_json::from_str(&json(&ListView::from(with_aws_keys()))).expect("JSON");
        assert_eq!(value["keys"][0]["aws"], serde_json::Value::Null);
        let aws = &value["keys"][2]["aws"];
        assert_eq!(
            aws["key_arn"],
            "arn:aws:kms:eu-west-1:111122223333:key/1234abcd"
        );
        assert_eq!(
            aws["backup_key_arn"],
            "arn:aws:kms:eu-central-1:111122223333:key/1234abcd"
        );
        assert_eq!(aws["role_arn"], serde_json::Value::Null);
        assert_eq!(value["keys"][3]["state"], "revoked_by_provider");
        assert_eq!(
            value["keys"][3]["aws"]["role_arn"],
            "arn:aws:iam::111122223333:role/cmk"
        );
    }

    #[test]
    fn list_says_when_aws_disabled_the_master_key() {
        let mut response = with_aws_keys();
        response.keys[2].state = KeyState::RevokedByProvider as i32;
        response.active_key_id.clear();
        let text = ListView::from(response.clone()).table();
        assert!(
            text.ends_with(
                "BYOK on; no active key: the master key is revoked by its provider: \
                 enable it in AWS KMS again\n"
            ),
            "{text}"
        );
        // Revoked by an admin as well: that is what blocks.
        response.keys[1].state = KeyState::Revoked as i32;
        let text = ListView::from(response).table();
        assert!(
            text.ends_with("no active key: the master key is revoked\n"),
            "{text}"
        );
    }

    #[test]
    fn an_added_aws_key_is_shown_beside_the_active_key() {
        let keys = with_aws_keys().keys;
        let view = KeyResponseView::from(KeyResponse {
            key: Some(keys[3].clone()),
            active_key: Some(keys[2].clone()),
        });
        let text = view.table();
        let expected = "key                 key-0004
source              aws_kms
state               revoked by provider
check value         0123456789
created             2026-01-03T00:00:00Z
activated           -
revoked             -
expires             -
rotation due        no
aws key arn         arn:aws:kms:eu-west-1:111122223333:key/5678efgh
aws backup key arn  -
aws role arn        arn:aws:iam::111122223333:role/cmk
active key          key-0003 (check value 5E6F7A8B9C)
";
        assert_eq!(text, expected, "\n{text}");
        let uploaded = KeyResponseView::from(KeyResponse {
            key: Some(keys[1].clone()),
            active_key: None,
        });
        assert!(!uploaded.table().contains("aws"), "{}", uploaded.table());
    }

    #[test]
    fn an_empty_active_key_id_is_null_in_json() {
        let mut response = sample();
        response.active_key_id.clear();
        let value: serde_json::Value =
            serde_json::from_str(&json(&ListView::from(response))).expect("JSON");
        assert_eq!(value["active_key_id"], serde_json::Value::Null);
    }

    #[test]
    fn rotation_lines_read_well() {
        let view = RotationView::from(Rotation {
            job_id: 2,
            state: RotationState::Finished as i32,
            target_key_id: "key-0002".into(),
            from_key_ids: vec!["key-0001".into()],
            total: 3000,
            done: 3000,
            rate_per_second: 2500.0,
            eta_seconds: 0,
            started_at: Some(Timestamp {
                seconds: 100,
                nanos: 0,
            }),
            ended_at: Some(Timestamp {
                seconds: 101,
                nanos: 200_000_000,
            }),
        });
        assert_eq!(view.state, "finished");
        assert_eq!(
            view.finished_line(),
            "rotation job 2 finished: 3000 of 3000 KEKs re-wrapped to key-0002 in 1.2 s\n"
        );
        let value: serde_json::Value = serde_json::from_str(&json(&view)).expect("JSON");
        assert_eq!(value["ended_at"], "1970-01-01T00:01:41.200Z");
        assert_eq!(value["from_key_ids"][0], "key-0001");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(1.23), "1.2 s");
        assert_eq!(human_duration(42.4), "42 s");
        assert_eq!(human_duration(185.0), "3 min 5 s");
        assert_eq!(human_duration(7800.0), "2 h 10 min");
    }

    #[test]
    fn times_outside_humantimes_range_still_render() {
        let before_1970 = Time(Timestamp {
            seconds: -86_400,
            nanos: 0,
        });
        assert_eq!(before_1970.to_string(), "1969-12-31T00:00:00Z");
    }
}
