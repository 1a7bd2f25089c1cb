//! HSM daemon benchmark: `cargo bench -p cmk-tests --bench hsm`.
//!
//! Each step is reported beside a baseline measured in the same run on the same
//! machine, so the ratio column stays meaningful on a noisy host:
//!
//! - import: the bare RSA-3072 OAEP-SHA-256 decryption, then the software
//!   keystore's import (decrypt, seal, durable atomic write), then `Import` over
//!   mutual TLS;
//! - wrap: a bare AES-256-GCM seal of a 32-byte KEK, then the keystore's wrap,
//!   then `Wrap` over mutual TLS against `GetImportPublicKey` (an RPC doing no
//!   cryptography) on the same connection, one at a time and 64 in flight, and
//!   `BatchWrap` of 1000 items;
//! - backends: `Import`, `Wrap` (one at a time and 64 in flight) and
//!   `BatchWrap` per item at the custody level (the `Custody` trait, no RPC)
//!   on the software keystore, Kryoptic and SoftHSM2, each on a fresh store,
//!   every token row beside the software keystore's same row.
//!
//! Timings are printed, never asserted.
//!
//! The soft tokens read their configuration variable (`KRYOPTIC_CONF`,
//! `SOFTHSM2_CONF`) once per process and `set_var` is unsafe, so, as the
//! PKCS#11 tests do, this binary prepares a fresh token and runs itself again
//! with the variable naming it and [`TOKEN_CHILD`] naming the token; the child
//! prints its figures on stdout ([`encode`]) and the parent prints them beside
//! its own. Kryoptic is the module named by `CMK_TEST_KRYOPTIC_MODULE`
//! (`CMK_TEST_KRYOPTIC_MODULE=$(bash scripts/kryoptic.sh)`), SoftHSM2 Debian's
//! `softhsm2`; a token that cannot be measured gets the reason in place of
//! its figures.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use cmk_control_plane::hsm::{Admission, random_handle};
use cmk_hsm_custody::{
    Custody, CustodyError, ImportKeyBits, KeyHandle, MaterialCustody, RootKey, SoftwareCustody,
    WrapItem, contract,
    envelope::{self, SealingKey},
};
use cmk_hsm_daemon::Limits;
use cmk_hsm_pkcs11::{Pkcs11Custody, Pkcs11Settings, TokenSelector, token};
use cmk_secret::SecretBytes;
use cmk_tests::{InProcess, Pki, ROOT_KEY_HEX};

/// Set in a child process: the token it measures ([`Token::name`]).
const TOKEN_CHILD: &str = "CMK_BENCH_PKCS11_TOKEN";

/// Timed calls per step of the backend comparison (after a tenth as many
/// untimed ones).
const IMPORTS: usize = 100;
const WRAPS: usize = 5000;
const WRAPS_IN_FLIGHT: usize = 10_000;
const BATCHES: usize = 10;
const BATCH_ITEMS: usize = 1000;
const IN_FLIGHT: usize = 64;

/// The steps of the backend comparison, in the order rows are measured,
/// sent and printed.
const STEPS: [&str; 4] = [
    "Import",
    "Wrap",
    "Wrap, 64 in flight",
    "BatchWrap, per item",
];

/// Figures of one step.
struct Stats {
    name: String,
    ops: usize,
    wall: Duration,
    median: Duration,
    p99: Duration,
}

impl Stats {
    fn new(name: &str, mut samples: Vec<Duration>, wall: Duration) -> Self {
        samples.sort();
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        Self {
            name: name.into(),
            ops: samples.len(),
            wall,
            median: at(0.5),
            p99: at(0.99),
        }
    }

    /// The figures of a step whose every call handled `items` items, per item.
    fn per_item(&self, name: &str, items: u32) -> Self {
        Self {
            name: name.into(),
            ops: self.ops * items as usize,
            wall: self.wall,
            median: self.median / items,
            p99: self.p99 / items,
        }
    }

    fn per_op(&self) -> f64 {
        self.wall.as_secs_f64() / self.ops as f64
    }
}

/// One step on one backend: its figures, or why there are none.
type Outcome = Result<Stats, String>;

fn print_header(title: &str) {
    println!("\n{title}");
    println!(
        "  {:<44} {:>8} {:>11} {:>11} {:>11} {:>8}",
        "step", "ops", "median", "p99", "ops/s", "ratio"
    );
}

fn print_row(stats: &Stats, baseline: &Stats) {
    println!(
        "  {:<44} {:>8} {:>11} {:>11} {:>11.0} {:>7.2}x",
        stats.name,
        stats.ops,
        format!("{:.1?}", stats.median),
        format!("{:.1?}", stats.p99),
        1.0 / stats.per_op(),
        stats.per_op() / baseline.per_op(),
    );
}

