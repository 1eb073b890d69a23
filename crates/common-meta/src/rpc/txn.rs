//! Conversions of transactions: compares, ops (nested transactions included) and
//! their answers.

use meta_proto::v1 as pb;

use super::{
    delete_range_response_to_pb, header, put_response_to_pb, range_response_to_pb, revision_of,
};
use crate::error::{Error, Result};
use crate::kv;

impl TryFrom<pb::Compare> for kv::Compare {
    type Error = Error;

    fn try_from(c: pb::Compare) -> Result<Self> {
        use pb::compare::{CompareOp as Op, Target};
        let op = match Op::try_from(c.op) {
            Ok(Op::Equal) => kv::CompareOp::Equal,
            Ok(Op::NotEqual) => kv::CompareOp::NotEqual,
            Ok(Op::Less) => kv::CompareOp::Less,
            Ok(Op::Greater) => kv::CompareOp::Greater,
            Err(_) => {
                return Err(Error::invalid_argument(format!(
                    "unknown compare op {}",
                    c.op
                )));
            }
        };
        let target = match c.target {
            Some(Target::Version(v)) => kv::CompareTarget::Version(v),
            Some(Target::CreateRevision(v)) => kv::CompareTarget::CreateRevision(v),
            Some(Target::ModRevision(v)) => kv::CompareTarget::ModRevision(v),
            Some(Target::Value(v)) => kv::CompareTarget::Value(v),
            Some(Target::Lease(v)) => kv::CompareTarget::Lease(v),
            None => return Err(Error::invalid_argument("compare has no target")),
        };
        Ok(kv::Compare {
            key: c.key,
            range_end: c.range_end,
            op,
            target,
        })
    }
}

impl From<kv::Compare> for pb::Compare {
    fn from(c: kv::Compare) -> Self {
        use pb::compare::{CompareOp as Op, Target};
        let op = match c.op {
            kv::CompareOp::Equal => Op::Equal,
            kv::CompareOp::NotEqual => Op::NotEqual,
            kv::CompareOp::Less => Op::Less,
            kv::CompareOp::Greater => Op::Greater,
        };
        let target = match c.target {
            kv::CompareTarget::Version(v) => Target::Version(v),
            kv::CompareTarget::CreateRevision(v) => Target::CreateRevision(v),
            kv::CompareTarget::ModRevision(v) => Target::ModRevision(v),
            kv::CompareTarget::Value(v) => Target::Value(v),
            kv::CompareTarget::Lease(v) => Target::Lease(v),
        };
        pb::Compare {
            key: c.key,
            op: op.into(),
            target: Some(target),
            range_end: c.range_end,
        }
    }
}

impl TryFrom<pb::TxnOp> for kv::TxnOp {
    type Error = Error;

    fn try_from(op: pb::TxnOp) -> Result<Self> {
        use pb::txn_op::Op;
        match op.op {
            Some(Op::Range(r)) => Ok(kv::TxnOp::Range(r.into())),
            Some(Op::Put(r)) => Ok(kv::TxnOp::Put(r.into())),
            Some(Op::DeleteRange(r)) => Ok(kv::TxnOp::DeleteRange(r.into())),
            Some(Op::Txn(r)) => Ok(kv::TxnOp::Txn(r.try_into()?)),
            None => Err(Error::invalid_argument("txn op has no operation")),
        }
    }
}

impl From<kv::TxnOp> for pb::TxnOp {
    fn from(op: kv::TxnOp) -> Self {
        use pb::txn_op::Op;
        let op = match op {
            kv::TxnOp::Range(r) => Op::Range(r.into()),
            kv::TxnOp::Put(r) => Op::Put(r.into()),
            kv::TxnOp::DeleteRange(r) => Op::DeleteRange(r.into()),
            kv::TxnOp::Txn(r) => Op::Txn(r.into()),
        };
        pb::TxnOp { op: Some(op) }
    }
}

impl TryFrom<pb::TxnRequest> for kv::TxnRequest {
    type Error = Error;

    fn try_from(r: pb::TxnRequest) -> Result<Self> {
        Ok(kv::TxnRequest {
            compare: r
                .compare
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
            success: r
                .success
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
            failure: r
                .failure
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
        })
    }
}

impl From<kv::TxnRequest> for pb::TxnRequest {
    fn from(r: kv::TxnRequest) -> Self {
        pb::TxnRequest {
            compare: r.compare.into_iter().map(Into::into).collect(),
            success: r.success.into_iter().map(Into::into).collect(),
            failure: r.failure.into_iter().map(Into::into).collect(),
            session: None,
        }
    }
}

/// Converts a txn response for the wire; inner responses carry the same header.
pub fn txn_response_to_pb(r: kv::TxnResponse, member_id: u64) -> pb::TxnResponse {
    use pb::txn_op_response::Response;
    let responses = r
        .responses
        .into_iter()
        .map(|op| pb::TxnOpResponse {
            response: Some(match op {
                kv::TxnOpResponse::Range(r) => Response::Range(range_response_to_pb(r, member_id)),
                kv::TxnOpResponse::Put(r) => Response::Put(put_response_to_pb(r, member_id)),
                kv::TxnOpResponse::DeleteRange(r) => {
                    Response::DeleteRange(delete_range_response_to_pb(r, member_id))
                }
                kv::TxnOpResponse::Txn(r) => Response::Txn(txn_response_to_pb(r, member_id)),
            }),
        })
        .collect();
    pb::TxnResponse {
        header: header(member_id, r.revision),
        succeeded: r.succeeded,
        responses,
    }
}

impl TryFrom<pb::TxnResponse> for kv::TxnResponse {
    type Error = Error;

    fn try_from(r: pb::TxnResponse) -> Result<Self> {
        use pb::txn_op_response::Response;
        let responses = r
            .responses
            .into_iter()
            .map(|op| match op.response {
                Some(Response::Range(r)) => Ok(kv::TxnOpResponse::Range(r.into())),
                Some(Response::Put(r)) => Ok(kv::TxnOpResponse::Put(r.into())),
                Some(Response::DeleteRange(r)) => Ok(kv::TxnOpResponse::DeleteRange(r.into())),
                Some(Response::Txn(r)) => Ok(kv::TxnOpResponse::Txn(r.try_into()?)),
                None => Err(Error::Remote {
                    code: "Internal".to_string(),
                    message: "txn op response without a response".to_string(),
                }),
            })
            .collect::<Result<_>>()?;
        Ok(kv::TxnResponse {
            revision: revision_of(r.header.as_ref()),
            succeeded: r.succeeded,
            responses,
        })
    }
}
