//! `KvBackend` over the `meta.v1.Store` service: each call uses its own RPC, and every
//! conversion is `common_meta::rpc`'s.

use async_trait::async_trait;
use common_meta::Result;
use common_meta::kv::{
    BatchDeleteRequest, BatchDeleteResponse, BatchGetRequest, BatchGetResponse, BatchPutRequest,
    BatchPutResponse, CompareAndPutRequest, CompareAndPutResponse, DeleteRangeRequest,
    DeleteRangeResponse, KvBackend, PutRequest, PutResponse, RangeRequest, RangeResponse,
    TxnRequest, TxnResponse,
};
use meta_proto::v1 as pb;

use crate::client::MetaClient;

#[async_trait]
impl KvBackend for MetaClient {
    fn name(&self) -> &'static str {
        "remote"
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        let req = pb::TxnRequest::from(req);
        self.with_store(|mut c| {
            let req = req.clone();
            async move { c.txn(req).await }
        })
        .await?
        .try_into()
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        let req = pb::RangeRequest::from(req);
        let resp = self
            .with_store(|mut c| {
                let req = req.clone();
                async move { c.range(req).await }
            })
            .await?;
        Ok(resp.into())
    }

    async fn range_serializable(&self, req: RangeRequest) -> Result<RangeResponse> {
        let req = pb::RangeRequest {
            serializable: true,
            ..pb::RangeRequest::from(req)
        };
        let resp = self
            .with_store(|mut c| {
                let req = req.clone();
                async move { c.range(req).await }
            })
            .await?;
        Ok(resp.into())
    }

    async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        let req = pb::PutRequest::from(req);
        let resp = self
            .with_store(|mut c| {
                let req = req.clone();
                async move { c.put(req).await }
            })
            .await?;
        Ok(resp.into())
    }

    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let req = pb::DeleteRangeRequest::from(req);
        let resp = self
            .with_store(|mut c| {
                let req = req.clone();
                async move { c.delete_range(req).await }
            })
            .await?;
        Ok(resp.into())
    }

    async fn batch_get(&self, req: BatchGetRequest) -> Result<BatchGetResponse> {
        let req = pb::BatchGetRequest::from(req);
        let resp = self
            .with_store(|mut c| {
                let req = req.clone();
                async move { c.batch_get(req).await }
            })
            .await?;
        Ok(resp.into())
    }

    async fn batch_put(&self, req: BatchPutRequest) -> Result<BatchPutResponse> {
        let req = pb::BatchPutRequest::from(req);
        let resp = self
            .with_store(|mut c| {
                let req = req.clone();
                async move { c.batch_put(req).await }
            })
            .await?;
        Ok(resp.into())
    }

    async fn batch_delete(&self, req: BatchDeleteRequest) -> Result<BatchDeleteResponse> {
        let req = pb::BatchDeleteRequest::from(req);
        let resp = self
            .with_store(|mut c| {
                let req = req.clone();
                async move { c.batch_delete(req).await }
            })
            .await?;
        Ok(resp.into())
    }

    async fn compare_and_put(&self, req: CompareAndPutRequest) -> Result<CompareAndPutResponse> {
        let req = pb::CompareAndPutRequest::from(req);
        let resp = self
            .with_store(|mut c| {
                let req = req.clone();
                async move { c.compare_and_put(req).await }
            })
            .await?;
        Ok(resp.into())
    }
}
