//! Ordering and dedupe: a change is admitted once. Changes from one source arrive in position
//! order, so anything at or before the last admitted position is a replay; a versioned key also
//! never goes back to a version it has already delivered (local echo, reconnect, mode switch).

use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::BuildHasher;
use std::sync::Arc;

use crate::event::{Change, ChangeKind};

/// Why a change was or was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// New: deliver it with this global sequence number.
    Accept(u64),
    /// Its source position was already admitted.
    DuplicatePosition,
    /// Its key already delivered this version or a newer one.
    StaleVersion,
}

/// Remembers the last admitted position and, for a bounded number of recently changed keys, the
/// last admitted version. Forgetting an old key is safe: its next change has a later position.
#[derive(Debug)]
pub struct Sequencer {
    last_position: Option<u128>,
    versions: Versions,
    next_seq: u64,
}

/// The last admitted version of at most `capacity` keys, in two generations of hash tables: a
/// key found in the old one moves to the current one; when the current one holds half the
/// capacity, the old one is dropped and the current one becomes old. So every key used within
/// the last `capacity / 2` new keys is remembered. Cheaper than a linked LRU (no node per key, no
/// list to relink on every hit), and the tables grow with use: a table sized for the whole
/// capacity up front spread a few hot keys over tens of MB, and every lookup missed the CPU
/// cache. A key is hashed once per change (`hash`), not once per table operation, and its hash
/// is kept in the entry, so a table that grows does not read every key again.
struct Versions {
    current: HashTable<Remembered>,
    old: HashTable<Remembered>,
    half: usize,
    hasher: DefaultHashBuilder,
}

impl std::fmt::Debug for Versions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Versions")
            .field("current", &self.current.len())
            .field("old", &self.old.len())
            .field("half", &self.half)
            .finish()
    }
}

struct Remembered {
    key: Arc<str>,
    version: u64,
    hash: u64,
}

fn same(key: &str) -> impl Fn(&Remembered) -> bool + '_ {
    move |e| &*e.key == key
}

impl Versions {
    fn new(capacity: usize) -> Self {
        Versions {
            current: HashTable::new(),
            old: HashTable::new(),
            half: (capacity / 2).max(1),
            hasher: DefaultHashBuilder::default(),
        }
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The remembered version of `key` (`hash` from `hash`), moved into the current generation.
    fn get_mut(&mut self, hash: u64, key: &str) -> Option<&mut u64> {
        if self.current.find(hash, same(key)).is_none() {
            let (e, _) = self.old.find_entry(hash, same(key)).ok()?.remove();
            self.add(hash, e.key, e.version);
        }
        self.current
            .find_mut(hash, same(key))
            .map(|e| &mut e.version)
    }

    fn insert(&mut self, hash: u64, key: Arc<str>, version: u64) {
        if let Some(e) = self.current.find_mut(hash, same(&key)) {
            e.version = version;
            return;
        }
        if let Ok(e) = self.old.find_entry(hash, same(&key)) {
            e.remove();
        }
        self.add(hash, key, version);
    }

    /// Adds a key that neither generation holds.
    fn add(&mut self, hash: u64, key: Arc<str>, version: u64) {
        if self.current.len() >= self.half {
            // The generation that ages out gives its table to the new one: emptied, with its
            // capacity kept, so the new generation does not grow (and rehash, and fault in fresh
            // pages) all over again. Only reached after `half` distinct keys, when a table of
            // that size is in use anyway.
            let mut recycled = std::mem::take(&mut self.old);
            recycled.clear();
            self.old = std::mem::replace(&mut self.current, recycled);
        }
        let entry = Remembered { key, version, hash };
        self.current.insert_unique(hash, entry, |e| e.hash);
    }

    fn remove(&mut self, hash: u64, key: &str) {
        if let Ok(e) = self.current.find_entry(hash, same(key)) {
            e.remove();
        }
        if let Ok(e) = self.old.find_entry(hash, same(key)) {
            e.remove();
        }
    }

    fn peek(&self, key: &str) -> Option<u64> {
        let hash = self.hash(key);
        self.current
            .find(hash, same(key))
            .or_else(|| self.old.find(hash, same(key)))
            .map(|e| e.version)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.old.len()
    }
}

impl Sequencer {
    pub fn new(capacity: usize) -> Self {
        Sequencer {
            last_position: None,
            versions: Versions::new(capacity),
            next_seq: 1,
        }
    }

