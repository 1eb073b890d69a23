//! Sending a request on to the leader. etcd's clients do not follow leader hints: a
//! member that does not lead passes a write (or a linearizable read) to the leader
//! itself and relays the answer, as an etcd follower does.
//!
//! A forwarded request carries a marker and is never forwarded again: if the member
//! it reached no longer leads either, the client gets etcd's "not leader" and retries,
//! instead of the request going round while leadership settles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Request, Status};

use super::status::{NO_LEADER, NOT_LEADER};
use crate::raft::driver::RaftView;
use crate::raft::members::Members;

/// gRPC metadata key marking a request one member forwarded to another.
pub const FORWARDED: &str = "x-metasrv-forwarded";

/// gRPC metadata key by which etcd's clients ask to be refused at once while the
/// cluster has no leader.
pub const HAS_LEADER: &str = "hasleader";

/// How long a request that needs the leader waits for an election to end.
pub const ELECTION_PATIENCE: Duration = Duration::from_secs(5);

/// How long a forwarded request may take (the leader's own timeouts are shorter).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a request that needs the leader runs.
pub enum Route {
    /// Here: this member leads.
    Local,
    /// At the leader, over this channel.
    Leader(Channel),
}

/// Channels to the leader, made as leadership moves.
pub struct Forward {
    view: Arc<RaftView>,
    members: Arc<Members>,
    me: u64,
    channels: Mutex<HashMap<(u64, String), Channel>>,
    tls: Arc<crate::tls::PeerTls>,
}

impl Forward {
    /// Forwarding for member `me`, following `view`'s leader, addressed by `members`.
    pub fn new(
        view: Arc<RaftView>,
        members: Arc<Members>,
        me: u64,
        tls: Arc<crate::tls::PeerTls>,
    ) -> Self {
        Forward {
            view,
            members,
            me,
            channels: Mutex::new(HashMap::new()),
            tls,
        }
    }

    /// Where `request`, which needs the leader, runs: here if this member leads,
    /// else at the leader; "not leader" for a request that was forwarded here already.
    /// While there is no leader it waits for one (up to [`ELECTION_PATIENCE`]) as
    /// etcd's proposals do, then answers etcd's "no leader"; at once when the client
    /// asked for a leader (etcd's `hasleader` metadata).
    pub async fn route<T>(&self, request: &Request<T>) -> Result<Route, Status> {
        let mut leader = self.view.leader();
        if leader == 0 && !request.metadata().contains_key(HAS_LEADER) {
            leader = self.view.leader_within(ELECTION_PATIENCE).await;
        }
        if leader == self.me {
            return Ok(Route::Local);
        }
        if leader == 0 {
            return Err(NO_LEADER.status());
        }
        if request.metadata().contains_key(FORWARDED) {
            return Err(NOT_LEADER.status());
        }
        let addr = self
            .members
            .addr(leader)
            .ok_or_else(|| NO_LEADER.status())?;
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(&(leader, addr.clone())) {
            return Ok(Route::Leader(channel.clone()));
        }
        let channel = self
            .tls
            .endpoint(&addr)
            .map_err(Status::internal)?
            .timeout(FORWARD_TIMEOUT)
            .connect_lazy();
        // Channels to members that no longer lead are dropped: one leader at a time.
        channels.clear();
        channels.insert((leader, addr), channel.clone());
        Ok(Route::Leader(channel))
    }
}

/// `request`'s message as a request to forward: the marker added, the caller's
/// metadata kept (a token, `hasleader`).
pub fn onward<T>(request: Request<T>) -> Request<T> {
    let (mut metadata, extensions, message) = request.into_parts();
    metadata.insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    Request::from_parts(metadata, extensions, message)
}
