//! etcd's Maintenance.Snapshot and `meta-srv restore`: a snapshot saved from a follower
//! of one cluster starts a new three-member cluster with every key, revision, lease
//! and history entry identical and a new cluster id; damaged or foreign files and
//! wrong targets are refused before anything is written.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use meta_proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use meta_srv::backup::{self, RestoreTarget};
use meta_srv::identity::InitialCluster;
use sha2::{Digest, Sha256};

use super::{get, kv, prefix, put};
use crate::in_process::{Running, leader_of, start_three, start_with};
use crate::support::run_bounded;

/// Saves a snapshot from `addr` as etcd's clients do; checks the stream's framing.
async fn save(addr: &str) -> Vec<u8> {
    let mut maintenance = MaintenanceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut stream = maintenance
        .snapshot(epb::SnapshotRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut file = Vec::new();
    let mut first = true;
    while let Some(chunk) = stream.message().await.unwrap() {
        if first {
            assert_eq!(chunk.version, "3.5.17", "the server version, first");
            assert!(chunk.header.is_some());
            first = false;
        }
        file.extend_from_slice(&chunk.blob);
        let said = chunk.remaining_bytes;
        assert!(said < 1 << 40, "{said}");
        file.reserve(said as usize);
        if said == 0 {
            assert!(stream.message().await.unwrap().is_none(), "nothing after 0");
            break;
        }
    }
    file
}

/// The file's layout as etcd's clients check it: its size modulo 512 is 32, and the
/// last 32 bytes are the SHA-256 of the others.
fn assert_checksummed(file: &[u8]) {
    assert_eq!(file.len() % 512, 32, "{} bytes", file.len());
    let (body, digest) = file.split_at(file.len() - 32);
    assert_eq!(Sha256::digest(body).as_slice(), digest);
}

/// Every key with its revisions and value, as `addr` answers a linearizable read.
async fn everything(addr: &str) -> Vec<(Vec<u8>, i64, i64, i64, i64, Vec<u8>)> {
    let answer = kv(addr)
        .await
        .range(epb::RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    answer
        .kvs
        .into_iter()
        .map(|k| {
            (
                k.key,
                k.create_revision,
                k.mod_revision,
                k.version,
                k.lease,
                k.value,
            )
        })
        .collect()
}

async fn hash_at(addr: &str, revision: i64) -> (u32, i64) {
    let answer = MaintenanceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .hash_kv(epb::HashKvRequest { revision })
        .await
        .unwrap()
        .into_inner();
    (answer.hash, answer.compact_revision)
}

/// Restores `file` for three new members on fresh ports and starts them.
async fn restore_three(file: &Path, dirs: &tempfile::TempDir) -> Vec<Running> {
    let ports = crate::cluster_process::free_ports();
    let spec = crate::in_process::initial_cluster(&ports);
    let mut members = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let data_dir = dirs.path().join(format!("m{}", i + 1));
        let target = RestoreTarget {
            data_dir: data_dir.clone(),
            node_id: i as u64 + 1,
            cluster: InitialCluster::parse(&spec).unwrap(),
            cluster_token: meta_srv::Config::default().cluster_token,
        };
        backup::restore(file, &target).unwrap();
        let spec = spec.clone();
        members.push(
            start_with(move |c| {
                c.node_id = i as u64 + 1;
                c.data_dir = data_dir;
                c.listen_addr = format!("127.0.0.1:{port}").parse().unwrap();
                c.initial_cluster = spec;
            })
            .await,
        );
    }
    members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_from_a_follower_restores_a_new_cluster_with_identical_data() {
    let members = start_three(|_| {}).await;
    let leader = leader_of(&members).await;
    let follower = &members[(leader + 1) % 3].grpc;
    let mut kv = kv(follower).await;
    let lease = LeaseClient::connect(format!("http://{follower}"))
        .await
        .unwrap()
        .lease_grant(epb::LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    for (key, value) in [("s/a", "1"), ("s/b", "1"), ("s/a", "2"), ("s/c", "1")] {
        kv.put(put(key, value)).await.unwrap();
    }
    let first_a = kv.range(get("s/a")).await.unwrap().into_inner().kvs[0].mod_revision;
    kv.put(epb::PutRequest {
        lease,
        ..put("s/leased", "x")
    })
    .await
    .unwrap();
    kv.delete_range(epb::DeleteRangeRequest {
        key: b"s/c".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let compacted = kv
        .compact(epb::CompactionRequest {
            revision: first_a,
            physical: true,
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    assert!(compacted > first_a);
    let last = kv
        .put(put("s/last", "1"))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    // The follower answers from what it applied: wait until it has the last write.
    crate::support::wait_until(Duration::from_secs(10), || async {
        let seen = hash_at(follower, 0).await;
        let wanted = hash_at(&members[leader].grpc, last).await;
        crate::support::check(seen == wanted, || format!("{seen:?} != {wanted:?}"))
    })
    .await;

    let file = save(follower).await;
    assert_checksummed(&file);
    let dirs = tempfile::tempdir().unwrap();
    let path = dirs.path().join("backup.db");
    std::fs::write(&path, &file).unwrap();
    let header = backup::verify(&path).unwrap();
    assert_eq!(header.revision, last);

    let before = everything(follower).await;
    let source_hash = hash_at(follower, last).await;
    let source_id = kv
        .range(get("s/a"))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .cluster_id;
    assert_eq!(header.source_cluster, source_id);
    for m in members {
        m.shutdown().await;
    }

    let restored = restore_three(&path, &dirs).await;
    let leader = leader_of(&restored).await;
    for m in &restored {
        assert_eq!(everything(&m.grpc).await, before, "member {}", m.grpc);
        assert_eq!(hash_at(&m.grpc, last).await, source_hash);
    }
    let mut kv = super::kv(&restored[leader].grpc).await;
    let old = kv
        .range(epb::RangeRequest {
            revision: compacted,
            ..prefix("s/")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.kvs.len(), 3, "history above the compaction came along");
    let next = kv.put(put("s/new", "1")).await.unwrap().into_inner();
    let header = next.header.unwrap();
    assert_eq!(header.revision, last + 1, "revisions go on");
    assert_ne!(header.cluster_id, source_id, "a new cluster id");
    let ttl = LeaseClient::connect(format!("http://{}", restored[leader].grpc))
        .await
        .unwrap()
        .lease_time_to_live(epb::LeaseTimeToLiveRequest {
            id: lease,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.keys, vec![b"s/leased".to_vec()], "the lease came along");
    assert!(ttl.ttl > 0, "{ttl:?}");
    for m in restored {
        m.shutdown().await;
    }
}

/// A valid backup file of a one-member cluster holding `keys` keys.
async fn small_backup(dir: &Path, keys: usize) -> std::path::PathBuf {
    let server = start_with(|_| {}).await;
    let mut kv = kv(&server.grpc).await;
    for i in 0..keys {
        kv.put(put(&format!("k{i}"), "v")).await.unwrap();
    }
    let file = save(&server.grpc).await;
    server.shutdown().await;
    let path = dir.join("good.db");
    std::fs::write(&path, file).unwrap();
    path
}

fn restore_cli(from: &Path, data_dir: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meta-srv"));
    command
        .arg("restore")
        .arg("--from")
        .arg(from)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("METASRV_") {
            command.env_remove(key);
        }
    }
    let (status, out, err) = run_bounded(command, Duration::from_secs(30));
    (status.success(), out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_bad_files_and_targets_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let good = small_backup(dir.path(), 3).await;
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, content: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    let mut flipped = bytes.clone();
    flipped[60] ^= 0xff;
    let mut foreign = vec![0u8; 4096 + 32];
    foreign[16..20].copy_from_slice(&0xED0C_DAEDu32.to_le_bytes());
    let cases = [
        (
            write("truncated.db", &bytes[..bytes.len() - 1]),
            "truncated",
        ),
        (write("flipped.db", &flipped), "SHA-256 mismatch"),
        (write("etcd.db", &foreign), "not a Metasrv backup"),
        (write("empty.db", b""), "too short"),
        (dir.path().join("missing.db"), "No such file"),
    ];
    for (file, want) in cases {
        let target = dir.path().join("never");
        let (ok, out, err) = restore_cli(&file, &target, &[]);
        assert!(!ok, "{file:?} was restored: {out}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{file:?}: {err}"
        );
        assert!(!target.exists(), "{file:?}: nothing written");
    }

    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep"), "mine").unwrap();
    let (ok, _, err) = restore_cli(&good, &busy, &[]);
    assert!(!ok && err.contains("is not empty"), "{err}");
    assert_eq!(std::fs::read_to_string(busy.join("keep")).unwrap(), "mine");

    let outside = dir.path().join("outside");
    let (ok, _, err) = restore_cli(
        &good,
        &outside,
        &["--node-id", "4", "--initial-cluster", "1=a:1,2=b:2,3=c:3"],
    );
    assert!(
        !ok && err.contains("node_id 4 is not in initial_cluster"),
        "{err}"
    );
    assert!(!outside.exists());

    // The good file restores, and the member starts on it.
    let fresh = dir.path().join("fresh");
    let (ok, out, err) = restore_cli(&good, &fresh, &[]);
    assert!(ok, "{err}");
    assert!(out.starts_with("restored revision 3 (3 keys"), "{out}");
    let server = crate::support::ServerProcess::start(&fresh);
    let answer = kv(&server.grpc)
        .await
        .range(prefix("k"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.count, 3);
    // Restoring again into the same directory is refused: it is no longer empty.
    drop(server);
    let (ok, _, err) = restore_cli(&good, &fresh, &[]);
    assert!(!ok && err.contains("is not empty"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metactl_saves_a_snapshot_that_restores() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(|_| {}).await;
    let mut kv = kv(&server.grpc).await;
    for i in 0..5 {
        kv.put(put(&format!("k{i}"), "v")).await.unwrap();
    }
    let file = dir.path().join("backup.db");
    let file_arg = file.to_str().unwrap().to_string();
    let (code, out, err) =
        crate::metactl::metactl_async(&server.grpc, &["snapshot", "save", &file_arg]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with(&format!("snapshot saved to {file_arg}: revision 5,")),
        "{out}"
    );
    assert!(
        !dir.path().join("backup.db.part").exists(),
        "no partial file is left"
    );
    assert_checksummed(&std::fs::read(&file).unwrap());

    // Somewhere it cannot write: one line, non-zero, nothing left.
    let (code, _, err) = crate::metactl::metactl_async(
        &server.grpc,
        &["snapshot", "save", "/nonexistent-metasrv-dir/backup.db"],
    )
    .await;
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("creating /nonexistent-metasrv-dir/backup.db.part"),
        "{err}"
    );
    server.shutdown().await;

    let fresh = dir.path().join("fresh");
    let (ok, out, err) = restore_cli(&file, &fresh, &[]);
    assert!(ok, "{err}");
    assert!(out.starts_with("restored revision 5 (5 keys"), "{out}");
}
