//! One sequence's view of the cache: its page tables, how many tokens and compressed entries it
//! holds, and which pages an append writes.

use std::ops::Range;

use super::family::Family;
use super::layout::{CacheLayout, UNIT_TOKENS};
use super::pool::PageId;
use super::prefix::{chain_hash, ROOT};
use crate::quant::PAGE_ROWS;

#[derive(Debug, Clone)]
pub struct Sequence {
    /// Tokens appended (for a sequence built on a cached prefix, including the prefix part
    /// that was re-run, excluding the part still to re-run).
    pub len: usize,
    /// First position whose window rows this sequence wrote (after a prefix hit, the window
    /// starts where the re-run starts).
    pub window_start: usize,
    /// Per family: append-only page table (compressed families), ring pages (window) or the
    /// state slot.
    pub tables: [Vec<PageId>; 4],
    /// Per compressed family (CSA, HCA): entries present, which exceed those of `len` while a
    /// sequence re-runs tokens of a cached prefix.
    pub entries: [usize; 2],
    /// Complete units hashed, the chain hash of the last one, and the tokens of the next one.
    pub units: usize,
    pub chain: u64,
    pub pending: Vec<u32>,
    /// The last `unresolved` tokens were appended by count, their ids still to come
    /// ([`CacheManager::resolve`](super::CacheManager::resolve)); the hasher waits for them.
    pub unresolved: usize,
}

/// A 256-token unit an append completed, ready to register.
pub struct CompletedUnit {
    pub index: usize,
    pub hash: u64,
    pub parent: u64,
    pub tokens: Vec<u32>,
}

/// The table slots one append writes in one family, and the table length it needs.
pub struct Touch {
    /// Slots written, each once; a window append that wraps around the ring needs two ranges.
    pub slots: [Range<usize>; 2],
    /// Row of the first write inside its page, for the watermark check of append-only families.
    pub first_row: usize,
    /// Entries present after the append, for append-only families' watermarks.
    pub end_entry: usize,
    pub table_len: usize,
}

impl Default for Sequence {
    fn default() -> Self {
        Sequence {
            len: 0,
            window_start: 0,
            tables: Default::default(),
            entries: [0; 2],
            units: 0,
            chain: ROOT,
            pending: Vec::new(),
            unresolved: 0,
        }
    }
}

impl Sequence {
    pub fn table(&self, family: Family) -> &[PageId] {
        &self.tables[family.index()]
    }

    pub fn entries(&self, family: Family) -> usize {
        self.entries[family.index() - Family::Csa.index()]
    }

    /// Window positions the append `[len, new_len)` writes: the last `window` of them (earlier
    /// ones would be overwritten by the same append).
    pub fn window_writes(&self, layout: &CacheLayout, new_len: usize) -> Range<usize> {
        self.len.max(new_len.saturating_sub(layout.window))..new_len
    }

    /// Compressed entries the append `[len, new_len)` writes: those it completes that are not
    /// present yet.
    fn entry_writes(&self, family: Family, new_len: usize) -> Range<usize> {
        let present = self.entries(family);
        present.max(family.entries(self.len))..present.max(family.entries(new_len))
    }

    /// What appending up to `new_len` tokens does to `family`'s table.
    pub fn touch(&self, layout: &CacheLayout, family: Family, new_len: usize) -> Touch {
        let none = [0..0, 0..0];
        let table_len = self.table(family).len();
        if layout.layers(family) == 0 || new_len == self.len {
            return Touch { slots: none, first_row: 0, end_entry: 0, table_len };
        }
        match family {
            Family::Window => {
                let w = layout.window;
                let pos = self.window_writes(layout, new_len);
                let start = pos.start % w;
                let end = start + pos.len();
                let pages = |r: Range<usize>| r.start / PAGE_ROWS..r.end.div_ceil(PAGE_ROWS);
                let slots = match (pages(start..w.min(end)), pages(0..end.saturating_sub(w))) {
                    // A ring of one page: both pieces of a wrapped write land on the same slot.
                    (a, b) if b.end > a.start => [0..a.end, 0..0],
                    pieces => pieces.into(),
                };
                let table_len = table_len.max(layout.pages_for_len(family, new_len));
                Touch { slots, first_row: 0, end_entry: 0, table_len }
            }
            Family::Csa | Family::Hca => {
                let e = self.entry_writes(family, new_len);
                if e.is_empty() {
                    return Touch { slots: none, first_row: 0, end_entry: 0, table_len };
                }
                let pages = e.start / PAGE_ROWS..e.end.div_ceil(PAGE_ROWS);
                let table_len = table_len.max(pages.end);
                Touch { slots: [pages, 0..0], first_row: e.start % PAGE_ROWS, end_entry: e.end, table_len }
            }
            Family::State => Touch { slots: [0..1, 0..0], first_row: 0, end_entry: 0, table_len: 1 },
        }
    }

    /// Physical row of `family`'s logical index `i` (a token position for the window, an entry
    /// index otherwise), or -1 when the sequence holds no such row.
    pub fn row(&self, layout: &CacheLayout, family: Family, i: i64) -> i64 {
        let valid = match family {
            Family::Window => self.window_start.max(self.len.saturating_sub(layout.window))..self.len,
            Family::Csa | Family::Hca => 0..family.entries(self.len),
            Family::State => 0..0,
        };
        if i < 0 || !valid.contains(&(i as usize)) {
            return -1;
        }
        let r = if family == Family::Window { i as usize % layout.window } else { i as usize };
        self.table(family)[r / PAGE_ROWS] as i64 * PAGE_ROWS as i64 + (r % PAGE_ROWS) as i64
    }

    /// Feeds the ids of the tokens at positions `first..` to the unit hasher and returns the
    /// units they complete. Tokens of a cached prefix being re-run were hashed already and are
    /// skipped.
    pub fn complete_units(&mut self, first: usize, tokens: &[u32]) -> Vec<CompletedUnit> {
        let hashed = self.units * UNIT_TOKENS + self.pending.len();
        let skip = hashed.saturating_sub(first).min(tokens.len());
        let mut done = Vec::new();
        for t in &tokens[skip..] {
            self.pending.push(*t);
            if self.pending.len() == UNIT_TOKENS {
                let tokens = std::mem::take(&mut self.pending);
                let hash = chain_hash(self.chain, &tokens);
                done.push(CompletedUnit { index: self.units, hash, parent: self.chain, tokens });
                (self.units, self.chain) = (self.units + 1, hash);
            }
        }
        done
    }
}
