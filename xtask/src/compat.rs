//! `cargo xtask compat etcd`: stock `etcdctl` (Debian's etcd-client) runs a scripted
//! list of commands against a single `meta-srv`, and each answer is checked against
//! what etcd prints for the same command. When an `etcd` binary is installed the same
//! script runs against it too, so the expected answers are checked against the real
//! thing in the same run.
//!
//! Revisions, lease ids and member ids differ between the two systems, so the script
//! captures them from earlier answers (`{rev:NAME}`, `{lease:NAME}`, `{id:NAME}`) and
//! answers are compared after [`normalize`] (lease ids, remaining TTLs, timings).
//!
//! After the script, the Rust `etcd-client` crate goes through the same operations
//! (`client.rs`). That crate's build needs protoc, so it sits behind this crate's `etcd`
//! feature: run without it, the suite builds itself with it and runs that build.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::root;

#[cfg(feature = "etcd")]
mod client;

/// How long one etcdctl command may take (a watch or an election is cut off there).
const STEP_DEADLINE: Duration = Duration::from_secs(10);

/// Runs the suite for `target` (only `etcd` so far).
pub fn run(target: &str) -> anyhow::Result<()> {
    if target != "etcd" {
        bail!("unknown compat target {target:?}; the one there is: etcd");
    }
    let version = Command::new("etcdctl").arg("version").output().map_err(|_| {
        anyhow::anyhow!(
            "etcdctl not found: install Debian's etcd-client (apt-get install etcd-client) and run this again"
        )
    })?;
    println!(
        "compat etcd: {}",
        String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("etcdctl")
    );
    if !cfg!(feature = "etcd") {
        return with_etcd_client();
    }
    let status = Command::new("cargo")
        .current_dir(root())
        .args(["build", "--quiet", "--bin", "meta-srv"])
        .status()?;
    if !status.success() {
        bail!("building meta-srv failed");
    }
    let mut failures = 0;
    let meta = Server::meta()?;
    failures += run_script("metasrv", &meta.endpoint)?;
    failures += run_client("metasrv", &meta.endpoint)?;
    drop(meta);
    if Command::new("etcd").arg("--version").output().is_ok() {
        let etcd = Server::etcd()?;
        failures += run_script("etcd", &etcd.endpoint)?;
        failures += run_client("etcd", &etcd.endpoint)?;
    } else {
        println!("etcd is not installed: the expected answers were not checked against it");
    }
    if failures > 0 {
        bail!("{failures} answers differ from etcd's");
    }
    println!("compat etcd: every answer matches");
    Ok(())
}

/// Builds this crate with the `etcd` feature (etcd-client) and runs the suite from
/// that build.
fn with_etcd_client() -> anyhow::Result<()> {
    if Command::new("protoc").arg("--version").output().is_err() {
        bail!(
            "protoc not found (the etcd-client crate needs it to build): install Debian's protobuf-compiler (apt-get install protobuf-compiler) and run this again"
        );
    }
    let status = Command::new("cargo")
        .current_dir(root())
        .args([
            "build",
            "--quiet",
            "-p",
            "xtask",
            "--features",
            "xtask/etcd",
        ])
        .args(["--bin", "xtask", "--bin", "meta-srv", "-p", "meta-srv"])
        .status()?;
    if !status.success() {
        bail!("building xtask with the etcd feature failed");
    }
    let status = Command::new(root().join("target/debug/xtask"))
        .args(["compat", "etcd"])
        .status()
        .context("running the suite built with the etcd feature")?;
    if !status.success() {
        bail!("the etcd compatibility suite failed");
    }
    Ok(())
}

/// Runs the etcd-client checks against `endpoint`; returns how many failed.
#[cfg(feature = "etcd")]
fn run_client(system: &str, endpoint: &str) -> anyhow::Result<usize> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(client::run(system, endpoint))
}

#[cfg(not(feature = "etcd"))]
fn run_client(_system: &str, _endpoint: &str) -> anyhow::Result<usize> {
    bail!("built without the `etcd` feature")
}

