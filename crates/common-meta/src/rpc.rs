//! The one set of conversions between the `meta.v1` wire types and the domain types of
//! [`crate::kv`]. Client and server both use these, so neither writes them again.
//!
//! Wire requests carry fields the domain does not (`serializable`); responses carry a
//! header the domain reduces to its revision. [`header`] builds that header.

use meta_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::kv;

impl From<crate::model::node::NodeRole> for pb::NodeRole {
    fn from(role: crate::model::node::NodeRole) -> Self {
        use crate::model::node::NodeRole as R;
        match role {
            R::Datanode => pb::NodeRole::Datanode,
            R::Frontend => pb::NodeRole::Frontend,
            R::Flownode => pb::NodeRole::Flownode,
        }
    }
}

impl TryFrom<pb::NodeRole> for crate::model::node::NodeRole {
    type Error = Error;

    fn try_from(role: pb::NodeRole) -> Result<Self> {
        use crate::model::node::NodeRole as R;
        match role {
            pb::NodeRole::Datanode => Ok(R::Datanode),
            pb::NodeRole::Frontend => Ok(R::Frontend),
            pb::NodeRole::Flownode => Ok(R::Flownode),
            pb::NodeRole::Unspecified => Err(Error::invalid_argument("node role unspecified")),
        }
    }
}

impl From<crate::model::node::NodeState> for pb::NodeState {
    fn from(state: crate::model::node::NodeState) -> Self {
        use crate::model::node::NodeState as S;
        match state {
            S::Joining => pb::NodeState::Joining,
            S::Active => pb::NodeState::Active,
            S::Draining => pb::NodeState::Draining,
            S::Decommissioned => pb::NodeState::Decommissioned,
        }
    }
}

impl TryFrom<i32> for crate::model::node::NodeState {
    type Error = Error;

    /// A wire node state; an unknown or unspecified one is an invalid argument.
    fn try_from(state: i32) -> Result<Self> {
        use crate::model::node::NodeState as S;
        match pb::NodeState::try_from(state) {
            Ok(pb::NodeState::Joining) => Ok(S::Joining),
            Ok(pb::NodeState::Active) => Ok(S::Active),
            Ok(pb::NodeState::Draining) => Ok(S::Draining),
            Ok(pb::NodeState::Decommissioned) => Ok(S::Decommissioned),
            _ => Err(Error::invalid_argument(format!(
                "unknown node state {state} (active, draining or decommissioned)"
            ))),
        }
    }
}

/// The response header for a store at `revision`, served by `member_id`.
pub fn header(member_id: u64, revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        member_id,
        revision,
    })
}

fn revision_of(header: Option<&pb::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision)
}

