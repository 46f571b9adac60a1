//! Launchers of cuda/indexer.cu and cuda/indexer_sm90a.cu: the fused Lightning Indexer top-k, and its scores written
//! dense.
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
/// Fewest keys a split takes: one page. Where the grid is small (one query, a short context) a
/// block's pages are a latency chain (about 2.5 us a page), so more blocks of fewer pages finish
/// sooner: measured against 4 pages at least, one query of 1,024 keys scored in 10.6 against
/// 13.5 us (docs/kernels/indexer.md).
const MIN_SPLIT_KEYS: usize = PAGE_ROWS;
/// Most keys a split takes: its candidate pool lives in shared memory (and its 64 pages' block-table entries:
/// `MAX_SPLIT_PAGES` in cuda/include/indexer_score.cuh).
const MAX_SPLIT_KEYS: usize = 4096;
/// Shared memory a merge block may take: 99 KiB, what sm_86/89/120 grant a block.
const MERGE_SHARED: usize = 99 * 1024;
/// Peaks a split writes: the largest key each half warp of the score kernel went through
/// (`PEAKS` in cuda/include/indexer_score.cuh).
const PEAKS_PER_SPLIT: usize = 8;

/// How the key axis is split: keys per split (a multiple of 64) and number of splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub keys: usize,
    pub count: usize,
    /// Candidates kept per split: min(k, keys).
    pub kcap: usize,
}

/// Splits a key axis of at most `max_keys` keys for `queries` queries: at most
/// [`TARGET_BLOCKS`] blocks in all (one wave at four blocks a multiprocessor; a few blocks past it
/// would cost a second wave) unless the queries alone are more, each split 64 to 4096 keys. Few
/// queries get many short splits, whose candidates the merge stages reduce.
pub fn split(queries: usize, max_keys: usize, k: usize) -> Split {
    let per_query = (TARGET_BLOCKS / queries.max(1)).max(1);
    let keys = max_keys.div_ceil(per_query).next_multiple_of(PAGE_ROWS).clamp(MIN_SPLIT_KEYS, MAX_SPLIT_KEYS);
    Split { keys, count: max_keys.div_ceil(keys).max(1), kcap: k.min(keys) }
}

/// Static shared memory of a merge block: its two counters.
const MERGE_STATIC_BYTES: usize = 16;

/// Dynamic shared memory of a merge block taking `group` lists of `cap` candidates for top-`k`:
/// the gathered candidates, the `next_pow2(k)` kept ones and the select scratch.
fn merge_shared_bytes(group: usize, cap: usize, k: usize) -> usize {
    (group * cap + k.next_power_of_two()) * 8 + SELECT_SCRATCH_BYTES
}

/// Candidates one merge block gathers for top-`k`: what [`MERGE_SHARED`] holds beside the rest
/// of [`merge_shared_bytes`] and the static counters: 8,444 at k = 4096, 12,028 at k = 512.
fn merge_keys(k: usize) -> usize {
    (MERGE_SHARED - MERGE_STATIC_BYTES - merge_shared_bytes(0, 0, k)) / 8
}

/// Lists of `cap` candidates one merge block takes for top-`k`: as many as [`merge_keys`] hold,
/// at least two (so every stage at least halves the lists; `cap <= k <= 4096` keeps two within
/// the shared memory).
fn merge_group(cap: usize, k: usize) -> usize {
    (merge_keys(k) / cap.max(1)).max(2)
}

/// One merge stage: `lists` lists of `cap` candidates a query in, `groups` blocks a query, each
/// taking `group` lists; the last stage has one group and writes the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeStage {
    pub lists: usize,
    pub cap: usize,
    pub group: usize,
    pub groups: usize,
}

/// The merge stages after a split `s` for top-`k`: each but the last keeps the top `k` of each
/// group, so the next stage takes `groups` lists of `k`.
pub fn merge_stages(s: Split, k: usize) -> Vec<MergeStage> {
    let (mut lists, mut cap) = (s.count, s.kcap);
    let mut stages = Vec::new();
    loop {
        let group = merge_group(cap, k);
        if lists <= group {
            stages.push(MergeStage { lists, cap, group: lists, groups: 1 });
            return stages;
        }
        let groups = lists.div_ceil(group);
        stages.push(MergeStage { lists, cap, group, groups });
        (lists, cap) = (groups, k);
    }
}

/// Bytes of one list region: `lists` lists of `cap` candidates (u64) a query, then their counts
/// (i32, at [`counts_offset`]), rounded to 8 bytes so the next region's candidates stay aligned.
fn region_bytes(queries: usize, lists: usize, cap: usize) -> usize {
    (counts_offset(queries, lists, cap) + queries * lists * 4).next_multiple_of(8)
}

