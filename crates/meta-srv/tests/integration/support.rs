//! Helpers: run the real `meta-srv` binary on a temp dir and ephemeral ports, wait for
//! conditions with deadlines, and always kill what was started (by PID, on drop).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a server may take to start listening.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// A `meta-srv` process; killed with SIGKILL when dropped.
pub struct ServerProcess {
    child: Child,
    pub grpc: String,
}

impl ServerProcess {
    /// Starts `meta-srv start` on `data_dir` with ephemeral ports and waits until it
    /// prints its listening line.
    pub fn start(data_dir: &Path) -> ServerProcess {
        Self::spawn(meta_srv_command(data_dir))
    }

    /// Starts `command` (a `meta-srv start`) and waits until it prints its listening line.
    pub fn spawn(mut command: Command) -> ServerProcess {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn meta-srv");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx
            .recv_timeout(START_DEADLINE)
            .unwrap_or_else(|e| panic!("meta-srv did not report listening in time: {e}"));
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_string()
        };
        ServerProcess {
            grpc: field("grpc="),
            child,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9 meta-srv");
        self.child.wait().expect("reap meta-srv");
    }

    /// Waits for the process to exit by itself within `deadline` (`None`: it did not,
    /// and was killed).
    pub fn wait_exit(mut self, deadline: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, deadline)
    }

    /// SIGTERM, then wait for a clean exit within `deadline`.
    pub fn terminate(mut self, deadline: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        wait_exit(&mut self.child, deadline).expect("meta-srv exits after SIGTERM")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `meta-srv start` on `data_dir` with ephemeral ports.
pub fn meta_srv_command(data_dir: &Path) -> Command {
    meta_srv_command_on(data_dir, "127.0.0.1:0")
}

/// `meta-srv start` on `data_dir` with gRPC on `listen_addr` and an ephemeral HTTP port.
pub fn meta_srv_command_on(data_dir: &Path, listen_addr: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meta-srv"));
    command
        .arg("start")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen-addr", listen_addr, "--http-addr", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("METASRV_") {
            command.env_remove(key);
        }
    }
    command
}

/// Waits for `child` to exit, polling under `deadline`; kills it and returns `None` if
/// it is still running then.
pub fn wait_exit(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command that must finish within `deadline`; returns its exit status, stdout
/// and stderr.
pub fn run_bounded(mut command: Command, deadline: Duration) -> (ExitStatus, String, String) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_exit(&mut child, deadline).expect("command finished within its deadline");
    (
        status,
        out_reader.join().expect("stdout reader"),
        err_reader.join().expect("stderr reader"),
    )
}

/// How often [`wait_until`] probes.
const POLL: Duration = Duration::from_millis(20);

/// Probes until `probe` answers `Ok`, and returns that; fails the test with the last
/// `Err` (what is still missing) once `deadline` has passed. The one place the async
/// tests wait on a condition.
pub async fn wait_until<T, F, Fut>(deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let until = Instant::now() + deadline;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(why) => assert!(Instant::now() < until, "not within {deadline:?}: {why}"),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `Ok(())` when `holds`, else `Err(why)`: the probe of a plain condition.
pub fn check(holds: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if holds { Ok(()) } else { Err(why()) }
}
