//! `Recent`: the newest entries of the log, decoded (see `Inner::recent` in the parent).

use raft::prelude::Entry;

/// Most entries and bytes of data [`Recent`] keeps.
pub(super) const RECENT_ENTRIES: usize = 8192;
pub(super) const RECENT_BYTES: usize = 32 * 1024 * 1024;

/// A contiguous run of the newest entries of the log (possibly empty).
#[derive(Default)]
pub(super) struct Recent {
    entries: std::collections::VecDeque<Entry>,
    bytes: usize,
}

impl Recent {
    pub(super) fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    pub(super) fn get(&self, index: u64) -> Option<&Entry> {
        let first = self.first_index()?;
        self.entries
            .get(usize::try_from(index.checked_sub(first)?).ok()?)
    }

    /// Adds `entries` (which replace every kept entry at or after the first of them).
    pub(super) fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        while self.entries.back().is_some_and(|e| e.index >= first.index) {
            if let Some(old) = self.entries.pop_back() {
                self.bytes -= old.data.len();
            }
        }
        if self
            .entries
            .back()
            .is_some_and(|e| e.index + 1 != first.index)
        {
            // Not contiguous (cannot happen after LogStore::append's checks): restart.
            self.entries.clear();
            self.bytes = 0;
        }
        for entry in entries {
            self.bytes += entry.data.len();
            self.entries.push_back(entry.clone());
        }
        while self.entries.len() > RECENT_ENTRIES
            || (self.bytes > RECENT_BYTES && self.entries.len() > 1)
        {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.data.len();
            }
        }
    }

    /// Forgets entries at or below `index`.
    pub(super) fn compact(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.data.len();
            }
        }
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}
