//! The cache manager of one model: a block pool per family, the sequences and the prefix index.
//! Appending lives in `append.rs`, kernel metadata in `metadata.rs`, byte accounting in
//! `accounting.rs`.

use std::collections::HashMap;

use super::family::Family;
use super::layout::{CacheLayout, UNIT_TOKENS};
use super::pool::{BlockPool, PageId};
use super::prefix::{PrefixIndex, PrefixMatch, SHARED};
use super::sequence::Sequence;
use crate::error::{Error, Result};

/// Sequence ids are handed out in increasing order and never reused, so a released id can be
/// told apart from one that never existed.
pub type SeqId = u64;

/// What a sequence added with a prompt gets from the prefix cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixHit {
    /// Leading prompt tokens whose compressed entries (CSA rows, indexer keys, HCA rows) are
    /// shared from the cache: a multiple of 256.
    pub cached_tokens: usize,
    /// The sequence's length after the hit. The caller appends the prompt from this position
    /// on; the tokens up to `cached_tokens` rebuild the window rings and compressor state
    /// (their compressed entries come back with slot -1: they are already cached).
    pub recompute_from: usize,
}

/// The most pages one family's pool takes: page ids must fit the kernels' int32 page tables,
/// and the pool's bookkeeping (some 13 bytes a page on the host) stays under 1 GiB.
pub const MAX_PAGES: usize = 1 << 26;
/// The most device bytes one manager's pools may describe (64 TiB): more than any machine's GPUs
/// hold, so a larger request is a mistake, refused before anything is allocated.
pub const MAX_POOL_BYTES: u128 = 1 << 46;

pub struct CacheManager {
    pub(super) layout: CacheLayout,
    pub(super) pools: [BlockPool; 4],
    pub(super) seqs: HashMap<SeqId, Sequence>,
    pub(super) prefix: PrefixIndex,
    next_id: SeqId,
}

impl CacheManager {
    /// A manager with `pages[f]` pages in family `f`'s pool (in [`Family::ALL`] order; page 0
    /// of each is the null page, so a pool of `n` pages hands out `n - 1`).
    pub fn new(layout: CacheLayout, pages: [usize; 4]) -> Result<Self> {
        for f in Family::ALL {
            if pages[f.index()] > MAX_PAGES {
                return Err(Error::value(
                    &format!("pages[{:?}]", f.name()),
                    format!("at most {MAX_PAGES} pages a pool, got {}", pages[f.index()]),
                ));
            }
        }
        let bytes = layout.footprint_of_pages(pages).total();
        if bytes > MAX_POOL_BYTES {
            return Err(Error::value(
                "pages",
                format!("the pools would take {bytes} bytes, more than the {MAX_POOL_BYTES} (64 TiB) any machine holds"),
            ));
        }
        let pool = |f: Family| BlockPool::new(&format!("pages[{:?}]", f.name()), pages[f.index()]);
        let pools = [pool(Family::Window)?, pool(Family::Csa)?, pool(Family::Hca)?, pool(Family::State)?];
        Ok(CacheManager { layout, pools, seqs: HashMap::new(), prefix: PrefixIndex::default(), next_id: 0 })
    }

    pub fn layout(&self) -> &CacheLayout {
        &self.layout
    }

    pub fn pool(&self, family: Family) -> &BlockPool {
        &self.pools[family.index()]
    }

    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Live sequence ids, in increasing order.
    pub fn sequence_ids(&self) -> Vec<SeqId> {
        let mut ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Registered prefix units (each 256 tokens), cached or in use.
    pub fn cached_units(&self) -> usize {
        self.prefix.num_units()
    }

    pub(super) fn seq(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs.get(&id).ok_or_else(|| self.missing(id))
    }

    pub(super) fn missing(&self, id: SeqId) -> Error {
        if id < self.next_id {
            Error::State(format!("sequence {id} was released"))
        } else {
            Error::State(format!("sequence {id} does not exist (no sequence with that id was added)"))
        }
    }

    /// Tokens appended to `id`.
    pub fn length(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }

    /// What [`add_sequence`](Self::add_sequence) would reuse for `prompt`, without taking it.
    pub fn lookup_prefix(&self, prompt: &[u32]) -> PrefixHit {
        self.hit(&self.prefix.lookup(prompt))
    }

    fn hit(&self, m: &PrefixMatch) -> PrefixHit {
        let cached_tokens = m.units * UNIT_TOKENS;
        PrefixHit { cached_tokens, recompute_from: cached_tokens.saturating_sub(self.layout.rebuild_tokens()) }
    }

    /// Adds an empty sequence, sharing the compressed pages of the longest cached prefix of
    /// `prompt` (pass `&[]` for none). Never allocates, so it cannot run out of pages.
    pub fn add_sequence(&mut self, prompt: &[u32]) -> (SeqId, PrefixHit) {
        let m = self.prefix.lookup(prompt);
        let hit = self.hit(&m);
        let mut seq = Sequence::default();
        for ((family, table), e) in SHARED.into_iter().zip(m.tables).zip(&mut seq.entries) {
            for page in &table {
                self.pools[family.index()].retain(*page);
            }
            *e = family.entries(hit.cached_tokens);
            seq.tables[family.index()] = table;
        }
        (seq.len, seq.window_start, seq.units, seq.chain) = (hit.recompute_from, hit.recompute_from, m.units, m.chain);
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, seq);
        (id, hit)
    }

    /// A new sequence sharing every page of `id` (copy on write: the first append of either
    /// that writes into a shared page gets a copy of it). Never allocates.
    pub fn fork(&mut self, id: SeqId) -> Result<SeqId> {
        let seq = self.seq(id)?.clone();
        for family in Family::ALL {
            for page in seq.table(family) {
                self.pools[family.index()].retain(*page);
            }
        }
        let child = self.next_id;
        self.next_id += 1;
        self.seqs.insert(child, seq);
        Ok(child)
    }

    /// Drops the sequence and its references. Pages left without references go to the back of
    /// their free list, last pages first, so a prefix's head outlives its tail in the cache.
    pub fn release(&mut self, id: SeqId) -> Result<()> {
        let seq = self.seqs.remove(&id).ok_or_else(|| self.missing(id))?;
        for family in Family::ALL {
            for page in seq.table(family).iter().rev() {
                self.pools[family.index()].release(*page)?;
            }
        }
        Ok(())
    }

    /// Refcount of every page of `family` (index = page id), for monitoring and tests.
    pub fn refcounts(&self, family: Family) -> Vec<u32> {
        let pool = self.pool(family);
        (0..pool.num_pages() as PageId).map(|p| pool.refcount(p)).collect()
    }
}
