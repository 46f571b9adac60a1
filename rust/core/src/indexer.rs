//! The Lightning Indexer's scores `I_ts = sum_h w_th ReLU(q_th . k_s)` (docs/model.md section 4)
//! over a paged key cache, and its fused selection, in which they are never stored for all keys.
//! Queries of one sequence are taken in blocks; a block streams its keys from the paged cache a
//! tile at a time, decodes each tile once and scores it against every query of the block. The
//! selection ([`indexer_topk`]) feeds each tile's scores to a running top-k per query
//! ([`crate::topk`]), in memory the block's transposed queries, one key tile and `O(k)` per
//! query; [`indexer_scores`] writes them to dense rows instead, through the same code, so its
//! scores are bit-identical to the selection's.
//!
//! When there are fewer blocks than threads, a block's key range is split among several jobs
//! (whose selections are merged); each key's score is computed the same way in any job, so the
//! result does not depend on the split.
//!
//! On the CPU a score that is not finite (finite inputs whose float32 sums overflowed) is an
//! error naming the inputs; the GPU does not look (it would synchronize the host).

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
    /// The arguments that set a score's size, named in the error of one that overflows.
    sized_by: [&'static str; 3],
}

impl<'a> Ctx<'a> {
    /// Borrows the CPU inputs, checking every sequence id, visible count and page id the
    /// queries need against the block table and the cache.
    ///
    /// # Safety
    /// As [`indexer_topk`].
    unsafe fn new(inputs: Inputs<'a>) -> Result<Self> {
        let Inputs { q, weights, key_cache, block_table, seq_ids, visible } = inputs;
        let (seqs, max_pages) = (block_table.dim(0), block_table.dim(1));
        let ctx = Ctx {
            q: Floats::new(q)?,
            w: Floats::new(weights)?,
            keys: PagedRows::new(key_cache, INDEX_DIM)?,
            block_table: Ids::new(block_table)?,
            max_pages,
            seq: Ids::new(seq_ids)?,
            visible: Ids::new(visible)?,
            heads: q.dim(1),
            sized_by: [q.name, weights.name, key_cache.name],
        };
        ctx.seq.expect_range(seq_ids.name, 0, seqs as i64, &format!("block_table has {seqs} sequences"))?;
        let most = (max_pages * PAGE_ROWS) as i64;
        if let Some((i, v)) = ctx.visible.find_outside(0, most + 1) {
            return Err(Error::value(
                visible.name,
                format!("value {v} at index {i} is outside [0, {most}] (block_table maps {max_pages} pages of {PAGE_ROWS} keys)"),
            ));
        }
        for ti in 0..q.dim(0) {
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
        Ok(ctx)
    }

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

/// Scores queries `queries` against their visible keys in `keys`, a tile at a time: `each(i, n0,
/// scores)` takes query `queries.0 + i`'s scores of keys `n0 .. n0 + scores.len()`.
fn score_job(
    ctx: &Ctx,
    s: &mut Scratch,
    queries: (usize, usize),
    keys: (usize, usize),
    mut each: impl FnMut(usize, usize, &[f32]),
) -> Result<()> {
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
    for n0 in (keys.0..keys.1).step_by(KEY_TILE) {
        let n = KEY_TILE.min(keys.1 - n0);
        for (j, dst) in s.keys.chunks_exact_mut(INDEX_DIM).take(n).enumerate() {
            ctx.keys.read(ctx.row(t0, n0 + j), dst);
        }
        check_rows(&s.keys[..n * INDEX_DIM], INDEX_DIM, |j| (ctx.keys.name, ctx.row(t0, n0 + j)))?;
        for i in 0..t1 - t0 {
            let m = n.min(ctx.visible(t0 + i).saturating_sub(n0));
            if m == 0 {
                continue;
            }
            score_keys(&s.qt[i * INDEX_DIM * hp..][..INDEX_DIM * hp], hp, &s.w[i * hp..][..hp], &s.keys, m, &mut s.scores);
            if let Some(j) = s.scores[..m].iter().position(|x| !x.is_finite()) {
                let (query, key) = (t0 + i, n0 + j);
                let msg = format!("the float32 sums overflow (query {query}, key {key}): values or scales too large");
                return Err(Error::value(&ctx.sized_by.join(", "), msg));
            }
            each(i, n0, &s.scores[..m]);
        }
    }
    Ok(())
}

/// How the work is cut: blocks of consecutive queries of one sequence, and jobs (a block and a
/// range of its keys); the jobs of a block ([`Plan::jobs_of`]) are consecutive, their key ranges
/// in order from key 0.
struct Plan {
    blocks: Vec<(usize, usize)>,
    jobs: Vec<(usize, (usize, usize))>,
    first_job: Vec<usize>,
}

impl Plan {
    fn new(ctx: &Ctx, t: usize) -> Plan {
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
        Plan { blocks, jobs, first_job }
    }

    /// The jobs of block `b`.
    fn jobs_of(&self, b: usize) -> std::ops::Range<usize> {
        self.first_job[b]..self.first_job[b + 1]
    }

    /// The block of each query.
    fn query_blocks(&self) -> Vec<usize> {
        self.blocks.iter().enumerate().flat_map(|(bi, (b0, b1))| (*b0..*b1).map(move |_| bi)).collect()
    }
}

/// The inputs both ops read, as the caller passed them.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    q: &'a TensorRef,
    weights: &'a TensorRef,
    key_cache: &'a TensorRef,
    block_table: &'a TensorRef,
    seq_ids: &'a TensorRef,
    visible: &'a TensorRef,
}

impl Inputs<'_> {
    /// Checks the shapes; returns the number of queries.
    fn check(&self) -> Result<usize> {
        self.q.expect_shape(&[None, None, Some(INDEX_DIM)])?;
        let (t, heads) = (self.q.dim(0), self.q.dim(1));
        if heads == 0 {
            return Err(Error::value(self.q.name, "needs at least one head"));
        }
        self.weights.expect_shape(&[Some(t), Some(heads)])?;
        self.block_table.expect_shape(&[None, None])?;
        self.seq_ids.expect_shape(&[Some(t)])?;
        self.visible.expect_shape(&[Some(t)])?;
        Ok(t)
    }

