//! Acknowledged writes survive `kill -9` of the real binary, and a full disk stops it
//! (fail-stop) without losing any.

use std::sync::Arc;
use std::time::Duration;

use common_meta::kv::{KvBackend, PutRequest, RangeRequest};
use meta_client::{MetaClient, MetaClientOptions};

use crate::support::{ServerProcess, run_bounded};

const KEYS: usize = 1000;
const WRITERS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());

    tracing::info!("--- {KEYS} keys are written by {WRITERS} concurrent writers");
    let client = Arc::new(MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap());
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            let mut last = 0;
            for i in (w..KEYS).step_by(WRITERS) {
                let put = PutRequest::new(format!("dur/{i:04}"), format!("value-{i}"));
                last = last.max(client.put(put).await.unwrap().revision);
            }
            last
        }));
    }
    let mut acked_revision = 0;
    for writer in writers {
        acked_revision = acked_revision.max(writer.await.unwrap());
    }
    assert_eq!(
        acked_revision, KEYS as i64,
        "one revision per put on a fresh store"
    );

    tracing::info!("--- the server is killed with SIGKILL and restarted on the same dir");
    server.kill9();
    let server = ServerProcess::start(dir.path());
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();

    let all = client.range(RangeRequest::prefix("dur/")).await.unwrap();
    assert_eq!(all.count, KEYS as i64, "every acknowledged key is there");
    assert_eq!(all.revision, acked_revision, "the revision survived");
    for (i, kv) in all.kvs.iter().enumerate() {
        assert_eq!(kv.key, format!("dur/{i:04}").into_bytes());
        assert_eq!(kv.value, format!("value-{i}").into_bytes());
        assert_eq!(kv.version, 1);
    }
    let next = client.put(PutRequest::new("dur/next", "x")).await.unwrap();
    assert_eq!(
        next.revision,
        acked_revision + 1,
        "revisions continue after restart"
    );

    tracing::info!("--- SIGTERM stops it cleanly");
    let status = server.terminate(Duration::from_secs(20));
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}

