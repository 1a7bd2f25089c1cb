//! Prometheus metrics: the `/metrics` endpoint, and a tower layer that counts
//! and times every gRPC request, gives it a request id and logs its outcome.
//!
//! Both binaries build one [`Registry`], register [`GrpcMetrics`] (and
//! whatever else they measure) in it, put [`GrpcMetrics::layer`] outermost on
//! their tonic server, and serve the registry with [`serve_metrics`].
//!
//! Labels are bounded by construction: `method` is a method the server has
//! (taken from its file descriptor sets) or `unknown`, and `code` is one of
//! the seventeen gRPC status codes, so a caller cannot grow the registry by
//! inventing paths.

use std::{
    collections::HashSet,
    future::Future,
    hash::Hash,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use axum::{
    extract::State,
    response::{IntoResponse, Response},
};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};
use prost::Message as _;
use tonic::Code;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Span;

use crate::request::{REQUEST_ID_HEADER, RequestId};

/// What `GET /metrics` answers with: the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds, in seconds, of every latency histogram: 100 µs (a rejected
/// call) to 10 s (a slow HSM), in 1–2.5–5 steps so that bucket labels stay
/// readable.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram with [`LATENCY_BUCKETS`], so that every latency the binaries
/// expose can be compared bucket for bucket.
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Latency histograms by label set `L`, each with [`LATENCY_BUCKETS`];
/// register it with `Unit::Seconds`.
pub type LatencyHistograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// An empty [`LatencyHistograms`].
pub fn latency_histograms<L: Clone + Hash + Eq>() -> LatencyHistograms<L> {
    Family::new_with_constructor(latency_histogram)
}

/// Awaits `call` and records how long it took under `labels`. A call whose
/// future is dropped before it completes is not recorded.
pub async fn timed<L, F>(histograms: &LatencyHistograms<L>, labels: &L, call: F) -> F::Output
where
    L: Clone + Hash + Eq,
    F: Future,
{
    let start = Instant::now();
    let output = call.await;
    histograms
        .get_or_create(labels)
        .observe(start.elapsed().as_secs_f64());
    output
}

/// Starts serving `registry` at `http://addr/metrics`, when an address is
/// configured, until the returned guard is dropped.
///
/// Plaintext, like the health probes: the metrics carry no key material and
/// no caller identities, only method names, status codes and latencies.
/// Other paths answer 404 and other methods 405.
pub async fn serve_metrics(
    addr: Option<SocketAddr>,
    registry: Arc<Registry>,
) -> std::io::Result<Option<MetricsServer>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(registry);
    tracing::info!(
        listener = "metrics",
        addr = %local,
        "metrics (plaintext HTTP, GET /metrics)"
    );
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "the metrics listener stopped");
        }
    });
    Ok(Some(MetricsServer { addr: local, task }))
}

