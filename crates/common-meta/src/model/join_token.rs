//! Join tokens: one-use credentials a node presents in its heartbeat handshake when the
//! cluster has a secret.
//!
//! A token is `mjt1.{node_id}.{expires_at_ms}.{nonce}.{mac}`, where `mac` is
//! HMAC-SHA256 keyed by the cluster secret over everything before it. Only a holder of
//! the secret can make one ([`JoinTokenSigner`]: `metactl token create` with the
//! secret), and a token names the one node it admits. The cluster accepts a token only
//! when it verifies against its own secret, and stores only the token's SHA-256, under
//! `__join_token/{sha256 hex}`, with its node, expiry and whether it was used.
//!
//! Admission rules (see [`decide`]):
//! - a token must verify against the secret, name the joining node, and be registered;
//! - an unused, unexpired token is consumed in the same transaction that registers the
//!   node (which records the token's hash), so two joiners cannot both use it;
//! - the node it admitted may present it again while it stays registered with it (a
//!   restart or a new leader is not a new join), also after expiry; any other use of a
//!   used token is refused, and once the node is removed or has joined again with
//!   another token it is spent for good.
//!
//! Records of tokens that expired unused are deleted a day after their expiry, when
//! later tokens are registered.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::hex::encode as hex;
use crate::kv::{
    Compare, CompareOp, CompareTarget, DeleteRangeRequest, KvBackend, PutRequest, RangeRequest,
    TxnOp, TxnRequest,
};
use crate::model::node::{NodeInfo, NodeManager};

/// Version tag at the start of every token.
const TAG: &str = "mjt1";
/// Where token records live.
const PREFIX: &str = "__join_token";
/// Most expired records deleted by one token registration.
const SWEEP_BATCH: usize = 64;
/// How long after its expiry an unused token's record is kept, so that a late joiner
/// is told "expired" rather than "not registered".
const KEEP_EXPIRED_MS: u64 = 24 * 3_600_000;
/// Shortest cluster secret accepted, bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// What the cluster stores about a token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// The node the token admits.
    pub node_id: u64,
    /// When it stops admitting a first join, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// True once a node joined with it.
    pub used: bool,
}

/// The parts of a token whose MAC verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The node it admits.
    pub node_id: u64,
    /// When it expires, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// Its SHA-256, hex: what the cluster stores and a node's record names.
    pub hash: String,
}

impl VerifiedToken {
    fn key(&self) -> Vec<u8> {
        format!("{PREFIX}/{}", self.hash).into_bytes()
    }
}

/// What a valid token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A first join: consume the token with the registration.
    Consume,
    /// The node that used the token comes back: register without a write to the token.
    Return,
}

fn unauthenticated(message: String) -> Error {
    Error::Unauthenticated { message }
}

/// Makes and verifies tokens with one cluster secret (no storage).
#[derive(Clone)]
pub struct JoinTokenSigner {
    secret: Vec<u8>,
}

impl std::fmt::Debug for JoinTokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("JoinTokenSigner { .. }")
    }
}

impl JoinTokenSigner {
    /// A signer keyed by `secret` (at least [`MIN_SECRET_BYTES`]).
    pub fn new(secret: &[u8]) -> Result<Self> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(Error::invalid_argument(format!(
                "the cluster secret has {} bytes; use at least {MIN_SECRET_BYTES}",
                secret.len()
            )));
        }
        Ok(JoinTokenSigner {
            secret: secret.to_vec(),
        })
    }

    /// A new token for `node_id` that expires at `expires_at_ms`.
    pub fn mint(&self, node_id: u64, expires_at_ms: u64) -> Result<String> {
        if node_id == 0 {
            return Err(Error::invalid_argument("node ids start at 1"));
        }
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| Error::Io {
            context: "drawing a join token nonce".to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let body = format!("{TAG}.{node_id}.{expires_at_ms}.{}", hex(&nonce));
        Ok(crate::signed::seal(&self.secret, &body))
    }

    /// Checks `token`'s form and MAC, and that it names `node_id` when one is given.
    pub fn verify(&self, token: &str, node_id: Option<u64>) -> Result<VerifiedToken> {
        let who = node_id.map_or_else(String::new, |id| format!("node {id}: "));
        let invalid = || {
            unauthenticated(format!(
                "{who}the join token is not valid for this cluster (not made with its secret)"
            ))
        };
        let body = crate::signed::open(&self.secret, token).map_err(|_| invalid())?;
        let mut parts = body.split('.');
        let (Some(TAG), Some(id), Some(expires), Some(_nonce), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid());
        };
        let (Ok(id), Ok(expires_at_ms)) = (id.parse::<u64>(), expires.parse::<u64>()) else {
            return Err(invalid());
        };
        if let Some(node_id) = node_id
            && id != node_id
        {
            return Err(unauthenticated(format!(
                "the join token is for node {id}, not node {node_id}"
            )));
        }
        Ok(VerifiedToken {
            node_id: id,
            expires_at_ms,
            hash: hex(&Sha256::digest(token.as_bytes())),
        })
    }
}