    /// The one device of the inputs and `outputs`.
    fn device(&self, outputs: &[&TensorRef]) -> Result<Device> {
        let mut all = vec![self.q, self.weights, self.key_cache, self.block_table, self.seq_ids, self.visible];
        all.extend_from_slice(outputs);
        same_device(&all)
    }

    /// The GPU launch's view of the inputs, with the dtypes the kernels take.
    fn gpu_args(&self) -> Result<gpu::indexer::IndexerArgs<'_>> {
        let Inputs { q, weights, key_cache, block_table, seq_ids, visible } = *self;
        q.expect_dtype(&[DType::F32, DType::BF16])?;
        weights.expect_dtype(&[DType::F32])?;
        block_table.expect_dtype(&[DType::I32])?;
        seq_ids.expect_dtype(&[DType::I32, DType::I64])?;
        visible.expect_dtype(&[DType::I32, DType::I64])?;
        let key_format = match cache_kind(key_cache, INDEX_DIM)? {
            CacheKind::Packed(f) if f == INDEX_KEY_FP4 => IndexFormat::Fp4,
            CacheKind::Packed(_) => IndexFormat::Fp8,
            CacheKind::PlainBf16 => IndexFormat::Bf16,
            CacheKind::PlainF32 => {
                return Err(Error::dtype(key_cache.name, "float32 key caches are CPU-only; use bfloat16 or a packed format"))
            }
        };
        Ok(gpu::indexer::IndexerArgs {
            q,
            weights,
            keys: key_cache,
            key_format,
            num_pages: key_cache.dim(0),
            block_table,
            seq_ids,
            visible,
        })
    }
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
    let inputs = Inputs { q, weights, key_cache, block_table, seq_ids, visible };
    let t = inputs.check()?;
    if k == 0 || k > MAX_TOPK {
        return Err(Error::value("k", format!("must be in 1..={MAX_TOPK}, got {k}")));
    }
    for out in [out_indices, out_scores] {
        out.expect_shape(&[Some(t), Some(k)])?;
    }
    out_indices.expect_dtype(&[DType::I32])?;
    out_scores.expect_dtype(&[DType::F32])?;
    if let Device::Cuda(dev) = inputs.device(&[out_indices, out_scores])? {
        let workspace = workspace.ok_or_else(|| Error::value("workspace", "a GPU call needs a workspace"))?;
        workspace.expect_device(q.device)?;
        let selection = gpu::indexer::Selection { k, physical, workspace, out_indices, out_scores };
        return gpu::indexer::indexer_topk(dev, stream, &inputs.gpu_args()?, &selection);
    }
    for out in [out_indices, out_scores] {
        out.expect_device(Device::Cpu)?;
    }
    let ctx = Ctx::new(inputs)?;
    let plan = Plan::new(&ctx, t);
    let results: Vec<Vec<TopK>> = plan
        .jobs
        .par_iter()
        .map_init(Scratch::default, |s, (bi, keys)| {
            let queries = plan.blocks[*bi];
            let mut tops: Vec<TopK> = (queries.0..queries.1).map(|_| TopK::new(k)).collect();
            score_job(&ctx, s, queries, *keys, |i, n0, scores| {
                let top = &mut tops[i];
                for (j, score) in scores.iter().enumerate() {
                    if *score > top.threshold() {
                        top.push(*score, (n0 + j) as u32);
                    }
                }
            })?;
            Ok(tops)
        })
        .collect::<Result<_>>()?;

    let idx = out_indices.host_mut::<i32>(&[DType::I32])?;
    let scores = out_scores.host_mut::<f32>(&[DType::F32])?;
    let query_block = plan.query_blocks();
    idx.par_chunks_mut(k).zip(scores.par_chunks_mut(k)).enumerate().for_each(|(ti, (oi, os))| {
        let bi = query_block[ti];
        let local = ti - plan.blocks[bi].0;
        let jobs = &results[plan.jobs_of(bi)];
        let mut top = jobs[0][local].clone();
        for r in &jobs[1..] {
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

/// Every score of [`indexer_topk`], dense: `out` (float32 `[T, W]`) gets query `t`'s score of
/// each key `s < visible[t]` of its sequence and `-inf` for `s >= visible[t]`; the scores are
/// bit-identical to those [`indexer_topk`] returns on the same device. Inputs as
/// [`indexer_topk`], with `visible[t] <= W` as well (on a GPU, unchecked: keys past `W` or the
/// block table are not scored, and keys on pages outside the cache get `-inf`).
///
/// # Safety
/// As [`indexer_topk`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn indexer_scores(
    q: &TensorRef,
    weights: &TensorRef,
    key_cache: &TensorRef,
    block_table: &TensorRef,
    seq_ids: &TensorRef,
    visible: &TensorRef,
    out: &TensorRef,
    stream: usize,
) -> Result<()> {
    let inputs = Inputs { q, weights, key_cache, block_table, seq_ids, visible };
    let t = inputs.check()?;
    out.expect_shape(&[Some(t), None])?;
    out.expect_dtype(&[DType::F32])?;
    let width = out.dim(1);
    if let Device::Cuda(dev) = inputs.device(&[out])? {
        return gpu::indexer::indexer_scores(dev, stream, &inputs.gpu_args()?, out);
    }
    out.expect_device(Device::Cpu)?;
    let ctx = Ctx::new(inputs)?;
    if let Some((i, v)) = ctx.visible.find_outside(0, width as i64 + 1) {
        return Err(Error::value(
            visible.name,
            format!("value {v} at index {i} is more than the {width} keys a row of {} holds (width)", out.name),
        ));
    }
    let plan = Plan::new(&ctx, t);
    let rows = out.host_mut::<f32>(&[DType::F32])?;
    rows.par_iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    // Each job writes its queries' scores of its key range: disjoint pieces of their rows.
    let mut pieces: Vec<Vec<&mut [f32]>> = plan.jobs.iter().map(|_| Vec::new()).collect();
    for (row, bi) in rows.chunks_mut(width.max(1)).zip(plan.query_blocks()) {
        let mut rest = row;
        for (piece, (_, (lo, hi))) in pieces[plan.jobs_of(bi)].iter_mut().zip(&plan.jobs[plan.jobs_of(bi)]) {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(hi - lo);
            piece.push(mine);
            rest = tail;
        }
    }
    plan.jobs.par_iter().zip(pieces.par_iter_mut()).try_for_each_init(Scratch::default, |s, ((bi, keys), rows)| {
        score_job(&ctx, s, plan.blocks[*bi], *keys, |i, n0, scores| {
            rows[i][n0 - keys.0..][..scores.len()].copy_from_slice(scores);
        })
    })
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
