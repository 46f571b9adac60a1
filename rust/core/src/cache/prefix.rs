//! Prefix reuse: chained hashes over full 256-token units of token ids.
//!
//! Unit `k` of a sequence (tokens `[256k, 256k + 256)`) is registered when the append that
//! completes it returns, under `hash(hash of unit k-1, tokens of unit k)`, naming the pages that
//! hold its compressed rows: CSA page `k` (the unit's 64 CSA entries fill exactly that page) and
//! the HCA page holding its two HCA entries (HCA page `k / 32`, shared by 32 units). A
//! registration lasts until one of its pages is reallocated, even while the pages sit free.
//!
//! Hash collisions are guarded by keeping each unit's parent hash and token ids and comparing
//! them on lookup, so a wrong match needs two different prefixes with equal 64-bit parent hashes
//! followed by identical units.
//!
//! Why a later unit's HCA page can stand for earlier ones: pages are written in place only at
//! their watermark (see `pool.rs`), so rows below the watermark all come from one token history;
//! the unit's tokens and chain match ours, hence every HCA row of that page up to the unit's own
//! rows is ours too.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use super::family::{Family, CSA_RATIO, HCA_RATIO};
use super::layout::UNIT_TOKENS;
use super::pool::{PageId, NULL_PAGE};
use crate::quant::PAGE_ROWS;

/// The compressed families, the only ones prefix reuse shares.
pub const SHARED: [Family; 2] = [Family::Csa, Family::Hca];

/// Parent hash of unit 0.
pub const ROOT: u64 = 0;

pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Page-table slot of the page holding unit `k`'s last entry in a compressed family.
pub fn unit_slot(family: Family, k: usize) -> usize {
    let per_unit = match family {
        Family::Csa => UNIT_TOKENS / CSA_RATIO,
        _ => UNIT_TOKENS / HCA_RATIO,
    };
    ((k + 1) * per_unit - 1) / PAGE_ROWS
}

struct Unit {
    parent: u64,
    tokens: Box<[u32]>,
    /// Per entry of [`SHARED`]: the page holding the unit's last entry (null if the model has
    /// no layer of that family).
    pages: [PageId; 2],
}

/// The longest registered prefix of a token list.
pub struct PrefixMatch {
    pub units: usize,
    /// Hash of the last matched unit ([`ROOT`] if none).
    pub chain: u64,
    /// Per entry of [`SHARED`]: the page table covering the matched units.
    pub tables: [Vec<PageId>; 2],
}

#[derive(Default)]
pub struct PrefixIndex {
    units: HashMap<u64, Unit>,
    /// Per entry of [`SHARED`]: page -> hashes of the units registered on it.
    by_page: [HashMap<PageId, Vec<u64>>; 2],
}

impl PrefixIndex {
    pub fn num_units(&self) -> usize {
        self.units.len()
    }

    /// Registers a completed unit; a unit already registered (or a colliding one) is kept.
    pub fn register(&mut self, hash: u64, parent: u64, tokens: &[u32], pages: [PageId; 2]) {
        if self.units.contains_key(&hash) {
            return;
        }
        self.units.insert(hash, Unit { parent, tokens: tokens.into(), pages });
        for (f, page) in pages.into_iter().enumerate().filter(|(_, p)| *p != NULL_PAGE) {
            self.by_page[f].entry(page).or_default().push(hash);
        }
    }

    /// Drops the registrations naming `page` of `family`, which is being reallocated.
    pub fn forget_page(&mut self, family: Family, page: PageId) {
        let Some(f) = SHARED.iter().position(|s| *s == family) else { return };
        for hash in self.by_page[f].remove(&page).unwrap_or_default() {
            // The unit may already be gone (another of its pages was reallocated first) and
            // its hash registered again on other pages.
            if self.units.get(&hash).is_some_and(|u| u.pages[f] == page) {
                self.units.remove(&hash);
            }
        }
    }

    /// The longest registered prefix of `tokens`, in whole units.
    pub fn lookup(&self, tokens: &[u32]) -> PrefixMatch {
        let mut m = PrefixMatch { units: 0, chain: ROOT, tables: [Vec::new(), Vec::new()] };
        for unit_tokens in tokens.chunks_exact(UNIT_TOKENS) {
            let hash = chain_hash(m.chain, unit_tokens);
            let Some(unit) = self.units.get(&hash).filter(|u| u.parent == m.chain && *u.tokens == *unit_tokens) else {
                break;
            };
            for (f, family) in SHARED.into_iter().enumerate() {
                if unit.pages[f] != NULL_PAGE {
                    let slot = unit_slot(family, m.units);
                    // The latest unit of a page stands for the earlier ones (see the module doc).
                    m.tables[f].truncate(slot);
                    m.tables[f].push(unit.pages[f]);
                }
            }
            m.units += 1;
            m.chain = hash;
        }
        m
    }

    /// Every registered unit's pages, for the consistency audit.
    pub fn pages(&self) -> impl Iterator<Item = [PageId; 2]> + '_ {
        self.units.values().map(|u| u.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u32) -> Vec<u32> {
        (0..UNIT_TOKENS as u32).map(|i| i * 7 + seed).collect()
    }

    #[test]
    fn slots_of_units() {
        assert_eq!((unit_slot(Family::Csa, 0), unit_slot(Family::Csa, 5)), (0, 5));
        assert_eq!((unit_slot(Family::Hca, 31), unit_slot(Family::Hca, 32)), (0, 1));
    }

    #[test]
    fn lookup_follows_the_chain_and_stops_at_a_difference() {
        let mut index = PrefixIndex::default();
        let (u0, u1) = (unit(0), unit(1));
        let h0 = chain_hash(ROOT, &u0);
        let h1 = chain_hash(h0, &u1);
        index.register(h0, ROOT, &u0, [5, 9]);
        index.register(h1, h0, &u1, [6, 10]);
        let prompt: Vec<u32> = [u0.clone(), u1.clone(), unit(2)].concat();
        let m = index.lookup(&prompt);
        assert_eq!((m.units, m.chain), (2, h1));
        assert_eq!(m.tables, [vec![5, 6], vec![10]]);
        let other: Vec<u32> = [unit(3), u1].concat();
        assert_eq!(index.lookup(&other).units, 0);
        assert_eq!(index.lookup(&prompt[..300]).units, 1);
    }

    #[test]
    fn a_colliding_hash_with_other_tokens_is_no_match() {
        let mut index = PrefixIndex::default();
        let u0 = unit(0);
        index.register(chain_hash(ROOT, &u0), ROOT, &unit(4), [5, 0]);
        assert_eq!(index.lookup(&u0).units, 0);
    }

    #[test]
    fn reallocating_a_page_forgets_its_units() {
        let mut index = PrefixIndex::default();
        let u0 = unit(0);
        let h0 = chain_hash(ROOT, &u0);
        index.register(h0, ROOT, &u0, [5, 9]);
        index.forget_page(Family::Csa, 6);
        assert_eq!(index.lookup(&u0).units, 1);
        index.forget_page(Family::Hca, 9);
        assert_eq!((index.lookup(&u0).units, index.num_units()), (0, 0));
        index.forget_page(Family::Csa, 5);
        assert_eq!(index.num_units(), 0);
    }
}
