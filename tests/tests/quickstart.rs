//! The quickstart command itself: `cmk-quickstart` comes up, both processes
//! answer health checks with the certificates it made, a second run reuses
//! the same keys, and stopping the supervisor (politely or not) stops both.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cmk_proto::{
    control::v1::{ListKeysRequest, key_admin_service_client::KeyAdminServiceClient},
    hsm::v1::{GetImportPublicKeyRequest, hsm_service_client::HsmServiceClient},
};
use cmk_tests::{ANY_PORT, binary, channel, wait_healthy};
use cmk_tls::TlsFiles;

struct Quickstart {
    child: Child,
    banner: String,
    hsm_pid: u32,
    control_plane_pid: u32,
    /// Where the control plane and the daemon listen, as the banner says.
    listen: SocketAddr,
    hsm_listen: SocketAddr,
}

/// Starts `cmk-quickstart` with both processes on ports the system picks,
/// and reads its banner (it prints once both answer).
fn start(dir: &Path) -> Quickstart {
    let mut child = Command::new(binary("cmk-quickstart"))
        .arg("--dir")
        .arg(dir)
        .args(["--listen", &ANY_PORT.to_string()])
        .args(["--hsm-listen", &ANY_PORT.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut banner = String::new();
    while !banner.contains("Ctrl-C stops both") {
        let line = received
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|_| panic!("no banner within 90 s; so far:\n{banner}"));
        banner.push_str(&line);
        banner.push('\n');
    }
    // `  hsm-daemon     127.0.0.1:7443  pid 123  log …`
    let words_of = |name: &str| -> Vec<String> {
        let line = banner
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap();
        line.split_whitespace().map(str::to_owned).collect()
    };
    let pid_of = |name: &str| -> u32 {
        let words = words_of(name);
        let at = words.iter().position(|w| *w == "pid").unwrap();
        words[at + 1].parse().unwrap()
    };
    let addr_of = |name: &str| -> SocketAddr { words_of(name)[1].parse().unwrap() };
    Quickstart {
        hsm_pid: pid_of("hsm-daemon"),
        control_plane_pid: pid_of("control-plane"),
        listen: addr_of("control-plane"),
        hsm_listen: addr_of("hsm-daemon"),
        banner,
        child,
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Whether `pid` is gone (or only a zombie waiting for a reaper).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gone(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn files(dir: &Path, stem: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("pki/{stem}.crt")),
        key: dir.join(format!("pki/{stem}.key")),
        ca: dir.join("pki/ca.crt"),
    }
}

/// The import key id (from the HSM daemon) and the generic default key
/// (from the control plane): what a second run must find again.
async fn identity_of_the_setup(
    dir: &Path,
    listen: SocketAddr,
    hsm_listen: SocketAddr,
) -> (String, String) {
    let admin = files(dir, "admin");
    let hsm_client = files(dir, "control-plane-client");
    wait_healthy(listen, &admin).await;
    wait_healthy(hsm_listen, &hsm_client).await;
    let import_key = HsmServiceClient::new(channel(hsm_listen, &hsm_client).await.unwrap())
        .get_import_public_key(GetImportPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id;
    let keys = KeyAdminServiceClient::new(channel(listen, &admin).await.unwrap())
        .list_keys(ListKeysRequest {
            org_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    (import_key, keys.active_key_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_comes_up_reuses_its_directory_and_stops_both_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");

    // First run: Ctrl-C (SIGINT to the supervisor alone, as a terminal's would
    // also reach the children) stops both, cleanly.
    let mut first = start(&dir);
    let (listen, hsm_listen) = (first.listen, first.hsm_listen);
    assert_ne!(listen.port(), 0);
    assert_ne!(hsm_listen.port(), 0);
    // Written again with the ports the processes got.
    for (file, expected) in [
        ("cmkctl.toml", format!("https://{listen}")),
        ("control-plane.toml", format!("https://{hsm_listen}")),
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(text.contains(&expected), "{file} lacks {expected}:\n{text}");
    }
    let config = dir.join("cmkctl.toml");
    for expected in [
        format!("export CMKCTL_CONFIG={}", config.display()),
        "cmkctl list".to_owned(),
        "cmkctl upload --wrapped cmk.wrapped --activate now".to_owned(),
        format!("-cert {} ", dir.join("pki/admin.crt").display()),
        format!("{listen} cmk.control.v1.KeyAdminService/ListKeys"),
        format!("{listen} cmk.control.v1.ContentKeyService/CreateKek"),
    ] {
        assert!(
            first.banner.contains(&expected),
            "banner lacks {expected:?}:\n{}",
            first.banner
        );
    }
    let setup = identity_of_the_setup(&dir, listen, hsm_listen).await;
    assert!(setup.1.starts_with("key-"), "{setup:?}");
    signal(first.child.id(), "INT");
    let status = first.child.wait().unwrap();
    assert!(status.success(), "quickstart exited with {status}");
    wait_gone(first.hsm_pid, "hsm-daemon");
    wait_gone(first.control_plane_pid, "control-plane");
    for log in ["hsm-daemon.log", "control-plane.log"] {
        let text = std::fs::read_to_string(dir.join("logs").join(log)).unwrap();
        assert!(
            text.contains("stopped"),
            "{log} does not end cleanly:\n{text}"
        );
    }

    // Second run: the same CA, root key, keystore and database.
    let ca = std::fs::read(dir.join("pki/ca.crt")).unwrap();
    let mut second = start(&dir);
    assert_eq!(
        identity_of_the_setup(&dir, second.listen, second.hsm_listen).await,
        setup,
        "the second run reuses the keys"
    );
    assert_eq!(std::fs::read(dir.join("pki/ca.crt")).unwrap(), ca);

    // A supervisor that dies without a word takes its children with it.
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    wait_gone(second.hsm_pid, "hsm-daemon");
    wait_gone(second.control_plane_pid, "control-plane");
}
