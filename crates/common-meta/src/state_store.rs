//! `KvStateStore`: the procedure framework's [`StateStore`] over any [`KvBackend`].
//!
//! Layout (every procedure key lives under `__procedure/`):
//!
//! ```text
//! __procedure/{key}                                   header: 0x00 + value (small)
//!                                                     header: 0x01 + gen (u64 BE) + count (u32 BE)
//! __procedure_seg/{len(key):04}/{key}/{gen:016x}/{i:08}  segment i of a large value
//! ```
//!
//! The key's length in the segment prefix keeps one key's segments from ever sharing a
//! prefix with another key's (`a` vs `a/0000000000000001`).
//!
//! Values larger than one KV value (the backend's `max_value_bytes`) are split into
//! segments. A large put writes its segments under a fresh generation first and the
//! header last, so a reader sees the old value or the new one, never a mix; the old
//! generation is deleted afterwards (a crash in between leaves unreachable segments,
//! never a wrong value).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use procedure::StateStore;

use crate::kv::{DeleteRangeRequest, KvBackend, KvLimits, PutRequest, RangeRequest, prefix_end};

const PREFIX: &str = "__procedure/";
const SEGMENT_PREFIX: &str = "__procedure_seg/";
const INLINE: u8 = 0x00;
const SEGMENTED: u8 = 0x01;

/// A [`StateStore`] over a [`KvBackend`]; see the module doc.
pub struct KvStateStore {
    kv: Arc<dyn KvBackend>,
    segment_bytes: usize,
}

fn store_error(key: &str, e: crate::Error) -> procedure::Error {
    procedure::Error::Store {
        key: key.to_string(),
        retryable: e.is_retryable(),
        message: e.to_string(),
    }
}

fn corrupt(key: &str, reason: &str) -> procedure::Error {
    procedure::Error::Store {
        key: key.to_string(),
        message: format!("corrupted procedure state: {reason}"),
        retryable: false,
    }
}

/// Where the segments of `key`'s generation `gen` live.
fn generation_prefix(key: &str, generation: u64) -> String {
    format!("{SEGMENT_PREFIX}{:04}/{key}/{generation:016x}/", key.len())
}

/// The generation a segmented header names.
fn generation_of(header: &[u8]) -> Option<u64> {
    match header.split_first() {
        Some((&SEGMENTED, rest)) => rest.get(..8)?.try_into().ok().map(u64::from_be_bytes),
        _ => None,
    }
}

impl KvStateStore {
    /// A store over `kv`, splitting values larger than `limits.max_value_bytes` (leaving
    /// room for the header).
    pub fn new(kv: Arc<dyn KvBackend>, limits: &KvLimits) -> Self {
        KvStateStore {
            kv,
            segment_bytes: limits.max_value_bytes.saturating_sub(64).max(1),
        }
    }

    async fn header(&self, key: &str) -> procedure::Result<Option<Vec<u8>>> {
        let full = format!("{PREFIX}{key}");
        Ok(self
            .kv
            .get(full.as_bytes())
            .await
            .map_err(|e| store_error(key, e))?
            .map(|kv| kv.value))
    }

    /// The value a header stands for (reading segments when needed).
    async fn assemble(&self, key: &str, header: Vec<u8>) -> procedure::Result<Vec<u8>> {
        match header.split_first() {
            Some((&INLINE, value)) => Ok(value.to_vec()),
            Some((&SEGMENTED, rest)) if rest.len() == 12 => {
                let generation =
                    u64::from_be_bytes(rest[..8].try_into().map_err(|_| corrupt(key, "header"))?);
                let count =
                    u32::from_be_bytes(rest[8..].try_into().map_err(|_| corrupt(key, "header"))?);
                let prefix = generation_prefix(key, generation);
                let segments = self
                    .kv
                    .range(RangeRequest::prefix(prefix.into_bytes()))
                    .await
                    .map_err(|e| store_error(key, e))?;
                if segments.kvs.len() != count as usize {
                    return Err(corrupt(
                        key,
                        &format!("{} of {count} segments found", segments.kvs.len()),
                    ));
                }
                Ok(segments.kvs.into_iter().flat_map(|kv| kv.value).collect())
            }
            _ => Err(corrupt(key, "unknown header")),
        }
    }

