//! Bad configuration and a locked data directory: one clear line, non-zero exit, and
//! nothing served or damaged.

use std::time::Duration;

use crate::support::{ServerProcess, meta_srv_command, run_bounded};

const EXIT_DEADLINE: Duration = Duration::from_secs(20);

#[test]
fn second_server_on_a_locked_dir_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(dir.path());
    let (status, stdout, stderr) = run_bounded(meta_srv_command(dir.path()), EXIT_DEADLINE);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(stdout.is_empty(), "it never listened: {stdout}");
    let line = stderr.trim();
    assert!(!line.contains('\n'), "one line: {line:?}");
    assert!(line.contains("already in use"), "{line}");
    assert!(line.contains(&format!("process {}", first.pid())), "{line}");
}

/// Each case: config file text and what the single error line must say.
#[test]
fn malformed_config_exits_2_with_one_line() {
    let cases = [
        ("node_id = 1\ncolour = \"blue\"\n", "unknown field `colour`"),
        ("node_id = -4\n", "node_id"),
        ("[limits\n", "invalid config file"),
        ("node_id = 0\n", "node_id must be at least 1"),
        ("listen_addr = \"here\"\n", "invalid socket address"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (text, want) in cases {
        let path = dir.path().join("meta.toml");
        std::fs::write(&path, text).unwrap();
        let mut command = meta_srv_command(&dir.path().join("data"));
        command.arg("--config").arg(&path);
        let (status, _, stderr) = run_bounded(command, EXIT_DEADLINE);
        assert_eq!(status.code(), Some(2), "{text:?}: {stderr}");
        let line = stderr.trim();
        assert!(!line.contains('\n'), "{text:?}: one line: {line:?}");
        assert!(line.starts_with("error: "), "{text:?}: {line}");
        assert!(line.contains(want), "{text:?}: {line:?} lacks {want:?}");
    }
}

#[test]
fn bad_flag_and_env_values_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = meta_srv_command(dir.path());
    command.env("METASRV_NODE_ID", "seven");
    let (status, _, stderr) = run_bounded(command, EXIT_DEADLINE);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.trim().contains("invalid value 'seven'"), "{stderr}");

    let mut command = meta_srv_command(dir.path());
    command.arg("--no-such-flag");
    let (status, _, stderr) = run_bounded(command, EXIT_DEADLINE);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    for (flag, value, want) in [
        (
            "--log-format",
            "xml",
            "log format \"xml\" is not one of text, json",
        ),
        (
            "--log-level",
            "info,[=",
            "is not a level or a list of module filters",
        ),
    ] {
        let mut command = meta_srv_command(dir.path());
        command.args([flag, value]);
        let (status, _, stderr) = run_bounded(command, EXIT_DEADLINE);
        assert_eq!(status.code(), Some(2), "{flag}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{flag}: {stderr}");
        assert!(stderr.contains(want), "{flag}: {stderr}");
    }
}

#[test]
fn env_and_flags_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.toml");
    // The file asks for a fixed port that the flags then override with port 0; if the
    // file won, the server would not come up on an ephemeral port.
    std::fs::write(&path, "node_id = 3\nlisten_addr = \"127.0.0.1:1\"\n").unwrap();
    let mut command = meta_srv_command(&dir.path().join("data"));
    command
        .arg("--config")
        .arg(&path)
        .env("METASRV_NODE_ID", "0");
    // The env var (node 0) wins over the file (node 3), so validation fails.
    let (status, _, stderr) = run_bounded(command, EXIT_DEADLINE);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("node_id must be at least 1"), "{stderr}");

    let mut command = meta_srv_command(&dir.path().join("data"));
    command
        .arg("--config")
        .arg(&path)
        .env("METASRV_NODE_ID", "0")
        .args(["--node-id", "9"]);
    // The flag (node 9) wins over the env var; listen_addr comes from the flag too.
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        line
    });
    let line = line.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("meta-srv listening grpc=127.0.0.1:"),
        "{line:?}"
    );
    assert!(!line.contains("grpc=127.0.0.1:1 "), "{line:?}");
}

#[test]
fn a_data_dir_of_another_cluster_or_member_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Created as a one-member cluster of member 1.
    ServerProcess::start(dir.path()).terminate(EXIT_DEADLINE);

    let mut command = meta_srv_command(dir.path());
    command.args(["--initial-cluster", "1=127.0.0.1:1,2=127.0.0.1:2"]);
    let (status, stdout, stderr) = run_bounded(command, EXIT_DEADLINE);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "it never listened: {stdout}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("belongs to cluster"), "{stderr}");

    // The rightful owner still starts on it.
    ServerProcess::start(dir.path()).terminate(EXIT_DEADLINE);

    // Member 1 of a three-member cluster; its directory must not serve member 2.
    let spec = "1=127.0.0.1:1,2=127.0.0.1:2,3=127.0.0.1:3";
    let member_dir = tempfile::tempdir().unwrap();
    let mut command = meta_srv_command(member_dir.path());
    command.args(["--node-id", "1", "--initial-cluster", spec]);
    ServerProcess::spawn(command).terminate(EXIT_DEADLINE);
    let mut command = meta_srv_command(member_dir.path());
    command.args(["--node-id", "2", "--initial-cluster", spec]);
    let (status, _, stderr) = run_bounded(command, EXIT_DEADLINE);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("belongs to member 1, not to member 2"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_node_id_for_the_initial_cluster_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = meta_srv_command(dir.path());
    command.args([
        "--node-id",
        "4",
        "--initial-cluster",
        "1=127.0.0.1:1,2=127.0.0.1:2",
    ]);
    let (status, _, stderr) = run_bounded(command, EXIT_DEADLINE);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("node_id 4 is not in initial_cluster"),
        "{stderr}"
    );
}
