//! Control-plane benchmark:
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p cmk-tests --bench control_plane
//! ```
//!
//! The real `control-plane` and `hsm-daemon` binaries of the release profile run
//! as child processes with a throwaway PKI, a SQLite file and the software
//! keystore in a temporary directory. Two parts:
//!
//! - content keys: `GenerateDataKey`, `Decrypt` and the pair of them through
//!   the control plane over mutual TLS, 64 calls in flight, beside a bare
//!   `cmk.bench.v1.EchoService` RPC measured in the same run. The echo server
//!   is this executable started again as a child process (see [`ECHO_LISTEN`]),
//!   serving with the binaries' runtime (`Runtime::new()`), TLS setup
//!   (`cmk_tls::watch_server_config` and `incoming`) and server settings, so that the
//!   only difference left is the work of the RPC itself. The rounds of each
//!   call are interleaved, so a machine that slows down mid-run slows all of
//!   them alike;
//! - rotation: KEKs of one org seeded into the stopped control plane's SQLite
//!   file (wrapped through the daemon's `BatchWrap` by the org's active master
//!   key, exactly as `CreateKek` wraps them), then a new master key uploaded
//!   and activated, and the time until `GetRotation` reports `FINISHED`, with
//!   the peak resident memory (`VmHWM`) of both processes.
//!
//! Environment: `CMK_BENCH_SECS` (seconds per round, default 3; 0 skips the
//! content-key part), `CMK_BENCH_IN_FLIGHT` (64), `CMK_BENCH_CONNECTIONS`
//! (HTTP/2 connections the calls share, 1), `CMK_BENCH_KEKS` (KEK counts to
//! rotate, default `100000,1000000`; empty skips the rotation part). The
//! children's logs go to files in the temporary directory (`CMK_LOG` applies, but
//! must keep the `info` line where each one reports its address);
//! `CMK_BENCH_KEEP=1` keeps it.
//!
//! Timings are printed, never asserted.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    fs::File,
    future::Future,
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use cmk_control_plane::envelope::kek_associated_data;
use cmk_control_plane_domain::{KekId, KeyState, OrgId, ResourceId, Timestamp};
use cmk_control_plane_store::{OrgStore, SqliteStore, StoredKek};
use cmk_hsm_custody::contract;
use cmk_proto::{
    bench::v1::{
        EchoRequest, EchoResponse,
        echo_service_client::EchoServiceClient,
        echo_service_server::{EchoService, EchoServiceServer},
    },
    control::v1::{
        self as pb, RotationState, content_key_service_client::ContentKeyServiceClient,
        key_admin_service_client::KeyAdminServiceClient,
    },
};
use cmk_secret::SecretBytes;
use cmk_tests::{
    ANY_PORT, CONTROL_PLANE, Pki, control_plane, control_plane_command, logged_in_file,
    wait_healthy,
};
use cmk_tls::TlsFiles;
use tonic::transport::Channel;

/// When set (to a socket address), this executable is the echo server and
/// nothing else; [`ECHO_PKI`] names the directory of its certificates.
const ECHO_LISTEN: &str = "CMK_BENCH_ECHO_LISTEN";
const ECHO_PKI: &str = "CMK_BENCH_ECHO_PKI";

/// The control plane's defaults, which the echo server copies.
const MAX_MESSAGE_BYTES: usize = 65_536;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const ORG: &str = "acme";
const ROUNDS: usize = 3;
const WARM_UP: Duration = Duration::from_millis(500);