/// Where a list region's counts start: after its candidates.
fn counts_offset(queries: usize, lists: usize, cap: usize) -> usize {
    queries * lists * cap * 8
}

/// Bytes of the splits' peaks (u64, [`PEAKS_PER_SPLIT`] a split), after the splits' region.
fn peaks_bytes(queries: usize, s: Split) -> usize {
    queries * s.count * PEAKS_PER_SPLIT * 8
}

/// Bytes of workspace the op needs: the splits' candidates and counts, their peaks, then each
/// middle merge stage's output.
pub fn workspace_bytes(queries: usize, max_keys: usize, k: usize) -> usize {
    let s = split(queries, max_keys, k);
    plan_bytes(queries, s, &merge_stages(s, k), k)
}

/// [`workspace_bytes`] of a split and its merge stages.
fn plan_bytes(queries: usize, s: Split, stages: &[MergeStage], k: usize) -> usize {
    let middle: usize = stages[..stages.len() - 1].iter().map(|st| region_bytes(queries, st.groups, k)).sum();
    region_bytes(queries, s.count, s.kcap) + peaks_bytes(queries, s) + middle
}

/// Peaks the first merge stage `st` takes a query for its floor (cuda/indexer.cu): all of them,
/// where they are at least `2 k` and fit where the stage gathers its candidates; 0 (no floor)
/// otherwise. Fewer than `k` bound nothing; from `k` to `2 k` the floor is at or below the
/// smallest peaks, which cuts too few candidates to pay for finding it (measured: 128K context,
/// one query, k = 1024, 1,024 peaks: 3 us slower a call than no floor).
fn floor_peaks(s: Split, st: &MergeStage, k: usize) -> usize {
    let peaks = s.count * PEAKS_PER_SPLIT;
    if peaks >= 2 * k && peaks <= st.group * st.cap { peaks } else { 0 }
}

/// Pages staged ahead by the score kernel (`STAGES` in cuda/include/indexer_score.cuh).
const STAGES: usize = 4;

/// Shared memory of the score kernel (either MMA kind): the bf16 key tile, per-warp partial scores, two pages' keys'
/// scales, the split's block-table entries (64), the split's scores (float32, `pool_keys`, 0 when it writes dense
/// scores), the radix-select scratch and the staged raw pages.
fn score_shared_bytes(pool_keys: usize, key_format: IndexFormat) -> u32 {
    let page_bytes = PAGE_ROWS * key_format.row_bytes();
    let tile = PAGE_ROWS * INDEX_DIM * 2 + 6 * PAGE_ROWS * 4 + MAX_SPLIT_KEYS / PAGE_ROWS * 4;
    (tile + pool_keys * 4 + SELECT_SCRATCH_BYTES + STAGES * page_bytes) as u32
}

/// Bytes of `SelectScratch` (cuda/include/topk.cuh): 256 bins, a prefix, a count and a flag.
const SELECT_SCRATCH_BYTES: usize = 1040;

