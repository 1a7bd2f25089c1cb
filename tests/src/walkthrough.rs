//! The walk-through's setting: a directory prepared by `cmk-quickstart init`,
//! the real `hsm-daemon` and `control-plane` executables started on its
//! configuration files, and a shell that runs each step exactly as written in
//! `docs/walkthrough.md` and keeps a transcript of commands and outputs.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::{ANY_PORT, binary, logged_addr, logged_in_file, wait_healthy};

/// The two processes, started from the quickstart's configuration files.
pub struct Setup {
    /// The quickstart directory.
    pub dev: PathBuf,
    /// The control plane's address.
    pub listen: SocketAddr,
    children: Vec<Child>,
    control_plane_args: Vec<String>,
    _tmp: tempfile::TempDir,
}

impl Setup {
    /// Prepares a fresh directory with `cmk-quickstart init` and starts both
    /// binaries on it.
    pub async fn start() -> Self {
        Self::start_with(&[], &[]).await
    }

    /// [`Setup::start`], with extra flags for the HSM daemon and the control plane.
    ///
    /// Each process listens on a port the system picks, which the test learns
    /// from its log: the daemon first, so that the control plane's
    /// configuration names the daemon's real address, then the control plane,
    /// so that `cmkctl`'s configuration and a restarted control plane use its
    /// real address.
    pub async fn start_with(hsm_args: &[&str], control_plane_args: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dev = tmp.path().join("dev");
        init(&dev, ANY_PORT, ANY_PORT);
        let hsm = spawn(&dev, &[], "hsm-daemon", "hsm-daemon.toml", hsm_args);
        let mut setup = Self {
            dev,
            listen: ANY_PORT,
            children: vec![hsm],
            control_plane_args: control_plane_args.iter().map(|a| a.to_string()).collect(),
            _tmp: tmp,
        };
        let hsm_listen = setup.wait_logged(0, "hsm-daemon").await;
        init(&setup.dev, ANY_PORT, hsm_listen);
        setup.children.push(spawn(
            &setup.dev,
            &[],
            "control-plane",
            "control-plane.toml",
            control_plane_args,
        ));
        setup.listen = setup.wait_logged(1, "control-plane").await;
        init(&setup.dev, setup.listen, hsm_listen);
        wait_healthy(hsm_listen, &setup.files("control-plane-client")).await;
        wait_healthy(setup.listen, &setup.files("admin")).await;
        setup
    }

    /// Where `program`'s listener `listener` (`grpc`, `health`, `metrics`)
    /// is bound, as its log says. Its plaintext listeners are logged before
    /// its main port, so all are known once [`Setup::start_with`] returns.
    pub fn addr(&self, program: &str, listener: &str) -> SocketAddr {
        let log = self.log(program);
        log.lines()
            .find_map(|line| logged_addr(line, listener))
            .unwrap_or_else(|| panic!("{program} logged no {listener} listener:\n{log}"))
    }

    /// Waits until `program`, the child at `index`, has logged its main
    /// port, and returns it.
    async fn wait_logged(&mut self, index: usize, program: &str) -> SocketAddr {
        let path = self.log_path(program);
        logged_in_file(&path, 0, &mut self.children[index], "grpc")
            .await
            .unwrap_or_else(|e| panic!("{program} {e}:\n{}", self.log(program)))
    }

    /// The TLS files of the quickstart identity `stem` (`admin`, `service`, …).
    pub fn files(&self, stem: &str) -> cmk_tls::TlsFiles {
        cmk_tls::TlsFiles {
            cert: self.dev.join(format!("pki/{stem}.crt")),
            key: self.dev.join(format!("pki/{stem}.key")),
            ca: self.dev.join("pki/ca.crt"),
        }
    }

    /// Kills the control plane (SIGKILL) and starts its binary again on the
    /// same files, run through `wrapper` (e.g. `faketime -f +31d`), and
    /// waits until it answers.
    pub async fn restart_control_plane(&mut self, wrapper: &[&str]) {
        let old = &mut self.children[1];
        let _ = old.kill();
        let _ = old.wait();
        let args: Vec<&str> = self.control_plane_args.iter().map(String::as_str).collect();
        self.children[1] = spawn(
            &self.dev,
            wrapper,
            "control-plane",
            "control-plane.toml",
            &args,
        );
        // Its configuration names the port it had, which the test holds on to.
        assert_eq!(self.wait_logged(1, "control-plane").await, self.listen);
        wait_healthy(self.listen, &self.files("admin")).await;
    }

    /// The log (stderr) of `program` since its last start.
    pub fn log(&self, program: &str) -> String {
        std::fs::read_to_string(self.log_path(program)).unwrap_or_default()
    }