fn main() {
    if let Ok(listen) = std::env::var(ECHO_LISTEN) {
        let pki = PathBuf::from(std::env::var(ECHO_PKI).expect("CMK_BENCH_ECHO_PKI is set"));
        return echo_server(listen.parse().unwrap(), &pki);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}

async fn bench() {
    let settings = BenchSettings::from_env();
    let binaries = Binaries::find();
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    println!("binaries:{}", binaries.describe());
    println!(
        "load average before the run: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!("work directory: {}", work.path().display());

    if settings.secs > 0 {
        content_keys(&settings, &binaries, &pki, &work.path().join("content")).await;
    }
    if !settings.keks.is_empty() {
        print_rotation_header();
        for &n in &settings.keks {
            let dir = work.path().join(format!("rotation-{n}"));
            let row = rotation(n, &binaries, &pki, &dir).await;
            print_rotation_row(&row);
            // Each size is a deployment of its own; its database can be large.
            if !settings.keep {
                std::fs::remove_dir_all(&dir).unwrap();
            }
        }
        println!(
            "\n  seed: KEKs wrapped through BatchWrap and inserted while the control plane is stopped \
             (not part of the rotation time)."
        );
        println!(
            "  rotate: from the UploadKey call (activate_now) until GetRotation reports FINISHED, polled every 100 ms."
        );
        println!(
            "  CPU: user + system time of each process during the rotation; cp SQLite = the control plane's\n  \
             sqlx-sqlite worker threads, rest = its async runtime (gRPC, TLS, protobuf, row decoding)."
        );
        println!(
            "  RSS: VmHWM of each process, started afresh after seeding; idle = right after start-up."
        );
        println!("  targets: 1M KEKs rotated in ≤ 20 s; control plane peak RSS ≤ 256 MiB.");
    }
    if settings.keep {
        let kept = work.keep();
        println!("\nkept {}", kept.display());
    }
}

struct BenchSettings {
    secs: u64,
    in_flight: usize,
    connections: usize,
    keks: Vec<u64>,
    keep: bool,
}

impl BenchSettings {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok();
        let number = |name: &str, default: u64| {
            var(name).map_or(default, |v| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
            })
        };
        let keks = var("CMK_BENCH_KEKS")
            .unwrap_or_else(|| "100000,1000000".into())
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.replace('_', "")
                    .parse()
                    .unwrap_or_else(|_| panic!("CMK_BENCH_KEKS: {s:?} is not a number"))
            })
            .collect();
        Self {
            secs: number("CMK_BENCH_SECS", 3),
            in_flight: number("CMK_BENCH_IN_FLIGHT", 64).max(1) as usize,
            connections: number("CMK_BENCH_CONNECTIONS", 1).max(1) as usize,
            keks,
            keep: var("CMK_BENCH_KEEP").is_some_and(|v| v == "1"),
        }
    }
}

// Processes -------------------------------------------------------------------

/// The binaries of the release profile, next to this benchmark's own
/// `<target>/release/deps/` directory.
struct Binaries {
    control_plane: PathBuf,
    hsm_daemon: PathBuf,
}

impl Binaries {
    fn find() -> Self {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(Path::parent).unwrap();
        let find = |name: &str| {
            let path = dir.join(name);
            assert!(
                path.is_file(),
                "{} is missing: build the binaries first with the same target directory:\n  \
                 cargo build --release --bins && cargo bench -p cmk-tests --bench control_plane",
                path.display()
            );
            path
        };
        Self {
            control_plane: find("control-plane"),
            hsm_daemon: find("hsm-daemon"),
        }
    }

    /// Where they are and how old, and a warning for each that is older than
    /// a source file it is built from: `cargo bench` does not rebuild them.
    fn describe(&self) -> String {
        let mut text = String::new();
        for binary in [&self.control_plane, &self.hsm_daemon] {
            let built = std::fs::metadata(binary).unwrap().modified().unwrap();
            let minutes = built.elapsed().unwrap_or_default().as_secs() / 60;
            text.push_str(&format!(
                "\n  {} (built {minutes} min ago)",
                binary.display()
            ));
            if let Some(newer) = newer_input(binary, built) {
                text.push_str(&format!(
                    "\n  WARNING: {} changed since; rebuild with cargo build --release --bins",
                    newer.display()
                ));
            }
        }
        text
    }
}

