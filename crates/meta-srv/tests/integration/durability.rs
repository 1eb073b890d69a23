//! Acknowledged writes survive `kill -9` of the real binary.

use std::sync::Arc;
use std::time::Duration;

use common_meta::kv::{KvBackend, PutRequest, RangeRequest};
use meta_client::{MetaClient, MetaClientOptions};

use crate::support::ServerProcess;

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