/// A small tmpfs mounted for one test, unmounted (lazily, so a process still holding
/// it cannot block that) when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let mut mount = std::process::Command::new("mount");
        mount
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(&path);
        let (status, _, err) = run_bounded(mount, Duration::from_secs(10));
        assert!(
            status.success(),
            "this test mounts a small tmpfs and needs root: {err}"
        );
        SmallDisk { path, _dir: dir }
    }

    fn resize(&self, size: &str) {
        let mut remount = std::process::Command::new("mount");
        remount
            .args(["-o"])
            .arg(format!("remount,size={size}"))
            .arg(&self.path);
        let (status, _, err) = run_bounded(remount, Duration::from_secs(10));
        assert!(status.success(), "remount: {err}");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_member_and_loses_no_acknowledged_write() {
    let disk = SmallDisk::mount("8m");
    let data = disk.path.join("data");
    let server = ServerProcess::start(&data);
    let options = MetaClientOptions {
        deadline: Duration::from_secs(5),
        ..MetaClientOptions::default()
    };
    let client = MetaClient::new(&[&server.grpc], options.clone()).unwrap();

    tracing::info!("--- puts fill the disk until the member fails");
    let value = vec![b'x'; 64 * 1024];
    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..1000 {
        let key = format!("full/{i:04}");
        match client
            .put(PutRequest::new(key.clone(), value.clone()))
            .await
        {
            Ok(_) => acked.push(key),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("8 MiB fill up before 64 MiB were written");
    assert!(acked.len() > 5, "some writes fit: {}", acked.len());
    let status = server
        .wait_exit(Duration::from_secs(60))
        .expect("a member that cannot persist exits by itself");
    assert!(
        !status.success(),
        "it exits non-zero: {status:?} (after: {failure})"
    );

    tracing::info!("--- with room again, every acknowledged write is there");
    disk.resize("256m");
    let server = ServerProcess::start(&data);
    let client = MetaClient::new(&[&server.grpc], options).unwrap();
    let all = client
        .range(RangeRequest {
            keys_only: true,
            ..RangeRequest::prefix("full/")
        })
        .await
        .unwrap();
    let present: Vec<String> = all
        .kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    for key in &acked {
        assert!(present.contains(key), "acknowledged {key} was lost");
    }
    client
        .put(PutRequest::new("full/after", "ok"))
        .await
        .expect("writes go on once there is room");
    drop(server);
}

/// Turns a current-format data directory of one stopped member into the first format:
/// the log one key per entry, the configuration back in `raft_meta`, the members in
/// their own tree, no boot counter, no `FORMAT`; and appends a committed, unapplied first-format entry (a bare
/// `TxnRequest` putting `legacy` = `1`), which the next start must replay.
fn downgrade_to_format_1(data_dir: &std::path::Path) {
    use prost::Message as _;
    use protobuf::Message as _;

    let db = sled::open(data_dir.join("db")).unwrap();
    let kv = db.open_tree("kv").unwrap();
    let meta = db.open_tree("raft_meta").unwrap();
    // Runs of entries (format 4) back to one key per entry: `[u64 BE last]` then
    // `[u32 BE length][Entry]` for each entry of a run.
    let log = db.open_tree("raft_log").unwrap();
    let runs = db.open_tree("raft_runs").unwrap();
    for item in runs.iter() {
        let (_, run) = item.unwrap();
        let mut rest = &run[8..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let entry = raft::prelude::Entry::parse_from_bytes(&rest[4..4 + len]).unwrap();
            log.insert(entry.index.to_be_bytes(), &rest[4..4 + len])
                .unwrap();
            rest = &rest[4 + len..];
        }
    }
    db.drop_tree("raft_runs").unwrap();
    let members = db.open_tree("members").unwrap();
    let system = |name: &[u8]| [&[0x03u8][..], name].concat();
    let conf = kv
        .remove(system(b"conf_state"))
        .unwrap()
        .expect("a format-2 conf state");
    meta.insert("conf_state", conf).unwrap();
    for item in kv.scan_prefix(system(b"member/")) {
        let (key, addr) = item.unwrap();
        members.insert(&key[key.len() - 8..], addr).unwrap();
        kv.remove(key).unwrap();
    }
    meta.remove("boot").unwrap();
    let (last, _) = log.last().unwrap().unwrap();
    let last = u64::from_be_bytes(last.as_ref().try_into().unwrap());
    let mut hard_state =
        raft::prelude::HardState::parse_from_bytes(&meta.get("hard_state").unwrap().unwrap())
            .unwrap();
    let put = meta_proto::v1::TxnRequest {
        success: vec![meta_proto::v1::TxnOp {
            op: Some(meta_proto::v1::txn_op::Op::Put(
                meta_proto::v1::PutRequest {
                    key: b"legacy".to_vec(),
                    value: b"1".to_vec(),
                    ..Default::default()
                },
            )),
        }],
        ..Default::default()
    };
    let entry = raft::prelude::Entry {
        term: hard_state.term,
        index: last + 1,
        data: put.encode_to_vec().into(),
        ..Default::default()
    };
    log.insert((last + 1).to_be_bytes(), entry.write_to_bytes().unwrap())
        .unwrap();
    hard_state.commit = last + 1;
    meta.insert("hard_state", hard_state.write_to_bytes().unwrap())
        .unwrap();
    db.flush().unwrap();
    std::fs::remove_file(data_dir.join("FORMAT")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_format_directory_opens_and_a_newer_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    client.put(PutRequest::new("old/key", "v")).await.unwrap();
    let status = server.terminate(Duration::from_secs(20));
    assert!(status.success());

    tracing::info!("--- the directory is turned into the first format, then opened");
    downgrade_to_format_1(dir.path());
    let server = ServerProcess::start(dir.path());
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    for (key, value) in [("old/key", "v"), ("legacy", "1")] {
        let got = client.get(key.as_bytes()).await.unwrap();
        assert_eq!(
            got.map(|kv| kv.value),
            Some(value.as_bytes().to_vec()),
            "{key}"
        );
    }
    let raft = client.status().await.unwrap();
    assert_eq!(raft.members.len(), 1, "members migrated: {raft:?}");
    client.put(PutRequest::new("new/key", "w")).await.unwrap();
    assert!(server.terminate(Duration::from_secs(20)).success());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("FORMAT"))
            .unwrap()
            .trim(),
        meta_srv::data_dir::FORMAT_VERSION.to_string()
    );

    tracing::info!("--- a directory of a newer format is refused, untouched");
    std::fs::write(dir.path().join("FORMAT"), "999\n").unwrap();
    let (status, _, err) = crate::support::run_bounded(
        crate::support::meta_srv_command(dir.path()),
        Duration::from_secs(30),
    );
    assert!(!status.success());
    assert!(
        err.contains("has data format 999, which is newer than this binary writes"),
        "{err}"
    );
}
