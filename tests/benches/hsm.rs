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
//!   `BatchWrap` of 1000 items.
//!
//! Timings are printed, never asserted.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use cmk_control_plane::hsm::{Admission, random_handle};
use cmk_hsm_custody::{
    Custody, ImportKeyBits, KeyHandle, RootKey, SoftwareCustody, contract,
    envelope::{self, SealingKey},
};
use cmk_hsm_daemon::Limits;
use cmk_secret::SecretBytes;
use cmk_tests::{InProcess, Pki, ROOT_KEY_HEX};

struct Stats {
    name: String,
    samples: Vec<Duration>,
    wall: Duration,
    ops: usize,
}

impl Stats {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        sorted[((sorted.len() - 1) as f64 * p).round() as usize]
    }

    fn per_op(&self) -> f64 {
        self.wall.as_secs_f64() / self.ops as f64
    }
}

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
        format!("{:.1?}", stats.percentile(0.5)),
        format!("{:.1?}", stats.percentile(0.99)),
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
    Stats {
        name: name.into(),
        samples,
        wall: start.elapsed(),
        ops: n,
    }
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
    Stats {
        name: name.into(),
        samples,
        wall: start.elapsed(),
        ops: n,
    }
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
    Stats {
        name: name.into(),
        wall: start.elapsed(),
        ops: samples.len(),
        samples,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
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
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let custody_import = async_bench("keystore import (decrypt+seal+fsync'd write)", 200, || {
        let (local, wrapped, next) = (local.clone(), &wrapped, next.clone());
        async move {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            local
                .import(&contract::handle(), &wrapped[i % wrapped.len()])
                .await
                .unwrap();
        }
    })
    .await;
    print_row(&custody_import, &bare_rsa);

    let daemon =
        InProcess::start(pki.settings(&store.path().join("daemon"), Limits::default())).await;
    let client = pki.control_plane_client(daemon.addr).await;
    let remote_public =
        cmk_tests::client_import_public_key(client.import_public_key().await.unwrap());
    let remote_wrapped: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..220)
            .map(|_| contract::wrap_for_import(&remote_public, contract::random(32).expose()))
            .collect(),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rpc_import = async_bench("Import over mTLS", 200, || {
        let (client, wrapped, next) = (client.clone(), remote_wrapped.clone(), next.clone());
        async move {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            client
                .import(
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
    let key = local.generate(&contract::handle()).await.unwrap();
    let custody_wrap = async_bench("keystore wrap", 100_000, || {
        let (local, kek) = (&local, &kek);
        async move {
            local.wrap(&key.handle, kek, aad).await.unwrap();
        }
    })
    .await;
    print_row(&custody_wrap, &bare_aes);

    let remote_key = client.generate(&random_handle()).await.unwrap();
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
            client.wrap(&handle, &kek, aad).await.unwrap();
        }
    })
    .await;
    print_row(&rpc_wrap, &rpc_baseline);
    let ct = client.wrap(&remote_key.handle, &kek, aad).await.unwrap();
    let rpc_unwrap = async_bench("Unwrap over mTLS", 3000, || {
        let (client, ct) = (client.clone(), ct.clone());
        async move {
            client.unwrap(&ct, aad).await.unwrap();
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
                client.wrap(&handle, &kek, aad).await.unwrap();
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
            let results = client.wrap_batch(items).await.unwrap();
            assert!(results.iter().all(Result::is_ok));
        }
    })
    .await;
    let per_item = Stats {
        name: "  the same, per item".into(),
        samples: batch.samples.iter().map(|d| *d / 1000).collect(),
        wall: batch.wall,
        ops: batch.ops * 1000,
    };
    print_row(&batch, &rpc_baseline);
    print_row(&per_item, &rpc_wrap);
    println!(
        "\n  ratio: time per operation relative to the baseline row above it (lower is faster)."
    );
    daemon.stop().await.unwrap();
}