    fn log_path(&self, program: &str) -> PathBuf {
        self.dev.join("logs").join(format!("{program}.err.log"))
    }

    /// A shell in a fresh working directory beside the quickstart directory,
    /// with `cmkctl` on its PATH, `grpcurl` standing for `tests/grpcurl.py`,
    /// and `DEV` (the quickstart directory) and `CP` (the control plane's
    /// address) set.
    pub fn shell(&self) -> Shell {
        let work = self.dev.parent().unwrap().join("work");
        std::fs::create_dir_all(&work).unwrap();
        Shell {
            work,
            env: vec![
                ("DEV".into(), self.dev.display().to_string()),
                ("CP".into(), self.listen.to_string()),
            ],
            transcript: String::new(),
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `cmk-quickstart init` on `dev` for these addresses: makes what is
/// missing and (re)writes the configuration files.
fn init(dev: &Path, listen: SocketAddr, hsm_listen: SocketAddr) {
    let init = Command::new(binary("cmk-quickstart"))
        .arg("init")
        .arg("--dir")
        .arg(dev)
        .args(["--listen", &listen.to_string()])
        .args(["--hsm-listen", &hsm_listen.to_string()])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
}

/// Starts `program` on its quickstart configuration file, through `wrapper`
/// when one is given, logging under `dev/logs/`.
fn spawn(dev: &Path, wrapper: &[&str], program: &str, config: &str, args: &[&str]) -> Child {
    // Where the quickstart keeps its logs too.
    let log =
        |name: &str| std::fs::File::create(dev.join("logs").join(format!("{name}.log"))).unwrap();
    let mut command = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(binary(program));
            command
        }
        None => Command::new(binary(program)),
    };
    command
        .arg("--config")
        .arg(dev.join(config))
        .args(args)
        .env_remove("CMK_HSM_ROOT_KEY")
        .stdin(Stdio::null())
        .stdout(log(program))
        .stderr(log(&format!("{program}.err")))
        .spawn()
        .unwrap()
}

/// What one step printed.
#[derive(Debug)]
pub struct Step {
    /// Exit status.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Step {
    /// Standard output, after checking the step succeeded.
    pub fn ok(self) -> String {
        assert_eq!(self.code, 0, "step failed: {self:?}");
        self.stdout
    }
}

/// Runs steps with bash and records them.
pub struct Shell {
    /// The working directory of every step.
    pub work: PathBuf,
    env: Vec<(String, String)>,
    transcript: String,
}

impl Shell {
    /// Sets a variable for the following steps.
    pub fn set(&mut self, name: &str, value: &str) {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.into(), value.into()));
    }

    /// Runs `script` (one step of the walk-through) with bash.
    pub fn run(&mut self, script: &str) -> Step {
        self.run_with_input(script, "")
    }

    /// Runs `script` with `input` on its standard input.
    pub fn run_with_input(&mut self, script: &str, input: &str) -> Step {
        let step = self.quiet_with_input(script, input);
        let _ = writeln!(self.transcript, "$ {script}");
        if !input.is_empty() {
            let _ = writeln!(self.transcript, "[stdin: {}]", input.trim_end());
        }
        self.transcript.push_str(&step.stdout);
        self.transcript.push_str(&step.stderr);
        if step.code != 0 {
            let _ = writeln!(self.transcript, "[exit {}]", step.code);
        }
        self.transcript.push('\n');
        step
    }

    /// Runs `script` without recording it (polling, for instance).
    pub fn quiet(&mut self, script: &str) -> Step {
        self.quiet_with_input(script, "")
    }

    fn quiet_with_input(&mut self, script: &str, input: &str) -> Step {
        use std::io::Write;
        let bins = binary("cmkctl");
        let bins = bins.parent().unwrap();
        let grpcurl = Path::new(env!("CARGO_MANIFEST_DIR")).join("grpcurl.py");
        let prelude = format!(
            "set -o pipefail\ngrpcurl() {{ python3 {} \"$@\"; }}\n",
            grpcurl.display()
        );
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(format!("{prelude}{script}"))
            .current_dir(&self.work)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bins.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env_remove("CMKCTL_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bash is required");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Step {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Writes the transcript to `<dir>/<name>.txt` (the tests pass cargo's
    /// `CARGO_TARGET_TMPDIR`): the material of `docs/walkthrough.md`.
    pub fn save(&self, dir: &str, name: &str) -> PathBuf {
        let path = Path::new(dir).join(format!("{name}.txt"));
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(&path, &self.transcript).unwrap();
        path
    }
}
