//! A full consistency check of the manager, O(pages + sequences): what tests assert after every
//! operation, and what a user can run when reporting a bug.

use super::family::Family;
use super::manager::CacheManager;
use super::pool::NULL_PAGE;
use super::prefix::SHARED;
use crate::error::{Error, Result};
use crate::quant::PAGE_ROWS;

fn broken(msg: String) -> Error {
    Error::State(format!("inconsistent cache (please report): {msg}"))
}

impl CacheManager {
    /// Checks that every page's refcount equals the number of page tables holding it, that the
    /// free list holds exactly the unreferenced pages, that tables have the length their
    /// sequence needs, that watermarks cover the rows sequences rely on, and that registered
    /// prefix units name full CSA pages.
    pub fn check(&self) -> Result<()> {
        for family in Family::ALL {
            let pool = self.pool(family);
            let mut refs = vec![0u32; pool.num_pages()];
            for (id, seq) in &self.seqs {
                for page in seq.table(family) {
                    if *page == NULL_PAGE || *page as usize >= refs.len() {
                        return Err(broken(format!("sequence {id} holds {} page {page}", family.name())));
                    }
                    refs[*page as usize] += 1;
                }
            }
            if let Some(p) = (0..refs.len()).find(|p| refs[*p] != pool.refcount(*p as u32)) {
                return Err(broken(format!(
                    "{} page {p} has refcount {} but {} holders",
                    family.name(),
                    pool.refcount(p as u32),
                    refs[p]
                )));
            }
            let free: Vec<u32> = pool.free_list().collect();
            let unreferenced = refs.iter().skip(1).filter(|r| **r == 0).count();
            if free.len() != pool.free_pages()
                || free.len() != unreferenced
                || free.iter().any(|p| refs[*p as usize] != 0)
            {
                return Err(broken(format!(
                    "{} free list does not hold exactly the unreferenced pages",
                    family.name()
                )));
            }
        }
        for (id, seq) in &self.seqs {
            let started = seq.len > seq.window_start;
            for family in [Family::Window, Family::State] {
                let want = if started { self.layout.pages_for_len(family, seq.len) } else { 0 };
                if seq.table(family).len() != want {
                    return Err(broken(format!(
                        "sequence {id} holds {} {} pages, needs {want}",
                        seq.table(family).len(),
                        family.name()
                    )));
                }
            }
            for family in SHARED.into_iter().filter(|f| self.layout.layers(*f) > 0) {
                let (entries, table) = (seq.entries(family), seq.table(family));
                if entries < family.entries(seq.len) || table.len() != entries.div_ceil(PAGE_ROWS) {
                    return Err(broken(format!(
                        "sequence {id} has {entries} {} entries in {} pages",
                        family.name(),
                        table.len()
                    )));
                }
                for (slot, page) in table.iter().enumerate() {
                    let rows = (entries - slot * PAGE_ROWS).min(PAGE_ROWS);
                    if self.pool(family).filled(*page) < rows {
                        return Err(broken(format!(
                            "{} page {page} is filled below the {rows} rows sequence {id} uses",
                            family.name()
                        )));
                    }
                }
            }
        }
        for pages in self.prefix.pages() {
            let csa = pages[0];
            if self.layout.layers(Family::Csa) > 0 && self.pool(Family::Csa).filled(csa) != PAGE_ROWS {
                return Err(broken(format!("a registered unit names csa page {csa}, which is not full")));
            }
        }
        Ok(())
    }
}
