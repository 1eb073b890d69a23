//! What the replicated state machine applies ([`Command`]), what it answers
//! ([`Applied`]), and the encoding of a command in a raft entry.
//!
//! Entry format: an empty payload is the no-op a new leader appends; a payload that
//! starts with `0x00` is that byte followed by a `meta.v1.RaftCommand`; any other payload
//! is a bare `meta.v1.TxnRequest` (the first format, still read so that an older log
//! replays). No protobuf encoding of a non-empty message starts with `0x00` (field number
//! 0 is invalid), so the three cannot be confused.

use meta_proto::v1 as pb;
use prost::Message as _;

use crate::auth::AuthChange;
use crate::error::{Error, Result};
use crate::kv::types::{TxnRequest, TxnResponse};

/// The first byte of a current-format entry payload.
const FORMAT_COMMAND: u8 = 0x00;

/// An entry's context: 16 bytes naming the proposing member and its proposal id, by
/// which the proposer finds the caller to answer when the entry is applied.
pub fn proposal_context(member: u64, proposal: u64) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(16);
    ctx.extend_from_slice(&member.to_be_bytes());
    ctx.extend_from_slice(&proposal.to_be_bytes());
    ctx
}

/// The proposing member and proposal id of an entry context ([`proposal_context`]);
/// `None` for anything shorter (the no-op of a new leader has none).
pub fn parse_context(ctx: &[u8]) -> Option<(u64, u64)> {
    let member: [u8; 8] = ctx.get(..8)?.try_into().ok()?;
    let proposal: [u8; 8] = ctx.get(8..16)?.try_into().ok()?;
    Some((u64::from_be_bytes(member), u64::from_be_bytes(proposal)))
}

/// Names a write as the `seq`-th of client session `id`, so that a retry is answered
/// with the first outcome instead of being applied again (exactly-once writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRef {
    /// The session, as opened (the index of the entry that opened it).
    pub id: u64,
    /// This write's number in the session: at least 1, never reused.
    pub seq: u64,
    /// The client holds the answer of every write numbered below this one, so the state
    /// machine may forget them.
    pub acked: u64,
}

impl SessionRef {
    /// Checks the numbering rules: `seq` at least 1 and `acked` not beyond `seq`.
    pub fn validate(&self) -> Result<()> {
        if self.id == 0 || self.seq == 0 || self.acked > self.seq {
            return Err(Error::invalid_argument(format!(
                "invalid session reference (id {}, seq {}, acked {}): id and seq must be at least 1 and acked at most seq",
                self.id, self.seq, self.acked
            )));
        }
        Ok(())
    }
}

impl From<pb::SessionRef> for SessionRef {
    fn from(s: pb::SessionRef) -> Self {
        SessionRef {
            id: s.id,
            seq: s.seq,
            acked: s.acked,
        }
    }
}

impl From<SessionRef> for pb::SessionRef {
    fn from(s: SessionRef) -> Self {
        pb::SessionRef {
            id: s.id,
            seq: s.seq,
            acked: s.acked,
        }
    }
}

/// One change of the replicated state machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Changes nothing but the applied index (a new leader's entry, a configuration
    /// change).
    Noop,
    /// A write transaction, exactly-once when it names a session.
    Txn {
        /// The transaction.
        txn: TxnRequest,
        /// The client session and seq it belongs to.
        session: Option<SessionRef>,
    },
    /// Opens a client session whose id is the entry's index.
    OpenSession {
        /// How long the session lives without a keep-alive (the leader keeps time).
        ttl_ms: u64,
        /// The user that opens it (empty: none); only it may use the session.
        owner: String,
    },
    /// Ends sessions (closed by their client, or expired as the leader decided).
    CloseSessions {
        /// The sessions.
        ids: Vec<u64>,
    },
    /// Discards the history before `revision` (keeping each key's version at it).
    Compact {
        /// The new compacted revision.
        revision: i64,
    },
    /// Creates lease `id` (chosen by the proposer) with a TTL in seconds.
    LeaseGrant {
        /// The lease, never 0.
        id: i64,
        /// Seconds it lives without a keep-alive.
        ttl_secs: i64,
    },
    /// Ends a lease, deleting its keys in one revision.
    LeaseRevoke {
        /// The lease.
        id: i64,
    },
    /// Records remaining TTLs `(id, ms; 0 = the whole TTL)`.
    LeaseCheckpoint {
        /// The leases and what is left of each.
        leases: Vec<(i64, i64)>,
    },
    /// Changes the auth state (users, roles, whether auth is on).
    Auth {
        /// The change.
        change: AuthChange,
    },
}