    /// Decides whether `c` is new; on acceptance stamps its global `seq` (a change that already
    /// carries one keeps it, and numbering continues after it).
    ///
    /// - Log positions (change log, binlog) only move forward: anything at or before the last
    ///   admitted one is a replay. Polled rows (polls overlap) and change-stream events (whose
    ///   resume is exact) skip this.
    /// - A `versioned` change is also dropped when its key already delivered this version or a
    ///   newer one (the same write seen by two paths, or across a binlog/polling switch).
    /// - An unversioned change (a SQL write that left `version` alone) is new by position
    ///   alone; an unversioned delete (SQL DELETE) forgets the key, whose versions restart.
    pub fn admit(&mut self, c: &mut Change) -> Admission {
        let logged = c.position.is_ordered_log();
        let pos = c.position.ordinal();
        if logged && matches!(self.last_position, Some(last) if pos <= last) {
            return Admission::DuplicatePosition;
        }
        // A key seen before is checked and updated with one lookup.
        let mut remembered = false;
        let hash = if c.table.is_none() {
            self.versions.hash(&c.key)
        } else {
            0
        };
        if c.versioned && c.table.is_none() {
            if let Some(v) = self.versions.get_mut(hash, &c.key) {
                if c.version <= *v {
                    // Still move the position forward: this entry of the log is consumed.
                    if logged {
                        self.last_position = Some(pos);
                    }
                    return Admission::StaleVersion;
                }
                *v = c.version;
                remembered = true;
            }
        }
        if logged {
            self.last_position = Some(pos);
        }
        if c.table.is_some() || remembered {
            // A row of a watched table (no key-value versions), or a version already stored.
        } else if !c.versioned && c.kind == ChangeKind::Delete {
            self.versions.remove(hash, &c.key);
        } else if c.versioned {
            // `get_mut` found it in neither generation.
            self.versions.add(hash, c.key.clone(), c.version);
        } else {
            self.versions.insert(hash, c.key.clone(), c.version);
        }
        // A change read from the Redis bus comes numbered: every instance uses the stream's seq.
        let seq = if c.seq > 0 { c.seq } else { self.next_seq };
        self.next_seq = seq + 1;
        c.seq = seq;
        Admission::Accept(seq)
    }

    /// Last version admitted for `key`, if remembered.
    pub fn last_version(&self, key: &str) -> Option<u64> {
        self.versions.peek(key)
    }

    /// The next seq handed out is at least `seq + 1`.
    pub fn continue_after(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq + 1);
    }

    /// The last global sequence number handed out (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{BinlogPosition, ChangeLogSeq, PollPosition, Position};

    fn ch(key: &str, version: u64, pos: u64) -> Change {
        Change {
            kind: ChangeKind::Update,
            key: key.into(),
            data: Some("1".into()),
            version,
            versioned: true,
            seq: 0,
            position: Position::ChangeLog(ChangeLogSeq(pos)),
            source: "test",
            commit_ts_us: 0,
            table: None,
            before: None,
            meta: None,
        }
    }

    #[test]
    fn accepts_in_order_and_stamps_seq() {
        let mut s = Sequencer::new(10);
        let mut a = ch("a", 1, 1);
        let mut b = ch("b", 1, 2);
        assert_eq!(s.admit(&mut a), Admission::Accept(1));
        assert_eq!(s.admit(&mut b), Admission::Accept(2));
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(s.last_seq(), 2);
    }

    #[test]
    fn replayed_positions_are_dropped() {
        let mut s = Sequencer::new(10);
        assert!(matches!(s.admit(&mut ch("a", 1, 5)), Admission::Accept(_)));
        assert_eq!(s.admit(&mut ch("a", 1, 5)), Admission::DuplicatePosition);
        assert_eq!(s.admit(&mut ch("b", 7, 4)), Admission::DuplicatePosition);
    }

    #[test]
    fn versions_never_go_back_per_key() {
        let mut s = Sequencer::new(10);
        assert!(matches!(s.admit(&mut ch("a", 3, 1)), Admission::Accept(_)));
        // An echo of the same write from another path, at a later position.
        assert_eq!(s.admit(&mut ch("a", 3, 2)), Admission::StaleVersion);
        assert_eq!(s.admit(&mut ch("a", 2, 3)), Admission::StaleVersion);
        assert!(matches!(s.admit(&mut ch("a", 4, 4)), Admission::Accept(_)));
        assert_eq!(s.last_version("a"), Some(4));
        // Other keys are independent.
        assert!(matches!(s.admit(&mut ch("b", 1, 5)), Admission::Accept(_)));
    }

