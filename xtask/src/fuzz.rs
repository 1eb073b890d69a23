//! `cargo xtask fuzz TARGET --seconds N`: the fuzz targets of `fuzz/` (cargo-fuzz,
//! libFuzzer, on the nightly toolchain), one or `all`, each for N seconds; prints how
//! many inputs each ran. A crash fails the task and leaves its input under
//! `fuzz/artifacts/TARGET/`. Hand-made seed inputs live in `fuzz/seeds/TARGET/`.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::root;

/// Every target of `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "typed_keys",
    "raft_entry",
    "procedure_record",
    "txn_differential",
    "log_run",
    "store_copy",
];

/// Runs `target` (or every target for `all`) for `seconds` each.
pub fn run(target: &str, seconds: u64) -> anyhow::Result<()> {
    let targets: Vec<&str> = match target {
        "all" => TARGETS.to_vec(),
        one if TARGETS.contains(&one) => vec![one],
        other => bail!(
            "unknown fuzz target {other:?}; one of: all, {}",
            TARGETS.join(", ")
        ),
    };
    let installed = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        bail!(
            "cargo-fuzz on the nightly toolchain is needed: `cargo install cargo-fuzz --locked` (and `rustup toolchain install nightly`)"
        );
    }
    let mut report = Vec::new();
    for target in targets {
        // The corpus grows under fuzz/corpus (not kept); fuzz/seeds/TARGET (kept)
        // holds hand-made inputs that start the search at meaningful requests.
        let corpus = root().join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut command = Command::new("cargo");
        command
            .current_dir(root())
            .args(["+nightly", "fuzz", "run", "--fuzz-dir", "fuzz", target])
            .arg(&corpus);
        let seeds = root().join("fuzz/seeds").join(target);
        if seeds.is_dir() {
            command.arg(&seeds);
        }
        let output = command
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        let executions = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(|n| n.trim().to_string())
            .unwrap_or_else(|| "?".to_string());
        if !output.status.success() {
            eprintln!("{log}");
            bail!("fuzz target {target} failed after {executions} executions (see above)");
        }
        report.push(format!(
            "{target}: {executions} executions in {seconds} s, no crash"
        ));
    }
    for line in report {
        println!("{line}");
    }
    Ok(())
}
