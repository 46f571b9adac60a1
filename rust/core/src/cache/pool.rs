//! A block pool: the pages of one cache family, with reference counts, a write watermark per
//! page and an LRU free list. Allocation, retain and release are O(1).
//!
//! Page 0 is the null page: never handed out, it pads page tables, and it doubles as the
//! sentinel of the free list, which is threaded through `prev`/`next` so that a free page can be
//! taken out of the middle (a prefix hit on a cached page) in O(1). Released pages go to the back
//! and allocation takes from the front, so the least recently released page is reused first
//! while the others keep their content (and their prefix registrations) as long as possible.

use crate::error::{Error, Result};
use crate::quant::PAGE_ROWS;

pub type PageId = u32;
pub const NULL_PAGE: PageId = 0;

#[derive(Debug, Clone)]
pub struct BlockPool {
    refs: Vec<u32>,
    /// Rows written so far, for append-only families: a page may be written in place only at
    /// its watermark, so rows a prefix registration relies on are never overwritten.
    filled: Vec<u8>,
    prev: Vec<PageId>,
    next: Vec<PageId>,
    free: usize,
}

impl BlockPool {
    /// A pool of `num_pages` pages, the null page included; all others start free.
    pub fn new(arg: &str, num_pages: usize) -> Result<Self> {
        if num_pages == 0 || num_pages > PageId::MAX as usize {
            return Err(Error::value(
                arg,
                format!("expected 1 to {} pages (page 0 is the null page), got {num_pages}", PageId::MAX),
            ));
        }
        let n = num_pages as PageId;
        // Free list in page order: sentinel 0 -> 1 -> 2 -> ... -> n-1 -> 0.
        let next = (0..n).map(|p| (p + 1) % n).collect();
        let prev = (0..n).map(|p| (p + n - 1) % n).collect();
        Ok(BlockPool { refs: vec![0; num_pages], filled: vec![0; num_pages], prev, next, free: num_pages - 1 })
    }

    /// Pages in the pool, the null page included.
    pub fn num_pages(&self) -> usize {
        self.refs.len()
    }

    pub fn free_pages(&self) -> usize {
        self.free
    }

    pub fn used_pages(&self) -> usize {
        self.num_pages() - 1 - self.free
    }

    pub fn refcount(&self, page: PageId) -> u32 {
        self.refs[page as usize]
    }

    pub fn filled(&self, page: PageId) -> usize {
        self.filled[page as usize] as usize
    }

    pub fn set_filled(&mut self, page: PageId, rows: usize) {
        debug_assert!(rows <= PAGE_ROWS);
        self.filled[page as usize] = rows as u8;
    }

    /// Takes the least recently released page, with one reference and an empty watermark.
    pub fn allocate(&mut self) -> Option<PageId> {
        let page = self.next[NULL_PAGE as usize];
        if page == NULL_PAGE {
            return None;
        }
        self.unlink(page);
        self.refs[page as usize] = 1;
        self.filled[page as usize] = 0;
        Some(page)
    }

    /// Adds a reference; a free page (one kept for prefix reuse) leaves the free list.
    pub fn retain(&mut self, page: PageId) {
        debug_assert_ne!(page, NULL_PAGE);
        if self.refs[page as usize] == 0 {
            self.unlink(page);
        }
        self.refs[page as usize] += 1;
    }

    /// Drops a reference; the last one sends the page to the back of the free list.
    pub fn release(&mut self, page: PageId) -> Result<()> {
        if page == NULL_PAGE || page as usize >= self.num_pages() || self.refs[page as usize] == 0 {
            return Err(Error::State(format!("release of page {page}, which is not in use (double free)")));
        }
        self.refs[page as usize] -= 1;
        if self.refs[page as usize] == 0 {
            let tail = self.prev[NULL_PAGE as usize];
            self.link_after(tail, page);
        }
        Ok(())
    }

    /// Free pages from the front (next to be allocated) to the back.
    pub fn free_list(&self) -> impl Iterator<Item = PageId> + '_ {
        let mut page = NULL_PAGE;
        std::iter::from_fn(move || {
            page = self.next[page as usize];
            (page != NULL_PAGE).then_some(page)
        })
    }

    fn unlink(&mut self, page: PageId) {
        let (p, n) = (self.prev[page as usize], self.next[page as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.free -= 1;
    }

    fn link_after(&mut self, at: PageId, page: PageId) {
        let n = self.next[at as usize];
        self.next[at as usize] = page;
        self.prev[page as usize] = at;
        self.next[page as usize] = n;
        self.prev[n as usize] = page;
        self.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_lru_and_skips_the_null_page() {
        let mut pool = BlockPool::new("pages", 4).unwrap();
        assert_eq!((pool.free_pages(), pool.used_pages()), (3, 0));
        let (a, b, c) = (pool.allocate().unwrap(), pool.allocate().unwrap(), pool.allocate().unwrap());
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(pool.allocate(), None);
        pool.release(b).unwrap();
        pool.release(a).unwrap();
        assert_eq!(pool.free_list().collect::<Vec<_>>(), vec![b, a]);
        assert_eq!(pool.allocate(), Some(b));
    }

    #[test]
    fn retain_takes_a_free_page_out_of_the_middle() {
        let mut pool = BlockPool::new("pages", 5).unwrap();
        pool.retain(3);
        assert_eq!(pool.free_list().collect::<Vec<_>>(), vec![1, 2, 4]);
        pool.retain(3);
        pool.release(3).unwrap();
        assert_eq!((pool.refcount(3), pool.free_pages()), (1, 3));
        pool.release(3).unwrap();
        assert_eq!(pool.free_list().collect::<Vec<_>>(), vec![1, 2, 4, 3]);
    }

    #[test]
    fn double_free_is_an_error_and_changes_nothing() {
        let mut pool = BlockPool::new("pages", 3).unwrap();
        let a = pool.allocate().unwrap();
        pool.release(a).unwrap();
        assert!(matches!(pool.release(a), Err(Error::State(_))));
        assert!(matches!(pool.release(NULL_PAGE), Err(Error::State(_))));
        assert_eq!(pool.free_list().collect::<Vec<_>>(), vec![2, 1]);
        assert!(BlockPool::new("pages", 0).is_err());
    }
}
