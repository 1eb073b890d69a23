//! The `meta.v1.Store` service: decodes a request, checks its size, calls the
//! [`KvBackend`], encodes the answer. Every conversion is `common_meta::rpc`'s. A write
//! that names a client session runs through [`SessionWrite`], so it is exactly-once;
//! sessions are opened, kept alive and closed through the leader's [`SessionKeeper`].

use std::sync::Arc;

use common_meta::kv::{KvBackend, KvLimits, SessionRef};
use common_meta::rpc;
use meta_proto::v1 as pb;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::auth::{Caller, Checked};
use crate::error::{refusal, to_status};
use crate::raft::backend::{RaftKvBackend, SessionWrite};
use crate::raft::driver::DriverHandle;
use crate::raft::members::Members;
use crate::session_keeper::SessionKeeper;

/// Serves the KV API of a raft member.
pub struct StoreService {
    backend: RaftKvBackend,
    sessions: Arc<SessionKeeper>,
    driver: DriverHandle,
    member_id: u64,
    limits: KvLimits,
    members: Arc<Members>,
}

impl StoreService {
    /// A service answering as `member_id` over `backend` (whose driver is behind
    /// `driver`) and the leader's `sessions`, refusing requests over `limits`; `members`
    /// maps member ids to addresses for leader hints.
    pub fn new(
        backend: RaftKvBackend,
        sessions: Arc<SessionKeeper>,
        driver: DriverHandle,
        member_id: u64,
        limits: KvLimits,
        members: Arc<Members>,
    ) -> Self {
        StoreService {
            backend,
            sessions,
            driver,
            member_id,
            limits,
            members,
        }
    }

    /// The status for `err`, with the leader hint for a not-leader answer.
    async fn status(&self, err: common_meta::Error) -> Status {
        refusal(err, &self.driver, &self.members, self.member_id).await
    }