fn sync_bench(name: &str, n: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..n.div_ceil(10) {
        f();
    }
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    Stats::new(name, samples, start.elapsed())
}

async fn async_bench<F, Fut>(name: &str, n: usize, f: F) -> Stats
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..n.div_ceil(10) {
        f().await;
    }
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        samples.push(t.elapsed());
    }
    Stats::new(name, samples, start.elapsed())
}

/// `n` calls with `in_flight` outstanding at once; per-call latency recorded.
async fn concurrent_bench<F, Fut>(name: &str, n: usize, in_flight: usize, f: F) -> Stats
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let per_task = n / in_flight;
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(per_task);
                for _ in 0..per_task {
                    let t = Instant::now();
                    f().await;
                    samples.push(t.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(n);
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    Stats::new(name, samples, start.elapsed())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Some(name) = std::env::var_os(TOKEN_CHILD) {
        let token = Token::ALL
            .into_iter()
            .find(|t| name == t.name())
            .unwrap_or_else(|| panic!("{TOKEN_CHILD}={name:?} names no token"));
        return measure_token(token).await;
    }
    let pki = Pki::new();
    let store = tempfile::tempdir().unwrap();
    let root = || RootKey::from_hex(&SecretBytes::copy_from(ROOT_KEY_HEX.as_bytes())).unwrap();
    let local =
        SoftwareCustody::open(&store.path().join("local"), root(), ImportKeyBits::Rsa3072).unwrap();
    let public = local.import_public_key().clone();

    // Import -------------------------------------------------------------------
    let wrapped: Vec<Vec<u8>> = (0..400)
        .map(|_| contract::wrap_for_import(&public, contract::random(32).expose()))
        .collect();
    print_header("Import (RSA-3072 OAEP-SHA-256, 32-byte key)");
    let bare_rsa = {
        let decryptor = cmk_hsm_custody::ImportKey::generate(ImportKeyBits::Rsa3072).unwrap();
        let mine: Vec<Vec<u8>> = (0..200)
            .map(|_| contract::wrap_for_import(decryptor.public(), contract::random(32).expose()))
            .collect();
        let mut i = 0;
        sync_bench("baseline: RSA-OAEP decrypt (aws-lc-rs)", 200, || {
            decryptor.decrypt_cmk(&mine[i % mine.len()]).unwrap();
            i += 1;
        })
    };
    print_row(&bare_rsa, &bare_rsa);
    let next = Arc::new(AtomicUsize::new(0));
    let custody_import = async_bench("keystore import (decrypt+seal+fsync'd write)", 200, || {
        let (local, wrapped, next) = (local.clone(), &wrapped, next.clone());
        async move {
            let i = next.fetch_add(1, Ordering::Relaxed);
            local
                .import(
                    &contract::handle(),
                    &contract::scope(),
                    &wrapped[i % wrapped.len()],
                )
                .await
                .unwrap();
        }
    })
    .await;
    print_row(&custody_import, &bare_rsa);

    let daemon =
        InProcess::start(pki.settings(&store.path().join("daemon"), Limits::default())).await;
    let client = pki.control_plane_client(daemon.addr).await;
    let org: &cmk_control_plane_domain::OrgId = Box::leak(Box::new(
        cmk_control_plane_domain::OrgId::parse(cmk_tests::HSM_TEST_ORG).unwrap(),
    ));
    let remote_public =
        cmk_tests::client_import_public_key(client.import_public_key().await.unwrap());
    let remote_wrapped: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..220)
            .map(|_| contract::wrap_for_import(&remote_public, contract::random(32).expose()))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let rpc_import = async_bench("Import over mTLS", 200, || {
        let (client, wrapped, next) = (client.clone(), remote_wrapped.clone(), next.clone());
        async move {
            let i = next.fetch_add(1, Ordering::Relaxed);
            client
                .import(
                    org,
                    &random_handle(),
                    Admission::New,
                    wrapped[i % wrapped.len()].clone(),
                    String::new(),
                )
                .await
                .unwrap();
        }
    })
    .await;
    print_row(&rpc_import, &bare_rsa);

    // Wrap -----------------------------------------------------------------------
    print_header("Wrap (AES-256-GCM, 32-byte KEK, 16-byte associated data)");
    let kek = contract::random(32);
    let aad = b"org-0001/kek-001";
    let sealing = SealingKey::new(&contract::random(32)).unwrap();
    let handle = KeyHandle::random().unwrap();
    let bare_aes = sync_bench("baseline: AES-256-GCM seal (in process)", 100_000, || {
        envelope::wrap(&sealing, &handle, &kek, aad).unwrap();
    });
    print_row(&bare_aes, &bare_aes);
    let key = local
        .generate(&contract::handle(), &contract::scope())
        .await
        .unwrap();
    let custody_wrap = async_bench("keystore wrap", 100_000, || {
        let (local, kek) = (&local, &kek);
        async move {
            local.wrap(&key.handle, kek, aad).await.unwrap();
        }
    })
    .await;
    print_row(&custody_wrap, &bare_aes);

    let remote_key = client.generate(Some(org), &random_handle()).await.unwrap();
    let rpc_baseline = async_bench("RPC baseline: GetImportPublicKey over mTLS", 3000, || {
        let client = client.clone();
        async move {
            client.import_public_key().await.unwrap();
        }
    })
    .await;
    println!();
    print_row(&rpc_baseline, &rpc_baseline);
    let rpc_wrap = async_bench("Wrap over mTLS", 3000, || {
        let (client, kek, handle) = (client.clone(), kek.clone(), remote_key.handle.clone());
        async move {
            client.wrap(org, &handle, &kek, aad).await.unwrap();
        }
    })
    .await;
    print_row(&rpc_wrap, &rpc_baseline);
    let ct = client
        .wrap(org, &remote_key.handle, &kek, aad)
        .await
        .unwrap();
    let rpc_unwrap = async_bench("Unwrap over mTLS", 3000, || {
        let (client, ct) = (client.clone(), ct.clone());
        async move {
            client.unwrap(org, &ct, aad).await.unwrap();
        }
    })
    .await;
    print_row(&rpc_unwrap, &rpc_baseline);

    println!();
    let baseline_64 = concurrent_bench("RPC baseline, 64 in flight", 20_000, 64, {
        let client = client.clone();
        move || {
            let client = client.clone();
            async move {
                client.import_public_key().await.unwrap();
            }
        }
    })
    .await;
    print_row(&baseline_64, &baseline_64);
    let wrap_64 = concurrent_bench("Wrap, 64 in flight", 20_000, 64, {
        let (client, kek, handle) = (client.clone(), kek.clone(), remote_key.handle.clone());
        move || {
            let (client, kek, handle) = (client.clone(), kek.clone(), handle.clone());
            async move {
                client.wrap(org, &handle, &kek, aad).await.unwrap();
            }
        }
    })
    .await;
    print_row(&wrap_64, &baseline_64);

    println!();
    let items: Vec<(&str, &SecretBytes, &[u8])> = (0..1000)
        .map(|_| (remote_key.handle.as_str(), &kek, &aad[..]))
        .collect();
    let batch = async_bench("BatchWrap, 1000 items per call", 20, || {
        let (client, items) = (&client, &items);
        async move {
            let results = client.wrap_batch(org, items).await.unwrap();
            assert!(results.iter().all(Result::is_ok));
        }
    })
    .await;
    let per_item = batch.per_item("  the same, per item", 1000);
    print_row(&batch, &rpc_baseline);
    print_row(&per_item, &rpc_wrap);
    println!(
        "\n  ratio: time per operation relative to the baseline row above it (lower is faster)."
    );
    daemon.stop().await.unwrap();

    // Backends -------------------------------------------------------------------
    let software = SoftwareCustody::open(
        &store.path().join("backends"),
        root(),
        ImportKeyBits::Rsa3072,
    )
    .unwrap();
    let software = measure_backend(software, "software keystore").await;
    let mut tokens = Vec::new();
    for token in Token::ALL {
        tokens.push((token, measure_in_child(token).await));
    }
    print_header("Backends at the custody level, each on a fresh store (no RPC)");
    for (i, step) in STEPS.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let baseline = software[i]
            .as_ref()
            .expect("the software keystore does every step");
        print_row(baseline, baseline);
        for (token, outcome) in &tokens {
            match outcome.as_ref().map(|rows| &rows[i]) {
                Ok(Ok(stats)) => print_row(stats, baseline),
                Ok(Err(reason)) | Err(reason) => {
                    println!("  {:<44} {reason}", row_name(step, token.name()));
                }
            }
        }
    }
    println!(
        "\n  ratio: time per operation relative to the software keystore's row of the same step \
         (lower is faster);\n  \"{}\" is {IN_FLIGHT} calls in flight, \"{}\" {BATCH_ITEMS} items per call; \
         the tokens have {} sessions.",
        STEPS[2],
        STEPS[3],
        Pkcs11Settings::DEFAULT_SESSIONS,
    );
}

