//! `Front`: a TCP proxy with a stable address in front of a server that may move
//! (a member restarted on a new port) or misbehave on demand: swallow the server's
//! replies, break every connection. Clients see what a real network does to them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy; see the module doc. Must be started inside a tokio runtime.
pub struct Front {
    /// The address clients connect to.
    pub addr: String,
    upstream: Arc<Mutex<Option<String>>>,
    swallow: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Front {
    /// A proxy on an ephemeral port, with no upstream yet (connections are refused by
    /// being closed at once).
    pub fn start() -> Front {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let listener = TcpListener::from_std(listener).unwrap();
        let upstream: Arc<Mutex<Option<String>>> = Arc::default();
        let swallow = Arc::new(AtomicBool::new(false));
        let (cut, cuts) = watch::channel(0u64);
        let (to, flag) = (upstream.clone(), swallow.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Some(target) = to.lock().unwrap().clone() else {
                    continue;
                };
                let (flag, cuts) = (flag.clone(), cuts.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&target).await {
                        relay(client, server, flag, cuts).await;
                    }
                });
            }
        });
        Front {
            addr,
            upstream,
            swallow,
            cut,
        }
    }

    /// Sends new connections to `upstream` (`None`: refuse them).
    pub fn point_to(&self, upstream: Option<String>) {
        *self.upstream.lock().unwrap() = upstream;
    }

    /// From now on the server's bytes are swallowed on every connection.
    pub fn swallow_replies(&self) {
        self.swallow.store(true, Ordering::SeqCst);
    }

    /// Breaks every open connection; later ones pass untouched.
    pub fn cut_and_heal(&self) {
        self.swallow.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    swallow: Arc<AtomicBool>,
    mut cuts: watch::Receiver<u64>,
) {
    cuts.mark_unchanged();
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = server_read.read(&mut buf).await {
            if swallow.load(Ordering::SeqCst) {
                continue;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    // Whichever ends first ends the connection: a cut drops both sockets.
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cuts.changed() => {}
    }
}
