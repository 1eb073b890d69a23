//! The etcd side of the benchmarks: processes from Debian's etcd-server, clients from
//! etcd-client (which also drive meta-srv with `--api etcd`).

use super::*;
use etcd_client::{Client, GetOptions};

struct EtcdTarget(Client);

#[async_trait]
impl Target for EtcdTarget {
    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<()> {
        self.0.kv_client().put(key, value, None).await?;
        Ok(())
    }

    async fn get(&self, key: Vec<u8>, serializable: bool) -> anyhow::Result<()> {
        let options = serializable.then(|| GetOptions::new().with_serializable());
        self.0.kv_client().get(key, options).await?;
        Ok(())
    }
}

pub async fn connect(endpoints: &[String]) -> anyhow::Result<Arc<dyn Target>> {
    let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
    Ok(Arc::new(EtcdTarget(Client::connect(urls, None).await?)))
}

/// A 3-member (or 1-member) etcd cluster on loopback, fsync on (etcd's default).
pub async fn start(members: usize) -> anyhow::Result<(Processes, Vec<String>)> {
    let ports = free_ports(members * 2)?;
    let peers: Vec<String> = (0..members)
        .map(|i| format!("m{}=http://127.0.0.1:{}", i + 1, ports[2 * i + 1]))
        .collect();
    let mut procs = Processes {
        children: Vec::new(),
        _dirs: Vec::new(),
    };
    let mut endpoints = Vec::new();
    for i in 0..members {
        let dir = tempfile::tempdir()?;
        let client = format!("127.0.0.1:{}", ports[2 * i]);
        let peer = format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let child = Command::new("etcd")
            .args(["--name", &format!("m{}", i + 1)])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &peers.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "bench"])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd")?;
        procs.children.push(child);
        procs._dirs.push(dir);
        endpoints.push(client);
    }
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = async {
            let target = connect(&endpoints).await?;
            target.put(b"ready".to_vec(), b"1".to_vec()).await
        };
        match ready.await {
            Ok(()) => return Ok((procs, endpoints)),
            Err(e) if Instant::now() > until => bail!("etcd did not become ready: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The etcd side of `bench watch`: the same watchers and writer through etcd-client.
pub async fn watch_run(
    args: &crate::bench_watch::WatchArgs,
) -> anyhow::Result<crate::bench_watch::Outcome> {
    use etcd_client::WatchOptions;
    let (procs, endpoints) = start(args.members).await?;
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(Client::connect(endpoints.clone(), None).await?);
    }
    let seen = crate::bench_watch::seen();
    let mut tasks = Vec::new();
    for i in 0..args.watchers {
        let mut client = clients[i % clients.len()].clone();
        let mut stream = client
            .watch("bw/", Some(WatchOptions::new().with_prefix()))
            .await?;
        let (seen, sampled) = (seen.clone(), i % args.sample_every.max(1) == 0);
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(response)) = stream.message().await {
                if !response.events().is_empty() {
                    crate::bench_watch::responded(&seen);
                }
                for event in response.events() {
                    if let Some(kv) = event.kv() {
                        crate::bench_watch::record(&seen, kv.value(), sampled);
                    }
                }
            }
        }));
    }
    let writer = Client::connect(endpoints.clone(), None).await?;
    let outcome = crate::bench_watch::measure(args, &procs, &seen, |key, value| {
        let mut writer = writer.clone();
        async move {
            writer.put(key, value, None).await?;
            Ok(())
        }
    })
    .await;
    for task in tasks {
        task.abort();
    }
    outcome
}