fn row_name(step: &str, backend: &str) -> String {
    format!("{step}: {backend}")
}

/// Every step of [`STEPS`] on `custody`, rows named after `backend`.
async fn measure_backend<C: MaterialCustody + Clone>(custody: C, backend: &str) -> Vec<Outcome> {
    let name = |i: usize| row_name(STEPS[i], backend);
    let public = custody.import_public_key().clone();
    let wrapped: Vec<Vec<u8>> = (0..IMPORTS)
        .map(|_| contract::wrap_for_import(&public, contract::random(32).expose()))
        .collect();
    // A token that cannot import says so on the first call.
    let import = match custody
        .import(&contract::handle(), &contract::scope(), &wrapped[0])
        .await
    {
        Ok(_) => {
            let next = AtomicUsize::new(0);
            Ok(async_bench(&name(0), IMPORTS, || {
                let (custody, wrapped, next) = (&custody, &wrapped, &next);
                async move {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    custody
                        .import(
                            &contract::handle(),
                            &contract::scope(),
                            &wrapped[i % wrapped.len()],
                        )
                        .await
                        .unwrap();
                }
            })
            .await)
        }
        Err(CustodyError::DeviceCannot(reason)) if reason == token::OAEP_SHA256_UNSUPPORTED => {
            Err("refused: token cannot unwrap OAEP-SHA-256".to_owned())
        }
        Err(CustodyError::DeviceCannot(reason)) => Err(format!("refused: {reason}")),
        Err(other) => panic!("{backend}: import: {other}"),
    };

    let kek = contract::random(32);
    let aad = b"org-0001/kek-001";
    let handle = custody
        .generate(&contract::handle(), &contract::scope())
        .await
        .unwrap()
        .handle;
    let wrap = async_bench(&name(1), WRAPS, || {
        let (custody, kek) = (&custody, &kek);
        async move {
            custody.wrap(&handle, kek, aad).await.unwrap();
        }
    })
    .await;
    let wrap_in_flight = concurrent_bench(&name(2), WRAPS_IN_FLIGHT, IN_FLIGHT, {
        let (custody, kek) = (custody.clone(), kek.clone());
        move || {
            let (custody, kek) = (custody.clone(), kek.clone());
            async move {
                custody.wrap(&handle, &kek, aad).await.unwrap();
            }
        }
    })
    .await;

    // The batches are built before the clock starts: one per call.
    let batches: Mutex<Vec<Vec<WrapItem>>> = Mutex::new(
        (0..BATCHES + BATCHES.div_ceil(10))
            .map(|_| {
                (0..BATCH_ITEMS)
                    .map(|_| WrapItem {
                        handle,
                        plaintext: kek.clone(),
                        associated_data: aad.to_vec(),
                    })
                    .collect()
            })
            .collect(),
    );
    let batch = async_bench(&name(3), BATCHES, || {
        let (custody, batches) = (&custody, &batches);
        async move {
            let items = batches.lock().unwrap().pop().expect("one batch per call");
            let results = custody.wrap_batch(items).await;
            assert!(results.iter().all(Result::is_ok));
        }
    })
    .await;
    let per_item = batch.per_item(&name(3), BATCH_ITEMS as u32);

    vec![import, Ok(wrap), Ok(wrap_in_flight), Ok(per_item)]
}

