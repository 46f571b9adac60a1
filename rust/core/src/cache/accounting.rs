//! Byte accounting from reserved pages: what a sequence of `len` tokens holds, per family and
//! amortized per token, and capacity planning (docs/model.md section 5). Every number comes from the
//! pages the allocator would reserve, the null page of each pool included where a pool is sized.

use super::family::Family;
use super::layout::{CacheLayout, CSA_STATE_BYTES, HCA_STATE_BYTES};
use super::manager::{CacheManager, SeqId};
use crate::error::{Error, Result};
use crate::quant::PAGE_ROWS;

/// Bytes by part of the cache. CSA pages hold main rows and indexer keys, reported apart.
/// Counted in 128 bits: a length or a page count near the top of 64 bits still gives the exact
/// number of bytes, never a wrapped one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub window: u128,
    pub csa_main: u128,
    pub csa_index: u128,
    pub hca: u128,
    pub state: u128,
}

impl Footprint {
    /// The compressed families: CSA rows and keys plus HCA rows (what grows with context).
    pub fn compressed(&self) -> u128 {
        self.csa_main + self.csa_index + self.hca
    }
    pub fn total(&self) -> u128 {
        self.window + self.compressed() + self.state
    }
}

impl CacheLayout {
    /// Bytes of `pages[f]` pages (state slots for `State`) of each family, across its layers.
    pub fn footprint_of_pages(&self, pages: [usize; 4]) -> Footprint {
        let n = |f: Family| pages[f.index()] as u128;
        let rows = |row_bytes: usize, layers: usize| (PAGE_ROWS * row_bytes) as u128 * layers as u128;
        let main = self.main.row_bytes();
        let csa = self.layers(Family::Csa);
        let hca = self.layers(Family::Hca);
        Footprint {
            window: n(Family::Window) * rows(main, self.num_layers()),
            csa_main: n(Family::Csa) * rows(main, csa),
            csa_index: n(Family::Csa) * rows(self.index.row_bytes(), csa),
            hca: n(Family::Hca) * rows(main, hca),
            state: n(Family::State) * (CSA_STATE_BYTES as u128 * csa as u128 + HCA_STATE_BYTES as u128 * hca as u128),
        }
    }

    /// Bytes of one page (one state slot) of `family`, across all its layers.
    pub fn page_bytes(&self, family: Family) -> u128 {
        let mut one = [0; 4];
        one[family.index()] = 1;
        self.footprint_of_pages(one).total()
    }

    /// Bytes a fresh sequence of `len` tokens holds.
    pub fn footprint(&self, len: usize) -> Footprint {
        self.footprint_of_pages(Family::ALL.map(|f| self.pages_for_len(f, len)))
    }

    /// Compressed-family bytes per token of a sequence of `len` tokens (window and state are
    /// per sequence, not per token: see [`footprint`](Self::footprint)).
    pub fn bytes_per_token(&self, len: usize) -> Result<f64> {
        if len == 0 {
            return Err(Error::value("seq_len", "expected at least 1 token, got 0"));
        }
        Ok(self.footprint(len).compressed() as f64 / len as f64)
    }

    /// How many sequences of `len` tokens fit in pools totalling `bytes` (null pages included).
    pub fn sequences_that_fit(&self, len: usize, bytes: u64) -> Result<u64> {
        if len == 0 {
            return Err(Error::value("seq_len", "expected at least 1 token, got 0"));
        }
        let null = self.footprint_of_pages([1; 4]).total();
        // At most `bytes`, so the quotient fits in 64 bits.
        Ok(((bytes as u128).saturating_sub(null) / self.footprint(len).total()) as u64)
    }

    /// The longest sequence that fits alone in pools totalling `bytes`; `None` when every
    /// length fits (a model without compressed layers holds at most one window per sequence).
    pub fn longest_context(&self, bytes: u64) -> Option<u64> {
        let null = self.footprint_of_pages([1; 4]).total();
        let fits = |len: u64| null + self.footprint(len as usize).total() <= bytes as u128;
        if self.layers(Family::Csa) + self.layers(Family::Hca) == 0 && fits(self.window as u64) {
            return None;
        }
        // A compressed layer holds at least one row per 128 tokens, so no length near 2^63 fits
        // in 64-bit bytes; the bound only keeps the doubling from wrapping whatever happens.
        let mut hi = 1u64;
        while hi < 1 << 63 && fits(hi) {
            hi *= 2;
        }
        if fits(hi) {
            return Some(hi);
        }
        // fits(lo) or lo == 0, and !fits(hi): bisect.
        let mut lo = hi / 2;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid
            } else {
                hi = mid
            }
        }
        Some(if fits(lo) { lo } else { 0 })
    }

    /// Pages per family (null page included) that hold as many sequences of `len` tokens as
    /// `bytes` allows: the budget is split across families in the proportion such sequences use.
    pub fn pages_for_budget(&self, bytes: u64, len: usize) -> Result<[usize; 4]> {
        let n = self.sequences_that_fit(len, bytes)? as usize;
        // n sequences of this length fit in `bytes`, so n times their pages does as well.
        Ok(Family::ALL.map(|f| n * self.pages_for_len(f, len) + 1))
    }
}

