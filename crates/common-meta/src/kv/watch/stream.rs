//! The consumer's end of a watcher: [`WatchStream`] (responses in order) and
//! [`WatchControl`] (progress requests apart from the stream).

use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::kv::types::WatchResponse;

/// What a consumer may ask of a running watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Answer with a [`WatchResponse::Progress`] (`requested: true`) in the stream, after
    /// every matching change at or below its revision.
    Progress,
}

/// The consumer's end of a watcher: responses in order, then (if the watcher ended on
/// its own) one error, then the end. Dropping it stops the watcher.
pub struct WatchStream {
    responses: Responses,
    control: mpsc::Sender<Control>,
}

/// Where a stream's responses come from.
enum Responses {
    /// A local watcher, which waits (and is cancelled if it waits too long).
    Bounded(mpsc::Receiver<Result<WatchResponse>>),
    /// A source that must never wait on one consumer (a client stream shared by many
    /// watchers): the consumer's backlog is held for it.
    Unbounded(mpsc::UnboundedReceiver<Result<WatchResponse>>),
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

impl WatchStream {
    /// A stream fed by another source (a remote watcher): `responses` carries what it
    /// delivers, `control` takes the consumer's requests.
    pub fn new(
        responses: mpsc::Receiver<Result<WatchResponse>>,
        control: mpsc::Sender<Control>,
    ) -> Self {
        WatchStream {
            responses: Responses::Bounded(responses),
            control,
        }
    }

    /// As [`new`](Self::new), for a source that holds no backlog of its own (it must
    /// not wait on this consumer): what the consumer has not read yet stays queued here.
    pub fn unbounded(
        responses: mpsc::UnboundedReceiver<Result<WatchResponse>>,
        control: mpsc::Sender<Control>,
    ) -> Self {
        WatchStream {
            responses: Responses::Unbounded(responses),
            control,
        }
    }

    /// The next response; `None` once the watcher ended.
    pub async fn next(&mut self) -> Option<Result<WatchResponse>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`next`](Self::next) for a caller that polls many streams itself.
    pub fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<WatchResponse>>> {
        match &mut self.responses {
            Responses::Bounded(responses) => responses.poll_recv(cx),
            Responses::Unbounded(responses) => responses.poll_recv(cx),
        }
    }

    /// Asks for a progress notice: a [`WatchResponse::Progress`] with `requested: true`
    /// comes in the stream, after every matching change at or below its revision.
    pub async fn progress(&self) -> Result<()> {
        self.controller().progress().await
    }

    /// A handle that asks for progress while another task reads the stream.
    pub fn controller(&self) -> WatchControl {
        WatchControl {
            control: self.control.clone(),
        }
    }
}

/// Asks a watcher for progress notices apart from its stream (see
/// [`WatchStream::controller`]).
#[derive(Debug, Clone)]
pub struct WatchControl {
    control: mpsc::Sender<Control>,
}

impl WatchControl {
    /// As [`WatchStream::progress`].
    pub async fn progress(&self) -> Result<()> {
        self.control
            .send(Control::Progress)
            .await
            .map_err(|_| Error::Unavailable {
                message: "the watcher has ended".to_string(),
            })
    }

    /// Asks for a progress notice without waiting (see [`WatchStream::progress`]).
    /// When the watcher already holds requests it has not answered, this one is not
    /// queued: each of those answers comes after every change at or below its own
    /// revision, so the next one serves this request too. An error once the watcher
    /// has ended.
    pub fn try_progress(&self) -> Result<()> {
        match self.control.try_send(Control::Progress) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::Unavailable {
                message: "the watcher has ended".to_string(),
            }),
        }
    }
}
