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

/// The state an unobserved write leaves: a value no operation reads or expects. All
/// such values are alike to every other operation, so they share one name.
const PHANTOM: &str = "\u{0}phantom";

/// Writes with an unknown outcome whose value nobody observes, grouped by what they
/// need to take effect: `None` for a put (anything), `Some(expect)` for a
/// compare-and-put. Only how many of a group have been called by a point matters, not
/// which (values are interchangeable), so the search counts them instead of trying
/// every subset: this keeps heavily faulted histories tractable, exactly.
struct Phantoms {
    groups: Vec<(Option<Option<String>>, Vec<u64>)>,
}

impl Phantoms {
    /// Phantoms of group `g` called by `horizon`.
    fn available(&self, g: usize, horizon: u64) -> usize {
        self.groups[g].1.partition_point(|start| *start <= horizon)
    }
}

/// Checks every key's sub-history; on failure names the key and its operations.
///
/// A write with an unknown outcome whose value nobody observes (no read returns it, no
/// compare-and-put expects it) may still explain a failed compare-and-put (the key
/// existed, or held another value); such writes become counted "phantoms" (see
/// [`Phantoms`]). Unknown operations may also stay unplaced: placing them last is
/// always allowed.
pub fn check(history: &[Op]) -> Result<(), String> {
    let observed: HashSet<&String> = history
        .iter()
        .filter_map(|op| match (&op.call, &op.outcome) {
            (_, Outcome::Get(Some(value))) => Some(value),
            (
                Call::Cas {
                    expect: Some(value),
                    ..
                },
                _,
            ) => Some(value),
            _ => None,
        })
        .collect();
    let mut by_key: BTreeMap<&str, (Vec<&Op>, Phantoms)> = BTreeMap::new();
    for op in history {
        let (ops, phantoms) = by_key
            .entry(&op.key)
            .or_insert_with(|| (Vec::new(), Phantoms { groups: Vec::new() }));
        let unobserved = written(&op.call).is_some_and(|value| !observed.contains(value));
        if op.outcome == Outcome::Unknown && unobserved {
            let guard = match &op.call {
                Call::Cas { expect, .. } => Some(expect.clone()),
                _ => None,
            };
            match phantoms.groups.iter_mut().find(|(g, _)| *g == guard) {
                Some((_, starts)) => starts.push(op.start),
                None => phantoms.groups.push((guard, vec![op.start])),
            }
        } else {
            ops.push(op);
        }
    }
    for (key, (mut ops, mut phantoms)) in by_key {
        ops.sort_by_key(|op| op.start);
        for (_, starts) in &mut phantoms.groups {
            starts.sort_unstable();
        }
        if !linearizable(&ops, &phantoms) {
            return Err(format!("key {key:?} is not linearizable: {ops:#?}"));
        }
    }
    Ok(())
}

fn linearizable(ops: &[&Op], phantoms: &Phantoms) -> bool {
    let mut search = Search {
        ops,
        phantoms,
        done: vec![false; ops.len()],
        used: vec![0; phantoms.groups.len()],
        seen: HashSet::new(),
    };
    search.run(&None)
}

/// A depth-first search over linearization orders, remembering the (ops placed,
/// phantoms used, state) triples already explored.
struct Search<'a> {
    ops: &'a [&'a Op],
    phantoms: &'a Phantoms,
    done: Vec<bool>,
    used: Vec<usize>,
    seen: HashSet<(Vec<bool>, Vec<usize>, Option<String>)>,
}

impl Search<'_> {
    fn run(&mut self, state: &Option<String>) -> bool {
        // Done when every operation with a known outcome is placed: the unknown rest go
        // last.
        if self
            .ops
            .iter()
            .zip(&self.done)
            .all(|(op, done)| *done || op.outcome == Outcome::Unknown)
        {
            return true;
        }
        if !self
            .seen
            .insert((self.done.clone(), self.used.clone(), state.clone()))
        {
            return false;
        }
        // An op may go next only if no pending op returned before it was called.
        let horizon = self
            .ops
            .iter()
            .zip(&self.done)
            .filter(|(_, d)| !**d)
            .map(|(op, _)| op.ret())
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..self.ops.len() {
            if self.done[i] || self.ops[i].start > horizon {
                continue;
            }
            let (next, expected) = step(state, &self.ops[i].call);
            if self.ops[i].outcome != Outcome::Unknown && self.ops[i].outcome != expected {
                continue;
            }
            self.done[i] = true;
            if self.run(&next) {
                return true;
            }
            self.done[i] = false;
        }
        let phantom = Some(PHANTOM.to_string());
        if *state != phantom {
            for g in 0..self.phantoms.groups.len() {
                let applies = match &self.phantoms.groups[g].0 {
                    None => true,
                    Some(expect) => expect == state,
                };
                if applies && self.used[g] < self.phantoms.available(g, horizon) {
                    self.used[g] += 1;
                    if self.run(&phantom) {
                        return true;
                    }
                    self.used[g] -= 1;
                }
            }
        }
        false
    }
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
                "an unknown write may explain a failed CAS",
                vec![
                    op(Call::Put("a".into()), Outcome::Unknown, 0, 1),
                    op(
                        Call::Cas {
                            expect: None,
                            new: "b".into(),
                        },
                        Outcome::Cas(false),
                        2,
                        3,
                    ),
                ],
                true,
            ),
            (
                "an unknown write cannot explain a stale read",
                vec![
                    op(Call::Put("x".into()), Outcome::Unknown, 0, 1),
                    put("a", 0, 1),
                    put("b", 2, 3),
                    get(Some("a"), 4, 5),
                ],
                false,
            ),
            (
                "an unknown CAS takes effect only from its expected value",
                vec![
                    op(
                        Call::Cas {
                            expect: Some("z".into()),
                            new: "n".into(),
                        },
                        Outcome::Unknown,
                        0,
                        1,
                    ),
                    op(
                        Call::Cas {
                            expect: None,
                            new: "b".into(),
                        },
                        Outcome::Cas(false),
                        2,
                        3,
                    ),
                ],
                false,
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
