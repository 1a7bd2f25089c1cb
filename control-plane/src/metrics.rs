//! What the control plane measures beside the gRPC requests it serves (which
//! `cmk_runtime::metrics::GrpcMetrics` counts and times): its calls to the
//! HSM daemon, its KEK cache, the rotation jobs it works, and the reloads of
//! its authorisation policy. Every label
//! takes a fixed set of values; none names an org, a key or a caller.

use cmk_runtime::metrics::{LatencyHistograms, latency_histograms};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

/// One HSM daemon call: its RPC, and whether it succeeded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HsmCall {
    /// The RPC's name, e.g. `BatchWrap`.
    pub method: &'static str,
    /// `ok` or `error` (the daemon's own metrics have the status codes).
    pub outcome: &'static str,
}

/// One KEK cache lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLookup {
    /// `hit` or `miss`.
    pub result: &'static str,
}

/// One look at the authorisation policy file that found it changed (or a
/// SIGHUP).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyReload {
    /// `applied`, or `refused` (it did not parse or check; the previous
    /// policy stays in force).
    pub outcome: &'static str,
}

/// The control plane's own metrics. Clones share the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Latency of calls to the HSM daemon.
    pub hsm_calls: LatencyHistograms<HsmCall>,
    /// KEK cache lookups by a content-key call.
    pub kek_cache: Family<CacheLookup, Counter>,
    /// KEKs this process re-wrapped and wrote for rotation jobs.
    pub keks_rewrapped: Counter,
    /// KEKs a rotation pass could not re-wrap (left as they were, retried).
    pub rewrap_failures: Counter,
    /// Rotation jobs this process is working now (holding their lease).
    pub rotations_active: Gauge,
    /// Refused calls naming an org that does not exist: logged, never written.
    pub refusals_unknown_org: Counter,
    /// Reloads of the authorisation policy file, by outcome.
    pub policy_reloads: Family<PolicyReload, Counter>,
    /// Identities holding a grant in the policy in force.
    pub authz_identities: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            hsm_calls: latency_histograms(),
            kek_cache: Family::default(),
            keks_rewrapped: Counter::default(),
            rewrap_failures: Counter::default(),
            rotations_active: Gauge::default(),
            refusals_unknown_org: Counter::default(),
            policy_reloads: Family::default(),
            authz_identities: Gauge::default(),
        }
    }
}

impl Metrics {
    /// New series, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        // prometheus-client appends the unit and `_total` when it exposes them.
        registry.register_with_unit(
            "cmk_hsm_call_duration",
            "Calls from the control plane to the HSM daemon, by RPC and outcome",
            Unit::Seconds,
            metrics.hsm_calls.clone(),
        );
        registry.register(
            "cmk_kek_cache_lookups",
            "Lookups of unwrapped KEKs in this process's cache",
            metrics.kek_cache.clone(),
        );
        registry.register(
            "cmk_rotation_keks_rewrapped",
            "KEKs re-wrapped to their org's active key by this process",
            metrics.keks_rewrapped.clone(),
        );
        registry.register(
            "cmk_rotation_rewrap_failures",
            "KEKs a rotation pass of this process could not re-wrap; retried",
            metrics.rewrap_failures.clone(),
        );
        registry.register(
            "cmk_rotation_jobs_active",
            "Rotation jobs this process is working (holding their lease)",
            metrics.rotations_active.clone(),
        );
        registry.register(
            "cmk_refusals_unknown_org",
            "Refused calls naming an organisation that does not exist (logged, not audited)",
            metrics.refusals_unknown_org.clone(),
        );
        registry.register(
            "cmk_authz_policy_reloads",
            "Reloads of the authorisation policy file: applied, or refused (the previous policy stays)",
            metrics.policy_reloads.clone(),
        );
        registry.register(
            "cmk_authz_policy_identities",
            "Identities holding a grant in the authorisation policy in force",
            metrics.authz_identities.clone(),
        );
        metrics
    }

    /// Counts a KEK cache lookup.
    pub fn cache_lookup(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.kek_cache.get_or_create(&CacheLookup { result }).inc();
    }

    /// Counts a reload of the authorisation policy, applied or refused.
    pub fn policy_reload(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "refused" };
        self.policy_reloads
            .get_or_create(&PolicyReload { outcome })
            .inc();
    }
}

/// Counts a rotation job as worked on until dropped, however the work ends
/// (finished, failed, or stopped because its lease was lost).
pub(crate) struct ActiveRotation(Gauge);

impl ActiveRotation {
    pub(crate) fn start(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for ActiveRotation {
    fn drop(&mut self) {
        self.0.dec();
    }
}