impl From<pb::KeyValue> for kv::KeyValue {
    fn from(kv: pb::KeyValue) -> Self {
        kv::KeyValue {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

impl From<kv::KeyValue> for pb::KeyValue {
    fn from(kv: kv::KeyValue) -> Self {
        pb::KeyValue {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

fn kvs_from_pb(kvs: Vec<pb::KeyValue>) -> Vec<kv::KeyValue> {
    kvs.into_iter().map(Into::into).collect()
}

fn kvs_to_pb(kvs: Vec<kv::KeyValue>) -> Vec<pb::KeyValue> {
    kvs.into_iter().map(Into::into).collect()
}

impl From<kv::Event> for pb::Event {
    fn from(e: kv::Event) -> Self {
        pb::Event {
            r#type: match e.kind {
                kv::EventKind::Put => pb::event::EventType::Put,
                kv::EventKind::Delete => pb::event::EventType::Delete,
            } as i32,
            kv: Some(e.kv.into()),
            prev_kv: e.prev_kv.map(Into::into),
        }
    }
}

impl From<pb::Event> for kv::Event {
    fn from(e: pb::Event) -> Self {
        kv::Event {
            kind: if e.r#type == pb::event::EventType::Delete as i32 {
                kv::EventKind::Delete
            } else {
                kv::EventKind::Put
            },
            kv: e.kv.map(Into::into).unwrap_or_default(),
            prev_kv: e.prev_kv.map(Into::into),
        }
    }
}

impl From<pb::WatchCreateRequest> for kv::WatchRequest {
    fn from(r: pb::WatchCreateRequest) -> Self {
        let has = |f: pb::WatchFilter| r.filters.contains(&(f as i32));
        kv::WatchRequest {
            no_put: has(pb::WatchFilter::Noput),
            no_delete: has(pb::WatchFilter::Nodelete),
            key: r.key,
            range_end: r.range_end,
            start_revision: r.start_revision,
            prev_kv: r.prev_kv,
            progress_notify: r.progress_notify,
        }
    }
}

impl From<kv::WatchRequest> for pb::WatchCreateRequest {
    fn from(r: kv::WatchRequest) -> Self {
        let mut filters = Vec::new();
        if r.no_put {
            filters.push(pb::WatchFilter::Noput as i32);
        }
        if r.no_delete {
            filters.push(pb::WatchFilter::Nodelete as i32);
        }
        pb::WatchCreateRequest {
            key: r.key,
            range_end: r.range_end,
            start_revision: r.start_revision,
            progress_notify: r.progress_notify,
            filters,
            prev_kv: r.prev_kv,
            watch_id: 0,
        }
    }
}

impl From<pb::RangeRequest> for kv::RangeRequest {
    fn from(r: pb::RangeRequest) -> Self {
        kv::RangeRequest {
            key: r.key,
            range_end: r.range_end,
            limit: r.limit,
            keys_only: r.keys_only,
            count_only: r.count_only,
            revision: r.revision,
        }
    }
}

impl From<kv::RangeRequest> for pb::RangeRequest {
    fn from(r: kv::RangeRequest) -> Self {
        pb::RangeRequest {
            key: r.key,
            range_end: r.range_end,
            limit: r.limit,
            keys_only: r.keys_only,
            count_only: r.count_only,
            serializable: false,
            revision: r.revision,
        }
    }
}

/// Converts a range response for the wire.
pub fn range_response_to_pb(r: kv::RangeResponse, member_id: u64) -> pb::RangeResponse {
    pb::RangeResponse {
        header: header(member_id, r.revision),
        kvs: kvs_to_pb(r.kvs),
        more: r.more,
        count: r.count,
    }
}

impl From<pb::RangeResponse> for kv::RangeResponse {
    fn from(r: pb::RangeResponse) -> Self {
        kv::RangeResponse {
            revision: revision_of(r.header.as_ref()),
            kvs: kvs_from_pb(r.kvs),
            more: r.more,
            count: r.count,
        }
    }
}

impl From<pb::PutRequest> for kv::PutRequest {
    fn from(r: pb::PutRequest) -> Self {
        kv::PutRequest {
            key: r.key,
            value: r.value,
            prev_kv: r.prev_kv,
            lease: r.lease,
            ignore_value: r.ignore_value,
            ignore_lease: r.ignore_lease,
        }
    }
}

impl From<kv::PutRequest> for pb::PutRequest {
    fn from(r: kv::PutRequest) -> Self {
        pb::PutRequest {
            key: r.key,
            value: r.value,
            prev_kv: r.prev_kv,
            session: None,
            lease: r.lease,
            ignore_value: r.ignore_value,
            ignore_lease: r.ignore_lease,
        }
    }
}

/// Converts a put response for the wire.
pub fn put_response_to_pb(r: kv::PutResponse, member_id: u64) -> pb::PutResponse {
    pb::PutResponse {
        header: header(member_id, r.revision),
        prev_kv: r.prev_kv.map(Into::into),
    }
}

impl From<pb::PutResponse> for kv::PutResponse {
    fn from(r: pb::PutResponse) -> Self {
        kv::PutResponse {
            revision: revision_of(r.header.as_ref()),
            prev_kv: r.prev_kv.map(Into::into),
        }
    }
}

impl From<pb::DeleteRangeRequest> for kv::DeleteRangeRequest {
    fn from(r: pb::DeleteRangeRequest) -> Self {
        kv::DeleteRangeRequest {
            key: r.key,
            range_end: r.range_end,
            prev_kv: r.prev_kv,
        }
    }
}

impl From<kv::DeleteRangeRequest> for pb::DeleteRangeRequest {
    fn from(r: kv::DeleteRangeRequest) -> Self {
        pb::DeleteRangeRequest {
            key: r.key,
            range_end: r.range_end,
            prev_kv: r.prev_kv,
            session: None,
        }
    }
}

/// Converts a delete-range response for the wire.
pub fn delete_range_response_to_pb(
    r: kv::DeleteRangeResponse,
    member_id: u64,
) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: header(member_id, r.revision),
        deleted: r.deleted,
        prev_kvs: kvs_to_pb(r.prev_kvs),
    }
}

impl From<pb::DeleteRangeResponse> for kv::DeleteRangeResponse {
    fn from(r: pb::DeleteRangeResponse) -> Self {
        kv::DeleteRangeResponse {
            revision: revision_of(r.header.as_ref()),
            deleted: r.deleted,
            prev_kvs: kvs_from_pb(r.prev_kvs),
        }
    }
}

impl From<pb::BatchGetRequest> for kv::BatchGetRequest {
    fn from(r: pb::BatchGetRequest) -> Self {
        kv::BatchGetRequest { keys: r.keys }
    }
}

impl From<kv::BatchGetRequest> for pb::BatchGetRequest {
    fn from(r: kv::BatchGetRequest) -> Self {
        pb::BatchGetRequest {
            keys: r.keys,
            serializable: false,
        }
    }
}

/// Converts a batch-get response for the wire.
pub fn batch_get_response_to_pb(r: kv::BatchGetResponse, member_id: u64) -> pb::BatchGetResponse {
    pb::BatchGetResponse {
        header: header(member_id, r.revision),
        kvs: kvs_to_pb(r.kvs),
    }
}

impl From<pb::BatchGetResponse> for kv::BatchGetResponse {
    fn from(r: pb::BatchGetResponse) -> Self {
        kv::BatchGetResponse {
            revision: revision_of(r.header.as_ref()),
            kvs: kvs_from_pb(r.kvs),
        }
    }
}

impl From<pb::BatchPutRequest> for kv::BatchPutRequest {
    fn from(r: pb::BatchPutRequest) -> Self {
        kv::BatchPutRequest {
            kvs: r.kvs.into_iter().map(|p| (p.key, p.value)).collect(),
            prev_kv: r.prev_kv,
        }
    }
}

impl From<kv::BatchPutRequest> for pb::BatchPutRequest {
    fn from(r: kv::BatchPutRequest) -> Self {
        pb::BatchPutRequest {
            kvs: r
                .kvs
                .into_iter()
                .map(|(key, value)| pb::KeyValuePair { key, value })
                .collect(),
            prev_kv: r.prev_kv,
            session: None,
        }
    }
}

/// Converts a batch-put response for the wire.
pub fn batch_put_response_to_pb(r: kv::BatchPutResponse, member_id: u64) -> pb::BatchPutResponse {
    pb::BatchPutResponse {
        header: header(member_id, r.revision),
        prev_kvs: kvs_to_pb(r.prev_kvs),
    }
}

impl From<pb::BatchPutResponse> for kv::BatchPutResponse {
    fn from(r: pb::BatchPutResponse) -> Self {
        kv::BatchPutResponse {
            revision: revision_of(r.header.as_ref()),
            prev_kvs: kvs_from_pb(r.prev_kvs),
        }
    }
}

impl From<pb::BatchDeleteRequest> for kv::BatchDeleteRequest {
    fn from(r: pb::BatchDeleteRequest) -> Self {
        kv::BatchDeleteRequest {
            keys: r.keys,
            prev_kv: r.prev_kv,
        }
    }
}

impl From<kv::BatchDeleteRequest> for pb::BatchDeleteRequest {
    fn from(r: kv::BatchDeleteRequest) -> Self {
        pb::BatchDeleteRequest {
            keys: r.keys,
            prev_kv: r.prev_kv,
            session: None,
        }
    }
}

/// Converts a batch-delete response for the wire.
pub fn batch_delete_response_to_pb(
    r: kv::BatchDeleteResponse,
    member_id: u64,
) -> pb::BatchDeleteResponse {
    pb::BatchDeleteResponse {
        header: header(member_id, r.revision),
        deleted: r.deleted,
        prev_kvs: kvs_to_pb(r.prev_kvs),
    }
}

impl From<pb::BatchDeleteResponse> for kv::BatchDeleteResponse {
    fn from(r: pb::BatchDeleteResponse) -> Self {
        kv::BatchDeleteResponse {
            revision: revision_of(r.header.as_ref()),
            deleted: r.deleted,
            prev_kvs: kvs_from_pb(r.prev_kvs),
        }
    }
}

impl From<pb::CompareAndPutRequest> for kv::CompareAndPutRequest {
    fn from(r: pb::CompareAndPutRequest) -> Self {
        kv::CompareAndPutRequest {
            key: r.key,
            expect: r.expect,
            value: r.value,
        }
    }
}

impl From<kv::CompareAndPutRequest> for pb::CompareAndPutRequest {
    fn from(r: kv::CompareAndPutRequest) -> Self {
        pb::CompareAndPutRequest {
            key: r.key,
            expect: r.expect,
            value: r.value,
            session: None,
        }
    }
}

/// Converts a compare-and-put response for the wire.
pub fn compare_and_put_response_to_pb(
    r: kv::CompareAndPutResponse,
    member_id: u64,
) -> pb::CompareAndPutResponse {
    pb::CompareAndPutResponse {
        header: header(member_id, r.revision),
        success: r.success,
        prev_kv: r.prev_kv.map(Into::into),
    }
}

impl From<pb::CompareAndPutResponse> for kv::CompareAndPutResponse {
    fn from(r: pb::CompareAndPutResponse) -> Self {
        kv::CompareAndPutResponse {
            revision: revision_of(r.header.as_ref()),
            success: r.success,
            prev_kv: r.prev_kv.map(Into::into),
        }
    }
}

pub mod etcd;
mod route;
mod txn;
pub use txn::txn_response_to_pb;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_round_trips_through_the_wire_types() {
        let txn = kv::TxnRequest {
            compare: vec![
                kv::Compare::new(
                    b"k".to_vec(),
                    kv::CompareOp::Less,
                    kv::CompareTarget::ModRevision(3),
                ),
                kv::Compare::new(
                    b"k".to_vec(),
                    kv::CompareOp::NotEqual,
                    kv::CompareTarget::Value(b"v".to_vec()),
                ),
            ],
            success: vec![kv::TxnOp::Put(kv::PutRequest::new(
                b"a".to_vec(),
                b"1".to_vec(),
            ))],
            failure: vec![
                kv::TxnOp::Range(kv::RangeRequest::prefix(b"p".to_vec()).with_limit(3)),
                kv::TxnOp::DeleteRange(kv::DeleteRangeRequest::key(b"d".to_vec())),
            ],
        };
        let wire: pb::TxnRequest = txn.clone().into();
        assert_eq!(kv::TxnRequest::try_from(wire).unwrap(), txn);
    }

    #[test]
    fn malformed_wire_txn_is_invalid_argument() {
        let no_target = pb::TxnRequest {
            compare: vec![pb::Compare {
                key: b"k".to_vec(),
                op: 0,
                target: None,
                range_end: Vec::new(),
            }],
            ..Default::default()
        };
        let err = kv::TxnRequest::try_from(no_target).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");

        let bad_op = pb::TxnRequest {
            compare: vec![pb::Compare {
                key: b"k".to_vec(),
                op: 42,
                target: Some(pb::compare::Target::Version(1)),
                range_end: Vec::new(),
            }],
            ..Default::default()
        };
        let err = kv::TxnRequest::try_from(bad_op).unwrap_err();
        assert!(err.to_string().contains("unknown compare op 42"), "{err}");
    }
}