/// What applying a [`Command`] answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The answer of a [`Command::Txn`] (for a duplicate: the first answer).
    Txn(TxnResponse),
    /// A lease was granted.
    LeaseGranted {
        /// Its id.
        id: i64,
        /// Its TTL in seconds.
        ttl_secs: i64,
    },
    /// A session was opened.
    SessionOpened {
        /// Its id.
        id: u64,
        /// Its TTL.
        ttl_ms: u64,
    },
    /// Nothing to answer ([`Command::Noop`], [`Command::CloseSessions`],
    /// [`Command::Compact`]).
    Done,
}

impl Command {
    /// The entry payload of this command.
    pub fn encode(self) -> Vec<u8> {
        use pb::raft_command::Command as C;
        let command = match self {
            Command::Noop => return Vec::new(),
            Command::Txn { txn, session } => C::Txn(pb::SessionTxn {
                txn: Some(txn.into()),
                session: session.map(Into::into),
            }),
            Command::OpenSession { ttl_ms, owner } => {
                C::OpenSession(pb::OpenSessionCommand { ttl_ms, owner })
            }
            Command::CloseSessions { ids } => C::CloseSessions(pb::CloseSessionsCommand { ids }),
            Command::Compact { revision } => C::Compact(pb::CompactCommand { revision }),
            Command::LeaseGrant { id, ttl_secs } => {
                C::LeaseGrant(pb::LeaseGrantCommand { id, ttl_secs })
            }
            Command::LeaseRevoke { id } => C::LeaseRevoke(pb::LeaseRevokeCommand { id }),
            Command::LeaseCheckpoint { leases } => C::LeaseCheckpoint(pb::LeaseCheckpointCommand {
                leases: leases
                    .into_iter()
                    .map(|(id, remaining_ms)| pb::LeaseRemaining { id, remaining_ms })
                    .collect(),
            }),
            Command::Auth { change } => C::Auth(pb::AuthCommand {
                change: serde_json::to_vec(&change)
                    .unwrap_or_else(|_| unreachable!("an AuthChange always encodes as JSON")),
            }),
        };
        let message = pb::RaftCommand {
            command: Some(command),
        };
        let mut out = Vec::with_capacity(1 + message.encoded_len());
        out.push(FORMAT_COMMAND);
        message.encode(&mut out).unwrap_or_else(|_| {
            // A Vec grows as needed: encoding into one cannot run out of room.
            unreachable!("encoding into a Vec never fails")
        });
        out
    }

