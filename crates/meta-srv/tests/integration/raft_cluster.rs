//! In-process raft clusters on the fault-injecting `LocalRouter`: conformance through the
//! raft backend, leader failure, partitions, restarts and leader transfer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common_meta::Error;
use common_meta::kv::conformance;
use common_meta::kv::{KvBackend, KvLimits, PutRequest, RangeRequest, SledKvStore};
use meta_srv::raft::backend::RaftKvBackend;
use meta_srv::raft::driver::{
    Command, Membership, MembershipChange, RaftNode, RaftSettings, RaftStatus,
};
use meta_srv::raft::members::Members;
use meta_srv::raft::transport::LocalRouter;
use meta_srv::service::store::StoreService;
use meta_srv::session_keeper::SessionKeeper;

use crate::front::Front;
use crate::support::{check, wait_until};

/// Longest a leader election may take here: election timeouts are 1-2 s (10-20 ticks of
/// 100 ms), and a pre-vote round comes first.
pub const ELECTION_BOUND: Duration = Duration::from_secs(10);

pub struct Member {
    pub node: RaftNode,
    pub backend: RaftKvBackend,
}

/// An in-process cluster. A killed member's driver stops and it leaves the router; its
/// database stays open and is reused on restart (in-process, nothing is lost the way a
/// crash loses unflushed writes: the process-level tests cover that).
pub struct Cluster {
    pub router: Arc<LocalRouter>,
    /// `(compact_after, keep_entries)` for every member started.
    compaction: (u64, u64),
    tick: Duration,
    voters: Vec<u64>,
    dbs: BTreeMap<u64, sled::Db>,
    pub members: BTreeMap<u64, Member>,
    /// Members' Store services, when clients reach them through meta-client.
    serving: Option<Serving>,
    _root: tempfile::TempDir,
}

/// Each member's `meta.v1.Store` service (a new server per incarnation) behind a
/// [`Front`] whose address stays the same across restarts.
struct Serving {
    fronts: BTreeMap<u64, Front>,
    members: Arc<Members>,
    stops: BTreeMap<u64, tokio::sync::watch::Sender<bool>>,
}

impl Cluster {
    pub fn new(size: u64) -> Cluster {
        Self::with_options(size, (10_000, 1_000), Duration::from_millis(100))
    }

    fn with_compaction(size: u64, compaction: (u64, u64)) -> Cluster {
        Self::with_options(size, compaction, Duration::from_millis(100))
    }

