//! The four cache families. Each has its own block pool; one page id of a family addresses 64
//! rows in every layer of that family, so layers share page tables (as vLLM does).

use crate::error::{Error, Result};

/// Compression ratio of CSA layers (overlapping compressor, with indexer keys).
pub const CSA_RATIO: usize = 4;
/// Compression ratio of HCA layers.
pub const HCA_RATIO: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// The sliding-window ring of every layer: `window` rows per layer and sequence, token `p`
    /// at ring row `p % window`, overwritten as the sequence grows.
    Window,
    /// CSA compressed rows (1 per 4 tokens) and their indexer keys, which share row ids.
    Csa,
    /// HCA compressed rows (1 per 128 tokens).
    Hca,
    /// Compressor decode state: one slot per sequence holds the fp32 state of all its
    /// compressors; it is rewritten by every token.
    State,
}

impl Family {
    pub const ALL: [Family; 4] = [Family::Window, Family::Csa, Family::Hca, Family::State];

    pub fn name(self) -> &'static str {
        match self {
            Family::Window => "window",
            Family::Csa => "csa",
            Family::Hca => "hca",
            Family::State => "state",
        }
    }

    pub fn parse(arg: &str, s: &str) -> Result<Self> {
        Family::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| Error::value(arg, format!("expected \"window\", \"csa\", \"hca\" or \"state\", got {s:?}")))
    }

    /// Position in per-family arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether rows are written once, in order, and never rewritten: only such pages can be
    /// shared by prefix reuse, and writing into one needs the page's watermark to match.
    pub fn append_only(self) -> bool {
        matches!(self, Family::Csa | Family::Hca)
    }

    /// Complete entries of a sequence of `len` tokens: entry `i` exists once token
    /// `r*i + r - 1` has been appended (docs/model.md section 3). Only for compressed families.
    pub fn entries(self, len: usize) -> usize {
        match self {
            Family::Csa => len / CSA_RATIO,
            Family::Hca => len / HCA_RATIO,
            Family::Window | Family::State => unreachable!("{} has no compressed entries", self.name()),
        }
    }
}
