//! Appending tokens to a batch of sequences: all or nothing, copy on write of pages that are
//! shared (or written off their watermark), slot mappings for the caller's writes, and
//! registration of the prefix units the append completes.
//!
//! Tokens may also be appended by count, their ids resolved later
//! ([`CacheManager::append_unresolved`], [`CacheManager::resolve`]): a decode step whose tokens
//! were sampled on the device is planned before the host sees them. Pages and slots depend only
//! on lengths; only the prefix index needs the ids, so a unit such tokens complete is registered
//! when they are resolved.

use std::collections::{HashMap, HashSet};

use super::family::Family;
use super::layout::CacheLayout;
use super::manager::{CacheManager, SeqId};
use super::pool::{BlockPool, PageId, NULL_PAGE};
use super::prefix::{unit_slot, PrefixIndex, SHARED};
use super::sequence::{CompletedUnit, Sequence, Touch};
use crate::error::{Error, Result};
use crate::quant::PAGE_ROWS;

/// What the caller must do on the device after an append: first every page copy, then the
/// writes at the slot mappings (a copy's source may be reallocated by the same append).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Per family ([`Family::index`]), concatenated over the batch in order. Window: one
    /// physical row per appended token (-1 for a token that a later token of the same append
    /// overwrites in the ring). CSA and HCA: one row per entry the append completes (-1 for an
    /// entry a cached prefix already holds). State: the sequence's state slot (-1 when the
    /// model has no compressor).
    pub slots: [Vec<i64>; 4],
    /// Per family: `(source page, destination page)` copies, in every layer of the family.
    pub copies: [Vec<(PageId, PageId)>; 4],
}

/// One sequence's tokens in an append: their ids, or a count whose ids come later.
#[derive(Clone, Copy)]
enum Chunk<'a> {
    Ids(&'a [u32]),
    Unresolved(usize),
}

impl Chunk<'_> {
    fn len(&self) -> usize {
        match self {
            Chunk::Ids(t) => t.len(),
            Chunk::Unresolved(n) => *n,
        }
    }
}

/// One sequence's part of an append.
struct Plan {
    touch: [Touch; 4],
    /// Per family: table slots whose page is replaced by a fresh copy.
    cow: [Vec<usize>; 4],
}

impl Plan {
    fn fresh(&self, seq: &Sequence, family: Family) -> usize {
        let f = family.index();
        self.cow[f].len() + self.touch[f].table_len - seq.table(family).len()
    }
}

impl CacheManager {
    /// Appends `tokens` to each sequence of `batch`. Either every sequence gets its pages or,
    /// when a pool is short, nothing changes and the error says which pools are short.
    /// A sequence with unresolved tokens takes ids only after they are resolved.
    pub fn append(&mut self, batch: &[(SeqId, &[u32])]) -> Result<Appended> {
        let chunks: Vec<(SeqId, Chunk)> = batch.iter().map(|(id, t)| (*id, Chunk::Ids(t))).collect();
        self.append_chunks(&chunks)
    }

    /// Appends `n` tokens to each `(sequence, n)` of `batch` whose ids are not known yet: the
    /// same pages and slots as [`append`](Self::append) of `n` ids. The ids follow with
    /// [`resolve`](Self::resolve), in order; until then the sequence's prefix units past them
    /// are not registered, and it takes no appends of ids.
    pub fn append_unresolved(&mut self, batch: &[(SeqId, usize)]) -> Result<Appended> {
        if let Some((id, n)) = batch.iter().find(|(_, n)| *n > u32::MAX as usize) {
            return Err(Error::value("counts", format!("{n} tokens for sequence {id}: at most {} an append", u32::MAX)));
        }
        let chunks: Vec<(SeqId, Chunk)> = batch.iter().map(|(id, n)| (*id, Chunk::Unresolved(*n))).collect();
        self.append_chunks(&chunks)
    }

