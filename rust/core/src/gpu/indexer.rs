//! Launchers of cuda/indexer.cu: the fused Lightning Indexer top-k, and its scores written dense.
//! Shapes, dtypes and index ranges are checked by the caller (`crate::indexer`); this module
//! sizes the split of the key axis and the workspace.

use super::{launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::kernel_args;
use crate::formats::IndexFormat;
use crate::quant::{INDEX_DIM, PAGE_ROWS};
use crate::tensor::{DType, TensorRef};

const SCORE_THREADS: u32 = 128;
const MERGE_THREADS: u32 = 1024;
/// Largest k the merge kernel sorts in shared memory.
pub const MAX_K: usize = crate::topk::MAX_TOPK;
/// Largest number of indexer heads (one 64-row tile of the MMA).
pub const MAX_HEADS: usize = 64;
/// Blocks to aim for: enough to fill every multiprocessor of a large GPU several times.
const TARGET_BLOCKS: usize = 4 * 132;

/// How the key axis is split: keys per split (a multiple of 64) and number of splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub keys: usize,
    pub count: usize,
    /// Candidates kept per split: min(k, keys).
    pub kcap: usize,
}

/// Splits a key axis of at most `max_keys` keys for `queries` queries.
pub fn split(queries: usize, max_keys: usize, k: usize) -> Split {
    let per_query = TARGET_BLOCKS.div_ceil(queries.max(1)).max(1);
    // At least 4k keys a split (up to the 4096 the shared pool holds), so that each split hands
    // the merge at most a quarter of its keys.
    let floor = (4 * k).next_multiple_of(PAGE_ROWS).clamp(4 * PAGE_ROWS, 4096);
    let keys = max_keys.div_ceil(per_query).next_multiple_of(PAGE_ROWS).clamp(floor, 4096);
    Split { keys, count: max_keys.div_ceil(keys).max(1), kcap: k.min(keys) }
}

/// Bytes of workspace the op needs: candidates (u64) and their counts (i32) per query and split.
pub fn workspace_bytes(queries: usize, max_keys: usize, k: usize) -> usize {
    let s = split(queries, max_keys, k);
    queries * s.count * (s.kcap * 8 + 4)
}

/// Pages staged ahead by the score kernel (`STAGES` in cuda/indexer.cu).
const STAGES: usize = 4;

/// Shared memory of the score kernel: the bf16 key tile, per-warp partial scores, the keys' scales, the split's
/// candidate pool (`pool_keys`, 0 when it writes dense scores), the radix-select scratch and the staged raw pages.
fn score_shared_bytes(pool_keys: usize, key_format: IndexFormat) -> u32 {
    let page_bytes = PAGE_ROWS * key_format.row_bytes();
    let tile = PAGE_ROWS * (INDEX_DIM + 8) * 2 + 5 * PAGE_ROWS * 4;
    (tile + pool_keys * 8 + 1040 + STAGES * page_bytes) as u32
}

/// The inputs of one launch, already validated.
pub struct IndexerArgs<'a> {
    pub q: &'a TensorRef,
    pub weights: &'a TensorRef,
    pub keys: &'a TensorRef,
    pub key_format: IndexFormat,
    pub num_pages: usize,
    pub block_table: &'a TensorRef,
    pub seq_ids: &'a TensorRef,
    pub visible: &'a TensorRef,
}

/// What the selection writes: the top `k` of each query, and the workspace of its splits.
pub struct Selection<'a> {
    pub k: usize,
    pub physical: bool,
    pub workspace: &'a TensorRef,
    pub out_indices: &'a TensorRef,
    pub out_scores: &'a TensorRef,
}

/// Where the score kernel puts the scores of a split: `(cand, counts)` candidates in the
/// workspace for the merge, or every score in a dense `[T, width]` matrix.
enum ScoreOut {
    Candidates { cand: u64, counts: u64 },
    Dense { out: u64, width: usize },
}

