//! `metactl kv`: reads and writes of keys, reads at a past revision, compaction, and
//! watching changes live.

use clap::{Args, Subcommand};
use common_meta::kv::{
    DeleteRangeRequest, EventKind, KvBackend, PutRequest, RangeRequest, WatchRequest, WatchResponse,
};
use meta_client::MetaClient;
use serde_json::json;

use super::{Failure, Output, kv_json, print, text};

#[derive(Subcommand)]
pub enum KvCommand {
    /// Write KEY = VALUE; prints OK.
    Put {
        key: String,
        value: String,
        /// Attach the key to this lease: it is deleted when the lease ends.
        #[arg(long, default_value_t = 0)]
        lease: i64,
    },
    /// Print KEY's value; exits 1 with "not found" when absent.
    Get {
        key: String,
        /// Read the member's local state (any member; may be stale) instead of a
        /// linearizable read through the leader.
        #[arg(long)]
        serializable: bool,
        /// Read as of this revision (0 = now).
        #[arg(long, default_value_t = 0)]
        rev: i64,
    },
    /// Delete KEY; prints the number of keys deleted.
    Del { key: String },
    /// List keys starting with PREFIX, one "KEY VALUE" line each.
    Range(RangeArgs),
    /// Print changes of KEY (or of every key starting with it, with --prefix) as they
    /// happen, one line each: "PUT KEY VALUE REV" or "DELETE KEY REV". Runs until
    /// interrupted, or until --count events were printed.
    Watch {
        key: String,
        /// Watch every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// Start at this revision (0 = from now); older changes come from the history.
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Print each change's previous value too (JSON: "prev_kv").
        #[arg(long)]
        prev_kv: bool,
        /// Stop after this many events (0 = never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Discard the history before REV: reads and watches below it fail from then on.
    Compact { rev: i64 },
}

#[derive(Args)]
pub struct RangeArgs {
    prefix: String,
    /// At most this many keys (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: u32,
    /// Read the member's local state (any member; may be stale).
    #[arg(long)]
    serializable: bool,
    /// Read as of this revision (0 = now).
    #[arg(long, default_value_t = 0)]
    rev: i64,
}

pub async fn kv(client: &MetaClient, command: KvCommand, output: Output) -> Result<(), Failure> {
    match command {
        KvCommand::Put { key, value, lease } => {
            let put = client
                .put(PutRequest::new(key, value).with_lease(lease))
                .await?;
            print(
                output,
                "OK".to_string(),
                json!({ "revision": put.revision }),
            );
        }
        KvCommand::Get {
            key,
            serializable,
            rev,
        } => {
            let request = RangeRequest::key(key.as_str()).at_revision(rev);
            let range = if serializable {
                client.range_serializable(request).await?
            } else {
                client.range(request).await?
            };
            let kv = range
                .kvs
                .into_iter()
                .next()
                .ok_or_else(|| Failure(format!("not found: {key}")))?;
            print(output, text(&kv.value), kv_json(&kv));
        }
        KvCommand::Del { key } => {
            let deleted = client.delete_range(DeleteRangeRequest::key(key)).await?;
            print(
                output,
                deleted.deleted.to_string(),
                json!({ "deleted": deleted.deleted, "revision": deleted.revision }),
            );
        }
        KvCommand::Range(args) => {
            let request = RangeRequest::prefix(args.prefix)
                .with_limit(i64::from(args.limit))
                .at_revision(args.rev);
            let range = if args.serializable {
                client.range_serializable(request).await?
            } else {
                client.range(request).await?
            };
            let lines: Vec<String> = range
                .kvs
                .iter()
                .map(|kv| format!("{} {}", text(&kv.key), text(&kv.value)))
                .collect();
            print(
                output,
                lines.join("\n"),
                json!({
                    "revision": range.revision,
                    "count": range.count,
                    "more": range.more,
                    "kvs": range.kvs.iter().map(kv_json).collect::<Vec<_>>(),
                }),
            );
        }
        KvCommand::Watch {
            key,
            prefix,
            rev,
            prev_kv,
            count,
        } => {
            let request = if prefix {
                WatchRequest::prefix(key)
            } else {
                WatchRequest::key(key)
            };
            let request = WatchRequest {
                prev_kv,
                ..request.from_revision(rev)
            };
            watch(client, request, count, output).await?;
        }
        KvCommand::Compact { rev } => {
            let revision = client.compact(rev).await?;
            print(
                output,
                format!("compacted at {rev}"),
                json!({ "compacted": rev, "revision": revision }),
            );
        }
    }
    Ok(())
}

async fn watch(
    client: &MetaClient,
    request: WatchRequest,
    count: u64,
    output: Output,
) -> Result<(), Failure> {
    let mut stream = client.watch(request).await?;
    let mut printed = 0;
    while let Some(response) = stream.next().await {
        let events = match response? {
            WatchResponse::Events { events, .. } => events,
            WatchResponse::Progress { .. } => continue,
        };
        for event in events {
            let kv = &event.kv;
            let line = match event.kind {
                EventKind::Put => format!(
                    "PUT {} {} {}",
                    text(&kv.key),
                    text(&kv.value),
                    kv.mod_revision
                ),
                EventKind::Delete => format!("DELETE {} {}", text(&kv.key), kv.mod_revision),
            };
            let mut document = json!({
                "type": if event.kind == EventKind::Put { "PUT" } else { "DELETE" },
                "kv": kv_json(kv),
            });
            if let Some(prev) = &event.prev_kv {
                document["prev_kv"] = kv_json(prev);
            }
            print(output, line, document);
            printed += 1;
            if count != 0 && printed >= count {
                return Ok(());
            }
        }
    }
    Err(Failure("error: the watch ended".to_string()))
}
