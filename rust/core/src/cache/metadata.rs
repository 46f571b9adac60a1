//! Kernel-facing metadata: padded page tables and logical -> physical row ids.

use super::family::Family;
use super::manager::{CacheManager, SeqId};
use crate::error::{Error, Result};

impl CacheManager {
    /// Page tables of `seq_ids` in `family`, row-major `[seq_ids.len(), width]` int32, padded
    /// with the null page 0. `width` defaults to the longest table; a given width shorter than
    /// a table is an error. The window table lists the ring pages (ring row `p % window` of
    /// token `p`); the state table holds the sequence's state slot.
    pub fn page_tables(&self, family: Family, seq_ids: &[SeqId], width: Option<usize>) -> Result<(Vec<i32>, usize)> {
        let tables = seq_ids.iter().map(|id| Ok(self.seq(*id)?.table(family))).collect::<Result<Vec<_>>>()?;
        let longest = tables.iter().map(|t| t.len()).max().unwrap_or(0);
        let width = width.unwrap_or(longest);
        let pages = self.pool(family).num_pages();
        if width > pages {
            return Err(Error::value(
                "width",
                format!("a {} page table is at most as wide as its pool ({pages} pages), got {width}", family.name()),
            ));
        }
        if longest > width {
            return Err(Error::value(
                "width",
                format!("a {} page table holds {longest} pages, more than width {width}", family.name()),
            ));
        }
        let mut out = vec![0i32; seq_ids.len() * width];
        for (row, table) in out.chunks_exact_mut(width.max(1)).zip(&tables) {
            for (o, page) in row.iter_mut().zip(*table) {
                *o = *page as i32;
            }
        }
        Ok((out, width))
    }

    /// Physical row ids (`page * 64 + offset`) of logical indices: row `i` of `logical`
    /// (`seq_ids.len()` rows, row-major) belongs to `seq_ids[i]`. Logical indices are token
    /// positions for the window (valid: the last `window` positions) and entry indices for CSA
    /// and HCA (valid: the complete entries). Anything else gives -1.
    pub fn physical_rows(&self, family: Family, seq_ids: &[SeqId], logical: &[i64], out: &mut [i64]) -> Result<()> {
        if family == Family::State {
            return Err(Error::value("family", "the state family has slots, not rows; read them with page_tables"));
        }
        let k = logical.len().checked_div(seq_ids.len()).unwrap_or(0);
        if out.len() != logical.len() || k * seq_ids.len() != logical.len() {
            return Err(Error::value(
                "logical",
                format!("expected {} rows (one per sequence id), got {} indices", seq_ids.len(), logical.len()),
            ));
        }
        for (i, id) in seq_ids.iter().enumerate() {
            let seq = self.seq(*id)?;
            for (o, l) in out[i * k..(i + 1) * k].iter_mut().zip(&logical[i * k..(i + 1) * k]) {
                *o = seq.row(&self.layout, family, *l);
            }
        }
        Ok(())
    }
}