/// A PKCS#11 soft token, measured in a child process of its own.
#[derive(Clone, Copy)]
enum Token {
    Kryoptic,
    SoftHsm2,
}

impl Token {
    const ALL: [Self; 2] = [Self::Kryoptic, Self::SoftHsm2];
    const LABEL: &str = "cmk-bench";
    const PIN: &str = "cmk-bench-pin";
    const SO_PIN: &str = "cmk-bench-so-pin";

    fn name(self) -> &'static str {
        match self {
            Self::Kryoptic => "Kryoptic",
            Self::SoftHsm2 => "SoftHSM2",
        }
    }

    /// The module, or why there is none.
    fn module(self) -> Result<PathBuf, String> {
        let (module, how) = match self {
            Self::Kryoptic => (
                std::env::var_os("CMK_TEST_KRYOPTIC_MODULE")
                    .map(PathBuf::from)
                    .ok_or(
                        "not measured: CMK_TEST_KRYOPTIC_MODULE is not set \
                         (CMK_TEST_KRYOPTIC_MODULE=$(bash scripts/kryoptic.sh))",
                    )?,
                "build it with `bash scripts/kryoptic.sh`",
            ),
            Self::SoftHsm2 => (
                PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
                "apt-get install softhsm2",
            ),
        };
        if !module.is_file() {
            return Err(format!(
                "not measured: {} is missing ({how})",
                module.display()
            ));
        }
        Ok(module)
    }

    /// Initialises a fresh token under `dir`; returns the variable (name and
    /// value) that points the module at it.
    fn prepare(self, module: &Path, dir: &Path) -> Result<(&'static str, OsString), String> {
        let (variable, value, mut init) = match self {
            Self::Kryoptic => {
                let conf = dir.join("token.sql");
                let mut init = std::process::Command::new("pkcs11-tool");
                init.arg("--module")
                    .arg(module)
                    .args(["--init-token", "--label", Self::LABEL])
                    .args(["--so-pin", Self::SO_PIN, "--init-pin", "--pin", Self::PIN])
                    .env("KRYOPTIC_CONF", &conf);
                ("KRYOPTIC_CONF", conf, init)
            }
            Self::SoftHsm2 => {
                let conf = dir.join("softhsm2.conf");
                let tokens = dir.join("tokens");
                std::fs::create_dir(&tokens).unwrap();
                std::fs::write(
                    &conf,
                    format!(
                        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                        tokens.display()
                    ),
                )
                .unwrap();
                let mut init = std::process::Command::new("softhsm2-util");
                init.args(["--init-token", "--free", "--label", Self::LABEL])
                    .args(["--so-pin", Self::SO_PIN, "--pin", Self::PIN])
                    .env("SOFTHSM2_CONF", &conf);
                ("SOFTHSM2_CONF", conf, init)
            }
        };
        let program = init.get_program().to_string_lossy().into_owned();
        let out = init
            .output()
            .map_err(|e| format!("not measured: {program} cannot run ({e})"))?;
        if !out.status.success() {
            return Err(format!(
                "not measured: {program} could not initialise a token: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok((variable, value.into_os_string()))
    }
}

/// Runs this binary again to measure `token` on a fresh token, and reads its
/// rows.
async fn measure_in_child(token: Token) -> Result<Vec<Outcome>, String> {
    let module = token.module()?;
    let dir = tempfile::tempdir().unwrap();
    let (variable, value) = token.prepare(&module, dir.path())?;
    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env(TOKEN_CHILD, token.name())
        .env(variable, value)
        .stderr(Stdio::inherit())
        .output()
        .await
        .unwrap();
    if !child.status.success() {
        return Err(format!(
            "not measured: the child process failed ({}; its stderr is above)",
            child.status
        ));
    }
    let stdout = String::from_utf8_lossy(&child.stdout);
    let rows: Vec<Outcome> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix(ROW))
        .zip(STEPS)
        .map(|(line, step)| decode(line, &row_name(step, token.name())))
        .collect();
    if rows.len() != STEPS.len() {
        return Err(format!(
            "not measured: the child process printed {} rows of {}",
            rows.len(),
            STEPS.len()
        ));
    }
    Ok(rows)
}

/// In the child process: every step on `token`, printed for the parent.
async fn measure_token(token: Token) {
    let settings = Pkcs11Settings::new(
        token.module().unwrap(),
        TokenSelector::Label(Token::LABEL.into()),
        SecretBytes::copy_from(Token::PIN.as_bytes()),
    );
    let custody = tokio::task::spawn_blocking(move || Pkcs11Custody::open(&settings))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{}: {e}", token.name()));
    for outcome in measure_backend(custody, token.name()).await {
        println!("{ROW}{}", encode(&outcome));
    }
}

/// Starts each line of a child process that carries a row.
const ROW: &str = "cmk-bench-row\t";

/// A row as a child process sends it: `ok`, operations, then wall time,
/// median and p99 in nanoseconds, or `none` and the reason; tab-separated.
fn encode(outcome: &Outcome) -> String {
    match outcome {
        Ok(s) => format!(
            "ok\t{}\t{}\t{}\t{}",
            s.ops,
            s.wall.as_nanos(),
            s.median.as_nanos(),
            s.p99.as_nanos()
        ),
        Err(reason) => format!("none\t{}", reason.replace(['\t', '\n'], " ")),
    }
}

/// The row [`encode`] sent, named `name`.
fn decode(line: &str, name: &str) -> Outcome {
    let fields: Vec<&str> = line.split('\t').collect();
    let nanos = |i: usize| Duration::from_nanos(fields[i].parse().expect("nanoseconds"));
    match fields[0] {
        "ok" => Ok(Stats {
            name: name.into(),
            ops: fields[1].parse().expect("operations"),
            wall: nanos(2),
            median: nanos(3),
            p99: nanos(4),
        }),
        "none" => Err(fields[1].to_owned()),
        other => panic!("a row of a child process starts with {other:?}"),
    }
}
