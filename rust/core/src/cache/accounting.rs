//! Byte accounting from reserved pages: what a sequence of `len` tokens holds, per family and
//! amortized per token, and capacity planning (docs/model.md section 5). Every number comes from the
//! pages the allocator would reserve, the null page of each pool included where a pool is sized.

use super::family::Family;
use super::layout::{CacheLayout, CSA_STATE_BYTES, HCA_STATE_BYTES};
use super::manager::{CacheManager, SeqId};
use crate::error::{Error, Result};
use crate::quant::PAGE_ROWS;

/// Bytes by part of the cache. CSA pages hold main rows and indexer keys, reported apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub window: u64,
    pub csa_main: u64,
    pub csa_index: u64,
    pub hca: u64,
    pub state: u64,
}

impl Footprint {
    /// The compressed families: CSA rows and keys plus HCA rows (what grows with context).
    pub fn compressed(&self) -> u64 {
        self.csa_main + self.csa_index + self.hca
    }
    pub fn total(&self) -> u64 {
        self.window + self.compressed() + self.state
    }
}

impl CacheLayout {
    /// Bytes of `pages[f]` pages (state slots for `State`) of each family, across its layers.
    pub fn footprint_of_pages(&self, pages: [usize; 4]) -> Footprint {
        let n = |f: Family| pages[f.index()] as u64;
        let rows = |row_bytes: usize, layers: usize| (PAGE_ROWS * row_bytes * layers) as u64;
        let main = self.main.row_bytes();
        let csa = self.layers(Family::Csa);
        let hca = self.layers(Family::Hca);
        Footprint {
            window: n(Family::Window) * rows(main, self.num_layers()),
            csa_main: n(Family::Csa) * rows(main, csa),
            csa_index: n(Family::Csa) * rows(self.index.row_bytes(), csa),
            hca: n(Family::Hca) * rows(main, hca),
            state: n(Family::State) * (CSA_STATE_BYTES * csa + HCA_STATE_BYTES * hca) as u64,
        }
    }

    /// Bytes of one page (one state slot) of `family`, across all its layers.
    pub fn page_bytes(&self, family: Family) -> u64 {
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
        Ok(bytes.saturating_sub(null) / self.footprint(len).total())
    }

    /// The longest sequence that fits alone in pools totalling `bytes`; `None` when every
    /// length fits (a model without compressed layers holds at most one window per sequence).
    pub fn longest_context(&self, bytes: u64) -> Option<u64> {
        let null = self.footprint_of_pages([1; 4]).total();
        let fits = |len: u64| null + self.footprint(len as usize).total() <= bytes;
        if self.layers(Family::Csa) + self.layers(Family::Hca) == 0 && fits(self.window as u64) {
            return None;
        }
        let mut hi = 1u64;
        while fits(hi) {
            hi *= 2;
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
        assert_eq!(f.state, (CSA_STATE_BYTES + HCA_STATE_BYTES) as u64);
        assert_eq!(l.footprint(0), Footprint::default());
        assert_eq!(l.page_bytes(Family::Csa), 64 * (584 + 68));
    }

    #[test]
    fn capacity_planning_agrees_with_footprints() {
        let l = layout(v4_flash_ratios(), IndexFormat::Fp4);
        let null = l.footprint_of_pages([1; 4]).total();
        let per = l.footprint(100_000).total();
        assert_eq!(l.sequences_that_fit(100_000, null + 3 * per).unwrap(), 3);
        assert_eq!(l.sequences_that_fit(100_000, null + 3 * per - 1).unwrap(), 2);
        let longest = l.longest_context(null + per).unwrap();
        assert!(longest >= 100_000);
        assert!(null + l.footprint(longest as usize).total() <= null + per);
        assert!(null + l.footprint(longest as usize + 1).total() > null + per);
        assert_eq!(l.longest_context(null - 1), Some(0));
        let pages = l.pages_for_budget(null + 3 * per, 100_000).unwrap();
        assert_eq!(l.footprint_of_pages(pages).total(), null + 3 * per);
        let swa_only = layout(vec![0, 0], IndexFormat::Fp4);
        assert_eq!(swa_only.longest_context(1 << 30), None);
    }
}