/// Which score kernel runs on GPU `dev`: `true` for the wgmma one (compute capability 9.0, the
/// build's sm_90a module), else the mma.sync one. `DSV4RS_INDEXER_KERNEL=wgmma|mma` forces one
/// (for tests and benchmarks); forcing one the GPU cannot run is an error. The dense scores
/// (`indexer_scores`) take the same kernel as the selection, so that they are its scores bit for bit.
fn use_wgmma(dev: i32) -> Result<bool> {
    let wgmma_ok = || -> Result<bool> {
        Ok(super::compute_capability(dev)? == (9, 0)
            && super::has_kernel(dev, Kernel::IndexerScoreWgmma)
            && super::has_kernel(dev, Kernel::IndexerScoreWgmmaDense))
    };
    match std::env::var("DSV4RS_INDEXER_KERNEL").ok().as_deref() {
        None | Some("") | Some("auto") => wgmma_ok(),
        Some("mma") => Ok(false),
        Some("wgmma") if wgmma_ok()? => Ok(true),
        Some(other) => Err(Error::value(
            "DSV4RS_INDEXER_KERNEL",
            format!("must be auto, wgmma or mma, and one GPU {dev} runs (got {other:?})"),
        )),
    }
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

/// Where the score kernel puts the scores of a split: `(cand, counts)` candidates and the half
/// warps' `peaks` in the workspace for the merge, or every score in a dense `[T, width]` matrix.
enum ScoreOut {
    Candidates { cand: u64, counts: u64, peaks: u64 },
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
    let wg = use_wgmma(dev)?;
    let (kernel, pool_keys, kc, sc, cand, counts, peaks, dense, width) = match out {
        ScoreOut::Candidates { cand, counts, peaks } => {
            let kernel = if wg { Kernel::IndexerScoreWgmma } else { Kernel::IndexerScore };
            (kernel, s.keys, s.kcap as i32, s.count as i32, cand, counts, peaks, 0u64, 0i64)
        }
        ScoreOut::Dense { out, width } => {
            let kernel = if wg { Kernel::IndexerScoreWgmmaDense } else { Kernel::IndexerScoreDense };
            (kernel, 0, 0, 0, 0, 0, 0, out, width as i64)
        }
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
        &mut kernel_args!(qp, qb, wp, h, kp, fmt, np, bt, mp, sp, vp, s64, v64, sk, kc, sc, cand, counts, peaks, dense,
                          width),
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
    let stages = merge_stages(s, sel.k);
    let need = plan_bytes(t, s, &stages, sel.k);
    let ws = sel.workspace;
    if ws.dtype != DType::U8 || ws.numel() < need || !ws.ptr.is_multiple_of(8) {
        return Err(Error::value(ws.name, format!("needs at least {need} bytes (uint8, 8-byte aligned)")));
    }
    let (mut cand, mut counts) = (ws.ptr as u64, ws.ptr as u64 + counts_offset(t, s.count, s.kcap) as u64);
    // The splits write their peaks only where the first stage takes a floor from them.
    let npk = floor_peaks(s, &stages[0], sel.k);
    let peaks_at = ws.ptr as u64 + region_bytes(t, s.count, s.kcap) as u64;
    let peaks = if npk > 0 { peaks_at } else { 0 };
    launch_score(dev, stream, a, s, ScoreOut::Candidates { cand, counts, peaks })?;
    let mut next = peaks_at + peaks_bytes(t, s) as u64;
    let (bt, mp) = (a.block_table.ptr as u64, max_pages as i32);
    let (sp, s64) = (a.seq_ids.ptr as u64, (a.seq_ids.dtype == DType::I64) as i32);
    let (k, kpow2, phys) = (sel.k as i32, sel.k.next_power_of_two() as i32, sel.physical as i32);
    let (oi, os) = (sel.out_indices.ptr as u64, sel.out_scores.ptr as u64);
    for (i, st) in stages.iter().enumerate() {
        let last = (i + 1 == stages.len()) as i32;
        let (out_cand, out_counts) =
            if last == 1 { (0, 0) } else { (next, next + counts_offset(t, st.groups, sel.k) as u64) };
        let (ls, cp, gp) = (st.lists as i32, st.cap as i32, st.group as i32);
        let npk = if i == 0 { npk as i32 } else { 0 };
        let merge = Launch {
            grid: (st.groups as u32, t as u32, 1),
            block: (MERGE_THREADS, 1, 1),
            shared_bytes: merge_shared_bytes(st.group, st.cap, sel.k) as u32,
            stream,
        };
        launch(
            dev,
            Kernel::IndexerMerge,
            &merge,
            &mut kernel_args!(cand, counts, ls, cp, gp, k, kpow2, last, out_cand, out_counts, bt, mp, sp, s64, phys, oi, os,
                              peaks, npk),
        )?;
        (cand, counts) = (out_cand, out_counts);
        next += region_bytes(t, st.groups, sel.k) as u64;
    }
    Ok(())
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
            assert!((MIN_SPLIT_KEYS..=MAX_SPLIT_KEYS).contains(&s.keys), "the shared-memory pool holds 64 to 4096 keys");
        }
        // One query at 4K context (1,024 keys, the model's CSA layer): 16 splits of one page.
        assert_eq!(split(1, 1024, 512), Split { keys: 64, count: 16, kcap: 64 });
        // One query at 1M context: 512 splits of 512 keys, enough blocks for every multiprocessor.
        assert_eq!(split(1, 262_144, 512), Split { keys: 512, count: 512, kcap: 512 });
    }

    #[test]
    fn score_shared_memory_at_the_largest_split() {
        // docs/kernels/indexer.md's table: FP4 fits four blocks an H200 multiprocessor (228 KiB
        // less 1 KiB a block), FP8 three; every format fits sm_86/89/120's 99 KiB a block beside
        // the kernel's 48 bytes of static shared memory.
        let bytes = |f| score_shared_bytes(MAX_SPLIT_KEYS, f) as usize;
        let all = (bytes(IndexFormat::Fp4), bytes(IndexFormat::Fp8), bytes(IndexFormat::Bf16));
        assert_eq!(all, (53_008, 69_392, 101_136));
        assert!(super::super::h200_blocks_fit(all.0, 4));
        assert!(all.2 + 48 <= 99 * 1024);
        // Dense scores keep no pool.
        assert_eq!(score_shared_bytes(0, IndexFormat::Fp4) as usize, 53_008 - 4 * MAX_SPLIT_KEYS);
    }

    #[test]
    fn merge_stages_at_model_shapes() {
        assert_eq!((merge_keys(512), merge_keys(4096)), (12_028, 8_444));
        // 1M context, one query, k = 512: 512 lists of 512 -> 23 groups -> the output.
        let groups: Vec<usize> = merge_stages(split(1, 262_144, 512), 512).iter().map(|s| s.groups).collect();
        assert_eq!(groups, [23, 1]);
        // 128K context, 32 queries: 16 splits of 2,048 keys (512 blocks, one wave), merged in one stage.
        assert_eq!(split(32, 32_768, 512), Split { keys: 2048, count: 16, kcap: 512 });
        assert_eq!(merge_stages(split(32, 32_768, 512), 512).len(), 1);
    }

    #[test]
    fn the_first_stage_takes_a_floor_where_the_peaks_bound_the_kth_key() {
        // 1M context, one query: 512 splits' 4,096 peaks, read where the 23 groups gather 11,776 keys.
        let s = split(1, 262_144, 512);
        assert_eq!(floor_peaks(s, &merge_stages(s, 512)[0], 512), 4096);
        // 128K context, one query: 512 splits of one page, 4,096 peaks, a floor for k = 512 and
        // k = 1024.
        let s = split(1, 32_768, 512);
        assert_eq!((s.keys, s.count), (64, 512));
        assert_eq!(floor_peaks(s, &merge_stages(s, 512)[0], 512), 4096);
        let s = split(1, 32_768, 1024);
        assert_eq!(floor_peaks(s, &merge_stages(s, 1024)[0], 1024), 4096);
        // 16K context, one query: 64 splits' 512 peaks, no more than k = 512 (the floor would be
        // the smallest peak).
        let s = split(1, 4096, 512);
        assert_eq!(floor_peaks(s, &merge_stages(s, 512)[0], 512), 0);
        // 1M context, 32 queries: 64 splits' 512 peaks a query, no more than k = 512.
        let s = split(32, 262_144, 512);
        assert_eq!(floor_peaks(s, &merge_stages(s, 512)[0], 512), 0);
        // 128K context, 32 queries: 128 peaks a query cannot bound the 512th key.
        let s = split(32, 32_768, 512);
        assert_eq!(floor_peaks(s, &merge_stages(s, 512)[0], 512), 0);
        // Peaks that would not fit where the stage gathers (k = 1: one candidate a split) are not taken.
        let s = split(1, 4096, 1);
        let st = merge_stages(s, 1)[0];
        assert!(s.count * PEAKS_PER_SPLIT > st.group * st.cap);
        assert_eq!(floor_peaks(s, &st, 1), 0);
    }

    #[test]
    fn merge_stages_end_in_one_group_within_shared_memory() {
        for t in [1, 3, 11, 64, 4096] {
            for n in [0, 64, 1_000, 19_200, 65_536, 262_144, 1 << 21] {
                for k in [1, 7, 100, 512, 777, 2048, 4096] {
                    let s = split(t, n, k);
                    let stages = merge_stages(s, k);
                    assert_eq!(stages[0].lists, s.count);
                    assert_eq!(stages[0].cap, s.kcap);
                    for pair in stages.windows(2) {
                        assert_eq!(pair[1].lists, pair[0].groups);
                        assert_eq!(pair[1].cap, k);
                        assert!(pair[0].groups * 2 <= pair[0].lists + 1, "every middle stage at least halves the lists");
                    }
                    let last = stages.last().unwrap();
                    assert_eq!((last.groups, last.group), (1, last.lists));
                    for st in &stages {
                        assert!(st.group * st.groups >= st.lists && st.group * (st.groups - 1) < st.lists);
                        assert!(st.group * st.cap <= merge_keys(k), "t {t} n {n} k {k}: {st:?}");
                        let shared = merge_shared_bytes(st.group, st.cap, k) + MERGE_STATIC_BYTES;
                        assert!(shared <= 99 * 1024, "fits sm_86/89/120's 99 KiB: {shared}");
                    }
                    let peaks = floor_peaks(s, &stages[0], k);
                    assert!(peaks == 0 || (2 * k..=stages[0].group * stages[0].cap).contains(&peaks));
                    // The regions follow each other, each 8-byte aligned.
                    let bytes = workspace_bytes(t, n, k);
                    assert_eq!(bytes % 8, 0);
                    assert!(bytes >= t * s.count * (s.kcap * 8 + 4 + PEAKS_PER_SPLIT * 8));
                }
            }
        }
    }
}
