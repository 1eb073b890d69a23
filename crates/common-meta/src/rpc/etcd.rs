//! Conversions between etcd's v3 wire (`meta_proto::etcd`) and the domain types of
//! [`crate::kv`]: the etcd API in `meta-srv` is an adapter over the same core, and
//! these are its only translations.
//!
//! A range is the one place etcd's API adds to the core: it sorts and filters by
//! revision after reading, then applies the limit. [`range_request`] asks the core
//! for every key when that is needed, and [`shape_range`] does the rest, so the two
//! halves of that rule stay together. etcd's request checks and error texts live with
//! the adapter.

use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::mvccpb;

use crate::error::{Error, Result};
use crate::kv;

/// Who answers: the parts of etcd's response header that do not change per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Responder {
    /// The cluster's id.
    pub cluster_id: u64,
    /// The answering member.
    pub member_id: u64,
    /// The raft term the member knows.
    pub raft_term: u64,
}

impl Responder {
    /// etcd's response header at `revision`.
    pub fn header(&self, revision: i64) -> Option<epb::ResponseHeader> {
        Some(epb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.raft_term,
        })
    }
}

impl From<kv::KeyValue> for mvccpb::KeyValue {
    fn from(kv: kv::KeyValue) -> Self {
        mvccpb::KeyValue {
            key: kv.key,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            value: kv.value,
            lease: kv.lease,
        }
    }
}

