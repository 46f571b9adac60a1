//! The Lightning Indexer's selection (docs/model.md section 4), fused: `I_ts = sum_h w_th
//! ReLU(q_th . k_s)` is never stored for all keys. Queries of one sequence are taken in blocks;
//! a block streams its keys from the paged cache a tile at a time, decodes each tile once, scores
//! it against every query of the block and feeds a running top-k per query ([`crate::topk`]).
//! Memory: the block's transposed queries, one key tile and `O(k)` per query.
//!
//! When there are fewer blocks than threads, a block's key range is split among several jobs
//! whose selections are merged; each key's score is computed the same way in any job, so the
//! result does not depend on the split.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::IndexFormat;
use crate::gpu;
use crate::quant::{INDEX_DIM, INDEX_KEY_FP4, PAGE_ROWS};
use crate::rows::{cache_kind, check_rows, CacheKind, Floats, Ids, PagedRows};
use crate::simd::{multiversion, F32x16, LANES};
use crate::tensor::{same_device, DType, Device, TensorRef};
use crate::tile::{dots, head_groups, padded_heads, transpose_query, with_head_vecs, ROWS};
use crate::topk::{TopK, MAX_TOPK};

/// Queries of one sequence scored together against each key tile.
const QUERY_BLOCK: usize = 8;
/// Keys decoded at a time (a multiple of [`ROWS`]).
const KEY_TILE: usize = 64;
/// Smallest key range worth a job of its own.
const MIN_SPLIT: usize = 2048;

multiversion! {
    /// Scores of keys `keys[..n]` (`[>= n rounded up to ROWS, 128]`) for one query held
    /// transposed in `qt` (`[128, hp]`) with weights `w` (`[hp]`, zero for padding heads).
    fn score_keys(qt: &[f32], hp: usize, w: &[f32], keys: &[f32], n: usize, out: &mut [f32]) {
        for j0 in (0..n).step_by(ROWS) {
            let rows = &keys[j0 * INDEX_DIM..(j0 + ROWS) * INDEX_DIM];
            let mut total = [F32x16::splat(0.0); ROWS];
            for (col, nv) in head_groups(hp) {
                with_head_vecs!(nv, V => {
                    let acc = dots::<V>(qt, hp, col, rows, INDEX_DIM);
                    for (t, a) in total.iter_mut().zip(&acc) {
                        for (v, x) in a.iter().enumerate() {
                            let wv = F32x16::load(&w[col + v * LANES..]);
                            *t = x.max(F32x16::splat(0.0)).mul_add(wv, *t);
                        }
                    }
                })
            }
            for (o, t) in out[j0..n.min(j0 + ROWS)].iter_mut().zip(&total) {
                *o = t.reduce_sum();
            }
        }
    }
}

/// Everything a job reads.
struct Ctx<'a> {
    q: Floats<'a>,
    w: Floats<'a>,
    keys: PagedRows<'a>,
    block_table: Ids<'a>,
    max_pages: usize,
    seq: Ids<'a>,
    visible: Ids<'a>,
    heads: usize,
    k: usize,
}

impl Ctx<'_> {
    /// Cache row of logical key `s` of query `t`'s sequence.
    fn row(&self, t: usize, s: usize) -> usize {
        let page = self.block_table.get(self.seq.get(t) as usize * self.max_pages + s / PAGE_ROWS);
        page as usize * PAGE_ROWS + s % PAGE_ROWS
    }

    fn visible(&self, t: usize) -> usize {
        self.visible.get(t) as usize
    }
}

/// Per-thread buffers of a job.
#[derive(Default)]
struct Scratch {
    qt: Vec<f32>,
    w: Vec<f32>,
    row: Vec<f32>,
    keys: Vec<f32>,
    scores: Vec<f32>,
}