/// The cluster's side of join tokens: registering the ones made with its secret and
/// admitting nodes with them.
pub struct JoinTokens {
    signer: JoinTokenSigner,
    kv: Arc<dyn KvBackend>,
}

impl JoinTokens {
    /// Tokens checked with `secret` (at least [`MIN_SECRET_BYTES`]), recorded in `kv`.
    pub fn new(secret: &[u8], kv: Arc<dyn KvBackend>) -> Result<Self> {
        Ok(JoinTokens {
            signer: JoinTokenSigner::new(secret)?,
            kv,
        })
    }

    /// Records `token` (made by a holder of the secret) so that its node may join with
    /// it; registering the same token again changes nothing.
    pub async fn register(&self, token: &str, now_ms: u64) -> Result<VerifiedToken> {
        let verified = self.signer.verify(token, None)?;
        if now_ms >= verified.expires_at_ms {
            return Err(Error::invalid_argument(format!(
                "the join token for node {} has already expired",
                verified.node_id
            )));
        }
        let record = JoinTokenRecord {
            node_id: verified.node_id,
            expires_at_ms: verified.expires_at_ms,
            used: false,
        };
        let key = verified.key();
        // Create only: a used token must never become unused again.
        self.kv
            .txn(TxnRequest {
                compare: vec![Compare::new(
                    key.clone(),
                    CompareOp::Equal,
                    CompareTarget::CreateRevision(0),
                )],
                success: vec![TxnOp::Put(PutRequest::new(key, encode(&record)?))],
                failure: Vec::new(),
            })
            .await?;
        self.sweep(now_ms).await?;
        Ok(verified)
    }

    /// Deletes the records of tokens that expired unused more than [`KEEP_EXPIRED_MS`]
    /// ago (at most [`SWEEP_BATCH`] per call), so they do not pile up. Used tokens stay:
    /// a node's record names its own.
    async fn sweep(&self, now_ms: u64) -> Result<()> {
        let records = self
            .kv
            .range(RangeRequest::prefix(format!("{PREFIX}/")))
            .await?;
        let expired = records.kvs.iter().filter(|kv| {
            decode(&kv.key, &kv.value).is_ok_and(|record| {
                !record.used && record.expires_at_ms.saturating_add(KEEP_EXPIRED_MS) <= now_ms
            })
        });
        for kv in expired.take(SWEEP_BATCH) {
            // Only if still as read: a record consumed meanwhile is kept.
            self.kv
                .txn(TxnRequest {
                    compare: vec![Compare::new(
                        kv.key.clone(),
                        CompareOp::Equal,
                        CompareTarget::ModRevision(kv.mod_revision),
                    )],
                    success: vec![TxnOp::DeleteRange(DeleteRangeRequest::key(kv.key.clone()))],
                    failure: Vec::new(),
                })
                .await?;
        }
        Ok(())
    }

    /// Registers `reported` (as [`NodeManager::register`]) if `token` admits it at
    /// `now_ms`; a first join consumes the token in the same transaction, and the node's
    /// record names the token.
    pub async fn admit(
        &self,
        nodes: &NodeManager,
        reported: &NodeInfo,
        token: &str,
        now_ms: u64,
    ) -> Result<NodeInfo> {
        if token.is_empty() {
            return Err(unauthenticated(format!(
                "node {0} has no join token; this cluster requires one \
                 (metactl token create --node {0})",
                reported.id
            )));
        }
        let verified = self.signer.verify(token, Some(reported.id))?;
        let key = verified.key();
        let reported = NodeInfo {
            join_token: Some(verified.hash.clone()),
            ..reported.clone()
        };
        loop {
            // One snapshot of the token and the node for the decision, and the
            // transaction compares both against it.
            let stored = self.kv.get(&key).await?;
            let record = stored
                .as_ref()
                .map(|kv| decode(&kv.key, &kv.value))
                .transpose()?;
            let existing = nodes.get_with_revision(reported.id).await?;
            let node = existing.as_ref().map(|(info, _)| info);
            let admission = decide(record.as_ref(), &verified, node, now_ms)?;
            let token_revision = stored.as_ref().map_or(0, |kv| kv.mod_revision);
            let compares = vec![Compare::new(
                key.clone(),
                CompareOp::Equal,
                CompareTarget::ModRevision(token_revision),
            )];
            let ops = match (admission, record) {
                (Admission::Consume, Some(record)) => vec![TxnOp::Put(PutRequest::new(
                    key.clone(),
                    encode(&JoinTokenRecord {
                        used: true,
                        ..record
                    })?,
                ))],
                _ => Vec::new(),
            };
            if let Some(info) = nodes
                .register_over(existing, &reported, compares, ops)
                .await?
            {
                return Ok(info);
            }
            // The node or the token changed meanwhile: decide again on fresh state.
        }
    }
}

