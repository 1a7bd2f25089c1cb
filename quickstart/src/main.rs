//! `cmk-quickstart`: prepares the development directory (see the library) and
//! runs the HSM daemon and the control plane as two child processes on
//! loopback until Ctrl-C.
//!
//! The children are this same executable re-run with `serve`, so that one
//! `cargo run` builds everything the quickstart needs. Each child reads its
//! configuration file exactly as the real binary would, and stops when its
//! standard input closes: the supervisor closes it to stop a child, and the
//! kernel closes it when the supervisor dies, so no child outlives it.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use cmk_quickstart::{Layout, prepare};
use cmk_runtime::{LogFormat, error_chain, init_logging, shutdown_signal};
use tokio::{
    io::AsyncReadExt,
    process::{Child, ChildStdin, Command},
};

#[derive(Parser)]
#[command(
    version,
    about = "Runs the HSM daemon and the control plane locally, with development certificates, \
             SQLite and the software keystore under one directory (not for production)"
)]
struct Cli {
    /// Directory for certificates, keys, database, configuration and logs; reused on later runs.
    #[arg(long, default_value = ".cmk-dev", global = true)]
    dir: PathBuf,
    /// The control plane's address.
    #[arg(long, default_value = "127.0.0.1:8443", global = true)]
    listen: SocketAddr,
    /// The HSM daemon's address.
    #[arg(long, default_value = "127.0.0.1:7443", global = true)]
    hsm_listen: SocketAddr,
    /// The organisation the generated admin, reader and service certificates act for
    /// (used when the directory is first made).
    #[arg(long, default_value = "acme", global = true)]
    org: String,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prepare the directory, start both processes, stop them on Ctrl-C (the default).
    Up,
    /// Only prepare the directory and print where things are, for starting the
    /// real `hsm-daemon` and `control-plane` binaries by hand.
    Init,
    /// Run one process from its configuration file until standard input closes.
    #[command(hide = true)]
    Serve {
        process: Process,
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Process {
    HsmDaemon,
    ControlPlane,
}

impl Process {
    fn name(self) -> &'static str {
        match self {
            Self::HsmDaemon => "hsm-daemon",
            Self::ControlPlane => "control-plane",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cmk-quickstart: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Cmd::Serve { process, config }) = cli.command {
        return runtime.block_on(serve(process, &config));
    }
    let layout = match Layout::new(&cli.dir, cli.listen, cli.hsm_listen, &cli.org)
        .and_then(|layout| prepare(&layout).map(|()| layout))
    {
        Ok(layout) => layout,
        Err(err) => {
            eprintln!("cmk-quickstart: {}", error_chain(&err));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Cmd::Init) => {
            println!("{}", cmk_quickstart::init_summary(&layout));
            ExitCode::SUCCESS
        }
        _ => runtime.block_on(up(layout)),
    }
}

/// A child: one server, stopped by a signal or by its standard input closing.
async fn serve(process: Process, config: &Path) -> ExitCode {
    let stop = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        tokio::select! {
            () = shutdown_signal() => {}
            // Ok(0) is end of file; an error means the pipe is gone too.
            _ = async { while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {} } => {
                tracing::info!("supervisor gone or stopping us; shutting down");
            }
        }
    };
    init_logging(LogFormat::Text);
    let result: Result<(), Box<dyn std::error::Error>> = match process {
        Process::HsmDaemon => match cmk_hsm_daemon::RawSettings::from_file(config)
            .and_then(|raw| raw.validate(None))
        {
            Ok(settings) => cmk_hsm_daemon::run(settings, stop)
                .await
                .map_err(Into::into),
            Err(err) => Err(err.into()),
        },
        Process::ControlPlane => {
            match cmk_control_plane::RawSettings::from_file(config).and_then(|raw| raw.validate()) {
                Ok(settings) => cmk_control_plane::run(settings, stop)
                    .await
                    .map_err(Into::into),
                Err(err) => Err(err.into()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{}: {}", process.name(), error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// The supervisor: start the daemon, then the control plane, print what to try,
/// and stop both (control plane first) on Ctrl-C or when either dies.
///
/// A port given as 0 is picked by the system: once a process has logged the
/// address it bound, the configuration files are written again with it, so
/// that the control plane finds the daemon and `cmkctl` the control plane.
async fn up(mut layout: Layout) -> ExitCode {
    let mut running = Vec::new();
    for process in [Process::HsmDaemon, Process::ControlPlane] {
        let started = match start(&layout, process).await {
            Ok((child, addr)) => {
                running.push(Running::new(process, child));
                let configured = match process {
                    Process::HsmDaemon => &mut layout.hsm_listen,
                    Process::ControlPlane => &mut layout.listen,
                };
                let changed = *configured != addr;
                *configured = addr;
                if changed {
                    prepare(&layout).map_err(|e| error_chain(&e))
                } else {
                    Ok(())
                }
            }
            Err(err) => Err(format!("{} did not start: {err}", process.name())),
        };
        if let Err(err) = started {
            eprintln!("cmk-quickstart: {err}");
            eprint!("{}", log_tail(&layout, process));
            stop_all(running).await;
            return ExitCode::FAILURE;
        }
    }
    let pids: Vec<_> = running
        .iter()
        .map(|running| running.child.id().unwrap_or_default())
        .collect();
    println!("{}", cmk_quickstart::banner(&layout, pids[0], pids[1]));

    let exited = {
        let [hsm, cp] = running.as_mut_slice() else {
            unreachable!("both processes were started above");
        };
        tokio::select! {
            () = shutdown_signal() => None,
            status = hsm.child.wait() => Some((Process::HsmDaemon, status)),
            status = cp.child.wait() => Some((Process::ControlPlane, status)),
        }
    };
    let code = match exited {
        None => ExitCode::SUCCESS,
        Some((process, status)) => {
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            eprintln!("cmk-quickstart: {} exited ({status})", process.name());
            eprint!("{}", log_tail(&layout, process));
            ExitCode::FAILURE
        }
    };
    stop_all(running).await;
    println!("cmk-quickstart: stopped; {} is kept", layout.dir.display());
    code
}

/// A started child and the write end of its standard input, held apart from
/// the child because `Child::wait` would close it (and so stop the child).
struct Running {
    process: Process,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Running {
    fn new(process: Process, mut child: Child) -> Self {
        let stdin = child.stdin.take();
        Self {
            process,
            child,
            stdin,
        }
    }
}

/// Starts `process` on its configuration file and waits until it answers;
/// returns it and its address: the configured one, or with port 0 the one it
/// logs once bound.
async fn start(layout: &Layout, process: Process) -> Result<(Child, SocketAddr), String> {
    let (config, configured) = match process {
        Process::HsmDaemon => (layout.hsm_config(), layout.hsm_listen),
        Process::ControlPlane => (layout.control_plane_config(), layout.listen),
    };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let log_path = log_path(layout, process);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    // Earlier runs' lines stay in the log.
    let logged_from = log
        .metadata()
        .map_err(|e| format!("{}: {e}", log_path.display()))?
        .len();
    let log_err = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut child = Command::new(exe)
        .args(["serve", process.name(), "--config"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let (cert, key) = match process {
        Process::HsmDaemon => ("control-plane-client.crt", "control-plane-client.key"),
        Process::ControlPlane => ("admin.crt", "admin.key"),
    };
    let files = cmk_tls::TlsFiles {
        cert: layout.pki(cert),
        key: layout.pki(key),
        ca: layout.pki("ca.crt"),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut addr = (configured.port() != 0).then_some(configured);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited at start-up ({status})"));
        }
        if addr.is_none() {
            let text = fs::read(&log_path).unwrap_or_default();
            let text =
                String::from_utf8_lossy(text.get(logged_from as usize..).unwrap_or_default());
            addr = text.lines().find_map(bound_addr);
        }
        if let Some(addr) = addr
            && cmk_quickstart::healthy(addr, &files).await
        {
            return Ok((child, addr));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(match addr {
                Some(addr) => format!("no health answer on {addr} within 30 s"),
                None => "did not log its address within 30 s".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The address in a child's log line for its main port, bound: the servers
/// log one line per listener with `listener` and `addr`, here in the text
/// format `serve` sets.
fn bound_addr(line: &str) -> Option<SocketAddr> {
    let mut words = line.split_whitespace();
    if !words.clone().any(|word| word == "listener=\"grpc\"") {
        return None;
    }
    words.find_map(|word| word.strip_prefix("addr=")?.parse().ok())
}

/// Stops the children in reverse order of start: closing a child's standard
/// input asks it to stop; one that has not stopped after 15 s is killed.
async fn stop_all(mut running: Vec<Running>) {
    while let Some(Running {
        process,
        mut child,
        stdin,
    }) = running.pop()
    {
        drop(stdin);
        match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => eprintln!("cmk-quickstart: {} exited ({status})", process.name()),
            Ok(Err(err)) => eprintln!("cmk-quickstart: {}: {err}", process.name()),
            Err(_) => {
                eprintln!(
                    "cmk-quickstart: {} did not stop within 15 s; killing it",
                    process.name()
                );
                let _ = child.kill().await;
            }
        }
    }
}

fn log_path(layout: &Layout, process: Process) -> PathBuf {
    layout.path("logs").join(format!("{}.log", process.name()))
}

/// The last lines of a child's log, to show why it stopped.
fn log_tail(layout: &Layout, process: Process) -> String {
    let path = log_path(layout, process);
    let text = fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(15)..];
    let mut out = format!("--- last lines of {} ---\n", path.display());
    for line in tail {
        out.push_str(line);
        out.push('\n');
    }
    out
}