/// A server process and its temporary directory, killed on drop.
pub(crate) struct Server {
    child: Child,
    /// Its client address.
    pub(crate) endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn meta() -> anyhow::Result<Server> {
        Server::meta_on("127.0.0.1:0")
    }

    /// A debug `meta-srv` on a free gRPC port, its HTTP port at `http`.
    pub(crate) fn meta_on(http: &str) -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let port = crate::bench::free_ports(1)?[0];
        let endpoint = format!("127.0.0.1:{port}");
        let mut child = Command::new(root().join("target/debug/meta-srv"))
            .arg("start")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen-addr", &endpoint, "--http-addr", http])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting meta-srv")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("piped stdout")?).read_line(&mut line)?;
        if !line.starts_with("meta-srv listening") {
            let _ = child.kill();
            bail!("meta-srv did not start: {line:?}");
        }
        Ok(Server {
            child,
            endpoint,
            _dir: dir,
        })
    }

    fn etcd() -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let ports = crate::bench::free_ports(2)?;
        let endpoint = format!("127.0.0.1:{}", ports[0]);
        let peer = format!("http://127.0.0.1:{}", ports[1]);
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen-client-urls", &format!("http://{endpoint}")])
            .args(["--advertise-client-urls", &format!("http://{endpoint}")])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd")?;
        let server = Server {
            child,
            endpoint,
            _dir: dir,
        };
        // etcdctl waits for the connection and for a leader (a linearizable read needs
        // one), and the read writes no key the script sees.
        let (code, _, stderr) = etcdctl(
            &server.endpoint,
            &["--dial-timeout=8s", "--command-timeout=8s", "get", "ready"],
            None,
        )?;
        if code != Some(0) {
            bail!("etcd did not start: {}", stderr.trim());
        }
        Ok(server)
    }
}

/// Runs etcdctl with `args` against `endpoint`, cut off at [`STEP_DEADLINE`]; the exit
/// code (`None` when cut off), stdout and stderr.
fn etcdctl(
    endpoint: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<(Option<i32>, String, String)> {
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running etcdctl")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("piped stdin")?
            .write_all(input.as_bytes())?;
    }
    let mut out = child.stdout.take().context("piped stdout")?;
    let mut err = child.stderr.take().context("piped stderr")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let error_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    // The readers end when etcdctl exits (its pipes close): wait for that, or kill it
    // at the deadline, which ends them too.
    let (done, finished) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = done.send(reader.join().unwrap_or_default());
    });
    let (stdout, cut_off) = match finished.recv_timeout(STEP_DEADLINE) {
        Ok(stdout) => (stdout, false),
        Err(_) => {
            let _ = child.kill();
            (finished.recv().unwrap_or_default(), true)
        }
    };
    let _ = waiter.join();
    let status = child.wait()?;
    let code = if cut_off { None } else { status.code() };
    let stderr = error_reader.join().unwrap_or_default();
    Ok((code, stdout, stderr))
}