    /// The value under `header`; if its segments vanished because a concurrent put
    /// replaced the value, reads the new header and tries again.
    async fn value(&self, key: &str, mut header: Vec<u8>) -> procedure::Result<Option<Vec<u8>>> {
        for _ in 0..5 {
            match self.assemble(key, header.clone()).await {
                Ok(value) => return Ok(Some(value)),
                Err(e) => match self.header(key).await? {
                    None => return Ok(None),
                    Some(now) if now != header => header = now,
                    Some(_) => return Err(e),
                },
            }
        }
        Err(corrupt(key, "the value kept changing while being read"))
    }

    async fn delete_generation(&self, key: &str, header: &[u8]) -> procedure::Result<()> {
        if let Some(generation) = generation_of(header) {
            let prefix = generation_prefix(key, generation).into_bytes();
            let range_end = prefix_end(&prefix);
            self.kv
                .delete_range(DeleteRangeRequest {
                    key: prefix,
                    range_end,
                    prev_kv: false,
                })
                .await
                .map_err(|e| store_error(key, e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for KvStateStore {
    async fn put(&self, key: &str, value: Vec<u8>) -> procedure::Result<()> {
        let full = format!("{PREFIX}{key}");
        // An inline save is one write: the header it replaces comes back with it (no
        // read first); only a segmented save reads the old header, for its generation.
        let header = if value.len() < self.segment_bytes {
            let mut header = Vec::with_capacity(value.len() + 1);
            header.push(INLINE);
            header.extend_from_slice(&value);
            header
        } else {
            let old = self.header(key).await?;
            // Strictly newer than the generation it replaces, whatever the clock does.
            let clock = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let generation = clock.max(old.as_deref().and_then(generation_of).map_or(0, |g| g + 1));
            let prefix = generation_prefix(key, generation);
            let chunks: Vec<&[u8]> = value.chunks(self.segment_bytes).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                self.kv
                    .put(PutRequest::new(format!("{prefix}{i:08}"), chunk.to_vec()))
                    .await
                    .map_err(|e| store_error(key, e))?;
            }
            let mut header = vec![SEGMENTED];
            header.extend_from_slice(&generation.to_be_bytes());
            header.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
            header
        };
        let put = self
            .kv
            .put(PutRequest {
                key: full.into_bytes(),
                value: header,
                prev_kv: true,
                ..Default::default()
            })
            .await
            .map_err(|e| store_error(key, e))?;
        if let Some(replaced) = put.prev_kv {
            self.delete_generation(key, &replaced.value).await?;
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> procedure::Result<Option<Vec<u8>>> {
        match self.header(key).await? {
            None => Ok(None),
            Some(header) => self.value(key, header).await,
        }
    }

    async fn delete(&self, key: &str) -> procedure::Result<()> {
        let Some(old) = self.header(key).await? else {
            return Ok(());
        };
        self.kv
            .delete_range(DeleteRangeRequest::key(format!("{PREFIX}{key}")))
            .await
            .map_err(|e| store_error(key, e))?;
        self.delete_generation(key, &old).await
    }

    async fn scan_prefix(&self, prefix: &str) -> procedure::Result<Vec<(String, Vec<u8>)>> {
        let full = format!("{PREFIX}{prefix}");
        let headers = self
            .kv
            .range(RangeRequest::prefix(full.into_bytes()))
            .await
            .map_err(|e| store_error(prefix, e))?;
        let mut out = Vec::with_capacity(headers.kvs.len());
        for kv in headers.kvs {
            let key = String::from_utf8_lossy(&kv.key[PREFIX.len()..]).into_owned();
            match self.value(&key, kv.value).await {
                Ok(Some(value)) => out.push((key, value)),
                Ok(None) => {}
                // One damaged entry must not hide the others (recovery reads them all).
                Err(e) if !e.is_retryable() => {
                    tracing::error!(%key, error = %e, "skipping an unreadable procedure state");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemoryKvBackend;

    fn store(max_value_bytes: usize) -> (KvStateStore, Arc<MemoryKvBackend>) {
        let limits = KvLimits {
            max_value_bytes,
            ..KvLimits::default()
        };
        let kv = Arc::new(MemoryKvBackend::with_limits(limits));
        (KvStateStore::new(kv.clone(), &limits), kv)
    }

    #[tokio::test]
    async fn small_and_segmented_values_round_trip() {
        let (store, kv) = store(200);
        store.put("procedure/a", b"small".to_vec()).await.unwrap();
        let big: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        store.put("procedure/b", big.clone()).await.unwrap();
        assert_eq!(store.get("procedure/a").await.unwrap().unwrap(), b"small");
        assert_eq!(store.get("procedure/b").await.unwrap().unwrap(), big);
        let scanned = store.scan_prefix("procedure/").await.unwrap();
        assert_eq!(scanned.len(), 2, "segments are not listed as entries");
        assert_eq!(scanned[1].1, big);

        // Keys that extend each other keep separate segments.
        store
            .put("procedure/b/0000000000000001", big.clone())
            .await
            .unwrap();
        store
            .put("procedure/b", big.iter().rev().copied().collect())
            .await
            .unwrap();
        assert_eq!(
            store
                .get("procedure/b/0000000000000001")
                .await
                .unwrap()
                .unwrap(),
            big
        );
        store.delete("procedure/b/0000000000000001").await.unwrap();
        // Overwriting a large value with a small one removes the old segments.
        store
            .put("procedure/b", b"now small".to_vec())
            .await
            .unwrap();
        let segments = kv
            .range(RangeRequest::prefix(SEGMENT_PREFIX.as_bytes().to_vec()))
            .await
            .unwrap();
        assert_eq!(segments.count, 0);
        store.delete("procedure/a").await.unwrap();
        store.delete("procedure/a").await.unwrap();
        assert_eq!(store.get("procedure/a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_missing_segment_is_reported_not_returned_short() {
        let (store, kv) = store(100);
        store.put("procedure/x", vec![7; 500]).await.unwrap();
        let segments = kv
            .range(RangeRequest::prefix(SEGMENT_PREFIX.as_bytes().to_vec()))
            .await
            .unwrap();
        kv.delete_range(DeleteRangeRequest::key(segments.kvs[1].key.clone()))
            .await
            .unwrap();
        let err = store.get("procedure/x").await.unwrap_err();
        assert!(err.to_string().contains("segments found"), "{err}");
    }

    #[tokio::test]
    async fn the_procedure_manager_runs_on_it() {
        use procedure::{
            Context, ManagerConfig, Procedure, ProcedureManager, ProcedureWithId, Status,
        };

        struct Two(u32);
        #[async_trait]
        impl Procedure for Two {
            fn type_name(&self) -> &str {
                "test.Two"
            }
            async fn execute(&mut self, _ctx: &Context) -> procedure::Result<Status> {
                self.0 += 1;
                Ok(if self.0 == 2 {
                    Status::Done {
                        output: Some("2".into()),
                    }
                } else {
                    Status::Executing { persist: true }
                })
            }
            fn dump(&self) -> procedure::Result<String> {
                // A large state, to go through segments.
                Ok(format!("{}{}", self.0, " ".repeat(700)))
            }
        }
        let (store, _) = store(256);
        let manager = ProcedureManager::new(Arc::new(store), ManagerConfig::default());
        manager.start().await.unwrap();
        let w = manager
            .submit(ProcedureWithId {
                id: "two".into(),
                procedure: Box::new(Two(0)),
            })
            .await
            .unwrap();
        assert_eq!(w.wait().await.unwrap().as_deref(), Some("2"));
        let record = manager.state("two").await.unwrap().unwrap();
        assert_eq!(record.step, 2);
    }
}