impl From<mvccpb::KeyValue> for kv::KeyValue {
    fn from(kv: mvccpb::KeyValue) -> Self {
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

impl From<kv::Event> for mvccpb::Event {
    fn from(event: kv::Event) -> Self {
        let kind = match event.kind {
            kv::EventKind::Put => mvccpb::event::EventType::Put,
            kv::EventKind::Delete => mvccpb::event::EventType::Delete,
        };
        mvccpb::Event {
            r#type: kind.into(),
            kv: Some(event.kv.into()),
            prev_kv: event.prev_kv.map(Into::into),
        }
    }
}

impl From<epb::WatchCreateRequest> for kv::WatchRequest {
    fn from(r: epb::WatchCreateRequest) -> Self {
        use epb::watch_create_request::FilterType;
        let has = |f: FilterType| r.filters.contains(&(f as i32));
        kv::WatchRequest {
            no_put: has(FilterType::Noput),
            no_delete: has(FilterType::Nodelete),
            key: r.key,
            range_end: r.range_end,
            start_revision: r.start_revision,
            prev_kv: r.prev_kv,
            progress_notify: r.progress_notify,
        }
    }
}

/// The core range an etcd range reads: every key of the range when the answer is
/// sorted or filtered (the limit applies after that, in [`shape_range`]).
pub fn range_request(r: &epb::RangeRequest) -> kv::RangeRequest {
    kv::RangeRequest {
        key: r.key.clone(),
        range_end: r.range_end.clone(),
        limit: if reshaped(r) { 0 } else { r.limit },
        keys_only: r.keys_only,
        count_only: r.count_only,
        revision: r.revision,
    }
}

/// Whether etcd sorts or filters this range's answer (anything but key order, which
/// the core reads in).
fn reshaped(r: &epb::RangeRequest) -> bool {
    sort_order(r) != epb::range_request::SortOrder::None
        || r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
}

/// The order etcd applies: ascending by default when the target is not the key, and
/// no sort for ascending keys (the order the range was read in).
fn sort_order(r: &epb::RangeRequest) -> epb::range_request::SortOrder {
    use epb::range_request::{SortOrder, SortTarget};
    let order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    match (order, target) {
        (SortOrder::None, SortTarget::Key) | (SortOrder::Ascend, SortTarget::Key) => {
            SortOrder::None
        }
        (SortOrder::None, _) => SortOrder::Ascend,
        (order, _) => order,
    }
}

/// Applies etcd's revision filters, sort and limit to the core's answer to
/// [`range_request`]. `count` stays the number of keys in the range, as etcd reports.
pub fn shape_range(answer: &mut kv::RangeResponse, r: &epb::RangeRequest) {
    use epb::range_request::{SortOrder, SortTarget};
    if !reshaped(r) {
        return;
    }
    answer.kvs.retain(|kv| {
        (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
            && (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
            && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
            && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
    });
    let order = sort_order(r);
    if order != SortOrder::None {
        // Stable: keys that tie stay in key order.
        match SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key) {
            SortTarget::Key => {}
            SortTarget::Version => answer.kvs.sort_by_key(|kv| kv.version),
            SortTarget::Create => answer.kvs.sort_by_key(|kv| kv.create_revision),
            SortTarget::Mod => answer.kvs.sort_by_key(|kv| kv.mod_revision),
            SortTarget::Value => answer.kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        }
        if order == SortOrder::Descend {
            answer.kvs.reverse();
        }
    }
    if let Ok(limit) = usize::try_from(r.limit)
        && limit > 0
        && answer.kvs.len() > limit
    {
        answer.kvs.truncate(limit);
        answer.more = true;
    }
}

/// Applies [`shape_range`] to every range answer of a transaction, matching each to
/// the request it answers in the branch that ran.
pub fn shape_txn(answer: &mut kv::TxnResponse, r: &epb::TxnRequest) {
    use epb::request_op::Request;
    let branch = if answer.succeeded {
        &r.success
    } else {
        &r.failure
    };
    for (op, response) in branch.iter().zip(answer.responses.iter_mut()) {
        match (&op.request, response) {
            (Some(Request::RequestRange(range)), kv::TxnOpResponse::Range(answer)) => {
                shape_range(answer, range);
            }
            (Some(Request::RequestTxn(nested)), kv::TxnOpResponse::Txn(answer)) => {
                shape_txn(answer, nested);
            }
            _ => {}
        }
    }
}

impl From<epb::PutRequest> for kv::PutRequest {
    fn from(r: epb::PutRequest) -> Self {
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

impl From<epb::DeleteRangeRequest> for kv::DeleteRangeRequest {
    fn from(r: epb::DeleteRangeRequest) -> Self {
        kv::DeleteRangeRequest {
            key: r.key,
            range_end: r.range_end,
            prev_kv: r.prev_kv,
        }
    }
}

impl TryFrom<epb::Compare> for kv::Compare {
    type Error = Error;

    /// An operand left out is its zero value, as etcd reads it.
    fn try_from(c: epb::Compare) -> Result<Self> {
        use epb::compare::{CompareResult, CompareTarget, TargetUnion};
        let op = match CompareResult::try_from(c.result) {
            Ok(CompareResult::Equal) => kv::CompareOp::Equal,
            Ok(CompareResult::Greater) => kv::CompareOp::Greater,
            Ok(CompareResult::Less) => kv::CompareOp::Less,
            Ok(CompareResult::NotEqual) => kv::CompareOp::NotEqual,
            Err(_) => {
                return Err(Error::invalid_argument(format!(
                    "unknown compare result {}",
                    c.result
                )));
            }
        };
        let number = |operand: Option<&TargetUnion>| match operand {
            Some(
                TargetUnion::Version(n)
                | TargetUnion::CreateRevision(n)
                | TargetUnion::ModRevision(n)
                | TargetUnion::Lease(n),
            ) => *n,
            _ => 0,
        };
        let operand = c.target_union.as_ref();
        let target = match CompareTarget::try_from(c.target) {
            Ok(CompareTarget::Version) => kv::CompareTarget::Version(number(operand)),
            Ok(CompareTarget::Create) => kv::CompareTarget::CreateRevision(number(operand)),
            Ok(CompareTarget::Mod) => kv::CompareTarget::ModRevision(number(operand)),
            Ok(CompareTarget::Lease) => kv::CompareTarget::Lease(number(operand)),
            Ok(CompareTarget::Value) => kv::CompareTarget::Value(match c.target_union {
                Some(TargetUnion::Value(value)) => value,
                _ => Vec::new(),
            }),
            Err(_) => {
                return Err(Error::invalid_argument(format!(
                    "unknown compare target {}",
                    c.target
                )));
            }
        };
        Ok(kv::Compare {
            key: c.key,
            range_end: c.range_end,
            op,
            target,
        })
    }
}

/// One operation of an etcd transaction as the core runs it (a range's sorting and
/// filters are applied to the answer by [`shape_txn`]).
pub fn txn_op(op: epb::RequestOp) -> Result<kv::TxnOp> {
    use epb::request_op::Request;
    match op.request {
        Some(Request::RequestRange(r)) => Ok(kv::TxnOp::Range(range_request(&r))),
        Some(Request::RequestPut(r)) => Ok(kv::TxnOp::Put(r.into())),
        Some(Request::RequestDeleteRange(r)) => Ok(kv::TxnOp::DeleteRange(r.into())),
        Some(Request::RequestTxn(r)) => Ok(kv::TxnOp::Txn(txn_request(r)?)),
        None => Err(Error::invalid_argument("a txn operation names no request")),
    }
}

/// An etcd transaction as the core runs it.
pub fn txn_request(r: epb::TxnRequest) -> Result<kv::TxnRequest> {
    Ok(kv::TxnRequest {
        compare: r
            .compare
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_>>()?,
        success: r.success.into_iter().map(txn_op).collect::<Result<_>>()?,
        failure: r.failure.into_iter().map(txn_op).collect::<Result<_>>()?,
    })
}

/// etcd's answer to a range.
pub fn range_response(r: kv::RangeResponse, who: &Responder) -> epb::RangeResponse {
    epb::RangeResponse {
        header: who.header(r.revision),
        kvs: r.kvs.into_iter().map(Into::into).collect(),
        more: r.more,
        count: r.count,
    }
}

/// etcd's answer to a put.
pub fn put_response(r: kv::PutResponse, who: &Responder) -> epb::PutResponse {
    epb::PutResponse {
        header: who.header(r.revision),
        prev_kv: r.prev_kv.map(Into::into),
    }
}

/// etcd's answer to a delete.
pub fn delete_range_response(
    r: kv::DeleteRangeResponse,
    who: &Responder,
) -> epb::DeleteRangeResponse {
    epb::DeleteRangeResponse {
        header: who.header(r.revision),
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(Into::into).collect(),
    }
}

/// etcd's answer to a transaction; every inner answer carries the same header.
pub fn txn_response(r: kv::TxnResponse, who: &Responder) -> epb::TxnResponse {
    use epb::response_op::Response;
    let responses = r
        .responses
        .into_iter()
        .map(|answer| epb::ResponseOp {
            response: Some(match answer {
                kv::TxnOpResponse::Range(r) => Response::ResponseRange(range_response(r, who)),
                kv::TxnOpResponse::Put(r) => Response::ResponsePut(put_response(r, who)),
                kv::TxnOpResponse::DeleteRange(r) => {
                    Response::ResponseDeleteRange(delete_range_response(r, who))
                }
                kv::TxnOpResponse::Txn(r) => Response::ResponseTxn(txn_response(r, who)),
            }),
        })
        .collect();
    epb::TxnResponse {
        header: who.header(r.revision),
        succeeded: r.succeeded,
        responses,
    }
}