/// Launches the score kernel over the key axis split as `s` (nothing when there are no queries).
///
/// # Safety
/// As [`indexer_topk`]; the output pointers address what [`ScoreOut`] describes.
unsafe fn launch_score(dev: i32, stream: usize, a: &IndexerArgs, s: Split, out: ScoreOut) -> Result<()> {
    let (t, heads) = (a.q.dim(0), a.q.dim(1));
    if heads > MAX_HEADS {
        return Err(Error::value(a.q.name, format!("the GPU indexer takes at most {MAX_HEADS} heads, got {heads}")));
    }
    let (qp, qb, wp, h) = (a.q.ptr as u64, (a.q.dtype == DType::BF16) as i32, a.weights.ptr as u64, heads as i32);
    let (kp, fmt, np) = (a.keys.ptr as u64, a.key_format, a.num_pages as i64);
    let (bt, mp) = (a.block_table.ptr as u64, a.block_table.dim(1) as i32);
    let (sp, vp) = (a.seq_ids.ptr as u64, a.visible.ptr as u64);
    let (s64, v64) = ((a.seq_ids.dtype == DType::I64) as i32, (a.visible.dtype == DType::I64) as i32);
    let (kernel, pool_keys, kc, sc, cand, counts, dense, width) = match out {
        ScoreOut::Candidates { cand, counts } => {
            (Kernel::IndexerScore, s.keys, s.kcap as i32, s.count as i32, cand, counts, 0u64, 0i64)
        }
        ScoreOut::Dense { out, width } => (Kernel::IndexerScoreDense, 0, 0, 0, 0, 0, out, width as i64),
    };
    let sk = s.keys as i32;
    let score = Launch {
        grid: (s.count as u32, t as u32, 1),
        block: (SCORE_THREADS, 1, 1),
        shared_bytes: score_shared_bytes(pool_keys, a.key_format),
        stream,
    };
    launch(
        dev,
        kernel,
        &score,
        &mut kernel_args!(qp, qb, wp, h, kp, fmt, np, bt, mp, sp, vp, s64, v64, sk, kc, sc, cand, counts, dense, width),
    )
}

/// # Safety
/// Every tensor satisfies `TensorRef`'s contract on device `dev`, with the shapes and dtypes
/// `crate::indexer` checks (q `[T, H, 128]`, ids int32/int64, block table int32, outputs
/// `[T, k]`);
/// `stream` belongs to that device.
pub unsafe fn indexer_topk(dev: i32, stream: usize, a: &IndexerArgs, sel: &Selection) -> Result<()> {
    let t = a.q.dim(0);
    let max_pages = a.block_table.dim(1);
    if sel.k > MAX_K {
        return Err(Error::value("k", format!("the GPU indexer takes k <= {MAX_K}, got {}", sel.k)));
    }
    let s = split(t, max_pages * PAGE_ROWS, sel.k);
    let need = workspace_bytes(t, max_pages * PAGE_ROWS, sel.k);
    let ws = sel.workspace;
    if ws.dtype != DType::U8 || ws.numel() < need || !ws.ptr.is_multiple_of(8) {
        return Err(Error::value(ws.name, format!("needs at least {need} bytes (uint8, 8-byte aligned)")));
    }
    let cand = ws.ptr as u64;
    let counts = cand + (t * s.count * s.kcap * 8) as u64;
    launch_score(dev, stream, a, s, ScoreOut::Candidates { cand, counts })?;
    let (bt, mp) = (a.block_table.ptr as u64, max_pages as i32);
    let (sp, s64) = (a.seq_ids.ptr as u64, (a.seq_ids.dtype == DType::I64) as i32);
    let (sc, kc) = (s.count as i32, s.kcap as i32);
    let (k, kpow2, phys) = (sel.k as i32, sel.k.next_power_of_two() as i32, sel.physical as i32);
    let (oi, os) = (sel.out_indices.ptr as u64, sel.out_scores.ptr as u64);
    let merge = Launch {
        grid: (t as u32, 1, 1),
        block: (MERGE_THREADS, 1, 1),
        shared_bytes: (sel.k.next_power_of_two() * 8 + 256 * 4 + 16) as u32,
        stream,
    };
    launch(
        dev,
        Kernel::IndexerMerge,
        &merge,
        &mut kernel_args!(cand, counts, sc, kc, k, kpow2, bt, mp, sp, s64, phys, oi, os),
    )
}

/// Every score of [`indexer_topk`]'s score kernel, dense, into `out` (float32 `[T, W]`): `-inf`
/// for the keys it does not score.
///
/// # Safety
/// As [`indexer_topk`], `out` being `[T, W]` float32.
pub unsafe fn indexer_scores(dev: i32, stream: usize, a: &IndexerArgs, out: &TensorRef) -> Result<()> {
    let (t, width) = (out.dim(0), out.dim(1));
    launch_score(dev, stream, a, split(t, width, 1), ScoreOut::Dense { out: out.ptr as u64, width })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_key_axis_in_whole_pages() {
        for (t, n, k) in [(1, 262_144, 512), (64, 262_144, 1024), (8192, 2048, 512), (1, 64, 2048), (3, 0, 5)] {
            let s = split(t, n, k);
            assert_eq!(s.keys % PAGE_ROWS, 0);
            assert!(s.keys * s.count >= n);
            assert!(s.kcap <= k && s.kcap <= s.keys);
            assert!(s.keys <= 4096, "the shared-memory pool holds at most 4096 keys");
        }
    }
}