    /// A cluster whose members use `tick` (elections after 10 to 20 ticks).
    pub fn with_options(size: u64, compaction: (u64, u64), tick: Duration) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let voters: Vec<u64> = (1..=size).collect();
        let mut cluster = Cluster {
            router: Arc::new(LocalRouter::default()),
            compaction,
            tick,
            dbs: BTreeMap::new(),
            voters,
            members: BTreeMap::new(),
            serving: None,
            _root: root,
        };
        for id in cluster.voters.clone() {
            cluster.start(id);
        }
        cluster
    }

    /// A cluster like [`Cluster::with_options`] whose members also serve the Store API
    /// (sessions included), each behind a stable address: see [`Cluster::endpoints`].
    /// Must be called inside a tokio runtime.
    pub fn serving(size: u64, compaction: (u64, u64), tick: Duration) -> Cluster {
        let fronts: BTreeMap<u64, Front> = (1..=size).map(|id| (id, Front::start())).collect();
        let addrs = fronts.iter().map(|(id, f)| (*id, f.addr.clone())).collect();
        let mut cluster = Cluster {
            router: Arc::new(LocalRouter::default()),
            compaction,
            tick,
            dbs: BTreeMap::new(),
            voters: (1..=size).collect(),
            members: BTreeMap::new(),
            serving: Some(Serving {
                fronts,
                members: Arc::new(Members::in_memory(addrs)),
                stops: BTreeMap::new(),
            }),
            _root: tempfile::tempdir().unwrap(),
        };
        for id in cluster.voters.clone() {
            cluster.start(id);
        }
        cluster
    }

    /// The members' stable Store addresses (empty unless made by [`Cluster::serving`]).
    pub fn endpoints(&self) -> Vec<String> {
        self.serving
            .iter()
            .flat_map(|s| s.fronts.values().map(|f| f.addr.clone()))
            .collect()
    }

    /// The proxy in front of member `id`'s Store service (clusters made by
    /// [`Cluster::serving`] only).
    pub fn front(&self, id: u64) -> Option<&Front> {
        self.serving.as_ref().and_then(|s| s.fronts.get(&id))
    }

    pub fn start(&mut self, id: u64) {
        self.start_with(id, self.voters.clone());
    }

    /// Starts member `id`; `initial_voters` is empty for a member that joins.
    fn start_with(&mut self, id: u64, initial_voters: Vec<u64>) {
        let dir = self._root.path().join(format!("m{id}"));
        let db = self
            .dbs
            .entry(id)
            .or_insert_with(|| sled::open(&dir).unwrap())
            .clone();
        let store = Arc::new(SledKvStore::open_in(db.clone(), KvLimits::default()).unwrap());
        let settings = RaftSettings {
            compact_after: self.compaction.0,
            keep_entries: self.compaction.1,
            tick: self.tick,
            storage_stall: Duration::from_secs(5),
            ..RaftSettings::new(id, initial_voters)
        };
        let node = RaftNode::start(
            settings,
            db,
            store.clone(),
            Arc::new(Members::in_memory(BTreeMap::new())),
            self.router.clone(),
        )
        .unwrap();
        self.router.register(id, node.driver());
        // 5 s at the default 100 ms tick: long enough for an election or two.
        let backend =
            RaftKvBackend::new(node.driver(), store, self.tick * 50, node.leadership(), 2);
        // Leases expire by the leader's clock, whichever member leads.
        let keeper = meta_srv::lease_keeper::LeaseKeeper::new(
            backend.clone(),
            self.tick * 10,
            std::time::Duration::from_secs(300),
        );
        let (_keeper_stop, keeper_stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _keep = _keeper_stop;
            keeper.run(keeper_stopped).await;
        });
        if let Some(serving) = &mut self.serving {
            let (addr, stop) = serve_store(id, &node, backend.clone(), serving.members.clone());
            serving.fronts[&id].point_to(Some(addr));
            serving.stops.insert(id, stop);
        }
        self.members.insert(id, Member { node, backend });
    }

    /// Stops member `id`: its driver ends and it leaves the router; its Store service
    /// stops and its clients' connections break.
    pub fn kill(&mut self, id: u64) {
        self.router.unregister(id);
        self.members.remove(&id);
        if let Some(serving) = &mut self.serving {
            serving.fronts[&id].point_to(None);
            serving.fronts[&id].cut_and_heal();
            if let Some(stop) = serving.stops.remove(&id) {
                let _ = stop.send(true);
            }
        }
    }

    pub fn backend(&self, id: u64) -> &RaftKvBackend {
        &self.members[&id].backend
    }

    async fn statuses(&self) -> Vec<RaftStatus> {
        let mut out = Vec::new();
        for member in self.members.values() {
            out.push(member.node.status().await.unwrap());
        }
        out
    }

    /// Waits until the live members among `among` agree on one leader among them.
    async fn leader_among(&self, among: &[u64]) -> u64 {
        wait_until(ELECTION_BOUND, || async {
            let statuses: Vec<RaftStatus> = self
                .statuses()
                .await
                .into_iter()
                .filter(|s| among.contains(&s.id))
                .collect();
            let leaders: Vec<u64> = statuses
                .iter()
                .filter(|s| s.role == "leader")
                .map(|s| s.id)
                .collect();
            match leaders[..] {
                [leader] if statuses.iter().all(|s| s.leader_id == leader) => Ok(leader),
                _ => Err(format!("no agreed leader: {statuses:?}")),
            }
        })
        .await
    }

    pub async fn leader(&self) -> u64 {
        let live: Vec<u64> = self.members.keys().copied().collect();
        self.leader_among(&live).await
    }

    /// Member `id`'s commit index now.
    pub async fn commit_index(&self, id: u64) -> u64 {
        self.members[&id].node.status().await.unwrap().commit_index
    }

    /// Waits until member `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) {
        wait_until(ELECTION_BOUND, || async {
            let status = self.members[&id].node.status().await.unwrap();
            check(status.applied_index >= index, || {
                format!("member {id} stuck at {status:?}, want {index}")
            })
        })
        .await;
    }
}