/// Selections of queries `queries` over their keys in `keys`.
fn run_job(ctx: &Ctx, s: &mut Scratch, queries: (usize, usize), keys: (usize, usize)) -> Result<Vec<TopK>> {
    let (t0, t1) = queries;
    let (h, hp) = (ctx.heads, padded_heads(ctx.heads));
    s.qt.resize((t1 - t0) * INDEX_DIM * hp, 0.0);
    s.w.resize((t1 - t0) * hp, 0.0);
    s.row.resize(INDEX_DIM, 0.0);
    s.keys.resize(KEY_TILE * INDEX_DIM, 0.0);
    s.scores.resize(KEY_TILE, 0.0);
    for (i, t) in (t0..t1).enumerate() {
        transpose_query(&ctx.q, t * h * INDEX_DIM, h, &mut s.row, &mut s.qt[i * INDEX_DIM * hp..][..INDEX_DIM * hp]);
        let w = &mut s.w[i * hp..][..hp];
        w.fill(0.0);
        ctx.w.read(t * h, &mut w[..h]);
    }
    let mut tops: Vec<TopK> = (t0..t1).map(|_| TopK::new(ctx.k)).collect();
    for n0 in (keys.0..keys.1).step_by(KEY_TILE) {
        let n = KEY_TILE.min(keys.1 - n0);
        for (j, dst) in s.keys.chunks_exact_mut(INDEX_DIM).take(n).enumerate() {
            ctx.keys.read(ctx.row(t0, n0 + j), dst);
        }
        check_rows(&s.keys[..n * INDEX_DIM], INDEX_DIM, |j| (ctx.keys.name, ctx.row(t0, n0 + j)))?;
        for (i, top) in tops.iter_mut().enumerate() {
            let m = n.min(ctx.visible(t0 + i).saturating_sub(n0));
            if m == 0 {
                continue;
            }
            score_keys(&s.qt[i * INDEX_DIM * hp..][..INDEX_DIM * hp], hp, &s.w[i * hp..][..hp], &s.keys, m, &mut s.scores);
            for (j, score) in s.scores[..m].iter().enumerate() {
                if *score > top.threshold() {
                    top.push(*score, (n0 + j) as u32);
                }
            }
        }
    }
    Ok(tops)
}