    /// The backend a write runs on: exactly-once within the session it names, if any
    /// (a session only its owner may use).
    fn write(
        &self,
        caller: &Caller,
        session: Option<pb::SessionRef>,
    ) -> Result<SessionWrite<'_>, Status> {
        if let Some(session) = &session {
            self.check_owner(caller, session.id)?;
        }
        Ok(SessionWrite {
            backend: &self.backend,
            session: session.map(SessionRef::from),
        })
    }

    /// Refuses a user other than the one that opened session `id`. A session opened
    /// while auth was off (no owner) may be used by anyone, and one that is not open is
    /// left to the state machine to refuse.
    fn check_owner(&self, caller: &Caller, id: u64) -> Result<(), Status> {
        let Some(user) = caller.name() else {
            return Ok(());
        };
        match self.backend.store().session_owner(id) {
            Ok(Some(owner)) if !owner.is_empty() && owner != user => Err(to_status(
                common_meta::Error::Auth(common_meta::auth::AuthError::PermissionDenied),
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(to_status(e)),
        }
    }

    /// Unwraps a request after checking its encoded size against `max_request_bytes`
    /// (the backend checks the other limits).
    fn admit<M: Message>(&self, request: Request<M>) -> Result<M, Status> {
        let message = request.into_inner();
        let size = message.encoded_len();
        if size > self.limits.max_request_bytes {
            return Err(to_status(self.limits.request_too_large(size)));
        }
        Ok(message)
    }
}

#[tonic::async_trait]
impl pb::store_server::Store for StoreService {
    async fn compact(
        &self,
        request: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let req = self.admit(request)?;
        match self.backend.compact(req.revision).await {
            Ok(revision) => Ok(Response::new(pb::CompactResponse {
                header: rpc::header(self.member_id, revision),
            })),
            Err(e) => Err(self.status(e).await),
        }
    }

    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let backend = Checked::new(&self.backend, Caller::of(&request));
        let req = self.admit(request)?;
        let serializable = req.serializable;
        let req = req.into();
        let resp = match if serializable {
            backend.range_serializable(req).await
        } else {
            backend.range(req).await
        } {
            Ok(resp) => resp,
            Err(e) => return Err(self.status(e).await),
        };
        Ok(Response::new(rpc::range_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let caller = Caller::of(&request);
        let mut req = self.admit(request)?;
        let write = self.write(&caller, req.session.take())?;
        let backend = Checked::new(&write, caller);
        let resp = match backend.put(req.into()).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.status(e).await),
        };
        Ok(Response::new(rpc::put_response_to_pb(resp, self.member_id)))
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let caller = Caller::of(&request);
        let mut req = self.admit(request)?;
        let write = self.write(&caller, req.session.take())?;
        let backend = Checked::new(&write, caller);
        let resp = match backend.delete_range(req.into()).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.status(e).await),
        };
        Ok(Response::new(rpc::delete_range_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn batch_get(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<Response<pb::BatchGetResponse>, Status> {
        let backend = Checked::new(&self.backend, Caller::of(&request));
        let req = self.admit(request)?.into();
        let resp = match backend.batch_get(req).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.status(e).await),
        };
        Ok(Response::new(rpc::batch_get_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn batch_put(
        &self,
        request: Request<pb::BatchPutRequest>,
    ) -> Result<Response<pb::BatchPutResponse>, Status> {
        let caller = Caller::of(&request);
        let mut req = self.admit(request)?;
        let write = self.write(&caller, req.session.take())?;
        let backend = Checked::new(&write, caller);
        let resp = match backend.batch_put(req.into()).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.status(e).await),
        };
        Ok(Response::new(rpc::batch_put_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn batch_delete(
        &self,
        request: Request<pb::BatchDeleteRequest>,
    ) -> Result<Response<pb::BatchDeleteResponse>, Status> {
        let caller = Caller::of(&request);
        let mut req = self.admit(request)?;
        let write = self.write(&caller, req.session.take())?;
        let backend = Checked::new(&write, caller);
        let resp = match backend.batch_delete(req.into()).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.status(e).await),
        };
        Ok(Response::new(rpc::batch_delete_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn compare_and_put(
        &self,
        request: Request<pb::CompareAndPutRequest>,
    ) -> Result<Response<pb::CompareAndPutResponse>, Status> {
        let caller = Caller::of(&request);
        let mut req = self.admit(request)?;
        let write = self.write(&caller, req.session.take())?;
        let backend = Checked::new(&write, caller);
        let resp = match backend.compare_and_put(req.into()).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.status(e).await),
        };
        Ok(Response::new(rpc::compare_and_put_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let caller = Caller::of(&request);
        let mut req = self.admit(request)?;
        let write = self.write(&caller, req.session.take())?;
        let backend = Checked::new(&write, caller);
        let req = req.try_into().map_err(to_status)?;
        let resp = match backend.txn(req).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.status(e).await),
        };
        Ok(Response::new(rpc::txn_response_to_pb(resp, self.member_id)))
    }

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        let owner = Caller::of(&request).name().unwrap_or_default().to_string();
        let req = request.into_inner();
        let (id, ttl) = match self.sessions.open(req.ttl_ms, owner).await {
            Ok(opened) => opened,
            Err(e) => return Err(self.status(e).await),
        };
        Ok(Response::new(pb::OpenSessionResponse {
            header: rpc::header(self.member_id, self.backend.local_revision()),
            id,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn keep_alive_session(
        &self,
        request: Request<pb::KeepAliveSessionRequest>,
    ) -> Result<Response<pb::KeepAliveSessionResponse>, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().id;
        self.check_owner(&caller, id)?;
        let ttl = match self.sessions.keep_alive(id).await {
            Ok(ttl) => ttl,
            Err(e) => return Err(self.status(e).await),
        };
        Ok(Response::new(pb::KeepAliveSessionResponse {
            header: rpc::header(self.member_id, self.backend.local_revision()),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().id;
        self.check_owner(&caller, id)?;
        if let Err(e) = self.sessions.close(id).await {
            return Err(self.status(e).await);
        }
        Ok(Response::new(pb::CloseSessionResponse {
            header: rpc::header(self.member_id, self.backend.local_revision()),
        }))
    }
}