    #[test]
    fn an_unversioned_change_replaces_the_remembered_version_in_either_generation() {
        let mut s = Sequencer::new(4);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            assert!(matches!(
                s.admit(&mut ch(k, 1, i as u64 + 1)),
                Admission::Accept(_)
            ));
        }
        // "a" is in the old generation now; a SQL write left its version at 9.
        let mut sql = Change {
            versioned: false,
            ..ch("a", 9, 4)
        };
        assert!(matches!(s.admit(&mut sql), Admission::Accept(_)));
        assert_eq!(s.last_version("a"), Some(9));
        assert_eq!(s.versions.len(), 3, "moved, not copied");
        assert_eq!(s.admit(&mut ch("a", 9, 5)), Admission::StaleVersion);
        // And in the current generation.
        let mut sql = Change {
            versioned: false,
            ..ch("a", 12, 6)
        };
        assert!(matches!(s.admit(&mut sql), Admission::Accept(_)));
        assert_eq!(s.last_version("a"), Some(12));
    }

    #[test]
    fn binlog_positions_and_versions() {
        let mut s = Sequencer::new(10);
        let at = |event_pos: u32, row: u32, version: u64, versioned: bool| Change {
            position: Position::Binlog(BinlogPosition {
                file_index: 1,
                event_pos,
                row,
            }),
            versioned,
            ..ch("k", version, 0)
        };
        assert!(matches!(
            s.admit(&mut at(100, 0, 5, true)),
            Admission::Accept(_)
        ));
        // A SQL client updated the row without bumping `version`: still a new change.
        assert!(matches!(
            s.admit(&mut at(100, 1, 5, false)),
            Admission::Accept(_)
        ));
        // Deleted with SQL DELETE, then re-created at version 1, later in the log.
        let mut del = Change {
            kind: ChangeKind::Delete,
            ..at(150, 0, 6, false)
        };
        assert!(matches!(s.admit(&mut del), Admission::Accept(_)));
        assert_eq!(s.last_version("k"), None);
        assert!(matches!(
            s.admit(&mut at(200, 0, 1, true)),
            Admission::Accept(_)
        ));
        // A reconnect replays the same rows: dropped by position.
        assert_eq!(
            s.admit(&mut at(100, 1, 5, false)),
            Admission::DuplicatePosition
        );
        assert_eq!(
            s.admit(&mut at(200, 0, 1, true)),
            Admission::DuplicatePosition
        );
        // A versioned write already delivered by polling, seen again in the binlog.
        assert_eq!(s.admit(&mut at(300, 0, 1, true)), Admission::StaleVersion);
        // A later file orders after every position of an earlier one.
        let next_file = Change {
            position: Position::Binlog(BinlogPosition {
                file_index: 2,
                event_pos: 4,
                row: 0,
            }),
            ..ch("k", 2, 0)
        };
        assert!(matches!(s.admit(&mut { next_file }), Admission::Accept(_)));
    }

    #[test]
    fn polled_rows_dedupe_by_version_only() {
        let mut s = Sequencer::new(10);
        let poll = |ts: i64, version: u64| Change {
            position: Position::Poll(PollPosition(ts)),
            ..ch("p", version, 0)
        };
        assert!(matches!(s.admit(&mut poll(1_000, 3)), Admission::Accept(_)));
        // Overlapping polls see the same row again: same version, dropped.
        assert_eq!(s.admit(&mut poll(1_000, 3)), Admission::StaleVersion);
        // An earlier timestamp is no replay by itself: a newer version is new.
        assert!(matches!(s.admit(&mut poll(900, 4)), Admission::Accept(_)));
        // Polled rows do not move the log position.
        assert!(matches!(s.admit(&mut ch("q", 1, 1)), Admission::Accept(_)));
    }

    #[test]
    fn a_key_used_again_is_remembered_longer_than_one_left_alone() {
        let mut s = Sequencer::new(4);
        let mut pos = 0;
        let mut admit = |s: &mut Sequencer, k: &str, v: u64| {
            pos += 1;
            s.admit(&mut ch(k, v, pos))
        };
        for k in ["a", "b", "c"] {
            assert!(matches!(admit(&mut s, k, 1), Admission::Accept(_)));
        }
        assert!(matches!(admit(&mut s, "a", 2), Admission::Accept(_)));
        assert!(matches!(admit(&mut s, "d", 1), Admission::Accept(_)));
        assert_eq!(s.last_version("b"), None, "left alone: forgotten");
        assert_eq!(s.last_version("a"), Some(2), "used again: remembered");
        assert_eq!(admit(&mut s, "a", 2), Admission::StaleVersion);
        assert!(s.versions.len() <= 4);
    }

    #[test]
    fn a_new_generation_reuses_the_table_of_the_one_aging_out() {
        let mut v = Versions::new(2_000);
        let add = |v: &mut Versions, i: usize| {
            let key: Arc<str> = format!("k{i}").into();
            v.insert(v.hash(&key), key, 1);
        };
        // The first rotation (at key 1,000) has no old table to reuse; the second does.
        for i in 0..2_001 {
            add(&mut v, i);
        }
        assert_eq!(v.current.len(), 1);
        assert_eq!(v.old.len(), 1_000);
        assert!(v.current.capacity() >= 1_000, "{}", v.current.capacity());
        // The recycled table holds nothing of its old generation.
        assert_eq!(v.peek("k0"), None);
        assert_eq!(v.peek("k1999"), Some(1));
        assert_eq!(v.peek("k2000"), Some(1));
    }

    #[test]
    fn bounded_memory_forgets_oldest_key_safely() {
        let mut s = Sequencer::new(2);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            assert!(matches!(
                s.admit(&mut ch(k, 1, i as u64 + 1)),
                Admission::Accept(_)
            ));
        }
        assert_eq!(s.last_version("a"), None);
        assert_eq!(s.last_version("c"), Some(1));
        assert_eq!(s.versions.len(), 2, "never more keys than the capacity");
        // A replay of "a" is still caught by its position.
        assert_eq!(s.admit(&mut ch("a", 1, 1)), Admission::DuplicatePosition);
    }
}
