//! `cargo xtask ui-test`: the dashboard in headless Chromium (Debian's `chromium`).
//! It builds a debug `meta-srv`, starts it, attaches three simulated datanodes and
//! creates a table, then loads `GET /` of the HTTP port: the DOM after the page's first
//! refresh must show the member as leader, three alive nodes, the table and the
//! procedure that created it. A screenshot is saved (`--screenshot`, default
//! `target/ui-test/dashboard.png`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meta_client::sim::{SimOptions, Simulator, sample_table};
use meta_client::{MetaClient, MetaClientOptions};

use crate::{root, run as run_command};

/// Settings of `ui-test`.
#[derive(clap::Args, Clone, Debug)]
pub struct UiArgs {
    /// Where to save the screenshot.
    #[arg(long)]
    pub screenshot: Option<PathBuf>,
}

/// How long one Chromium run may take.
const BROWSER_DEADLINE: Duration = Duration::from_secs(90);

/// Runs headless Chromium with `args` on `url`, bounded in time; its standard output.
fn chromium(url: &str, args: &[String]) -> anyhow::Result<String> {
    let profile = tempfile::tempdir()?;
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting chromium")?;
    let mut out = child.stdout.take().context("piped stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut text);
        text
    });
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let text = reader.join().unwrap_or_default();
            if !status.success() {
                bail!("chromium exited with {status}");
            }
            return Ok(text);
        }
        if started.elapsed() > BROWSER_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            bail!("chromium did not finish within {BROWSER_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The rows of table `id` in `dom` (its `<tbody>` text).
fn tbody<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap_or(dom.len());
    let rest = &dom[start..];
    let end = rest.find("</table>").unwrap_or(rest.len());
    &rest[..end]
}

/// Checks what the page shows; each missing thing is named.
fn check(dom: &str) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if !dom.contains("data-ready=\"1\"") {
        missing.push("the page never finished a refresh".to_string());
    }
    if !tbody(dom, "members").contains(">leader<") {
        missing.push("no member marked leader".to_string());
    }
    let alive = tbody(dom, "nodes").matches("class=\"alive\"").count();
    if alive != 3 {
        missing.push(format!("{alive} alive nodes, not 3"));
    }
    if !tbody(dom, "tables").contains("greptime.public.ui_cpu") {
        missing.push("the table greptime.public.ui_cpu".to_string());
    }
    if !tbody(dom, "procedures").contains("CreateTable") {
        missing.push("the create-table procedure".to_string());
    }
    if !dom.contains("id=\"chart-writes\"") {
        missing.push("the writes chart".to_string());
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!("the dashboard lacks: {}", missing.join("; "))
}

/// Runs the UI test.
pub fn run(args: UiArgs) -> anyhow::Result<()> {
    if Command::new("chromium").arg("--version").output().is_err() {
        bail!("chromium is not installed: `apt-get install chromium` (Debian's package) and retry");
    }
    run_command(Command::new("cargo").args(["build", "--quiet", "--bin", "meta-srv"]))?;
    let http = format!("127.0.0.1:{}", crate::bench::free_ports(1)?[0]);
    let server = crate::compat::Server::meta_on(&http)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let url = format!("http://{http}/");
    let screenshot = args
        .screenshot
        .unwrap_or_else(|| root().join("target/ui-test/dashboard.png"));
    runtime.block_on(async {
        let client = MetaClient::new(&[&server.endpoint], MetaClientOptions::default())?;
        let sim = Simulator::start(
            std::slice::from_ref(&server.endpoint),
            &SimOptions {
                nodes: 3,
                regions_per_node: 0,
                ..SimOptions::default()
            },
        )
        .await?;
        sim.activate(&client, Duration::from_secs(30)).await?;
        client
            .create_table(&sample_table("ui_cpu", 3), true)
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes = client.nodes().await?;
            let alive = nodes.iter().filter(|n| n.liveness == 1).count();
            if alive == 3 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the simulated nodes are not alive after 30 s ({alive} of 3)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Chromium runs on a blocking thread while the simulated nodes keep beating.
        let dom = {
            let url = url.clone();
            tokio::task::spawn_blocking(move || chromium(&url, &["--dump-dom".to_string()]))
                .await??
        };
        check(&dom)?;
        if let Some(dir) = screenshot.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let shot = screenshot.clone();
        let url2 = url.clone();
        tokio::task::spawn_blocking(move || {
            chromium(
                &url2,
                &[
                    format!("--screenshot={}", shot.display()),
                    "--window-size=1280,1000".to_string(),
                    "--hide-scrollbars".to_string(),
                ],
            )
        })
        .await??;
        drop(sim);
        Ok::<_, anyhow::Error>(())
    })?;
    saved(&screenshot)?;
    println!(
        "ui-test: the dashboard at {url} shows the leader, 3 alive nodes, the table and its procedure; screenshot {}",
        screenshot.display()
    );
    Ok(())
}

fn saved(path: &Path) -> anyhow::Result<()> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("no screenshot at {}", path.display()))?
        .len();
    if size < 1_000 {
        bail!("the screenshot at {} is only {size} bytes", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_names_what_a_page_lacks() {
        let broken = r#"<table id="members"><tbody><tr><td>1</td><td></td></tr></tbody></table>
            <table id="nodes"><tbody><tr><td class="alive">alive</td></tr></tbody></table>"#;
        let err = check(broken).unwrap_err().to_string();
        for want in [
            "never finished",
            "no member marked leader",
            "1 alive nodes",
            "ui_cpu",
            "create-table",
            "writes chart",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
        let good = r#"<body data-ready="1"><table id="members"><tbody><td>leader</td></tbody></table>
            <div id="chart-writes"></div>
            <table id="nodes"><tbody><td class="alive"></td><td class="alive"></td><td class="alive"></td></tbody></table>
            <table id="tables"><tbody><td>greptime.public.ui_cpu</td></tbody></table>
            <table id="procedures"><tbody><td>metasrv.CreateTable</td></tbody></table>"#;
        check(good).unwrap();
    }
}