/// The running metrics listener; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn scrape(State(registry): State<Arc<Registry>>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => (
            [(http::header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(_) => {
            tracing::error!("cannot encode the metrics registry");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// A file descriptor set given to [`GrpcMetrics::register`] did not decode.
#[derive(Debug, thiserror::Error)]
#[error("file descriptor set {index} (counting from 0) does not decode")]
pub struct DescriptorSetError {
    index: usize,
    #[source]
    source: prost::DecodeError,
}

/// Request counts and latencies of one gRPC server, registered in a
/// [`Registry`]:
///
/// - `cmk_grpc_requests_total{method, code}`: requests by final status;
/// - `cmk_grpc_request_duration_seconds{method}`: time from a request's
///   arrival to its status being known (for a stream, its whole life).
///
/// Cheap to clone; all clones update the same metrics.
#[derive(Clone, Debug)]
pub struct GrpcMetrics(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    requests: Family<RequestLabels, Counter>,
    durations: LatencyHistograms<MethodLabels>,
    known_methods: HashSet<Arc<str>>,
    unknown: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: Arc<str>,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: Arc<str>,
}

impl GrpcMetrics {
    /// Registers the gRPC metrics in `registry`. `descriptor_sets` are the
    /// encoded `FileDescriptorSet`s of every service the server has (such as
    /// `tonic_health::pb::FILE_DESCRIPTOR_SET`); a request for any other
    /// path is labelled `method="unknown"`.
    ///
    /// Nothing is registered if a set does not decode.
    pub fn register(
        registry: &mut Registry,
        descriptor_sets: &[&[u8]],
    ) -> Result<Self, DescriptorSetError> {
        let known_methods = known_methods(descriptor_sets)?;
        let requests = Family::default();
        let durations = latency_histograms();
        // prometheus-client appends `_total` to counters and the unit to the
        // name, so these are exposed as `cmk_grpc_requests_total` and
        // `cmk_grpc_request_duration_seconds`.
        registry.register(
            "cmk_grpc_requests",
            "gRPC requests by method and final status code",
            requests.clone(),
        );
        registry.register_with_unit(
            "cmk_grpc_request_duration",
            "Time from a gRPC request's arrival to its status being known",
            Unit::Seconds,
            durations.clone(),
        );
        Ok(Self(Arc::new(Shared {
            requests,
            durations,
            known_methods,
            unknown: Arc::from("unknown"),
        })))
    }

    /// [`GrpcMetrics::register`] for a cmk server: its own services'
    /// descriptor sets `own`, plus gRPC health and both reflection versions,
    /// which every cmk server serves too.
    pub fn register_server(
        registry: &mut Registry,
        own: &[&[u8]],
    ) -> Result<Self, DescriptorSetError> {
        let mut sets = own.to_vec();
        sets.extend([
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ]);
        Self::register(registry, &sets)
    }

    /// The layer to put on the tonic server, outermost so that requests
    /// refused by inner layers (authorisation, say) are counted too:
    /// `Server::builder().layer(metrics.layer())`.
    pub fn layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer(self.clone())
    }

    fn method_label(&self, path: &str) -> Arc<str> {
        self.0
            .known_methods
            .get(path)
            .unwrap_or(&self.0.unknown)
            .clone()
    }
}

/// Every `/package.Service/Method` path the descriptor sets describe.
fn known_methods(descriptor_sets: &[&[u8]]) -> Result<HashSet<Arc<str>>, DescriptorSetError> {
    let mut methods = HashSet::new();
    for (index, bytes) in descriptor_sets.iter().enumerate() {
        let set = prost_types::FileDescriptorSet::decode(*bytes)
            .map_err(|source| DescriptorSetError { index, source })?;
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                let service_name = match package {
                    "" => service.name().to_owned(),
                    package => format!("{package}.{}", service.name()),
                };
                for method in &service.method {
                    methods.insert(Arc::from(format!("/{service_name}/{}", method.name())));
                }
            }
        }
    }
    Ok(methods)
}