/// An input of `binary` modified after `built`, from the dependency list
/// Cargo writes beside it (`<binary>.d`: "output: input input ...").
fn newer_input(binary: &Path, built: std::time::SystemTime) -> Option<PathBuf> {
    let deps = std::fs::read_to_string(binary.with_extension("d")).ok()?;
    let (_, inputs) = deps.split_once(": ")?;
    inputs.split_whitespace().map(PathBuf::from).find(|input| {
        std::fs::metadata(input)
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified > built)
    })
}

/// A child process: stopped with SIGTERM by [`Service::stop`], killed if dropped.
struct Service {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Service {
    /// Starts `command` (stderr to `log`; its listen port 0), learns its
    /// address from the line it logs when bound, and waits until that answers
    /// the health check for `client`.
    async fn start(
        name: &'static str,
        mut command: Command,
        log: PathBuf,
        client: &TlsFiles,
    ) -> Self {
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        // Earlier runs' lines stay in the file.
        let from = stderr.metadata().unwrap().len() as usize;
        let child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut server = Self {
            name,
            child,
            addr: ANY_PORT,
            log,
        };
        match logged_in_file(&server.log, from, &mut server.child, "grpc").await {
            Ok(addr) => server.addr = addr,
            Err(err) => server.fail(&err),
        }
        let healthy =
            tokio::time::timeout(Duration::from_secs(30), wait_healthy(server.addr, client));
        if healthy.await.is_err() || server.child.try_wait().unwrap().is_some() {
            server.fail("did not become healthy");
        }
        server
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        if !self.child.wait().unwrap().success() {
            self.fail("did not stop cleanly");
        }
    }

    fn fail(&mut self, what: &str) -> ! {
        let _ = self.child.kill();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{} on {} {what}; the end of {}:\n{}",
            self.name,
            self.addr,
            self.log.display(),
            tail.join("\n")
        );
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_daemon(binaries: &Binaries, pki: &Pki, dir: &Path) -> Service {
    let mut command = Command::new(&binaries.hsm_daemon);
    command
        .arg("--listen")
        .arg(ANY_PORT.to_string())
        .arg("--keystore-dir")
        .arg(dir.join("keystore"))
        .arg("--root-key-file")
        .arg(pki.path("root.key"))
        .arg("--allowed-client")
        .arg(CONTROL_PLANE)
        .arg("--tls-cert")
        .arg(pki.path("server.crt"))
        .arg("--tls-key")
        .arg(pki.path("server.key"))
        .arg("--tls-client-ca")
        .arg(pki.path("ca.crt"))
        .env_remove("CMK_HSM_ROOT_KEY");
    let log = dir.join("hsm-daemon.log");
    Service::start(
        "hsm-daemon",
        command,
        log,
        &pki.client_files("control-plane"),
    )
    .await
}

/// The control plane with its defaults, on `dir/cmk.db`, against `hsm`.
async fn start_control_plane(
    binaries: &Binaries,
    pki: &Pki,
    hsm: SocketAddr,
    dir: &Path,
) -> Service {
    let command = control_plane_command(&binaries.control_plane, pki, hsm, dir, ANY_PORT);
    let log = dir.join("control-plane.log");
    Service::start(
        "control-plane",
        command,
        log,
        &pki.client_files("admin-acme"),
    )
    .await
}

fn database(dir: &Path) -> PathBuf {
    dir.join("cmk.db")
}

/// This executable again, as the echo server.
async fn start_echo(pki: &Pki, dir: &Path) -> Service {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .env(ECHO_LISTEN, ANY_PORT.to_string())
        .env(ECHO_PKI, pki.dir.path());
    let log = dir.join("echo.log");
    Service::start("echo", command, log, &pki.client_files("service-acme")).await
}

/// Peak and current resident memory of `pid`, bytes (`VmHWM`, `VmRSS`).
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .map(|kb| kb.trim().parse::<u64>().unwrap() * 1024)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

// The echo server ---------------------------------------------------------------

struct Echo;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoResponse>, tonic::Status> {
        let EchoRequest { payload } = request.into_inner();
        Ok(tonic::Response::new(EchoResponse { payload }))
    }
}

/// Serves `EchoService` as the binaries serve their APIs: the same runtime,
/// TLS and server settings, plus health for readiness. Ends on SIGTERM, or
/// when stdin closes (the benchmark ended without stopping it).
fn echo_server(listen: SocketAddr, pki: &Path) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // The same reloading configuration the services use.
        let tls = cmk_tls::watch_server_config(
            TlsFiles {
                cert: pki.join("server.crt"),
                key: pki.join("server.key"),
                ca: pki.join("ca.crt"),
            },
            cmk_tls::RELOAD_INTERVAL,
        )
        .unwrap();
        let listener = cmk_tls::bind(listen).await.unwrap();
        // As the binaries log it (their text format), for the benchmark to
        // learn the port.
        eprintln!(
            "listening listener=\"grpc\" addr={}",
            listener.local_addr().unwrap()
        );
        let incoming = cmk_tls::incoming(
            listener,
            tls,
            cmk_tls::AcceptLimits::with_timeout(HANDSHAKE_TIMEOUT),
        );
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EchoServiceServer<Echo>>().await;
        let echo = EchoServiceServer::new(Echo)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        let stop = async move {
            let stdin_closed = tokio::task::spawn_blocking(|| {
                let _ = std::io::stdin().read_to_end(&mut Vec::new());
            });
            tokio::select! {
                _ = stdin_closed => {}
                _ = term.recv() => {}
            }
        };
        tonic::transport::Server::builder()
            .timeout(REQUEST_TIMEOUT)
            .add_service(echo)
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming, stop)
            .await
            .unwrap();
    });
    // Not waiting for the thread that may still be blocked reading stdin.
    std::process::exit(0);
}