/// What a step's answer must be.
enum Expect {
    /// Exit 0 and this output (after normalising).
    Out(&'static str),
    /// A non-zero exit whose `Error:` line is this.
    Fails(&'static str),
    /// Cut off at the deadline (a watch, an election) having printed this.
    Streams(&'static str),
    /// Exit 0 and this on stderr (etcdctl prints some answers there).
    Says(&'static str),
    /// Exit 0; the output differs between systems by nature (ids, versions, sizes).
    Succeeds,
}

/// What a step takes from its answer for later steps.
enum Capture {
    None,
    /// The header revision of a `-w json` answer.
    Revision(&'static str),
    /// The lease id of `lease grant`.
    Lease(&'static str),
    /// The member id of `member add` (hex, as etcdctl prints it).
    Member(&'static str),
    /// The id of the first member `member list` prints (the only one here).
    FirstMember(&'static str),
}

struct Step {
    args: &'static str,
    stdin: Option<&'static str>,
    expect: Expect,
    capture: Capture,
}

fn step(args: &'static str, expect: Expect) -> Step {
    Step {
        args,
        stdin: None,
        expect,
        capture: Capture::None,
    }
}

/// The script: what etcdctl 3.4 prints against etcd 3.4 for each command.
fn script() -> Vec<Step> {
    use Expect::*;
    vec![
        Step {
            capture: Capture::Revision("a1"),
            ..step("put a 1 -w json", Succeeds)
        },
        step("put b 2", Out("OK")),
        step("get a", Out("a\n1")),
        step("get a --from-key", Out("a\n1\nb\n2")),
        step("get a c", Out("a\n1\nb\n2")),
        step("get {empty} --prefix --limit 1", Out("a\n1")),
        step("get {empty} --prefix --keys-only", Out("a\n\nb")),
        step(
            "get {empty} --prefix --sort-by=VALUE --order=DESCEND",
            Out("b\n2\na\n1"),
        ),
        step(
            "get {empty} --prefix --sort-by=CREATE --order=ASCEND --limit 1",
            Out("a\n1"),
        ),
        step("put a 3", Out("OK")),
        step("get a --rev {rev:a1}", Out("a\n1")),
        step("get a --print-value-only", Out("3")),
        step("del a", Out("1")),
        step("del zz", Out("0")),
        step("get a", Out("")),
        Step {
            stdin: Some("value(\"b\") = \"2\"\n\nput c 3\n\nput c 4\n\n"),
            ..step("txn", Out("SUCCESS\n\nOK"))
        },
        Step {
            stdin: Some("value(\"b\") = \"9\"\n\nput c 3\n\nput c 4\n\n"),
            ..step("txn", Out("FAILURE\n\nOK"))
        },
        step("get c", Out("c\n4")),
        Step {
            capture: Capture::Revision("w1"),
            ..step("put w/1 x -w json", Succeeds)
        },
        step("put w/1 z", Out("OK")),
        step(
            "watch --prev-kv w/1 --rev {rev:w1}",
            Streams("PUT\nw/1\nx\nPUT\nw/1\nx\nw/1\nz"),
        ),
        step(
            "watch --prefix w/ --rev {rev:w1}",
            Streams("PUT\nw/1\nx\nPUT\nw/1\nz"),
        ),
        Step {
            capture: Capture::Lease("l"),
            ..step("lease grant 30", Out("lease <LEASE> granted with TTL(30s)"))
        },
        step("put k v --lease={lease:l}", Out("OK")),
        step(
            "lease timetolive {lease:l} --keys",
            Out("lease <LEASE> granted with TTL(30s), remaining(<N>s), attached keys([k])"),
        ),
        step(
            "lease keep-alive --once {lease:l}",
            Out("lease <LEASE> keepalived with TTL(30)"),
        ),
        step("lease list", Out("found 1 leases\n<LEASE>")),
        step("lease revoke {lease:l}", Out("lease <LEASE> revoked")),
        step("get k", Out("")),
        step(
            "lease revoke 123",
            Fails("Error: failed to revoke lease (etcdserver: requested lease not found)"),
        ),
        step("lease timetolive 123", Out("lease <LEASE> already expired")),
        step(
            "put x y --lease=123",
            Fails("Error: etcdserver: requested lease not found"),
        ),
        step("lock mylock echo locked", Out("locked")),
        step("elect myelection p1", Streams("myelection/<LEASE>\np1")),
        Step {
            capture: Capture::Revision("now"),
            ..step("put d 1 -w json", Succeeds)
        },
        step("compaction {rev:now}", Out("compacted revision {rev:now}")),
        step(
            "get a --rev {rev:a1}",
            Fails("Error: etcdserver: mvcc: required revision has been compacted"),
        ),
        step("alarm list", Out("")),
        step(
            "defrag",
            Out("Finished defragmenting etcd member[{endpoint}]"),
        ),
        step(
            "endpoint health",
            Says("{endpoint} is healthy: successfully committed proposal: took = <T>"),
        ),
        step("endpoint status", Succeeds),
        step("endpoint hashkv", Succeeds),
        Step {
            capture: Capture::FirstMember("me"),
            ..step("member list", Succeeds)
        },
        Step {
            capture: Capture::Member("m2"),
            ..step(
                "member add m2 --learner --peer-urls=http://127.0.0.1:1",
                Succeeds,
            )
        },
        step(
            "member promote {id:m2}",
            Fails(
                "Error: etcdserver: can only promote a learner member which is in sync with leader",
            ),
        ),
        step("member remove {id:m2}", Succeeds),
        step(
            "move-leader {id:me}",
            Out("Leadership transferred from {id:me} to {id:me}"),
        ),
        step(
            "snapshot save {tmp}/snap.db",
            Out("Snapshot saved at {tmp}/snap.db"),
        ),
        step(
            "put {empty} v",
            Fails("Error: etcdserver: key is not provided"),
        ),
        step("get b", Out("b\n2")),
        // Auth last: once on, every step needs a user. etcdctl's `auth enable` grants
        // root the root role itself when it lacks it.
        step("user add root:rootpw", Out("User root created")),
        step("auth enable", Out("Authentication Enabled")),
        step("get b", Fails("Error: etcdserver: user name is empty")),
        step("role add app --user root:rootpw", Out("Role app created")),
        step(
            "role grant-permission app readwrite app/ --prefix=true --user root:rootpw",
            Out("Role app updated"),
        ),
        step(
            "user add alice:alicepw --user root:rootpw",
            Out("User alice created"),
        ),
        step(
            "user grant-role alice app --user root:rootpw",
            Out("Role app is granted to user alice"),
        ),
        step("put app/1 v --user alice:alicepw", Out("OK")),
        step("get app/1 --user alice:alicepw", Out("app/1\nv")),
        step(
            "put other v --user alice:alicepw",
            Fails("Error: etcdserver: permission denied"),
        ),
        step(
            "get app/1 --user alice:wrong",
            Fails("Error: etcdserver: authentication failed, invalid user ID or password"),
        ),
        step(
            "user list --user alice:alicepw",
            Fails("Error: etcdserver: permission denied"),
        ),
        step("user list --user root:rootpw", Out("alice\nroot")),
        step(
            "role get app --user root:rootpw",
            Out(
                "Role app\nKV Read:\n\t[app/, app0) (prefix app/)\nKV Write:\n\t[app/, app0) (prefix app/)",
            ),
        ),
        step(
            "user delete root --user root:rootpw",
            Fails("Error: etcdserver: invalid auth management"),
        ),
        step(
            "auth disable --user root:rootpw",
            Out("Authentication Disabled"),
        ),
        step("get app/1", Out("app/1\nv")),
    ]
}

/// Runs the script against `endpoint`; returns how many answers were wrong.
fn run_script(system: &str, endpoint: &str) -> anyhow::Result<usize> {
    let mut captured: HashMap<String, String> = HashMap::new();
    captured.insert("endpoint".into(), endpoint.to_string());
    // Files a step writes (a saved snapshot) go here, removed with the run.
    let tmp = tempfile::tempdir()?;
    captured.insert("tmp".into(), tmp.path().display().to_string());
    let mut failures = 0;
    for step in script() {
        let args = fill(step.args, &captured);
        // `{empty}` is an empty argument (the empty key).
        let words: Vec<&str> = args
            .split(' ')
            .map(|word| if word == "{empty}" { "" } else { word })
            .collect();
        let (code, stdout, stderr) = etcdctl(endpoint, &words, step.stdin)?;
        match &step.capture {
            Capture::None => {}
            Capture::Revision(name) => {
                let revision = json_revision(&stdout)
                    .with_context(|| format!("{system}: no revision in {stdout:?}"))?;
                captured.insert(format!("rev:{name}"), revision.to_string());
            }
            Capture::Lease(name) => {
                let id = stdout.split_whitespace().nth(1).unwrap_or_default();
                captured.insert(format!("lease:{name}"), id.to_string());
            }
            Capture::Member(name) => {
                let id = stdout.split_whitespace().nth(1).unwrap_or_default();
                captured.insert(format!("id:{name}"), id.to_string());
            }
            Capture::FirstMember(name) => {
                let id = stdout.split(',').next().unwrap_or_default().trim();
                captured.insert(format!("id:{name}"), id.to_string());
            }
        }
        let out = normalize(&stdout);
        let error = stderr
            .lines()
            .find(|l| l.starts_with("Error:"))
            .unwrap_or_default()
            .trim_end()
            .to_string();
        let verdict = match &step.expect {
            Expect::Out(want) => {
                // Filled in from captured ids, which are normalised like the answer.
                let want = normalize(&fill(want, &captured));
                (code == Some(0) && out == want)
                    .then_some(())
                    .ok_or_else(|| {
                        format!("want exit 0 and {want:?}, got {code:?} {out:?} {error:?}")
                    })
            }
            Expect::Fails(want) => (code.is_some_and(|c| c != 0) && error == *want)
                .then_some(())
                .ok_or_else(|| format!("want {want:?}, got {code:?} {error:?}")),
            Expect::Streams(want) => (code.is_none() && out == *want)
                .then_some(())
                .ok_or_else(|| format!("want {want:?} until cut off, got {code:?} {out:?}")),
            Expect::Says(want) => {
                let want = fill(want, &captured);
                let said = normalize(&stderr);
                (code == Some(0) && said == want)
                    .then_some(())
                    .ok_or_else(|| {
                        format!("want exit 0 and {want:?} on stderr, got {code:?} {said:?}")
                    })
            }
            Expect::Succeeds => (code == Some(0))
                .then_some(())
                .ok_or_else(|| format!("want exit 0, got {code:?} {error:?}")),
        };
        match verdict {
            Ok(()) => println!("  ok    {system:>7}  etcdctl {args}"),
            Err(why) => {
                failures += 1;
                println!("  FAIL  {system:>7}  etcdctl {args}: {why}");
            }
        }
    }
    Ok(failures)
}

/// `text` with `{NAME}` placeholders replaced by captured values.
fn fill(text: &str, captured: &HashMap<String, String>) -> String {
    let mut out = text.to_string();
    for (name, value) in captured {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

/// The header revision of a `-w json` answer.
fn json_revision(text: &str) -> Option<i64> {
    let rest = text.split("\"revision\":").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// An answer with what legitimately differs between systems and runs replaced: lease
/// ids (8 to 16 hex digits, alone or after a `/` as in an election key) by `<LEASE>`,
/// a remaining TTL by `<N>`, a timing by `<T>`; trailing blank space removed.
fn normalize(text: &str) -> String {
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let mut line = line.trim_end().to_string();
            if let Some(at) = line.find("took = ") {
                line.truncate(at + "took = ".len());
                line.push_str("<T>");
            }
            if let Some(at) = line.find("remaining(")
                && let Some(end) = line[at..].find("s)")
            {
                line.replace_range(at + "remaining(".len()..at + end, "<N>");
            }
            line.split(' ')
                .map(|word| {
                    let (head, tail) = match word.rsplit_once('/') {
                        Some((head, tail)) => (format!("{head}/"), tail),
                        None => (String::new(), word),
                    };
                    if (8..=16).contains(&tail.len()) && tail.chars().all(|c| c.is_ascii_hexdigit())
                    {
                        format!("{head}<LEASE>")
                    } else {
                        word.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    lines.join("\n").trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizing_hides_what_differs_between_systems_only() {
        assert_eq!(
            normalize(
                "lease 694da23199694026 granted with TTL(30s), remaining(29s), attached keys([k])\n"
            ),
            "lease <LEASE> granted with TTL(30s), remaining(<N>s), attached keys([k])"
        );
        assert_eq!(normalize("myel/694da2319969401f\np1\n"), "myel/<LEASE>\np1");
        assert_eq!(
            normalize("h:1 is healthy: successfully committed proposal: took = 1.8ms"),
            "h:1 is healthy: successfully committed proposal: took = <T>"
        );
        // What must match stays as it is.
        assert_eq!(normalize("a\n\nb\n\n"), "a\n\nb");
        assert_eq!(normalize("PUT\nw/1\nx"), "PUT\nw/1\nx");
        assert_eq!(normalize("myel/739a2319b8ed225"), "myel/<LEASE>");
        assert_eq!(
            normalize("lease 0000000000000123 already expired"),
            "lease <LEASE> already expired"
        );
        assert_eq!(
            json_revision(r#"{"header":{"cluster_id":1,"revision":42,"raft_term":2}}"#),
            Some(42)
        );
    }
}