/// Counts, times and logs every request, under a request id; see
/// [`GrpcMetrics`].
///
/// Each request is handled inside a `request` span carrying `request_id` and
/// `method`, so every log line written for it carries both; the id is also
/// put in the request's extensions and metadata (`x-request-id`, replacing an
/// invalid one) and in the response headers. When the status is known one
/// line is logged: at debug level for `Ok`, at info level otherwise.
///
/// A request whose response is dropped before its status is known (the
/// client cancelled, or tonic's server-wide timeout fired) is recorded as
/// `Cancelled`, which is what the client sees.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer(GrpcMetrics);

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around a server's routes.
#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<GrpcMetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = GrpcMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let start = Instant::now();
        let method = self.metrics.method_label(request.uri().path());
        let id = RequestId::from_header(request.headers().get(REQUEST_ID_HEADER));
        let header = id.to_header_value();
        // Handlers see the id that is logged, never an invalid one.
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, header.clone());
        let span = tracing::info_span!("request", request_id = %id, method = %method);
        request.extensions_mut().insert(id);
        let inner = span.in_scope(|| self.inner.call(request));
        GrpcMetricsFuture {
            inner,
            span: span.clone(),
            header,
            pending: Pending(Some(Outcome {
                metrics: self.metrics.clone(),
                method,
                start,
                span,
            })),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GrpcMetricsService`].
    pub struct GrpcMetricsFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        header: HeaderValue,
        pending: Pending,
    }
}

impl<F, B, E> Future for GrpcMetricsFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<GrpcMetricsBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.span.enter();
            ready!(this.inner.poll(cx))
        };
        match result {
            Ok(mut response) => {
                response
                    .headers_mut()
                    .insert(REQUEST_ID_HEADER, this.header.clone());
                let mut pending = std::mem::take(this.pending);
                // A trailers-only response (how tonic sends a handler's
                // error) has its status in the headers and an empty body.
                if let Some(code) = grpc_status(response.headers()) {
                    pending.finish(code);
                }
                Poll::Ready(Ok(response.map(|inner| GrpcMetricsBody { inner, pending })))
            }
            Err(err) => {
                // No status reaches the client from here; tonic turns the
                // error into one further out, which this layer cannot see.
                this.pending.finish(Code::Unknown);
                Poll::Ready(Err(err))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The response body of [`GrpcMetricsService`]: the inner body, watched
    /// for the `grpc-status` trailer.
    pub struct GrpcMetricsBody<B> {
        #[pin]
        inner: B,
        pending: Pending,
    }
}

impl<B: Body> Body for GrpcMetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.pending
                        .finish(grpc_status(trailers).unwrap_or(Code::Unknown));
                }
            }
            // A body that fails or ends without trailers sends no status: the
            // client sees a reset stream or a missing status.
            Some(Err(_)) | None => this.pending.finish(Code::Unknown),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

/// A request whose status is not known yet. Recorded exactly once: by
/// [`Pending::finish`], or as `Cancelled` when dropped unfinished.
#[derive(Default)]
struct Pending(Option<Outcome>);

struct Outcome {
    metrics: GrpcMetrics,
    method: Arc<str>,
    start: Instant,
    span: Span,
}

impl Pending {
    fn finish(&mut self, code: Code) {
        if let Some(outcome) = self.0.take() {
            outcome.record(code);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

impl Outcome {
    fn record(self, code: Code) {
        let latency = self.start.elapsed();
        let code_name = code_name(code);
        let Shared {
            requests,
            durations,
            ..
        } = &*self.metrics.0;
        requests
            .get_or_create(&RequestLabels {
                method: self.method.clone(),
                code: code_name,
            })
            .inc();
        durations
            .get_or_create(&MethodLabels {
                method: self.method,
            })
            .observe(latency.as_secs_f64());
        let _entered = self.span.enter();
        // Whole microseconds: finer is noise, and keeps the log line short.
        let latency_ms = latency.as_micros() as f64 / 1e3;
        if code == Code::Ok {
            tracing::debug!(code = code_name, latency_ms, "request finished");
        } else {
            tracing::info!(code = code_name, latency_ms, "request finished");
        }
    }
}

/// The code's name as `tonic::Code`'s `Debug` writes it, without allocating.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use prost_types::{
        FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto, ServiceDescriptorProto,
    };

    use super::*;

    fn file(package: Option<&str>, service: &str, methods: &[&str]) -> FileDescriptorProto {
        FileDescriptorProto {
            package: package.map(str::to_owned),
            service: vec![ServiceDescriptorProto {
                name: Some(service.to_owned()),
                method: methods
                    .iter()
                    .map(|name| MethodDescriptorProto {
                        name: Some((*name).to_owned()),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn known_methods_are_full_paths() {
        let set = FileDescriptorSet {
            file: vec![
                file(Some("cmk.test.v1"), "Keys", &["Create", "Rotate"]),
                file(None, "Bare", &["Ping"]),
            ],
        }
        .encode_to_vec();
        let methods = known_methods(&[&set]).unwrap();
        let mut methods: Vec<_> = methods.iter().map(|m| m.to_string()).collect();
        methods.sort();
        assert_eq!(
            methods,
            [
                "/Bare/Ping",
                "/cmk.test.v1.Keys/Create",
                "/cmk.test.v1.Keys/Rotate"
            ]
        );
    }

    #[test]
    fn known_methods_from_real_descriptor_sets() {
        let methods = known_methods(&[
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ])
        .unwrap();
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(methods.contains(path), "{path}");
        }
    }

    #[test]
    fn undecodable_sets_are_errors_naming_the_set() {
        let err =
            known_methods(&[tonic_health::pb::FILE_DESCRIPTOR_SET, b"\xff\xff\xff"]).unwrap_err();
        assert_eq!(err.index, 1);
        let mut registry = Registry::default();
        assert!(GrpcMetrics::register(&mut registry, &[b"\x0a"]).is_err());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert_eq!(text, "# EOF\n", "nothing registered");
    }

    #[test]
    fn unknown_paths_share_one_label() {
        let mut registry = Registry::default();
        let metrics =
            GrpcMetrics::register(&mut registry, &[tonic_health::pb::FILE_DESCRIPTOR_SET]).unwrap();
        assert_eq!(
            &*metrics.method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        for path in ["/", "/grpc.health.v1.Health/Nope", "/x/y", "unknown"] {
            assert_eq!(&*metrics.method_label(path), "unknown");
        }
    }

    #[test]
    fn code_names_match_tonic() {
        for n in 0..=16 {
            let code = Code::from_i32(n);
            assert_eq!(code_name(code), format!("{code:?}"));
        }
    }

    #[tokio::test]
    async fn timed_records_completed_calls() {
        let histograms = latency_histograms::<Vec<(String, String)>>();
        let mut registry = Registry::default();
        registry.register_with_unit("call", "Calls", Unit::Seconds, histograms.clone());
        let labels = vec![("op".to_owned(), "wrap".to_owned())];
        assert_eq!(timed(&histograms, &labels, async { 7 }).await, 7);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("call_seconds_count{op=\"wrap\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("call_seconds_bucket{le=\"0.0001\",op=\"wrap\"}"),
            "{text}"
        );
    }
}
