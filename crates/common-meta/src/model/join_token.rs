//! Join tokens: one-use credentials a node presents in its heartbeat handshake when the
//! cluster has a secret.
//!
//! A token is `mjt1.{node_id}.{expires_at_ms}.{nonce}.{mac}`, where `mac` is
//! HMAC-SHA256 keyed by the cluster secret over everything before it, so only a holder
//! of the secret can mint one, and a token names the one node it admits. The cluster
//! stores only the token's SHA-256, under `__join_token/{sha256 hex}`, with its node,
//! expiry and whether it was used. Admission rules (see [`decide`]):
//!
//! - a token must verify against the secret and name the joining node;
//! - an unused, unexpired token is consumed in the same transaction that registers the
//!   node, so two joiners cannot both use it;
//! - a used token still admits the node that used it while that node stays registered
//!   (a restart or a new leader is not a new join); after the node is removed the token
//!   is spent for good.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::kv::{Compare, CompareOp, CompareTarget, KvBackend, PutRequest, TxnOp};
use crate::model::node::{NodeInfo, NodeManager};

/// Version tag at the start of every token.
const TAG: &str = "mjt1";
/// Where token records live.
const PREFIX: &str = "__join_token";
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
    /// The key of its record.
    pub key: Vec<u8>,
}

/// What a valid token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A first join: consume the token with the registration.
    Consume,
    /// The node that used the token comes back: register without a write to the token.
    Return,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn record_key(token: &str) -> Vec<u8> {
    format!("{PREFIX}/{}", hex(&Sha256::digest(token.as_bytes()))).into_bytes()
}

fn unauthenticated(message: String) -> Error {
    Error::Unauthenticated { message }
}

/// Mints and checks tokens with one cluster secret.
pub struct JoinTokens {
    secret: Vec<u8>,
    kv: Arc<dyn KvBackend>,
}

impl JoinTokens {
    /// Tokens keyed by `secret` (at least [`MIN_SECRET_BYTES`]), recorded in `kv`.
    pub fn new(secret: &[u8], kv: Arc<dyn KvBackend>) -> Result<Self> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(Error::invalid_argument(format!(
                "the cluster secret has {} bytes; use at least {MIN_SECRET_BYTES}",
                secret.len()
            )));
        }
        Ok(JoinTokens {
            secret: secret.to_vec(),
            kv,
        })
    }

    fn mac(&self, body: &str) -> Hmac<Sha256> {
        // HMAC accepts keys of any length: new_from_slice cannot fail for it.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(body.as_bytes());
        mac
    }

    /// A new token for `node_id` that expires at `expires_at_ms`, and its record.
    pub fn mint(&self, node_id: u64, expires_at_ms: u64) -> Result<(String, JoinTokenRecord)> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| Error::Io {
            context: "drawing a join token nonce".to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let body = format!("{TAG}.{node_id}.{expires_at_ms}.{}", hex(&nonce));
        let mac = hex(&self.mac(&body).finalize().into_bytes());
        let record = JoinTokenRecord {
            node_id,
            expires_at_ms,
            used: false,
        };
        Ok((format!("{body}.{mac}"), record))
    }

    /// Checks `token`'s form and MAC and that it names `node_id` (no storage read).
    pub fn verify(&self, token: &str, node_id: u64) -> Result<VerifiedToken> {
        let invalid = || {
            unauthenticated(format!(
                "node {node_id}: the join token is not valid for this cluster"
            ))
        };
        let (body, mac) = token.rsplit_once('.').ok_or_else(invalid)?;
        let mac = unhex(mac).ok_or_else(invalid)?;
        self.mac(body).verify_slice(&mac).map_err(|_| invalid())?;
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
        if id != node_id {
            return Err(unauthenticated(format!(
                "the join token is for node {id}, not node {node_id}"
            )));
        }
        Ok(VerifiedToken {
            node_id,
            expires_at_ms,
            key: record_key(token),
        })
    }

    /// Issues a token for `node_id` valid for `ttl_ms` from `now_ms` and stores its
    /// record; returns the token and its expiry.
    pub async fn create(&self, node_id: u64, ttl_ms: u64, now_ms: u64) -> Result<(String, u64)> {
        if node_id == 0 {
            return Err(Error::invalid_argument("node ids start at 1"));
        }
        if ttl_ms == 0 {
            return Err(Error::invalid_argument("a join token needs a ttl above 0"));
        }
        let expires_at_ms = now_ms.saturating_add(ttl_ms);
        let (token, record) = self.mint(node_id, expires_at_ms)?;
        self.kv
            .put(PutRequest::new(record_key(&token), encode(&record)?))
            .await?;
        Ok((token, expires_at_ms))
    }

    /// Registers `reported` (as [`NodeManager::register`]) if `token` admits it at
    /// `now_ms`; a first join consumes the token in the same transaction.
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
        let verified = self.verify(token, reported.id)?;
        loop {
            let stored = self.kv.get(&verified.key).await?;
            let record = stored
                .as_ref()
                .map(|kv| decode(&kv.key, &kv.value))
                .transpose()?;
            let registered = nodes.get(reported.id).await?.is_some();
            let admission = decide(record.as_ref(), &verified, registered, now_ms)?;
            let also = match (admission, &stored) {
                (Admission::Consume, Some(kv)) => Some((
                    Compare::new(
                        verified.key.clone(),
                        CompareOp::Equal,
                        CompareTarget::ModRevision(kv.mod_revision),
                    ),
                    TxnOp::Put(PutRequest::new(
                        verified.key.clone(),
                        encode(&JoinTokenRecord {
                            used: true,
                            ..verified_record(&verified)
                        })?,
                    )),
                )),
                _ => None,
            };
            if let Some(info) = nodes.try_register(reported, also).await? {
                return Ok(info);
            }
            // The node or the token changed meanwhile: decide again on fresh state.
        }
    }
}

