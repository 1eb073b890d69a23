//! etcd's `KV` service: Range, Put, DeleteRange, Txn, Compact over the member's
//! backend. Writes and linearizable reads run at the leader (forwarded when this
//! member does not lead); serializable reads are served here.

use std::sync::Arc;

use common_meta::kv::KvBackend;
use common_meta::rpc::etcd as convert;
use meta_proto::etcd::etcdserverpb as epb;
use tonic::{Request, Response, Status};

use super::forward::{Route, onward};
use super::status::status;
use super::{Etcd, check};
use crate::auth::{Caller, Checked};

/// etcd's KV service of one member.
pub struct KvService {
    etcd: Arc<Etcd>,
}

impl KvService {
    /// The service over the member's shared etcd state.
    pub fn new(etcd: Arc<Etcd>) -> Self {
        KvService { etcd }
    }

    fn client(
        channel: tonic::transport::Channel,
    ) -> epb::kv_client::KvClient<tonic::transport::Channel> {
        epb::kv_client::KvClient::new(channel)
    }
}

#[tonic::async_trait]
impl epb::kv_server::Kv for KvService {
    async fn range(
        &self,
        request: Request<epb::RangeRequest>,
    ) -> Result<Response<epb::RangeResponse>, Status> {
        check::range(request.get_ref())?;
        check::size(request.get_ref(), &self.etcd.limits)?;
        if !request.get_ref().serializable
            && let Route::Leader(channel) = self.etcd.forward.route(&request).await?
        {
            return Self::client(channel).range(onward(request)).await;
        }
        let backend = Checked::new(&self.etcd.backend, Caller::of(&request));
        let r = request.into_inner();
        let core = convert::range_request(&r);
        let mut answer = if r.serializable {
            backend.range_serializable(core).await
        } else {
            backend.range(core).await
        }
        .map_err(status)?;
        convert::shape_range(&mut answer, &r);
        Ok(Response::new(convert::range_response(
            answer,
            &self.etcd.responder(),
        )))
    }

    async fn put(
        &self,
        request: Request<epb::PutRequest>,
    ) -> Result<Response<epb::PutResponse>, Status> {
        check::put(request.get_ref())?;
        check::size(request.get_ref(), &self.etcd.limits)?;
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return Self::client(channel).put(onward(request)).await;
        }
        let answer = Checked::new(&self.etcd.backend, Caller::of(&request))
            .put(request.into_inner().into())
            .await
            .map_err(status)?;
        Ok(Response::new(convert::put_response(
            answer,
            &self.etcd.responder(),
        )))
    }

    async fn delete_range(
        &self,
        request: Request<epb::DeleteRangeRequest>,
    ) -> Result<Response<epb::DeleteRangeResponse>, Status> {
        check::delete_range(request.get_ref())?;
        check::size(request.get_ref(), &self.etcd.limits)?;
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return Self::client(channel).delete_range(onward(request)).await;
        }
        let answer = Checked::new(&self.etcd.backend, Caller::of(&request))
            .delete_range(request.into_inner().into())
            .await
            .map_err(status)?;
        Ok(Response::new(convert::delete_range_response(
            answer,
            &self.etcd.responder(),
        )))
    }

    async fn txn(
        &self,
        request: Request<epb::TxnRequest>,
    ) -> Result<Response<epb::TxnResponse>, Status> {
        check::txn(request.get_ref(), &self.etcd.limits)?;
        check::size(request.get_ref(), &self.etcd.limits)?;
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return Self::client(channel).txn(onward(request)).await;
        }
        let backend = Checked::new(&self.etcd.backend, Caller::of(&request));
        let r = request.into_inner();
        let core = convert::txn_request(r.clone()).map_err(status)?;
        let mut answer = backend.txn(core).await.map_err(status)?;
        convert::shape_txn(&mut answer, &r);
        Ok(Response::new(convert::txn_response(
            answer,
            &self.etcd.responder(),
        )))
    }

    async fn compact(
        &self,
        request: Request<epb::CompactionRequest>,
    ) -> Result<Response<epb::CompactionResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return Self::client(channel).compact(onward(request)).await;
        }
        // Compaction here reclaims the space as it applies: `physical` is always met.
        let revision = self
            .etcd
            .backend
            .compact(request.into_inner().revision)
            .await
            .map_err(status)?;
        Ok(Response::new(epb::CompactionResponse {
            header: self.etcd.responder().header(revision),
        }))
    }
}
