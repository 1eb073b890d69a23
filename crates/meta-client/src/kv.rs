//! `KvBackend` over the `meta.v1.Store` service: each call uses its own RPC, every write
//! runs in the client's session (exactly-once), and every conversion is
//! `common_meta::rpc`'s.

use async_trait::async_trait;
use common_meta::Result;
use common_meta::kv::{
    BatchDeleteRequest, BatchDeleteResponse, BatchGetRequest, BatchGetResponse, BatchPutRequest,
    BatchPutResponse, CompareAndPutRequest, CompareAndPutResponse, DeleteRangeRequest,
    DeleteRangeResponse, KvBackend, LeaseGrant, LeaseTimeToLive, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse, WatchRequest, WatchStream,
};
use meta_proto::v1 as pb;

use crate::client::MetaClient;

/// One unary Store RPC through the client's retry loop; the request is cloned per try.
macro_rules! unary {
    ($client:expr, $method:ident, $request:expr) => {{
        let request = $request;
        $client
            .with_store(|mut store| {
                let request = request.clone();
                async move { store.$method(request).await }
            })
            .await
    }};
}

/// One write Store RPC, exactly-once in the client's session (see `session.rs`); the
/// request is cloned per try and carries the session reference of that try.
macro_rules! write {
    ($client:expr, $method:ident, $request:expr) => {{
        let request = $request;
        $client
            .write(|mut store, session| {
                let mut request = request.clone();
                request.session = session;
                async move { store.$method(request).await }
            })
            .await
    }};
}

#[async_trait]
impl KvBackend for MetaClient {
    fn name(&self) -> &'static str {
        "remote"
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        if req.is_read_only() {
            return unary!(self, txn, pb::TxnRequest::from(req))?.try_into();
        }
        write!(self, txn, pb::TxnRequest::from(req))?.try_into()
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        Ok(unary!(self, range, pb::RangeRequest::from(req))?.into())
    }

    async fn compact(&self, revision: i64) -> Result<i64> {
        let response = unary!(self, compact, pb::CompactRequest { revision })?;
        Ok(response.header.map_or(0, |h| h.revision))
    }

    async fn lease_grant(&self, ttl: i64, id: i64) -> Result<LeaseGrant> {
        self.remote_lease_grant(ttl, id).await
    }

    async fn lease_revoke(&self, id: i64) -> Result<()> {
        self.remote_lease_revoke(id).await
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64> {
        self.remote_lease_keep_alive(id).await
    }

    async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLive> {
        self.remote_lease_time_to_live(id, keys).await
    }

    async fn leases(&self) -> Result<Vec<i64>> {
        self.remote_leases().await
    }

    /// Survives the loss of the member serving it; see `watch.rs`.
    async fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        self.remote_watch(req).await
    }

    async fn range_serializable(&self, req: RangeRequest) -> Result<RangeResponse> {
        let request = pb::RangeRequest {
            serializable: true,
            ..pb::RangeRequest::from(req)
        };
        Ok(unary!(self, range, request)?.into())
    }

    async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        Ok(write!(self, put, pb::PutRequest::from(req))?.into())
    }

    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        Ok(write!(self, delete_range, pb::DeleteRangeRequest::from(req))?.into())
    }

    async fn batch_get(&self, req: BatchGetRequest) -> Result<BatchGetResponse> {
        Ok(unary!(self, batch_get, pb::BatchGetRequest::from(req))?.into())
    }

    async fn batch_put(&self, req: BatchPutRequest) -> Result<BatchPutResponse> {
        Ok(write!(self, batch_put, pb::BatchPutRequest::from(req))?.into())
    }

    async fn batch_delete(&self, req: BatchDeleteRequest) -> Result<BatchDeleteResponse> {
        Ok(write!(self, batch_delete, pb::BatchDeleteRequest::from(req))?.into())
    }

    async fn compare_and_put(&self, req: CompareAndPutRequest) -> Result<CompareAndPutResponse> {
        Ok(write!(self, compare_and_put, pb::CompareAndPutRequest::from(req))?.into())
    }
}
