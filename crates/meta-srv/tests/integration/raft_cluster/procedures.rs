//! A procedure started on the leader is finished by the next leader.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use common_meta::kv::{CompareAndPutRequest, KvBackend, KvLimits};
use meta_srv::procedure_host::{LoaderRegistry, ProcedureHost};
use procedure::{
    BoxedProcedure, Context, ManagerConfig, Procedure, ProcedureManager, ProcedureState,
    ProcedureWithId, Status,
};

use super::*;

/// Steps that each record an effect with a compare-and-put (so a re-run step does
/// not apply twice), pausing after step 1 until the gate opens.
struct Effects {
    next: u32,
    kv: Arc<dyn KvBackend>,
    gate: Arc<AtomicBool>,
}

const STEPS: u32 = 4;

#[async_trait]
impl Procedure for Effects {
    fn type_name(&self) -> &str {
        "test.Effects"
    }

    async fn execute(&mut self, _ctx: &Context) -> procedure::Result<Status> {
        if self.next == STEPS {
            return Ok(Status::Done {
                output: Some("all effects".into()),
            });
        }
        if self.next == 2 && !self.gate.load(Ordering::SeqCst) {
            return Err(procedure::Error::retry_later("the gate is closed"));
        }
        self.kv
            .compare_and_put(CompareAndPutRequest {
                key: format!("eff/{}", self.next).into_bytes(),
                expect: None,
                value: b"1".to_vec(),
            })
            .await
            .map_err(|e| procedure::Error::retry_later(e.to_string()))?;
        self.next += 1;
        Ok(Status::Executing { persist: true })
    }

    fn dump(&self) -> procedure::Result<String> {
        Ok(self.next.to_string())
    }
}

fn host(cluster: &Cluster, id: u64, gate: &Arc<AtomicBool>) -> ProcedureHost {
    let member = &cluster.members[&id];
    let kv: Arc<dyn KvBackend> = Arc::new(member.backend.clone());
    let (loader_kv, gate) = (kv.clone(), gate.clone());
    let loaders: LoaderRegistry = Arc::new(move |manager: &ProcedureManager| {
        let (kv, gate) = (loader_kv.clone(), gate.clone());
        manager.register_loader(
            "test.Effects",
            Box::new(move |data: &str| {
                let next = data
                    .parse()
                    .map_err(|_| procedure::Error::external("bad state"))?;
                Ok(Box::new(Effects {
                    next,
                    kv: kv.clone(),
                    gate: gate.clone(),
                }) as BoxedProcedure)
            }),
        )
    });
    let config = ManagerConfig {
        retry_delay: Duration::from_millis(20),
        max_retry_delay: Duration::from_millis(50),
        max_retries: 1000,
        ..ManagerConfig::default()
    };
    ProcedureHost::start(
        member.node.leadership(),
        kv,
        KvLimits::default(),
        config,
        loaders,
    )
}

async fn leading_manager(hosts: &BTreeMap<u64, ProcedureHost>, leader: u64) -> ProcedureManager {
    wait_until(ELECTION_BOUND, || async {
        hosts[&leader]
            .manager()
            .ok_or_else(|| format!("member {leader} runs no procedure manager"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_procedure_survives_the_death_of_its_leader() {
    let mut cluster = Cluster::new(3);
    let gate = Arc::new(AtomicBool::new(false));
    let mut hosts: BTreeMap<u64, ProcedureHost> = [1, 2, 3]
        .into_iter()
        .map(|id| (id, host(&cluster, id, &gate)))
        .collect();
    let first = cluster.leader().await;
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != first).collect();
    for id in &followers {
        assert!(
            hosts[id].manager().is_none(),
            "only the leader runs procedures"
        );
    }

    tracing::info!("--- the leader starts a procedure; it stops at the closed gate");
    let manager = leading_manager(&hosts, first).await;
    let kv = Arc::new(cluster.backend(first).clone());
    manager
        .submit(ProcedureWithId {
            id: "effects".into(),
            procedure: Box::new(Effects {
                next: 0,
                kv,
                gate: gate.clone(),
            }),
        })
        .await
        .unwrap();
    wait_until(ELECTION_BOUND, || async {
        let step = manager.state("effects").await.unwrap().unwrap().step;
        check(step >= 2, || {
            format!("the first two steps did not persist: step {step}")
        })
    })
    .await;

    tracing::info!("--- the leader dies; the gate opens; the next leader finishes it");
    hosts.remove(&first);
    cluster.kill(first);
    gate.store(true, Ordering::SeqCst);
    let second = cluster.leader_among(&followers).await;
    let manager = leading_manager(&hosts, second).await;
    let output = tokio::time::timeout(ELECTION_BOUND, manager.watch("effects").unwrap().wait())
        .await
        .expect("finished in time")
        .unwrap();
    assert_eq!(output.as_deref(), Some("all effects"));
    let record = manager.state("effects").await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.step),
        (ProcedureState::Done, STEPS as u64 + 1)
    );
    for step in 0..STEPS {
        let kv = cluster
            .backend(second)
            .get(format!("eff/{step}").as_bytes())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kv.version, 1, "effect {step} happened exactly once");
    }
}