/// Top-`k` keys per query: `out_indices` (int32 `[T, k]`) and `out_scores` (float32 `[T, k]`),
/// score descending, ties to the lower key, padded with -1 / -inf beyond `visible[t]`.
///
/// `q`: float32/bfloat16 `[T, H, 128]`; `weights`: float32/bfloat16 `[T, H]`; `key_cache`: a
/// paged cache of indexer keys (see [`PagedRows`]); `block_table`: int32/int64 `[B, max_pages]`,
/// key `s` of sequence `b` being row `s % 64` of page `block_table[b, s / 64]`; `seq_ids`:
/// `[T]` sequence of each query; `visible`: `[T]` keys each query sees (at most
/// `max_pages * 64`). Indices are logical key numbers, or cache rows when `physical`.
///
/// On a GPU (cuda/indexer.cu) the call runs on `stream` with `workspace` (uint8, at least
/// [`gpu::indexer::workspace_bytes`]); q is rounded to bf16 there (exact for the FP4
/// quant-dequantized queries of the model), weights must be float32, the block table int32,
/// plain key caches bfloat16, and ids outside the cache are skipped rather than raised.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; the outputs alias nothing else; `stream`
/// is a `CUstream` of the tensors' GPU when they live on one.
#[allow(clippy::too_many_arguments)]
pub unsafe fn indexer_topk(
    q: &TensorRef,
    weights: &TensorRef,
    key_cache: &TensorRef,
    block_table: &TensorRef,
    seq_ids: &TensorRef,
    visible: &TensorRef,
    out_indices: &TensorRef,
    out_scores: &TensorRef,
    k: usize,
    physical: bool,
    workspace: Option<&TensorRef>,
    stream: usize,
) -> Result<()> {
    q.expect_shape(&[None, None, Some(INDEX_DIM)])?;
    let (t, heads) = (q.dim(0), q.dim(1));
    if heads == 0 {
        return Err(Error::value(q.name, "needs at least one head"));
    }
    if k == 0 || k > MAX_TOPK {
        return Err(Error::value("k", format!("must be in 1..={MAX_TOPK}, got {k}")));
    }
    weights.expect_shape(&[Some(t), Some(heads)])?;
    block_table.expect_shape(&[None, None])?;
    let (seqs, max_pages) = (block_table.dim(0), block_table.dim(1));
    seq_ids.expect_shape(&[Some(t)])?;
    visible.expect_shape(&[Some(t)])?;
    for out in [out_indices, out_scores] {
        out.expect_shape(&[Some(t), Some(k)])?;
    }
    out_indices.expect_dtype(&[DType::I32])?;
    out_scores.expect_dtype(&[DType::F32])?;
    let all = [q, weights, key_cache, block_table, seq_ids, visible, out_indices, out_scores];
    if let Device::Cuda(dev) = same_device(&all)? {
        let workspace = workspace.ok_or_else(|| Error::value("workspace", "a GPU call needs a workspace"))?;
        return indexer_topk_gpu(dev, stream, all, workspace, k, physical);
    }
    for out in [out_indices, out_scores] {
        out.expect_device(Device::Cpu)?;
    }
    let ctx = Ctx {
        q: Floats::new(q)?,
        w: Floats::new(weights)?,
        keys: PagedRows::new(key_cache, INDEX_DIM)?,
        block_table: Ids::new(block_table)?,
        max_pages,
        seq: Ids::new(seq_ids)?,
        visible: Ids::new(visible)?,
        heads,
        k,
    };
    ctx.seq.expect_range(seq_ids.name, 0, seqs as i64, &format!("block_table has {seqs} sequences"))?;
    let most = (max_pages * PAGE_ROWS) as i64;
    if let Some((i, v)) = ctx.visible.find_outside(0, most + 1) {
        return Err(Error::value(
            visible.name,
            format!("value {v} at index {i} is outside [0, {most}] (block_table maps {max_pages} pages of {PAGE_ROWS} keys)"),
        ));
    }
    for ti in 0..t {
        let b = ctx.seq.get(ti) as usize;
        for p in 0..ctx.visible(ti).div_ceil(PAGE_ROWS) {
            let page = ctx.block_table.get(b * max_pages + p);
            if !(0..ctx.keys.rows as i64 / PAGE_ROWS as i64).contains(&page) {
                return Err(Error::index(
                    block_table.name,
                    format!(
                        "page id {page} (sequence {b}, page {p}, needed by query {ti}) is outside [0, {}), the pages of {}",
                        ctx.keys.rows / PAGE_ROWS,
                        key_cache.name
                    ),
                ));
            }
        }
    }

    // Blocks of consecutive queries of one sequence, then their key ranges split into jobs.
    let mut blocks: Vec<(usize, usize)> = Vec::new();
    for ti in 0..t {
        match blocks.last_mut() {
            Some((b0, b1)) if *b1 - *b0 < QUERY_BLOCK && ctx.seq.get(*b0) == ctx.seq.get(ti) => *b1 += 1,
            _ => blocks.push((ti, ti + 1)),
        }
    }
    let parts = (2 * rayon::current_num_threads()).div_ceil(blocks.len().max(1));
    let mut jobs: Vec<(usize, (usize, usize))> = Vec::new();
    let mut first_job = Vec::with_capacity(blocks.len() + 1);
    for (bi, (b0, b1)) in blocks.iter().enumerate() {
        first_job.push(jobs.len());
        let n = (*b0..*b1).map(|ti| ctx.visible(ti)).max().unwrap_or(0);
        let part = n.div_ceil(parts.min(n / MIN_SPLIT).max(1)).div_ceil(KEY_TILE) * KEY_TILE;
        jobs.extend((0..n.max(1)).step_by(part.max(1)).map(|lo| (bi, (lo, n.min(lo + part)))));
    }
    first_job.push(jobs.len());
    let results: Vec<Vec<TopK>> = jobs
        .par_iter()
        .map_init(Scratch::default, |s, (bi, keys)| run_job(&ctx, s, blocks[*bi], *keys))
        .collect::<Result<_>>()?;

    let idx = out_indices.host_mut::<i32>(&[DType::I32])?;
    let scores = out_scores.host_mut::<f32>(&[DType::F32])?;
    let query_block: Vec<usize> = blocks.iter().enumerate().flat_map(|(bi, (b0, b1))| (*b0..*b1).map(move |_| bi)).collect();
    idx.par_chunks_mut(k).zip(scores.par_chunks_mut(k)).enumerate().for_each(|(ti, (oi, os))| {
        let bi = query_block[ti];
        let local = ti - blocks[bi].0;
        let mut top = results[first_job[bi]][local].clone();
        for r in &results[first_job[bi] + 1..first_job[bi + 1]] {
            top.merge(&r[local]);
        }
        let best = top.into_sorted();
        oi.fill(-1);
        os.fill(f32::NEG_INFINITY);
        for ((i, s), b) in oi.iter_mut().zip(os.iter_mut()).zip(&best) {
            let key = b.index as usize;
            *i = if physical { ctx.row(ti, key) } else { key } as i32;
            *s = b.score;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transposed query and weights scored against keys, in f64 for comparison.
    #[test]
    fn score_keys_matches_the_formula() {
        for heads in [1usize, 5, 16, 64, 80] {
            let hp = padded_heads(heads);
            let q: Vec<f32> = (0..heads * INDEX_DIM).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let w: Vec<f32> = (0..heads).map(|h| (h as f32 - 2.0) / 7.0).collect();
            let keys: Vec<f32> = (0..8 * INDEX_DIM).map(|i| ((i * 53 % 97) as f32 - 48.0) / 40.0).collect();
            let mut qt = vec![0f32; INDEX_DIM * hp];
            let mut row = vec![0f32; INDEX_DIM];
            transpose_query(&Floats::F32(&q), 0, heads, &mut row, &mut qt);
            let mut wp = vec![0f32; hp];
            wp[..heads].copy_from_slice(&w);
            let mut out = vec![0f32; 8];
            score_keys(&qt, hp, &wp, &keys, 7, &mut out);
            for (j, o) in out[..7].iter().enumerate() {
                let want: f64 = (0..heads)
                    .map(|h| {
                        let dot: f64 = (0..INDEX_DIM)
                            .map(|d| q[h * INDEX_DIM + d] as f64 * keys[j * INDEX_DIM + d] as f64)
                            .sum();
                        w[h] as f64 * dot.max(0.0)
                    })
                    .sum();
                assert!((*o as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "heads {heads} key {j}: {o} vs {want}");
            }
        }
    }
}

/// The GPU form of [`indexer_topk`], after the shape checks they share.
///
/// # Safety
/// As [`indexer_topk`].
unsafe fn indexer_topk_gpu(
    dev: i32,
    stream: usize,
    t: [&TensorRef; 8],
    workspace: &TensorRef,
    k: usize,
    physical: bool,
) -> Result<()> {
    let [q, weights, key_cache, block_table, seq_ids, visible, out_indices, out_scores] = t;
    q.expect_dtype(&[DType::F32, DType::BF16])?;
    weights.expect_dtype(&[DType::F32])?;
    block_table.expect_dtype(&[DType::I32])?;
    seq_ids.expect_dtype(&[DType::I32, DType::I64])?;
    visible.expect_dtype(&[DType::I32, DType::I64])?;
    workspace.expect_device(q.device)?;
    let key_format = match cache_kind(key_cache, INDEX_DIM)? {
        CacheKind::Packed(f) if f == INDEX_KEY_FP4 => IndexFormat::Fp4,
        CacheKind::Packed(_) => IndexFormat::Fp8,
        CacheKind::PlainBf16 => IndexFormat::Bf16,
        CacheKind::PlainF32 => {
            return Err(Error::dtype(key_cache.name, "float32 key caches are CPU-only; use bfloat16 or a packed format"))
        }
    };
    let args = gpu::indexer::IndexerArgs {
        q,
        weights,
        keys: key_cache,
        key_format,
        num_pages: key_cache.dim(0),
        block_table,
        seq_ids,
        visible,
        k,
        physical,
        workspace,
        out_indices,
        out_scores,
    };
    gpu::indexer::indexer_topk(dev, stream, &args)
}