    /// Decodes an entry payload (either format; see the module doc). Bytes that do not
    /// decode are an [`Error::InvalidArgument`]: every member refuses the same entry the
    /// same way.
    pub fn decode(data: &[u8]) -> Result<Command> {
        use pb::raft_command::Command as C;
        let bad =
            |e: prost::DecodeError| Error::invalid_argument(format!("undecodable entry: {e}"));
        match data.split_first() {
            None => Ok(Command::Noop),
            Some((&FORMAT_COMMAND, rest)) => {
                let message = pb::RaftCommand::decode(rest).map_err(bad)?;
                match message.command {
                    Some(C::Txn(t)) => Ok(Command::Txn {
                        txn: t.txn.unwrap_or_default().try_into()?,
                        session: t.session.map(Into::into),
                    }),
                    Some(C::OpenSession(o)) => Ok(Command::OpenSession {
                        ttl_ms: o.ttl_ms,
                        owner: o.owner,
                    }),
                    Some(C::CloseSessions(c)) => Ok(Command::CloseSessions { ids: c.ids }),
                    Some(C::Compact(c)) => Ok(Command::Compact {
                        revision: c.revision,
                    }),
                    Some(C::LeaseGrant(g)) => Ok(Command::LeaseGrant {
                        id: g.id,
                        ttl_secs: g.ttl_secs,
                    }),
                    Some(C::LeaseRevoke(r)) => Ok(Command::LeaseRevoke { id: r.id }),
                    Some(C::LeaseCheckpoint(c)) => Ok(Command::LeaseCheckpoint {
                        leases: c
                            .leases
                            .into_iter()
                            .map(|l| (l.id, l.remaining_ms))
                            .collect(),
                    }),
                    Some(C::Auth(a)) => Ok(Command::Auth {
                        change: serde_json::from_slice(&a.change).map_err(|e| {
                            Error::invalid_argument(format!("undecodable auth change: {e}"))
                        })?,
                    }),
                    None => Err(Error::invalid_argument(
                        "undecodable entry: a command of an unknown kind",
                    )),
                }
            }
            Some(_) => Ok(Command::Txn {
                txn: pb::TxnRequest::decode(data).map_err(bad)?.try_into()?,
                session: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::types::{PutRequest, TxnOp};

    fn put() -> TxnRequest {
        TxnRequest {
            success: vec![TxnOp::Put(PutRequest::new(b"k".to_vec(), b"v".to_vec()))],
            ..Default::default()
        }
    }

    #[test]
    fn every_command_round_trips() {
        let session = SessionRef {
            id: 7,
            seq: 3,
            acked: 2,
        };
        for command in [
            Command::Noop,
            Command::Txn {
                txn: put(),
                session: None,
            },
            Command::Txn {
                txn: put(),
                session: Some(session),
            },
            Command::OpenSession {
                ttl_ms: 60_000,
                owner: "alice".into(),
            },
            Command::CloseSessions { ids: vec![1, 9] },
            Command::Compact { revision: 42 },
            Command::LeaseGrant {
                id: 5,
                ttl_secs: 10,
            },
            Command::LeaseRevoke { id: 5 },
            Command::LeaseCheckpoint {
                leases: vec![(5, 300), (6, 0)],
            },
            Command::Auth {
                change: AuthChange::RoleGrant {
                    name: "app".into(),
                    permission: crate::auth::Permission {
                        key: b"a".to_vec(),
                        range_end: vec![0],
                        access: crate::auth::Access::Read,
                    },
                },
            },
        ] {
            assert_eq!(Command::decode(&command.clone().encode()).unwrap(), command);
        }
    }

    #[test]
    fn a_first_format_entry_is_a_bare_txn() {
        let legacy = pb::TxnRequest::from(put()).encode_to_vec();
        assert_ne!(legacy[0], FORMAT_COMMAND);
        assert_eq!(
            Command::decode(&legacy).unwrap(),
            Command::Txn {
                txn: put(),
                session: None
            }
        );
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for bad in [
            &[0x00, 0xff][..],
            &[0x00, 0x0a, 0x05, 0x01],
            &[0xff, 0xff, 0xff],
        ] {
            let err = Command::decode(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        }
        assert!(matches!(
            Command::decode(&[0x00]),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn proposal_context_round_trips_and_rejects_short_input() {
        assert_eq!(
            parse_context(&proposal_context(3, u64::MAX)),
            Some((3, u64::MAX))
        );
        assert_eq!(parse_context(b"short"), None);
        assert_eq!(parse_context(&[]), None);
    }

    #[test]
    fn session_numbering_is_checked() {
        let ok = SessionRef {
            id: 1,
            seq: 1,
            acked: 1,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            SessionRef { seq: 0, ..ok },
            SessionRef { id: 0, ..ok },
            SessionRef { acked: 2, ..ok },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