/// Whether a verified token admits its node at `now_ms`, given its stored record (if
/// any) and the node's current registration (if any).
pub fn decide(
    record: Option<&JoinTokenRecord>,
    token: &VerifiedToken,
    node: Option<&NodeInfo>,
    now_ms: u64,
) -> Result<Admission> {
    let id = token.node_id;
    let admitted_by_it = node.is_some_and(|n| n.join_token.as_deref() == Some(&token.hash));
    match record {
        None => Err(unauthenticated(format!(
            "node {id}: the join token is not registered with this cluster \
             (metactl token create registers the tokens it prints)"
        ))),
        Some(record) if record.used && admitted_by_it => Ok(Admission::Return),
        Some(record) if record.used => Err(unauthenticated(format!(
            "node {id}: the join token was already used; create a new one"
        ))),
        Some(record) if now_ms >= record.expires_at_ms => Err(unauthenticated(format!(
            "node {id}: the join token expired {} s ago; create a new one",
            (now_ms - record.expires_at_ms) / 1000
        ))),
        Some(_) => Ok(Admission::Consume),
    }
}

fn encode(record: &JoinTokenRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(record)
        .map_err(|e| Error::invalid_argument(format!("encoding a join token record: {e}")))
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<JoinTokenRecord> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupted {
        location: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::kv::MemoryKvBackend;
    use crate::model::node::{NodeRole, NodeState};

    const SECRET: &[u8] = b"0123456789abcdef-secret";

    fn node(id: u64) -> NodeInfo {
        NodeInfo {
            id,
            role: NodeRole::Datanode,
            addr: format!("dn{id}:4001"),
            labels: BTreeMap::new(),
            state: NodeState::Joining,
            version: "1".to_string(),
            start_time_ms: 1,
            join_token: None,
        }
    }

    #[test]
    fn verify_refuses_forgeries_and_other_nodes() {
        let signer = JoinTokenSigner::new(SECRET).unwrap();
        let token = signer.mint(7, 1_000).unwrap();
        let verified = signer.verify(&token, Some(7)).unwrap();
        assert_eq!((verified.node_id, verified.expires_at_ms), (7, 1_000));
        assert_eq!(signer.verify(&token, None).unwrap(), verified);
        let other = JoinTokenSigner::new(b"another secret of 16+ bytes").unwrap();
        let forged_expiry = token.replacen(".1000.", ".9999999.", 1);
        let cases: [(&str, u64, &str); 6] = [
            (&token, 8, "is for node 7, not node 8"),
            (&forged_expiry, 7, "not valid"),
            ("", 7, "not valid"),
            ("mjt1.7.1000", 7, "not valid"),
            ("garbage.zz", 7, "not valid"),
            (&token[..token.len() - 2], 7, "not valid"),
        ];
        for (candidate, node, want) in cases {
            let err = signer
                .verify(candidate, Some(node))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{candidate:?}: {err}");
        }
        let err = other.verify(&token, Some(7)).unwrap_err().to_string();
        assert!(err.contains("not valid"), "{err}");
        assert!(JoinTokenSigner::new(b"short").is_err());
        assert!(signer.mint(0, 1).is_err());
        assert_eq!(format!("{signer:?}"), "JoinTokenSigner { .. }");
    }

    #[test]
    fn decisions() {
        let token = VerifiedToken {
            node_id: 7,
            expires_at_ms: 1_000,
            hash: "h1".to_string(),
        };
        let fresh = JoinTokenRecord {
            node_id: 7,
            expires_at_ms: 1_000,
            used: false,
        };
        let used = JoinTokenRecord {
            used: true,
            ..fresh.clone()
        };
        let with = |hash: Option<&str>| NodeInfo {
            join_token: hash.map(str::to_string),
            ..node(7)
        };
        let (by_it, by_other, plain) = (with(Some("h1")), with(Some("h2")), with(None));
        // Each case: record, the node's registration, now, and the admission or an
        // error fragment.
        type Case<'a> = (
            Option<&'a JoinTokenRecord>,
            Option<&'a NodeInfo>,
            u64,
            Result<Admission, &'a str>,
        );
        let cases: [Case; 8] = [
            (Some(&fresh), None, 999, Ok(Admission::Consume)),
            (Some(&fresh), Some(&plain), 999, Ok(Admission::Consume)),
            (Some(&fresh), None, 1_000, Err("expired")),
            (Some(&used), Some(&by_it), 5_000, Ok(Admission::Return)),
            (Some(&used), None, 10, Err("already used")),
            (Some(&used), Some(&by_other), 10, Err("already used")),
            (Some(&used), Some(&plain), 10, Err("already used")),
            (None, None, 10, Err("not registered with this cluster")),
        ];
        for (record, node, now, want) in cases {
            let got = decide(record, &token, node, now);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w),
                (Err(w), Err(g)) => assert!(g.to_string().contains(w), "{g}"),
                (w, g) => panic!("{record:?} {node:?} {now}: wanted {w:?}, got {g:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_token_admits_once_and_then_only_the_node_it_admitted() {
        let kv: Arc<dyn KvBackend> = Arc::new(MemoryKvBackend::default());
        let nodes = NodeManager::new(kv.clone());
        let tokens = JoinTokens::new(SECRET, kv.clone()).unwrap();
        let signer = JoinTokenSigner::new(SECRET).unwrap();
        let err = tokens.admit(&nodes, &node(7), "", 0).await.unwrap_err();
        assert!(
            err.to_string().contains("metactl token create --node 7"),
            "{err}"
        );
        let token = signer.mint(7, 61_000).unwrap();
        let err = tokens.admit(&nodes, &node(7), &token, 0).await.unwrap_err();
        assert!(err.to_string().contains("not registered"), "{err}");
        let foreign = JoinTokenSigner::new(b"not this cluster's secret").unwrap();
        let err = tokens
            .register(&foreign.mint(7, 61_000).unwrap(), 1_000)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not valid"), "{err}");
        let err = tokens.register(&token, 70_000).await.unwrap_err();
        assert!(err.to_string().contains("already expired"), "{err}");
        tokens.register(&token, 1_000).await.unwrap();
        // Only the hash is stored.
        let stored = kv
            .range(crate::kv::RangeRequest::prefix(PREFIX))
            .await
            .unwrap();
        assert_eq!(stored.kvs.len(), 1);
        assert!(!String::from_utf8_lossy(&stored.kvs[0].value).contains(&token));
        assert!(!String::from_utf8_lossy(&stored.kvs[0].key).contains(&token));

        let info = tokens.admit(&nodes, &node(7), &token, 2_000).await.unwrap();
        assert!(info.join_token.is_some());
        // Registering it again cannot make it unused.
        tokens.register(&token, 3_000).await.unwrap();
        // The node comes back (restart, new leader): still admitted, even after expiry.
        tokens
            .admit(&nodes, &node(7), &token, 90_000)
            .await
            .unwrap();

        // It leaves and joins again with a second token: the first is spent for good.
        for state in [
            NodeState::Active,
            NodeState::Draining,
            NodeState::Decommissioned,
        ] {
            nodes.set_state(7, state).await.unwrap();
        }
        nodes.remove(7).await.unwrap();
        let err = tokens
            .admit(&nodes, &node(7), &token, 3_000)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already used"), "{err}");
        let second = signer.mint(7, 61_000).unwrap();
        tokens.register(&second, 3_000).await.unwrap();
        // Tokens that expire unused are swept when later ones are registered.
        let unused = signer.mint(8, 5_000).unwrap();
        tokens.register(&unused, 3_000).await.unwrap();
        let count = |kv: Arc<dyn KvBackend>| async move {
            kv.range(crate::kv::RangeRequest::prefix(PREFIX))
                .await
                .unwrap()
                .kvs
                .len()
        };
        assert_eq!(count(kv.clone()).await, 3);
        tokens
            .register(&signer.mint(9, 99_000).unwrap(), 6_000)
            .await
            .unwrap();
        assert_eq!(count(kv.clone()).await, 4, "8's expired a moment ago: kept");
        let later = 5_000 + KEEP_EXPIRED_MS;
        tokens
            .register(&signer.mint(10, later + 99_000).unwrap(), later)
            .await
            .unwrap();
        assert_eq!(
            count(kv.clone()).await,
            4,
            "8's swept; 7's used first and recently expired second, 9's and 10's remain"
        );
        let err = tokens
            .admit(&nodes, &node(8), &unused, 7_000)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not registered"), "{err}");
        tokens
            .admit(&nodes, &node(7), &second, 4_000)
            .await
            .unwrap();
        let err = tokens
            .admit(&nodes, &node(7), &token, 5_000)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already used"), "{err}");
    }
}
