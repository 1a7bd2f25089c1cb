//! Running a test's body on a fresh token of its own. Soft tokens find their
//! store through an environment variable they read once per process
//! (`SOFTHSM2_CONF`, `KRYOPTIC_CONF`), and a test cannot set a variable for
//! itself (`set_var` is unsafe under edition 2024, and unsafe code is
//! forbidden here). So the test prepares a token in a fresh directory and
//! runs itself again as a child process with the variable set: tests stay
//! parallel and never share a token.

use std::{ffi::OsString, future::Future, path::Path, process::Command};

/// Set in the child process: the token directory.
const CHILD: &str = "CMK_TEST_PKCS11_TOKEN_DIR";

/// In the child process, runs `body`. In the parent, has `prepare` set up a
/// token in a fresh directory and return the variable (name and value) that
/// points `token`'s module at it, then runs the test `name` again in a child
/// process with it and requires that it ran and passed.
pub fn on_fresh_token<F, Fut>(
    name: &str,
    token: &str,
    prepare: impl FnOnce(&Path) -> (&'static str, OsString),
    body: F,
) where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var_os(CHILD).is_some() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        return runtime.block_on(body());
    }
    let dir = tempfile::tempdir().unwrap();
    let (variable, value) = prepare(dir.path());
    let child = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(variable, value)
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout);
    let stderr = String::from_utf8_lossy(&child.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(child.status.success(), "{name} failed on {token}");
    assert!(
        stdout.contains("1 passed"),
        "{name} did not run in the child process"
    );
}

/// The token directory of the child process.
#[allow(dead_code)]
pub fn token_dir() -> Option<std::path::PathBuf> {
    std::env::var_os(CHILD).map(Into::into)
}
