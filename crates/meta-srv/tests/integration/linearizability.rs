//! A Wing–Gong–Lowe linearizability checker for a KV history of puts, gets and
//! compare-and-puts, checked key by key (linearizability is compositional: a history is
//! linearizable if and only if each key's sub-history is).
//!
//! An operation whose outcome is unknown (the client gave up) may have taken effect at
//! any point after its call, or never: it gets an infinite return time and any result.
//! Reads that failed had no effect and are left out of the history.

use std::collections::{BTreeMap, HashSet};

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Call {
    Put(String),
    Get,
    Cas { expect: Option<String>, new: String },
}

/// What it was told.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    Put,
    Get(Option<String>),
    Cas(bool),
    /// No answer: it may or may not have happened.
    Unknown,
}

/// One operation of the history; times are any monotonic clock's ticks.
#[derive(Debug, Clone)]
pub struct Op {
    pub key: String,
    pub call: Call,
    pub outcome: Outcome,
    pub start: u64,
    pub end: u64,
}

impl Op {
    fn ret(&self) -> u64 {
        if self.outcome == Outcome::Unknown {
            u64::MAX
        } else {
            self.end
        }
    }
}

/// The register model of one key: the next state and the outcome the call must have.
fn step(state: &Option<String>, call: &Call) -> (Option<String>, Outcome) {
    match call {
        Call::Put(value) => (Some(value.clone()), Outcome::Put),
        Call::Get => (state.clone(), Outcome::Get(state.clone())),
        Call::Cas { expect, new } if state == expect => (Some(new.clone()), Outcome::Cas(true)),
        Call::Cas { .. } => (state.clone(), Outcome::Cas(false)),
    }
}

/// The value a write would leave, for telling whether anyone observed it.
fn written(call: &Call) -> Option<&String> {
    match call {
        Call::Put(value) | Call::Cas { new: value, .. } => Some(value),
        Call::Get => None,
    }
}

/// Checks every key's sub-history; on failure names the key and its operations.
///
/// Writes with an unknown outcome whose value nobody observed (no read returned it, no
/// successful compare-and-put expected it) are left out: leaving one out is the same as
/// linearizing it last, which is always allowed, and it keeps the search small. Values
/// are unique per write, so "observed" is exact.
pub fn check(history: &[Op]) -> Result<(), String> {
    let observed: std::collections::HashSet<&String> = history
        .iter()
        .filter_map(|op| match (&op.call, &op.outcome) {
            (_, Outcome::Get(Some(value))) => Some(value),
            (
                Call::Cas {
                    expect: Some(value),
                    ..
                },
                Outcome::Cas(true),
            ) => Some(value),
            _ => None,
        })
        .collect();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        let unobserved_unknown = op.outcome == Outcome::Unknown
            && written(&op.call).is_none_or(|value| !observed.contains(value));
        if !unobserved_unknown {
            by_key.entry(&op.key).or_default().push(op);
        }
    }
    for (key, mut ops) in by_key {
        ops.sort_by_key(|op| op.start);
        if !linearizable(&ops) {
            return Err(format!("key {key:?} is not linearizable: {ops:#?}"));
        }
    }
    Ok(())
}

fn linearizable(ops: &[&Op]) -> bool {
    let mut done = vec![false; ops.len()];
    let mut seen = HashSet::new();
    search(ops, &mut done, &None, 0, &mut seen)
}

/// Depth-first search over linearization orders, remembering (set done, state) pairs
/// already explored.
fn search(
    ops: &[&Op],
    done: &mut Vec<bool>,
    state: &Option<String>,
    count: usize,
    seen: &mut HashSet<(Vec<bool>, Option<String>)>,
) -> bool {
    if count == ops.len() {
        return true;
    }
    if !seen.insert((done.clone(), state.clone())) {
        return false;
    }
    // An op may go next only if no pending op returned before it was called.
    let horizon = ops
        .iter()
        .zip(done.iter())
        .filter(|(_, d)| !**d)
        .map(|(op, _)| op.ret())
        .min()
        .unwrap_or(u64::MAX);
    for i in 0..ops.len() {
        if done[i] || ops[i].start > horizon {
            continue;
        }
        let (next, expected) = step(state, &ops[i].call);
        if ops[i].outcome != Outcome::Unknown && ops[i].outcome != expected {
            continue;
        }
        done[i] = true;
        if search(ops, done, &next, count + 1, seen) {
            return true;
        }
        done[i] = false;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: Call, outcome: Outcome, start: u64, end: u64) -> Op {
        Op {
            key: "k".into(),
            call,
            outcome,
            start,
            end,
        }
    }

    fn put(v: &str, s: u64, e: u64) -> Op {
        op(Call::Put(v.into()), Outcome::Put, s, e)
    }

    fn get(v: Option<&str>, s: u64, e: u64) -> Op {
        op(Call::Get, Outcome::Get(v.map(Into::into)), s, e)
    }

    #[test]
    fn sequential_and_concurrent_histories() {
        // Each case: a history and whether it is linearizable.
        let cases: Vec<(&str, Vec<Op>, bool)> = vec![
            (
                "read your write",
                vec![put("a", 0, 1), get(Some("a"), 2, 3)],
                true,
            ),
            (
                "stale read after a completed write",
                vec![put("a", 0, 1), get(None, 2, 3)],
                false,
            ),
            (
                "concurrent read may see either",
                vec![put("a", 0, 10), get(None, 2, 3), get(Some("a"), 4, 5)],
                true,
            ),
            (
                "reads cannot go back in time",
                vec![put("a", 0, 10), get(Some("a"), 2, 3), get(None, 4, 5)],
                false,
            ),
            (
                "a value nobody wrote",
                vec![put("a", 0, 1), get(Some("b"), 2, 3)],
                false,
            ),
            (
                "an unknown write may appear later",
                vec![
                    op(Call::Put("a".into()), Outcome::Unknown, 0, 1),
                    get(None, 2, 3),
                    get(Some("a"), 4, 5),
                ],
                true,
            ),
            (
                "two successful CAS from the same value",
                vec![
                    put("a", 0, 1),
                    op(
                        Call::Cas {
                            expect: Some("a".into()),
                            new: "b".into(),
                        },
                        Outcome::Cas(true),
                        2,
                        5,
                    ),
                    op(
                        Call::Cas {
                            expect: Some("a".into()),
                            new: "c".into(),
                        },
                        Outcome::Cas(true),
                        3,
                        6,
                    ),
                ],
                false,
            ),
            (
                "a failed CAS that should have succeeded",
                vec![
                    put("a", 0, 1),
                    op(
                        Call::Cas {
                            expect: Some("a".into()),
                            new: "b".into(),
                        },
                        Outcome::Cas(false),
                        2,
                        3,
                    ),
                ],
                false,
            ),
        ];
        for (name, history, want) in cases {
            assert_eq!(check(&history).is_ok(), want, "{name}");
        }
    }
}
