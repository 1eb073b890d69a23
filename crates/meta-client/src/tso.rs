//! `TsoClient`: timestamps from the leader's oracle (`meta.v1.Tso`).
//!
//! One dispatcher task per client holds one stream to the leader. It merges every
//! request waiting when it sends into one message (at most [`MAX_BATCH`] timestamps),
//! and hands each caller its part of the consecutive range the answer ends. Every
//! answer is checked: its lowest timestamp must be above the highest handed out before
//! on this client, or the whole batch fails (a fallback is an error, never handed out).
//! A broken stream (the leader changed or stopped) is reopened at the leader and the
//! batch asked again, within the client's deadline: a lost answer only wastes
//! timestamps.

use std::time::Instant;

use common_meta::{Error, Result};
use meta_proto::v1 as pb;
use meta_proto::v1::tso_client::TsoClient as TsoStub;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Streaming};

use crate::client::MetaClient;
use crate::status::from_status;

/// The most timestamps one stream message asks for (the server's cap).
pub const MAX_BATCH: u32 = 10_000;

/// Bits of a timestamp's logical part: `physical_ms << 18 | logical`.
pub const LOGICAL_BITS: u32 = 18;

/// Callers waiting at most, before new ones wait for room.
const QUEUE: usize = 65_536;

/// One caller's ask.
struct Ask {
    count: u32,
    reply: oneshot::Sender<Result<u64>>,
}

/// Strictly increasing timestamps from the leader, batched across concurrent callers.
#[derive(Debug)]
pub struct TsoClient {
    queue: mpsc::Sender<Ask>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TsoClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TsoClient {
    /// A client of `client`'s cluster; its dispatcher runs until this is dropped.
    pub fn new(client: &MetaClient) -> TsoClient {
        let (queue, asks) = mpsc::channel(QUEUE);
        let task = tokio::spawn(dispatch(client.clone(), asks));
        TsoClient { queue, task }
    }

    /// One timestamp.
    pub async fn timestamp(&self) -> Result<u64> {
        self.timestamps(1).await
    }

    /// `count` consecutive timestamps (1 to [`MAX_BATCH`]); the highest is returned,
    /// the others are the `count - 1` below it.
    pub async fn timestamps(&self, count: u32) -> Result<u64> {
        if count == 0 || count > MAX_BATCH {
            return Err(Error::invalid_argument(format!(
                "count {count} is out of range: ask for 1 to {MAX_BATCH} timestamps"
            )));
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Ask { count, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> Error {
    Error::Unavailable {
        message: "the timestamp client's dispatcher stopped".to_string(),
    }
}

/// A stream to the leader: where requests go and where answers come from.
type Open = (mpsc::Sender<pb::TsoRequest>, Streaming<pb::TsoResponse>);

async fn dispatch(client: MetaClient, mut asks: mpsc::Receiver<Ask>) {
    let mut stream: Option<Open> = None;
    let mut last = 0u64;
    let mut carried: Option<Ask> = None;
    loop {
        let first = match carried.take() {
            Some(ask) => ask,
            None => match asks.recv().await {
                Some(ask) => ask,
                None => return,
            },
        };
        let mut total = first.count;
        let mut batch = vec![first];
        while let Ok(ask) = asks.try_recv() {
            if total + ask.count > MAX_BATCH {
                carried = Some(ask);
                break;
            }
            total += ask.count;
            batch.push(ask);
        }
        let answer = exchange(&client, &mut stream, total)
            .await
            .and_then(|highest| check(highest, total, last));
        match answer {
            Ok(highest) => {
                last = highest;
                let mut next = highest - u64::from(total) + 1;
                for ask in batch {
                    let high = next + u64::from(ask.count) - 1;
                    let _ = ask.reply.send(Ok(high));
                    next = high + 1;
                }
            }
            Err(e) => {
                stream = None;
                let message = e.to_string();
                let mut first = Some(e);
                for ask in batch {
                    let error = first.take().unwrap_or_else(|| Error::Unavailable {
                        message: message.clone(),
                    });
                    let _ = ask.reply.send(Err(error));
                }
            }
        }
    }
}

/// `highest` when the `total` timestamps it ends are all above `last` and share its
/// physical part; the fallback as an error otherwise.
fn check(highest: u64, total: u32, last: u64) -> Result<u64> {
    let logical = highest & ((1 << LOGICAL_BITS) - 1);
    if logical < u64::from(total) {
        return Err(Error::Corrupted {
            location: "a timestamp answer".to_string(),
            reason: format!("{highest} cannot end {total} timestamps of one millisecond"),
        });
    }
    let lowest = highest - u64::from(total) + 1;
    if lowest <= last {
        return Err(Error::Corrupted {
            location: "a timestamp answer".to_string(),
            reason: format!(
                "timestamp fallback: {lowest} is not above {last}, handed out before; nothing of this batch was handed out"
            ),
        });
    }
    Ok(highest)
}

/// Asks the leader for `count` timestamps, opening (or reopening) the stream as
/// needed, within the client's deadline.
async fn exchange(client: &MetaClient, stream: &mut Option<Open>, count: u32) -> Result<u64> {
    let until = Instant::now() + client.options().deadline;
    loop {
        let (requests, answers) = match stream {
            Some(open) => open,
            None => stream.insert(open(client).await?),
        };
        let sent = requests.send(pb::TsoRequest { count }).await.is_ok();
        let answer = if sent {
            answers.message().await
        } else {
            Ok(None)
        };
        match answer {
            Ok(Some(response)) => return Ok(response.timestamp),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                *stream = None;
                return Err(from_status(&status));
            }
            other => {
                *stream = None;
                if Instant::now() >= until {
                    let why = match other {
                        Err(status) => status.message().to_string(),
                        _ => "the stream ended".to_string(),
                    };
                    return Err(Error::Unavailable {
                        message: format!("no timestamps within the deadline: {why}"),
                    });
                }
            }
        }
    }
}

/// A stream to the leader (the client's retries follow leader hints there).
async fn open(client: &MetaClient) -> Result<Open> {
    client
        .with_channel(|channel| async move {
            let (requests, queued) = mpsc::channel(16);
            let answers = TsoStub::new(channel)
                .tso(ReceiverStream::new(queued))
                .await?
                .into_inner();
            Ok(Response::new((requests, answers)))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_below_what_was_handed_out_is_refused() {
        let ts = |physical: u64, logical: u64| physical << LOGICAL_BITS | logical;
        assert_eq!(check(ts(10, 5), 5, ts(9, 100)).unwrap(), ts(10, 5));
        let fallback = check(ts(10, 5), 5, ts(10, 1)).unwrap_err().to_string();
        assert!(fallback.contains("timestamp fallback"), "{fallback}");
        assert!(
            check(ts(10, 5), 5, ts(10, 0)).is_ok(),
            "strictly above is enough"
        );
        let torn = check(ts(10, 3), 5, 0).unwrap_err().to_string();
        assert!(torn.contains("cannot end 5"), "{torn}");
    }
}
