//! The `meta.v1.Store` service: decodes a request, checks its size, calls the
//! [`KvBackend`], encodes the answer. Every conversion is `common_meta::rpc`'s.

use std::sync::Arc;

use common_meta::kv::{KvBackend, KvLimits};
use common_meta::rpc;
use meta_proto::v1 as pb;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::error::{to_status, to_status_with_hint};
use crate::raft::members::Members;

/// Serves the KV API over any backend.
pub struct StoreService {
    backend: Arc<dyn KvBackend>,
    member_id: u64,
    limits: KvLimits,
    members: Arc<Members>,
}

impl StoreService {
    /// A service answering as `member_id` over `backend`, refusing requests over `limits`;
    /// `members` maps member ids to addresses for leader hints.
    pub fn new(
        backend: Arc<dyn KvBackend>,
        member_id: u64,
        limits: KvLimits,
        members: Arc<Members>,
    ) -> Self {
        StoreService {
            backend,
            member_id,
            limits,
            members,
        }
    }

    /// The status for `err`, with the leader hint for a not-leader answer.
    fn status(&self, err: common_meta::Error) -> Status {
        to_status_with_hint(err, &self.members)
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
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let req = self.admit(request)?;
        let serializable = req.serializable;
        let req = req.into();
        let resp = if serializable {
            self.backend.range_serializable(req).await
        } else {
            self.backend.range(req).await
        }
        .map_err(|e| self.status(e))?;
        Ok(Response::new(rpc::range_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let req = self.admit(request)?.into();
        let resp = self.backend.put(req).await.map_err(|e| self.status(e))?;
        Ok(Response::new(rpc::put_response_to_pb(resp, self.member_id)))
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let req = self.admit(request)?.into();
        let resp = self
            .backend
            .delete_range(req)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(rpc::delete_range_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn batch_get(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<Response<pb::BatchGetResponse>, Status> {
        let req = self.admit(request)?.into();
        let resp = self
            .backend
            .batch_get(req)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(rpc::batch_get_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn batch_put(
        &self,
        request: Request<pb::BatchPutRequest>,
    ) -> Result<Response<pb::BatchPutResponse>, Status> {
        let req = self.admit(request)?.into();
        let resp = self
            .backend
            .batch_put(req)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(rpc::batch_put_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn batch_delete(
        &self,
        request: Request<pb::BatchDeleteRequest>,
    ) -> Result<Response<pb::BatchDeleteResponse>, Status> {
        let req = self.admit(request)?.into();
        let resp = self
            .backend
            .batch_delete(req)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(rpc::batch_delete_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn compare_and_put(
        &self,
        request: Request<pb::CompareAndPutRequest>,
    ) -> Result<Response<pb::CompareAndPutResponse>, Status> {
        let req = self.admit(request)?.into();
        let resp = self
            .backend
            .compare_and_put(req)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(rpc::compare_and_put_response_to_pb(
            resp,
            self.member_id,
        )))
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let req = self
            .admit(request)?
            .try_into()
            .map_err(|e| self.status(e))?;
        let resp = self.backend.txn(req).await.map_err(|e| self.status(e))?;
        Ok(Response::new(rpc::txn_response_to_pb(resp, self.member_id)))
    }
}