// Content keys -------------------------------------------------------------------

type Call = Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// `f` (called with the number of the task that calls it) as a [`Call`].
fn call<F, Fut>(f: F) -> Call
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |task| Box::pin(f(task)))
}

struct Workload {
    name: String,
    /// RPCs per call of `run`.
    rpcs: usize,
    run: Call,
    samples: Vec<Duration>,
    wall: Duration,
}

impl Workload {
    fn new(name: &str, rpcs: usize, run: Call) -> Self {
        Self {
            name: name.into(),
            rpcs,
            run,
            samples: Vec::new(),
            wall: Duration::ZERO,
        }
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        sorted[((sorted.len() - 1) as f64 * p).round() as usize]
    }

    fn rpcs_per_sec(&self) -> f64 {
        (self.samples.len() * self.rpcs) as f64 / self.wall.as_secs_f64()
    }
}

/// Keeps `in_flight` calls of `call` outstanding until `until`; returns each
/// call's latency and the time until the last one finished.
async fn run_until(call: &Call, in_flight: usize, until: Instant) -> (Vec<Duration>, Duration) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|task| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    call(task).await;
                    samples.push(t.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    (samples, start.elapsed())
}

async fn content_keys(settings: &BenchSettings, binaries: &Binaries, pki: &Pki, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let daemon = start_daemon(binaries, pki, dir).await;
    let cp = start_control_plane(binaries, pki, daemon.addr, dir).await;
    let echo = start_echo(pki, dir).await;

    let mut content = Vec::new();
    let mut echoes = Vec::new();
    for _ in 0..settings.connections {
        content.push(ContentKeyServiceClient::new(
            pki.channel(cp.addr, "service-acme").await.unwrap(),
        ));
        echoes.push(EchoServiceClient::new(
            pki.channel(echo.addr, "service-acme").await.unwrap(),
        ));
    }
    // The org's first KEK, under the generic default key; every call below
    // finds it in the control plane's KEK cache.
    let kek = content[0]
        .clone()
        .create_kek(pb::CreateKekRequest {
            org_id: ORG.into(),
            resource: "bench/space-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .kek_id;
    let context = b"space-1/document-42".to_vec();
    let generate = {
        let (kek, context) = (kek.clone(), context.clone());
        move |client: &ContentKeyServiceClient<Channel>| {
            let mut client = client.clone();
            let request = pb::GenerateDataKeyRequest {
                org_id: ORG.into(),
                kek_id: kek.clone(),
                context: context.clone(),
            };
            async move {
                client
                    .generate_data_key(request)
                    .await
                    .unwrap()
                    .into_inner()
            }
        }
    };
    let wrapped = generate(&content[0]).await.wrapped_key;
    // The echo carries what a call carries: a wrapped content key.
    let payload = wrapped.len();
    let decrypt = {
        let context = context.clone();
        move |client: &ContentKeyServiceClient<Channel>, wrapped: Vec<u8>| {
            let mut client = client.clone();
            let request = pb::DecryptRequest {
                org_id: ORG.into(),
                wrapped_key: wrapped,
                context: context.clone(),
            };
            async move { client.decrypt(request).await.unwrap().into_inner() }
        }
    };

    let pick = |task: usize, n: usize| task % n;
    let mut workloads = vec![
        Workload::new(
            &format!("baseline: Echo, {payload} bytes (separate process)"),
            1,
            {
                let echoes = echoes.clone();
                call(move |task| {
                    let mut client = echoes[pick(task, echoes.len())].clone();
                    async move {
                        let response = client
                            .echo(EchoRequest {
                                payload: vec![7; payload],
                            })
                            .await
                            .unwrap();
                        assert_eq!(response.into_inner().payload.len(), payload);
                    }
                })
            },
        ),
        Workload::new("GenerateDataKey", 1, {
            let (content, generate) = (content.clone(), generate.clone());
            call(move |task| {
                let generated = generate(&content[pick(task, content.len())]);
                async move {
                    generated.await;
                }
            })
        }),
        Workload::new("Decrypt", 1, {
            let (content, decrypt, wrapped) = (content.clone(), decrypt.clone(), wrapped.clone());
            call(move |task| {
                let decrypted = decrypt(&content[pick(task, content.len())], wrapped.clone());
                async move {
                    decrypted.await;
                }
            })
        }),
        Workload::new("GenerateDataKey then Decrypt (pair)", 2, {
            let (content, generate, decrypt) = (content.clone(), generate.clone(), decrypt.clone());
            call(move |task| {
                let client = content[pick(task, content.len())].clone();
                let (generate, decrypt) = (generate.clone(), decrypt.clone());
                async move {
                    let data_key = generate(&client).await;
                    let opened = decrypt(&client, data_key.wrapped_key).await;
                    assert!(opened.plaintext == data_key.plaintext);
                }
            })
        }),
    ];

    let measured = Duration::from_secs(settings.secs);
    for _ in 0..ROUNDS {
        for workload in &mut workloads {
            run_until(&workload.run, settings.in_flight, Instant::now() + WARM_UP).await;
            let (samples, wall) =
                run_until(&workload.run, settings.in_flight, Instant::now() + measured).await;
            workload.samples.extend(samples);
            workload.wall += wall;
        }
    }

    println!(
        "\nContent keys over mutual TLS: {} in flight on {} HTTP/2 connection{}, KEK cache warm,\n\
         {ROUNDS} interleaved rounds of {} s per row (after {:?} of warm-up each)",
        settings.in_flight,
        settings.connections,
        if settings.connections == 1 { "" } else { "s" },
        settings.secs,
        WARM_UP,
    );
    println!(
        "  {:<46} {:>8} {:>10} {:>10} {:>10} {:>7}",
        "call", "calls", "p50", "p99", "RPCs/s", "ratio"
    );
    let baseline = workloads[0].rpcs_per_sec();
    for workload in &workloads {
        println!(
            "  {:<46} {:>8} {:>10} {:>10} {:>10.0} {:>6.2}x",
            workload.name,
            workload.samples.len(),
            format!("{:.2?}", workload.percentile(0.5)),
            format!("{:.2?}", workload.percentile(0.99)),
            workload.rpcs_per_sec(),
            workload.rpcs_per_sec() / baseline,
        );
    }
    println!(
        "\n  ratio: RPCs per second relative to the echo baseline (higher is faster; target ≥ 0.6).\n  \
         The pair row counts two RPCs per call; its p50/p99 are of the pair. The echo server is this\n  \
         benchmark started again as a child process, with the binaries' runtime, TLS and server settings.\n  \
         Client and servers share the machine's {} cores.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    drop((content, echoes));
    echo.stop();
    cp.stop();
    daemon.stop();
}

// Rotation ------------------------------------------------------------------------

struct RotationRow {
    keks: u64,
    seed: Duration,
    rotate: Duration,
    /// CPU time during the rotation.
    cp_cpu: CpuTime,
    hsm_cpu: CpuTime,
    cp_idle: u64,
    cp_peak: u64,
    hsm_idle: u64,
    hsm_peak: u64,
}

fn print_rotation_header() {
    println!(
        "\nRotation of one org's KEKs on SQLite (the control plane's defaults: batches of 1000)"
    );
    println!(
        "  {:>9} {:>8} {:>8} {:>8}   {:>19} {:>8}   {:>21}   {:>21}",
        "KEKs",
        "seed",
        "rotate",
        "KEKs/s",
        "CPU cp: SQLite/rest",
        "CPU hsm",
        "RSS cp: idle / peak",
        "RSS hsm: idle / peak"
    );
}

fn print_rotation_row(row: &RotationRow) {
    println!(
        "  {:>9} {:>8} {:>8} {:>8.0}   {:>19} {:>8}   {:>21}   {:>21}",
        row.keks,
        format!("{:.1?}", row.seed),
        format!("{:.1?}", row.rotate),
        row.keks as f64 / row.rotate.as_secs_f64(),
        format!(
            "{:.1}s / {:.1}s",
            row.cp_cpu.sqlite,
            row.cp_cpu.total - row.cp_cpu.sqlite
        ),
        format!("{:.1}s", row.hsm_cpu.total),
        format!("{} / {}", mib(row.cp_idle), mib(row.cp_peak)),
        format!("{} / {}", mib(row.hsm_idle), mib(row.hsm_peak)),
    );
}

/// CPU seconds (user + system) a process has used, and how much of it its
/// SQLite threads (sqlx runs each connection on a thread of its own).
#[derive(Clone, Copy, Default)]
struct CpuTime {
    total: f64,
    sqlite: f64,
}

impl CpuTime {
    fn of(pid: u32) -> Self {
        let mut cpu = Self::default();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let path = task.unwrap().path().join("stat");
            // A thread that ended since the listing has no stat.
            let Ok(stat) = std::fs::read_to_string(path) else {
                continue;
            };
            // "tid (name) state ppid ...": utime and stime are the 12th and
            // 13th fields after the name, in clock ticks (USER_HZ, 100 on Linux).
            let (name, rest) = stat.split_once(" (").unwrap().1.rsplit_once(") ").unwrap();
            let fields: Vec<&str> = rest.split(' ').collect();
            let ticks: u64 =
                fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
            let secs = ticks as f64 / 100.0;
            cpu.total += secs;
            if name.starts_with("sqlx-sqlite") {
                cpu.sqlite += secs;
            }
        }
        cpu
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            total: self.total - earlier.total,
            sqlite: self.sqlite - earlier.sqlite,
        }
    }
}

fn key_request(key_id: &str) -> pb::KeyRequest {
    pb::KeyRequest {
        org_id: ORG.into(),
        key_id: key_id.into(),
    }
}

/// Uploads a new key of the org, wrapped with the openssl CLI as an admin
/// would, and activates it at once; returns its id.
async fn upload_and_activate(
    admin: &mut KeyAdminServiceClient<Channel>,
    dir: &Path,
    name: &str,
) -> String {
    let public = admin
        .get_import_public_key(pb::GetImportPublicKeyRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    std::fs::write(dir.join("pub.pem"), &public.public_key_pem).unwrap();
    let wrapped = control_plane::wrap_new_key(dir, name);
    let key = admin
        .upload_key(pb::UploadKeyRequest {
            org_id: ORG.into(),
            wrapped_key: wrapped,
            activate_now: true,
            import_key_id: public.key_id,
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key.state(), pb::KeyState::Active);
    key.key_id
}

/// Polls GetRotation every 100 ms until the job towards `target` is finished;
/// calls `tick` with each answer.
async fn wait_rotation(
    admin: &mut KeyAdminServiceClient<Channel>,
    target: &str,
    mut tick: impl FnMut(&pb::Rotation),
) -> pb::Rotation {
    loop {
        let job = admin
            .get_rotation(pb::GetRotationRequest { org_id: ORG.into() })
            .await
            .unwrap()
            .into_inner();
        tick(&job);
        if job.target_key_id == target && job.state() == RotationState::Finished {
            return job;
        }
        assert!(
            job.target_key_id != target || job.state() == RotationState::Running,
            "rotation job ended as {:?}",
            job.state()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn rotation(n: u64, binaries: &Binaries, pki: &Pki, dir: &Path) -> RotationRow {
    std::fs::create_dir_all(dir).unwrap();
    let org = OrgId::parse(ORG).unwrap();

    // An org with an uploaded master key, whose KEKs will be seeded.
    let daemon = start_daemon(binaries, pki, dir).await;
    let cp = start_control_plane(binaries, pki, daemon.addr, dir).await;
    let mut admin = KeyAdminServiceClient::new(pki.channel(cp.addr, "admin-acme").await.unwrap());
    admin
        .set_byok(pb::SetByokRequest {
            org_id: ORG.into(),
            enabled: true,
        })
        .await
        .unwrap();
    let first = upload_and_activate(&mut admin, dir, "first").await;
    wait_rotation(&mut admin, &first, |_| {}).await;
    drop(admin);
    cp.stop();

    // Seed: wrap with the daemon while the control plane is stopped.
    let seed_started = Instant::now();
    let store = SqliteStore::open(&format!("sqlite://{}", database(dir).display()))
        .await
        .unwrap();
    let stored = store.load_org(&org).await.unwrap().unwrap();
    let master = stored
        .keys
        .iter()
        .find(|k| k.record.state == KeyState::Active)
        .unwrap();
    assert_eq!(master.record.id.0, first);
    let hsm = pki.control_plane_client(daemon.addr).await;
    let samples = seed(&store, &hsm, &org, master, n).await;
    store.close().await;
    let seed_time = seed_started.elapsed();
    drop(hsm);
    daemon.stop();

    // Both afresh, so that each one's peak is that of the rotation.
    let daemon = start_daemon(binaries, pki, dir).await;
    let cp = start_control_plane(binaries, pki, daemon.addr, dir).await;
    let (cp_idle, _) = memory(cp.pid());
    let (hsm_idle, _) = memory(daemon.pid());
    let cpu_before = (CpuTime::of(cp.pid()), CpuTime::of(daemon.pid()));
    let mut admin = KeyAdminServiceClient::new(pki.channel(cp.addr, "admin-acme").await.unwrap());
    let started = Instant::now();
    let second = upload_and_activate(&mut admin, dir, "second").await;
    let mut last_print = Instant::now();
    // No sampling of memory while it runs: VmHWM, read once it has finished,
    // is the kernel's own record of the peak.
    let job = wait_rotation(&mut admin, &second, |job| {
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "    {n} KEKs: {} of {} re-wrapped after {:.1?}",
                job.done,
                job.total,
                started.elapsed()
            );
        }
    })
    .await;
    let rotate = started.elapsed();
    let cp_cpu = CpuTime::of(cp.pid()).since(cpu_before.0);
    let hsm_cpu = CpuTime::of(daemon.pid()).since(cpu_before.1);
    let (cp_peak, _) = memory(cp.pid());
    let (hsm_peak, _) = memory(daemon.pid());
    assert_eq!((job.total, job.done), (n, n), "job {job:?}");

    // Every KEK is wrapped by the new key, and a sample opens through it.
    let preview = admin
        .preview_revocation(key_request(&second))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preview.keks_wrapped_by_key, n);
    let listing = admin
        .list_keys(pb::ListKeysRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    let old = control_plane::state_of(&listing, &first);
    assert_eq!(old, Some(pb::KeyState::Deactivated));
    let mut content =
        ContentKeyServiceClient::new(pki.channel(cp.addr, "service-acme").await.unwrap());
    for kek in &samples {
        let data_key = content
            .generate_data_key(pb::GenerateDataKeyRequest {
                org_id: ORG.into(),
                kek_id: kek.as_str().into(),
                context: b"verify".to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        let opened = content
            .decrypt(pb::DecryptRequest {
                org_id: ORG.into(),
                wrapped_key: data_key.wrapped_key,
                context: b"verify".to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(opened.plaintext == data_key.plaintext);
    }
    drop((admin, content));
    cp.stop();
    daemon.stop();
    RotationRow {
        keks: n,
        seed: seed_time,
        rotate,
        cp_cpu,
        hsm_cpu,
        cp_idle,
        cp_peak,
        hsm_idle,
        hsm_peak,
    }
}

/// Stores `n` new KEKs of `org` wrapped by `master`, as `CreateKek` makes them
/// (random ids and bytes, the org and id as associated data); returns about a
/// hundred of their ids, spread over the id range.
async fn seed(
    store: &SqliteStore,
    hsm: &cmk_control_plane::hsm::HsmClient,
    org: &OrgId,
    master: &cmk_control_plane_store::StoredKey,
    n: u64,
) -> Vec<KekId> {
    const WRAP_BATCH: u64 = 1000;
    const INSERT_BATCH: usize = 20_000;
    let now = Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<StoredKek>>(4);
    // Wrapping and inserting overlap: one task wraps, this one inserts.
    let producer = {
        let (hsm, org, master) = (hsm.clone(), org.clone(), master.clone());
        tokio::spawn(async move {
            let mut pending = Vec::with_capacity(INSERT_BATCH);
            let mut made = 0;
            while made < n {
                let count = WRAP_BATCH.min(n - made);
                let ids: Vec<KekId> = (0..count)
                    .map(|_| KekId::from_random(contract::random(16).expose().try_into().unwrap()))
                    .collect();
                let keks: Vec<SecretBytes> = (0..count).map(|_| contract::random(32)).collect();
                let aads: Vec<Vec<u8>> =
                    ids.iter().map(|id| kek_associated_data(&org, id)).collect();
                let items: Vec<(&str, &SecretBytes, &[u8])> = keks
                    .iter()
                    .zip(&aads)
                    .map(|(kek, aad)| (master.handle.as_str(), kek, aad.as_slice()))
                    .collect();
                let wrapped = hsm.wrap_batch(&org, &items).await.unwrap();
                for (i, (id, ciphertext)) in ids.into_iter().zip(wrapped).enumerate() {
                    pending.push(StoredKek {
                        id,
                        resource: ResourceId::parse(&format!("bench/space-{}", made + i as u64))
                            .unwrap(),
                        key: master.record.id.clone(),
                        wrapped: ciphertext.unwrap(),
                        created_at: now,
                    });
                }
                made += count;
                if pending.len() >= INSERT_BATCH || made == n {
                    tx.send(std::mem::take(&mut pending)).await.unwrap();
                }
            }
        })
    };
    let every = (n / 100).max(1) as usize;
    let mut samples = Vec::new();
    let mut stored = 0;
    let mut last_print = Instant::now();
    while let Some(keks) = rx.recv().await {
        samples.extend(keks.iter().step_by(every).map(|k| k.id.clone()));
        stored += keks.len();
        store.insert_keks_unchecked(org, keks).await.unwrap();
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!("    {n} KEKs: {stored} seeded");
        }
    }
    producer.await.unwrap();
    samples.truncate(100);
    samples
}