/// Serves member `id`'s Store API on an ephemeral port until the returned sender says
/// stop; returns the address.
fn serve_store(
    id: u64,
    node: &RaftNode,
    backend: RaftKvBackend,
    members: Arc<Members>,
) -> (String, tokio::sync::watch::Sender<bool>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let keeper = Arc::new(SessionKeeper::new(backend.clone(), node.leadership()));
    let sweeper = keeper.clone();
    let sweep_until = stopped.clone();
    tokio::spawn(async move { sweeper.run(sweep_until).await });
    let watch = meta_srv::service::watch::WatchService::new(backend.clone(), id, stopped.clone());
    let mut until = stopped;
    let service = StoreService::new(
        backend,
        keeper,
        node.driver(),
        id,
        KvLimits::default(),
        members,
    );
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(meta_proto::v1::store_server::StoreServer::new(service))
            .add_service(meta_proto::v1::watch_server::WatchServer::new(watch))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    let _ = until.wait_for(|s| *s).await;
                },
            )
            .await;
    });
    (addr, stop)
}

/// Writes `{prefix}{i:03}` = `value(i)` for each `i` of `range`, all acknowledged.
async fn put_many(
    backend: &RaftKvBackend,
    prefix: &str,
    range: std::ops::Range<usize>,
    value: impl Fn(usize) -> String,
) {
    for i in range {
        put(backend, &format!("{prefix}{i:03}"), &value(i))
            .await
            .unwrap();
    }
}

