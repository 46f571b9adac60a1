//! The paged KV-cache allocator (docs/model.md sections 3 and 5).
//!
//! Four cache families, each a pool of pages: the sliding-window ring of every layer, CSA rows
//! with their indexer keys, HCA rows, and compressor-state slots. One page id of a family
//! addresses 64 rows in every layer of that family, so a sequence has one page table per
//! family. The manager only does bookkeeping on the host: it hands out page ids, physical row
//! ids (`page * 64 + offset`) and the page copies that copy-on-write needs; the caller owns the
//! device tensors and performs the copies and writes.
//!
//! - [`layout`]: the model's cache geometry, row formats and presets.
//! - [`family`]: the four families. [`pool`]: one family's pages.
//! - [`manager`]: sequences (add, fork, release) and prefix reuse ([`prefix`]).
//! - [`append`]: appending tokens. [`metadata`]: page tables and row ids for kernels.
//! - [`accounting`]: bytes held, per token, and capacity planning. [`audit`]: invariants.

pub mod accounting;
pub mod append;
pub mod audit;
pub mod family;
pub mod layout;
pub mod manager;
pub mod metadata;
pub mod pool;
pub mod prefix;
pub mod sequence;

pub use accounting::Footprint;
pub use append::Appended;
pub use family::Family;
pub use layout::{v4_flash_ratios, v4_pro_ratios, CacheLayout};
pub use manager::{CacheManager, PrefixHit, SeqId};

#[cfg(test)]
mod tests;