    /// The ids of the first `ids.len()` unresolved tokens of `id`, registering the prefix units
    /// they complete. More ids than unresolved tokens is an error that changes nothing.
    pub fn resolve(&mut self, id: SeqId, ids: &[u32]) -> Result<()> {
        if !self.seqs.contains_key(&id) {
            return Err(self.missing(id));
        }
        let seq = self.seqs.get_mut(&id).expect("checked above");
        if ids.len() > seq.unresolved {
            return Err(Error::value(
                "ids",
                format!("sequence {id} has {} unresolved tokens, got {} ids", seq.unresolved, ids.len()),
            ));
        }
        let first = seq.len - seq.unresolved;
        seq.unresolved -= ids.len();
        let completed = seq.complete_units(first, ids);
        register(&mut self.prefix, seq, completed);
        Ok(())
    }

    /// Unresolved tokens of `id` (see [`append_unresolved`](Self::append_unresolved)).
    pub fn unresolved(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.unresolved)
    }

    fn append_chunks(&mut self, batch: &[(SeqId, Chunk)]) -> Result<Appended> {
        let plans = self.plan(batch)?;
        let CacheManager { layout, pools, seqs, prefix, .. } = self;
        let mut out = Appended::default();
        for ((id, chunk), plan) in batch.iter().zip(plans) {
            let seq = seqs.get_mut(id).expect("planned sequences exist");
            for family in Family::ALL {
                apply(pools, prefix, seq, family, &plan, &mut out.copies[family.index()])?;
            }
            let completed = advance(layout, seq, *chunk, &mut out.slots);
            register(prefix, seq, completed);
        }
        Ok(out)
    }

    /// Decides every copy and fresh page of the batch before anything changes. A page that an
    /// earlier sequence of the batch copies away has one reference fewer for the later ones.
    fn plan(&self, batch: &[(SeqId, Chunk)]) -> Result<Vec<Plan>> {
        let mut seen = HashSet::with_capacity(batch.len());
        let mut dropped: HashMap<(usize, PageId), u32> = HashMap::new();
        let mut need = [0usize; 4];
        let mut first_short = None;
        let mut plans = Vec::with_capacity(batch.len());
        for (id, chunk) in batch {
            if !seen.insert(*id) {
                return Err(Error::value("seq_ids", format!("sequence {id} appears more than once in one append")));
            }
            let seq = self.seq(*id)?;
            if seq.unresolved > 0 && matches!(chunk, Chunk::Ids(_)) {
                return Err(Error::value(
                    "tokens",
                    format!(
                        "sequence {id} has {} appended tokens whose ids are not resolved yet; resolve them before \
                         appending ids (nothing was changed)",
                        seq.unresolved
                    ),
                ));
            }
            let new_len = seq.len + chunk.len();
            let touch = Family::ALL.map(|f| seq.touch(&self.layout, f, new_len));
            let mut cow: [Vec<usize>; 4] = Default::default();
            for family in Family::ALL {
                let (f, t, table) = (family.index(), &touch[family.index()], seq.table(family));
                let pool = &self.pools[f];
                for slot in t.slots.iter().flat_map(|r| r.clone()).filter(|s| *s < table.len()) {
                    let page = table[slot];
                    let refs = pool.refcount(page) - dropped.get(&(f, page)).copied().unwrap_or(0);
                    if refs > 1 || (family.append_only() && pool.filled(page) != t.first_row) {
                        cow[f].push(slot);
                        *dropped.entry((f, page)).or_default() += 1;
                    }
                }
            }
            let plan = Plan { touch, cow };
            for family in Family::ALL {
                need[family.index()] += plan.fresh(seq, family);
            }
            if first_short.is_none() && Family::ALL.iter().any(|f| need[f.index()] > self.pools[f.index()].free_pages()) {
                first_short = Some(*id);
            }
            plans.push(plan);
        }
        // A page that a copy leaves without references (a cached page written off its
        // watermark) is not counted as available: it is freed only after its copy is taken.
        let short: Vec<String> = Family::ALL
            .into_iter()
            .filter(|f| need[f.index()] > self.pools[f.index()].free_pages())
            .map(|f| {
                let pool = self.pool(f);
                format!(
                    "{} pool needs {} free pages, has {} of {}",
                    f.name(),
                    need[f.index()],
                    pool.free_pages(),
                    pool.num_pages() - 1
                )
            })
            .collect();
        if let Some(id) = first_short {
            return Err(Error::OutOfPages(format!(
                "sequence {id} (and any after it in the batch) cannot get its pages: {}; nothing was changed \
                 (release sequences or give the pool more pages)",
                short.join("; ")
            )));
        }
        Ok(plans)
    }
}