impl CacheManager {
    /// Bytes of the pages `id` references (shared pages counted in full).
    pub fn sequence_footprint(&self, id: SeqId) -> Result<Footprint> {
        let seq = self.seq(id)?;
        Ok(self.layout.footprint_of_pages(Family::ALL.map(|f| seq.table(f).len())))
    }

    /// Bytes of the pages in use (each counted once, however many sequences share it).
    pub fn used_footprint(&self) -> Footprint {
        self.layout.footprint_of_pages(Family::ALL.map(|f| self.pool(f).used_pages()))
    }

    /// Bytes of every page of every pool, null pages included: the device memory to allocate.
    pub fn pool_footprint(&self) -> Footprint {
        self.layout.footprint_of_pages(Family::ALL.map(|f| self.pool(f).num_pages()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{v4_flash_ratios, v4_pro_ratios};
    use super::*;
    use crate::formats::{IndexFormat, MainFormat};

    fn layout(ratios: Vec<usize>, index: IndexFormat) -> CacheLayout {
        CacheLayout::new(ratios, 128, MainFormat::Fp8, index).unwrap()
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn amortized_bytes_per_token_reproduce_spec_section_5() {
        let cases = [
            (v4_pro_ratios(), IndexFormat::Fp4, 5031.4375),
            (v4_flash_ratios(), IndexFormat::Fp4, 3514.25),
            (v4_pro_ratios(), IndexFormat::Fp8, 30.0 * 179.0 + 31.0 * 4.5625),
            (v4_flash_ratios(), IndexFormat::Bf16, 21.0 * (146.0 + 64.0) + 20.0 * 4.5625),
        ];
        for (ratios, index, want) in cases {
            assert_eq!(layout(ratios, index).bytes_per_token(MIB).unwrap(), want);
        }
        let pro = layout(v4_pro_ratios(), IndexFormat::Fp4).footprint(MIB);
        assert_eq!(pro.compressed(), 5_275_844_608); // 5.28 GB
        assert_eq!(pro.window, 62 * 128 * 584);
        assert_eq!(pro.state, 30 * 80 * 1024 + 31 * 512 * 1024);
        assert_eq!(layout(v4_flash_ratios(), IndexFormat::Fp4).footprint(MIB).compressed(), 3_684_958_208);
    }

    #[test]
    fn footprints_round_up_to_pages() {
        let l = layout(vec![4, 128, 0], IndexFormat::Fp4);
        let f = l.footprint(5);
        assert_eq!((f.window, f.csa_main, f.csa_index, f.hca), (3 * 64 * 584, 64 * 584, 64 * 68, 0));
        assert_eq!(f.state, (CSA_STATE_BYTES + HCA_STATE_BYTES) as u128);
        assert_eq!(l.footprint(0), Footprint::default());
        assert_eq!(l.page_bytes(Family::Csa), 64 * (584 + 68));
    }

    #[test]
    fn capacity_planning_agrees_with_footprints() {
        let l = layout(v4_flash_ratios(), IndexFormat::Fp4);
        let null = l.footprint_of_pages([1; 4]).total();
        let per = l.footprint(100_000).total();
        let budget = |b: u128| u64::try_from(b).unwrap();
        assert_eq!(l.sequences_that_fit(100_000, budget(null + 3 * per)).unwrap(), 3);
        assert_eq!(l.sequences_that_fit(100_000, budget(null + 3 * per - 1)).unwrap(), 2);
        let longest = l.longest_context(budget(null + per)).unwrap();
        assert!(longest >= 100_000);
        assert!(null + l.footprint(longest as usize).total() <= null + per);
        assert!(null + l.footprint(longest as usize + 1).total() > null + per);
        assert_eq!(l.longest_context(budget(null) - 1), Some(0));
        let pages = l.pages_for_budget(budget(null + 3 * per), 100_000).unwrap();
        assert_eq!(l.footprint_of_pages(pages).total(), null + 3 * per);
        let swa_only = layout(vec![0, 0], IndexFormat::Fp4);
        assert_eq!(swa_only.longest_context(1 << 30), None);
    }

    #[test]
    fn huge_lengths_and_budgets_count_exactly() {
        let pro = layout(v4_pro_ratios(), IndexFormat::Fp4);
        assert_eq!(pro.bytes_per_token(1 << 62).unwrap(), 5031.4375);
        // 2^64 - 1 tokens: 2^62 - 1 CSA entries in 2^56 pages, 2^57 - 1 HCA entries in 2^51 pages.
        assert_eq!(pro.footprint(usize::MAX).compressed(), (1u128 << 62) * 652 * 30 + (1u128 << 57) * 584 * 31);
        let csa_only = layout(vec![4], IndexFormat::Fp4);
        let longest = csa_only.longest_context(u64::MAX).unwrap();
        assert!(longest > 1 << 56 && longest < 1 << 63, "{longest}");
        assert!(pro.pages_for_budget(u64::MAX, 1).unwrap().iter().all(|p| *p >= 1));
    }
}
