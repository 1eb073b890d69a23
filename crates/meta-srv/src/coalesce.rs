//! Client connections that gather the gRPC server's writes into fewer system calls.
//!
//! A change seen by many watchers becomes one small message per watcher, and the
//! watchers of one connection are served by as many tasks. HTTP/2 writes and flushes
//! each time its connection task runs, and the runtime runs a task woken by another
//! straight after it, so without help every message leaves in a send of its own: on
//! loopback the kernel's share of those sends was most of the serving member's CPU.
//!
//! [`Coalesced`] keeps what HTTP/2 writes in a buffer and, at a flush, lets the other
//! tasks that are ready run once first (the connection task wakes itself and steps
//! aside), so the messages they add go out in the same send. A lone response waits
//! for one turn of the runtime's queue, a few microseconds; a burst leaves in one
//! send per connection instead of one per message.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes gathered before a write goes out without waiting for a flush.
const GATHER_LIMIT: usize = 256 * 1024;

/// A connection whose writes are gathered and flushed after the other ready tasks had
/// their turn (see the module doc).
#[derive(Debug)]
pub struct Coalesced<IO> {
    io: IO,
    buffer: Vec<u8>,
    /// How much of `buffer` is already written.
    written: usize,
    /// The flush in progress has stepped aside once.
    yielded: bool,
}

impl<IO> Coalesced<IO> {
    /// Wraps a connection.
    pub fn new(io: IO) -> Self {
        Coalesced {
            io,
            buffer: Vec::new(),
            written: 0,
            yielded: false,
        }
    }
}

impl<IO: AsyncWrite + Unpin> Coalesced<IO> {
    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buffer.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buffer[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buffer.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room: a full buffer is written out first.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buffer.len() >= GATHER_LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesced<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesced<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        this.buffer.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        let mut total = 0;
        for buf in bufs {
            this.buffer.extend_from_slice(buf);
            total += buf.len();
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffer.len() > this.written && !this.yielded {
            // Step aside once: a task that wakes itself goes to the back of the queue,
            // behind the tasks about to add to this connection.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.yielded = false;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Coalesced<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn gathered_writes_arrive_whole_and_in_order_after_a_flush() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut conn = Coalesced::new(near);
        let mut expected = Vec::new();
        for i in 0..1000u32 {
            let chunk = i.to_be_bytes();
            conn.write_all(&chunk).await.unwrap();
            expected.extend_from_slice(&chunk);
        }
        // The pipe holds 64 bytes: a flush must keep writing until all is through.
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 4000];
            far.read_exact(&mut got).await.unwrap();
            got
        });
        conn.flush().await.unwrap();
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn nothing_leaves_before_the_flush_and_a_shutdown_drains() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut conn = Coalesced::new(near);
        conn.write_all(b"held").await.unwrap();
        let mut probe = [0u8; 4];
        assert!(
            far.read_exact(&mut probe).now_or_never().is_none(),
            "a write before any flush stays gathered"
        );
        conn.shutdown().await.unwrap();
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"held");
    }
}