pub async fn put(backend: &RaftKvBackend, key: &str, value: &str) -> Result<i64, Error> {
    backend
        .put(PutRequest::new(key, value))
        .await
        .map(|r| r.revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_group_passes_conformance() {
    let cluster = Cluster::new(1);
    let leader = cluster.leader().await;
    assert_eq!(leader, 1);
    conformance::run_all(cluster.backend(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_group_passes_conformance_and_replicates() {
    let cluster = Cluster::new(3);
    let leader = cluster.leader().await;
    conformance::run_all(cluster.backend(leader)).await;
    let status = cluster.members[&leader].node.status().await.unwrap();
    for id in [1, 2, 3] {
        cluster.wait_applied(id, status.commit_index).await;
        let local = cluster
            .backend(id)
            .read_local(common_meta::kv::TxnRequest {
                success: vec![common_meta::kv::TxnOp::Range(RangeRequest::key("cas/k"))],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            local.revision,
            cluster.backend(leader).local_revision(),
            "member {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_refuse_with_the_leader_hint() {
    let cluster = Cluster::new(3);
    let leader = cluster.leader().await;
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let err = put(cluster.backend(follower), "k", "v").await.unwrap_err();
    assert!(
        matches!(err, Error::NotLeader { leader: Some(l) } if l == leader),
        "{err}"
    );
    let err = cluster.backend(follower).get(b"k").await.unwrap_err();
    assert!(
        matches!(err, Error::NotLeader { .. }),
        "linearizable reads need the leader: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_no_acknowledged_write_is_lost() {
    let mut cluster = Cluster::new(3);
    let first = cluster.leader().await;
    put_many(cluster.backend(first), "w/", 0..50, |_| "before".into()).await;

    tracing::info!("--- the leader is killed");
    cluster.kill(first);
    let second = cluster.leader().await;
    assert_ne!(second, first);
    // A new leader serves linearizable reads as soon as its term has a committed entry
    // (raft drops ReadIndex before that; the driver holds reads until then).
    let read = tokio::time::timeout(
        Duration::from_secs(3),
        cluster.backend(second).get(b"w/000"),
    )
    .await
    .expect("a read right after the election is answered promptly")
    .unwrap();
    assert_eq!(read.unwrap().value, b"before");
    put_many(cluster.backend(second), "w/", 50..100, |_| "after".into()).await;

    tracing::info!("--- it restarts and catches up from its log and the leader");
    cluster.start(first);
    let all = cluster
        .backend(second)
        .range(RangeRequest::prefix("w/"))
        .await
        .unwrap();
    assert_eq!(all.count, 100, "every acknowledged write is there");
    let commit = cluster.commit_index(second).await;
    cluster.wait_applied(first, commit).await;
    let local = cluster
        .backend(first)
        .read_local(common_meta::kv::TxnRequest {
            success: vec![common_meta::kv::TxnOp::Range(RangeRequest::prefix("w/"))],
            ..Default::default()
        })
        .await
        .unwrap();
    match &local.responses[0] {
        common_meta::kv::TxnOpResponse::Range(r) => assert_eq!(r.count, 100),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_cannot_commit_or_read_and_heals() {
    let cluster = Cluster::new(3);
    let old = cluster.leader().await;
    put(cluster.backend(old), "p/0", "x").await.unwrap();

    tracing::info!("--- the leader is cut off from both followers");
    cluster.router.isolate(old);
    let majority: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != old).collect();
    let new = cluster.leader_among(&majority).await;
    put(cluster.backend(new), "p/1", "majority").await.unwrap();

    // The old leader steps down (check-quorum) or times out; either way nothing commits.
    // Refused before proposing, it is "not leader"; proposed, then lost, it is an
    // outcome unknown (never a plain "unavailable", which would claim nothing applied).
    let err = put(cluster.backend(old), "p/2", "minority")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotLeader { .. }) || err.is_outcome_unknown(),
        "{err}"
    );
    let err = cluster.backend(old).get(b"p/1").await.unwrap_err();
    assert!(
        err.is_retryable(),
        "no linearizable read in the minority: {err}"
    );

    tracing::info!("--- heal: the old leader follows and converges");
    cluster.router.heal();
    let leader = cluster.leader().await;
    let all = cluster
        .backend(leader)
        .range(RangeRequest::prefix("p/"))
        .await
        .unwrap();
    let keys: Vec<_> = all
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    assert_eq!(keys, ["p/0", "p/1"], "the minority's write never happened");
    let commit = cluster.commit_index(leader).await;
    cluster.wait_applied(old, commit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_can_be_transferred() {
    let cluster = Cluster::new(3);
    let old = cluster.leader().await;
    put(cluster.backend(old), "t", "1").await.unwrap();
    let target = [1, 2, 3].into_iter().find(|&id| id != old).unwrap();
    let commit = cluster.commit_index(old).await;
    cluster.wait_applied(target, commit).await;
    cluster.members[&old]
        .node
        .driver()
        .send(meta_srv::raft::driver::Command::TransferLeader { to: target })
        .unwrap();
    wait_until(ELECTION_BOUND, || async {
        let leader = cluster.leader().await;
        check(leader == target, || {
            format!("leadership did not move to {target}: {leader} leads")
        })
    })
    .await;
    put(cluster.backend(target), "t", "2").await.unwrap();
    assert_eq!(
        cluster
            .backend(target)
            .get(b"t")
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

async fn change(
    cluster: &Cluster,
    leader: u64,
    change: MembershipChange,
) -> Result<Membership, Error> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    cluster.members[&leader]
        .node
        .driver()
        .send(Command::ChangeMembership { change, reply })
        .unwrap();
    tokio::time::timeout(ELECTION_BOUND, answer)
        .await
        .expect("membership change answered in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_learner_promote_and_remove() {
    let mut cluster = Cluster::new(3);
    let leader = cluster.leader().await;
    put_many(cluster.backend(leader), "m/", 0..20, |_| "v".into()).await;

    tracing::info!("--- member 4 joins as a learner and receives the whole log");
    let membership = change(
        &cluster,
        leader,
        MembershipChange::AddLearner {
            id: 4,
            addr: "a:4".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(membership.learners, [4]);
    cluster.start_with(4, Vec::new());
    let commit = cluster.commit_index(leader).await;
    cluster.wait_applied(4, commit).await;
    assert_eq!(
        cluster.members[&4].node.status().await.unwrap().learners,
        [4]
    );

    tracing::info!("--- bad changes are refused with a reason");
    for (bad, want) in [
        (
            MembershipChange::AddLearner {
                id: 4,
                addr: "a:4".into(),
            },
            "already exists",
        ),
        (MembershipChange::Promote { id: 2 }, "is not a learner"),
        (MembershipChange::Remove { id: 9 }, "unknown member 9"),
        (
            MembershipChange::Remove { id: leader },
            "transfer leadership first",
        ),
    ] {
        let err = change(&cluster, leader, bad).await.unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let err = change(&cluster, follower, MembershipChange::Promote { id: 4 })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err}");

    tracing::info!("--- it is promoted, then a follower is removed");
    let membership = change(&cluster, leader, MembershipChange::Promote { id: 4 })
        .await
        .unwrap();
    assert_eq!(membership.voters, [1, 2, 3, 4]);
    let removed = follower;
    let membership = change(&cluster, leader, MembershipChange::Remove { id: removed })
        .await
        .unwrap();
    assert!(!membership.voters.contains(&removed));
    assert_eq!(membership.voters.len(), 3);

    tracing::info!("--- the removed member keeps running but cannot disrupt the cluster");
    let term = cluster.members[&leader].node.status().await.unwrap().term;
    // Write for longer than two maximal election timeouts (2 x 2 s).
    let started = Instant::now();
    let mut writes = 0;
    while started.elapsed() < Duration::from_secs(5) {
        put(
            cluster.backend(leader),
            "after-removal",
            &writes.to_string(),
        )
        .await
        .unwrap();
        writes += 1;
    }
    let now = cluster.members[&leader].node.status().await.unwrap();
    assert_eq!(
        (now.role, now.term),
        ("leader", term),
        "no election was forced"
    );
    let err = put(cluster.backend(removed), "x", "y").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_and_new_members_catch_up_by_snapshot_after_compaction() {
    let mut cluster = Cluster::with_compaction(3, (20, 5));
    let leader = cluster.leader().await;
    let lagging = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    tracing::info!("--- member {lagging} is stopped; the others write and compact");
    cluster.kill(lagging);
    put_many(cluster.backend(leader), "s/", 0..120, |i| i.to_string()).await;
    change(
        &cluster,
        leader,
        MembershipChange::AddLearner {
            id: 4,
            addr: "a:4".into(),
        },
    )
    .await
    .unwrap();
    let first = cluster.members[&leader].node.status().await.unwrap();
    assert!(first.commit_index > 100);

    tracing::info!("--- the lagging member restarts and a new learner starts empty");
    cluster.start(lagging);
    cluster.start_with(4, Vec::new());
    let commit = cluster.commit_index(leader).await;
    for id in [lagging, 4] {
        cluster.wait_applied(id, commit).await;
        let local = cluster
            .backend(id)
            .range_serializable(RangeRequest::prefix("s/"))
            .await
            .unwrap();
        assert_eq!(local.count, 120, "member {id} has every key");
        assert_eq!(local.kvs[119].value, b"119");
        let status = cluster.members[&id].node.status().await.unwrap();
        assert_eq!(
            status.voters.len(),
            3,
            "member {id} learned the configuration"
        );
        assert_eq!(status.learners, [4]);
        assert!(
            status.first_index > 1,
            "member {id} started from a snapshot: {status:?}"
        );
    }
    // Both keep following the log after the snapshot.
    put(cluster.backend(leader), "s/after", "x").await.unwrap();
    let commit = cluster.commit_index(leader).await;
    cluster.wait_applied(4, commit).await;
    cluster.wait_applied(lagging, commit).await;
}

mod procedures;