/// Registers the prefix units an append or a resolve completed, under the pages that hold them.
fn register(prefix: &mut PrefixIndex, seq: &Sequence, completed: Vec<CompletedUnit>) {
    for unit in completed {
        let pages = SHARED.map(|f| seq.table(f).get(unit_slot(f, unit.index)).copied().unwrap_or(NULL_PAGE));
        if pages != [NULL_PAGE; 2] {
            prefix.register(unit.hash, unit.parent, &unit.tokens, pages);
        }
    }
}

/// Moves the sequence forward by `chunk` (its pages are in place) and pushes the slots of the
/// rows the caller writes; returns the prefix units the tokens complete.
fn advance(layout: &CacheLayout, seq: &mut Sequence, chunk: Chunk, slots: &mut [Vec<i64>; 4]) -> Vec<CompletedUnit> {
    let (old_len, new_len) = (seq.len, seq.len + chunk.len());
    let window = seq.window_writes(layout, new_len);
    let old_entries = seq.entries;
    let completed = match chunk {
        Chunk::Ids(tokens) => seq.complete_units(old_len, tokens),
        Chunk::Unresolved(n) => {
            seq.unresolved += n;
            Vec::new()
        }
    };
    seq.len = new_len;
    for (e, family) in seq.entries.iter_mut().zip(SHARED) {
        *e = (*e).max(family.entries(new_len));
    }
    let window_slot = |p: usize| if window.contains(&p) { seq.row(layout, Family::Window, p as i64) } else { -1 };
    slots[Family::Window.index()].extend((old_len..new_len).map(window_slot));
    for (k, family) in SHARED.into_iter().enumerate().filter(|(_, f)| layout.layers(*f) > 0) {
        let entry_slot = |i: usize| if i < old_entries[k] { -1 } else { seq.row(layout, family, i as i64) };
        slots[family.index()].extend((family.entries(old_len)..family.entries(new_len)).map(entry_slot));
    }
    slots[Family::State.index()].push(seq.table(Family::State).first().map_or(-1, |s| *s as i64));
    completed
}

/// Carries out one sequence's plan for one family: copies, fresh pages, watermarks.
fn apply(
    pools: &mut [BlockPool; 4],
    prefix: &mut PrefixIndex,
    seq: &mut Sequence,
    family: Family,
    plan: &Plan,
    copies: &mut Vec<(PageId, PageId)>,
) -> Result<()> {
    let (f, t) = (family.index(), &plan.touch[family.index()]);
    let mut take = |pools: &mut [BlockPool; 4]| {
        let page = pools[f].allocate().expect("the plan checked the free pages");
        prefix.forget_page(family, page);
        page
    };
    for slot in &plan.cow[f] {
        let src = seq.tables[f][*slot];
        let dst = take(pools);
        pools[f].set_filled(dst, t.first_row);
        pools[f].release(src)?;
        seq.tables[f][*slot] = dst;
        copies.push((src, dst));
    }
    while seq.tables[f].len() < t.table_len {
        let page = take(pools);
        seq.tables[f].push(page);
    }
    if family.append_only() {
        for slot in t.slots[0].clone() {
            pools[f].set_filled(seq.tables[f][slot], (t.end_entry - slot * PAGE_ROWS).min(PAGE_ROWS));
        }
    }
    Ok(())
}