fn verified_record(token: &VerifiedToken) -> JoinTokenRecord {
    JoinTokenRecord {
        node_id: token.node_id,
        expires_at_ms: token.expires_at_ms,
        used: false,
    }
}

/// Whether a verified token admits its node at `now_ms`, given its stored record (if
/// any) and whether the node is registered now.
pub fn decide(
    record: Option<&JoinTokenRecord>,
    token: &VerifiedToken,
    registered: bool,
    now_ms: u64,
) -> Result<Admission> {
    let node = token.node_id;
    match record {
        None => Err(unauthenticated(format!(
            "node {node}: the join token was not issued by this cluster"
        ))),
        Some(record) if record.used && registered => Ok(Admission::Return),
        Some(record) if record.used => Err(unauthenticated(format!(
            "node {node}: the join token was already used; create a new one"
        ))),
        Some(record) if now_ms >= record.expires_at_ms => Err(unauthenticated(format!(
            "node {node}: the join token expired {} s ago; create a new one",
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
        }
    }

    #[test]
    fn verify_refuses_forgeries_and_other_nodes() {
        let kv: Arc<dyn KvBackend> = Arc::new(MemoryKvBackend::default());
        let tokens = JoinTokens::new(SECRET, kv.clone()).unwrap();
        let (token, _) = tokens.mint(7, 1_000).unwrap();
        assert_eq!(tokens.verify(&token, 7).unwrap().expires_at_ms, 1_000);
        let other = JoinTokens::new(b"another secret of 16+ bytes", kv).unwrap();
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
            let err = tokens.verify(candidate, node).unwrap_err().to_string();
            assert!(err.contains(want), "{candidate:?}: {err}");
        }
        let err = other.verify(&token, 7).unwrap_err().to_string();
        assert!(err.contains("not valid"), "{err}");
        assert!(JoinTokens::new(b"short", Arc::new(MemoryKvBackend::default())).is_err());
    }

    #[test]
    fn decisions() {
        let token = VerifiedToken {
            node_id: 7,
            expires_at_ms: 1_000,
            key: Vec::new(),
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
        // Each case: record, node registered, now, and the admission or an error fragment.
        type Case<'a> = (
            Option<&'a JoinTokenRecord>,
            bool,
            u64,
            Result<Admission, &'a str>,
        );
        let cases: [Case; 6] = [
            (Some(&fresh), false, 999, Ok(Admission::Consume)),
            (Some(&fresh), true, 999, Ok(Admission::Consume)),
            (Some(&fresh), false, 1_000, Err("expired")),
            (Some(&used), true, 5_000, Ok(Admission::Return)),
            (Some(&used), false, 10, Err("already used")),
            (None, false, 10, Err("not issued by this cluster")),
        ];
        for (record, registered, now, want) in cases {
            let got = decide(record, &token, registered, now);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w),
                (Err(w), Err(g)) => assert!(g.to_string().contains(w), "{g}"),
                (w, g) => panic!("{record:?} {registered} {now}: wanted {w:?}, got {g:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_token_admits_once_and_then_only_its_node() {
        let kv: Arc<dyn KvBackend> = Arc::new(MemoryKvBackend::default());
        let nodes = NodeManager::new(kv.clone());
        let tokens = JoinTokens::new(SECRET, kv.clone()).unwrap();
        let err = tokens.admit(&nodes, &node(7), "", 0).await.unwrap_err();
        assert!(
            err.to_string().contains("metactl token create --node 7"),
            "{err}"
        );
        let (token, expires) = tokens.create(7, 60_000, 1_000).await.unwrap();
        assert_eq!(expires, 61_000);
        // Only the hash is stored.
        let stored = kv
            .range(crate::kv::RangeRequest::prefix(PREFIX))
            .await
            .unwrap();
        assert_eq!(stored.kvs.len(), 1);
        assert!(!String::from_utf8_lossy(&stored.kvs[0].value).contains(&token));
        assert!(!String::from_utf8_lossy(&stored.kvs[0].key).contains(&token));

        tokens.admit(&nodes, &node(7), &token, 2_000).await.unwrap();
        // The node comes back (restart, new leader): still admitted, even after expiry.
        tokens
            .admit(&nodes, &node(7), &token, 90_000)
            .await
            .unwrap();
        nodes.set_state(7, NodeState::Active).await.unwrap();
        nodes.set_state(7, NodeState::Draining).await.unwrap();
        nodes.set_state(7, NodeState::Decommissioned).await.unwrap();
        nodes.remove(7).await.unwrap();
        let err = tokens
            .admit(&nodes, &node(7), &token, 3_000)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already used"), "{err}");
    }
}
