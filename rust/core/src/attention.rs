//! Sparse attention with a sink (docs/model.md section 2), streaming: each query walks its candidate
//! rows (from one or two paged caches) a tile at a time with an online softmax, decoding every row
//! once and using it for all heads as key and value (K = V). Heads sit in vector lanes
//! ([`crate::tile`]), so the running max, sum and output of 16 heads update as one vector.
//!
//! Queries run in parallel; when there are fewer queries than threads, a query's candidates are
//! split among jobs whose partial softmax states are merged in a fixed order.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gpu;
pub use crate::gpu::attention::Candidates;
use crate::gpu::attention::AttentionArgs;
use crate::quant::{ENTRY_DIM, MAIN_ENTRY, ROPE_DIM};
use crate::rope::{inv_freq_values, RopeTable, Rotation};
use crate::rows::{cache_kind, check_rows, CacheKind, Floats, Ids, PagedRows};
use crate::simd::{multiversion, F32x16, LANES};
use crate::tensor::{same_device, DType, Device, TensorRef};
use crate::tile::{dots, head_groups, padded_heads, transpose_query, with_head_vecs, ROWS};

const D: usize = ENTRY_DIM;
/// Candidate rows decoded at a time (a multiple of [`ROWS`]).
const ROW_TILE: usize = 64;
/// Output dims of one register block of the value product.
const DIMS: usize = 4;
/// Fewest candidates worth a job of their own.
const MIN_SPLIT: usize = 64;

/// Online-softmax state of one query over some of its candidates, heads in lanes (`hp` of them):
/// running max `m` of the logits, sum `l` of `exp(logit - m)`, and the output numerator `ot`
/// transposed (`[512, hp]`).
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    ot: Vec<f32>,
}

impl Partial {
    fn new(hp: usize) -> Self {
        Partial { m: vec![f32::NEG_INFINITY; hp], l: vec![0.0; hp], ot: vec![0.0; D * hp] }
    }

    /// Folds `other` (the same query over other candidates) into `self`.
    fn merge(&mut self, other: &Partial) {
        let hp = self.m.len();
        for h in 0..hp {
            let m = self.m[h].max(other.m[h]);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let (a, b) = ((self.m[h] - m).exp(), (other.m[h] - m).exp());
            self.m[h] = m;
            self.l[h] = self.l[h] * a + other.l[h] * b;
            for d in 0..D {
                self.ot[d * hp + h] = self.ot[d * hp + h] * a + other.ot[d * hp + h] * b;
            }
        }
    }
}

multiversion! {
    /// Folds candidate rows `rows[..n]` (`[>= n rounded up to ROWS, 512]`, `n >= 1`) into the
    /// state `m`, `l`, `ot` of the query held transposed in `qt`. `p` (`[ROW_TILE, hp]`) and
    /// `corr` (`[hp]`) are scratch.
    fn attend_tile(
        qt: &[f32], hp: usize, rows: &[f32], n: usize, scale: f32,
        p: &mut [f32], corr: &mut [f32], m: &mut [f32], l: &mut [f32], ot: &mut [f32],
    ) {
        for j0 in (0..n).step_by(ROWS) {
            let block = &rows[j0 * D..(j0 + ROWS) * D];
            for (col, nv) in head_groups(hp) {
                with_head_vecs!(nv, V => {
                    let acc = dots::<V>(qt, hp, col, block, D);
                    for (j, a) in acc.iter().enumerate().take(n - j0) {
                        for (v, x) in a.iter().enumerate() {
                            (*x * F32x16::splat(scale)).store(&mut p[(j0 + j) * hp + col + v * LANES..]);
                        }
                    }
                })
            }
        }
        for c in (0..hp).step_by(LANES) {
            let m_old = F32x16::load(&m[c..]);
            let mut m_new = m_old;
            for j in 0..n {
                m_new = m_new.max(F32x16::load(&p[j * hp + c..]));
            }
            let mut sum = F32x16::splat(0.0);
            for j in 0..n {
                let e = (F32x16::load(&p[j * hp + c..]) - m_new).exp();
                e.store(&mut p[j * hp + c..]);
                sum = sum + e;
            }
            let cv = (m_old - m_new).exp();
            cv.store(&mut corr[c..]);
            F32x16::load(&l[c..]).mul_add(cv, sum).store(&mut l[c..]);
            m_new.store(&mut m[c..]);
        }
        for d0 in (0..D).step_by(DIMS) {
            for (col, nv) in head_groups(hp) {
                with_head_vecs!(nv, V => {
                    let cv: [F32x16; V] = std::array::from_fn(|v| F32x16::load(&corr[col + v * LANES..]));
                    let mut acc: [[F32x16; V]; DIMS] = std::array::from_fn(|dd| {
                        std::array::from_fn(|v| F32x16::load(&ot[(d0 + dd) * hp + col + v * LANES..]) * cv[v])
                    });
                    for j in 0..n {
                        let pv: [F32x16; V] = std::array::from_fn(|v| F32x16::load(&p[j * hp + col + v * LANES..]));
                        for (dd, a) in acc.iter_mut().enumerate() {
                            let x = F32x16::splat(rows[j * D + d0 + dd]);
                            for v in 0..V {
                                a[v] = x.mul_add(pv[v], a[v]);
                            }
                        }
                    }
                    for (dd, a) in acc.iter().enumerate() {
                        for (v, x) in a.iter().enumerate() {
                            x.store(&mut ot[(d0 + dd) * hp + col + v * LANES..]);
                        }
                    }
                })
            }
        }
    }
}

/// One candidate list: a cache, `[T, K]` row ids (-1 masked) and optional `[T]` lengths.
struct Source<'a> {
    cache: PagedRows<'a>,
    ids: Ids<'a>,
    width: usize,
    lengths: Option<Ids<'a>>,
}

/// Everything a job reads.
struct Ctx<'a> {
    q: Floats<'a>,
    heads: usize,
    scale: f32,
    sources: Vec<Source<'a>>,
}

impl Ctx<'_> {
    /// The valid candidates of query `t`, in order: `(source, row)`.
    fn candidates(&self, t: usize, out: &mut Vec<(usize, usize)>) {
        out.clear();
        for (si, s) in self.sources.iter().enumerate() {
            let len = s.lengths.as_ref().map_or(s.width, |l| l.get(t) as usize);
            let ids = (0..len).map(|c| s.ids.get(t * s.width + c)).filter(|r| *r >= 0);
            out.extend(ids.map(|r| (si, r as usize)));
        }
    }
}

/// Per-thread buffers of a job.
#[derive(Default)]
struct Scratch {
    cands: Vec<(usize, usize)>,
    qt: Vec<f32>,
    row: Vec<f32>,
    rows: Vec<f32>,
    p: Vec<f32>,
    corr: Vec<f32>,
}

/// The state of query `t` over its candidates `part.0 .. part.1` (positions in its list).
fn run_job(ctx: &Ctx, s: &mut Scratch, t: usize, part: (usize, usize)) -> Result<Partial> {
    let hp = padded_heads(ctx.heads);
    ctx.candidates(t, &mut s.cands);
    s.qt.resize(D * hp, 0.0);
    s.row.resize(D, 0.0);
    s.rows.resize(ROW_TILE * D, 0.0);
    s.p.resize(ROW_TILE * hp, 0.0);
    s.corr.resize(hp, 0.0);
    transpose_query(&ctx.q, t * ctx.heads * D, ctx.heads, &mut s.row, &mut s.qt);
    let mut st = Partial::new(hp);
    for tile in s.cands[part.0..part.1].chunks(ROW_TILE) {
        for ((si, row), dst) in tile.iter().zip(s.rows.chunks_exact_mut(D)) {
            ctx.sources[*si].cache.read(*row, dst);
        }
        check_rows(&s.rows[..tile.len() * D], D, |j| (ctx.sources[tile[j].0].cache.name, tile[j].1))?;
        attend_tile(&s.qt, hp, &s.rows, tile.len(), ctx.scale, &mut s.p, &mut s.corr, &mut st.m, &mut st.l, &mut st.ot);
    }
    Ok(st)
}

/// Output `[H, 512]` and log-sum-exp `[H]` of one query from its merged state.
fn finish(st: &Partial, sink: &[f32], rot: Option<&Rotation>, out: &mut [f32], lse: &mut [f32]) {
    let hp = st.m.len();
    for (h, (o, lse)) in out.chunks_exact_mut(D).zip(lse.iter_mut()).enumerate() {
        if st.l[h] == 0.0 {
            o.fill(0.0);
            *lse = f32::NEG_INFINITY;
            continue;
        }
        let (m, l) = (st.m[h] as f64, st.l[h] as f64);
        let inv = 1.0 / (l + (sink[h] as f64 - m).exp());
        for (d, v) in o.iter_mut().enumerate() {
            *v = (st.ot[d * hp + h] as f64 * inv) as f32;
        }
        *lse = (m + l.ln()) as f32;
        if let Some(r) = rot {
            r.apply(o);
        }
    }
}

/// Inverse RoPE of the output at the query positions (docs/model.md section 2).
#[derive(Clone, Copy)]
pub struct Derotate<'a> {
    pub positions: &'a TensorRef,
    pub inv_freq: &'a TensorRef,
    pub table: RopeTable,
}

/// Checks one candidate list of `t` queries against its cache.
///
/// # Safety
/// The tensors satisfy [`TensorRef`]'s contract.
unsafe fn source<'a>(cache: &'a TensorRef, ids: &'a TensorRef, lengths: Option<&'a TensorRef>, t: usize) -> Result<Source<'a>> {
    let cache = PagedRows::new(cache, D)?;
    ids.expect_shape(&[Some(t), None])?;
    let width = ids.dim(1);
    let idv = Ids::new(ids)?;
    idv.expect_range(ids.name, -1, cache.rows as i64, &format!("-1 or a row of {}, which holds {} rows", cache.name, cache.rows))?;
    let lengths = match lengths {
        None => None,
        Some(l) => {
            l.expect_shape(&[Some(t)])?;
            let lv = Ids::new(l)?;
            if let Some((i, v)) = lv.find_outside(0, width as i64 + 1) {
                return Err(Error::value(l.name, format!("value {v} at index {i} is outside [0, {width}] ({} has {width} columns)", ids.name)));
            }
            Some(lv)
        }
    };
    Ok(Source { cache, ids: idv, width, lengths })
}

/// Attention of `q` (float32/bfloat16 `[T, H, 512]`) over candidate rows `indices` (int32/int64
/// `[T, K]`, -1 masked, the first `lengths[t]` counting when given) of `cache`, plus those of
/// `extra`, in one softmax with the sink `sink` (float32 `[H]`). Writes `out` (float32
/// `[T, H, 512]`; on a GPU also bfloat16, rounded to nearest even, where
/// `gpu::attention::stores_bf16` says the call stores it) and `lse` (float32 `[T, H]`, the log-sum-exp of
/// the candidates' logits without the sink, -inf when a query has none; its output is then 0).
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; the outputs alias nothing else.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sparse_attention(
    q: &TensorRef,
    cache: &TensorRef,
    indices: &TensorRef,
    lengths: Option<&TensorRef>,
    extra: Option<Candidates>,
    sink: &TensorRef,
    scale: f32,
    derotate: Option<Derotate>,
    out: &TensorRef,
    lse: &TensorRef,
    workspace: Option<&TensorRef>,
    stream: usize,
) -> Result<()> {
    q.expect_shape(&[None, None, Some(D)])?;
    let (t, heads) = (q.dim(0), q.dim(1));
    if heads == 0 {
        return Err(Error::value(q.name, "needs at least one head"));
    }
    if !scale.is_finite() {
        return Err(Error::value("scale", format!("must be finite, got {scale}")));
    }
    sink.expect_shape(&[Some(heads)])?;
    let mut all = vec![q, cache, indices, sink, out, lse];
    all.extend(lengths);
    if let Some(e) = &extra {
        all.extend([e.cache, e.indices].into_iter().chain(e.lengths));
    }
    if let Some(d) = &derotate {
        all.extend([d.positions, d.inv_freq]);
    }
    if let Device::Cuda(dev) = same_device(&all)? {
        let workspace = workspace.ok_or_else(|| Error::value("workspace", "a GPU call needs a workspace"))?;
        let a = Candidates { cache, indices, lengths };
        return sparse_attention_gpu(dev, stream, q, a, extra, sink, scale, derotate, workspace, out, lse);
    }
    out.expect_device(Device::Cpu)?;
    out.expect_dtype(&[DType::F32])?;
    out.expect_shape(&[Some(t), Some(heads), Some(D)])?;
    lse.expect_device(Device::Cpu)?;
    lse.expect_dtype(&[DType::F32])?;
    lse.expect_shape(&[Some(t), Some(heads)])?;
    let mut sources = vec![source(cache, indices, lengths, t)?];
    if let Some(e) = &extra {
        sources.push(source(e.cache, e.indices, e.lengths, t)?);
    }
    let sink_v = match Floats::new(sink)? {
        Floats::F32(v) => v.to_vec(),
        f => {
            let mut v = vec![0f32; heads];
            f.read(0, &mut v);
            v
        }
    };
    let rot = match &derotate {
        None => None,
        Some(dr) => {
            dr.positions.expect_shape(&[Some(t)])?;
            Some((Ids::new(dr.positions)?, inv_freq_values(dr.inv_freq, D)?, dr.table))
        }
    };
    let ctx = Ctx { q: Floats::new(q)?, heads, scale, sources };

    let threads = rayon::current_num_threads();
    let dst = out.host_mut::<f32>(&[DType::F32])?;
    let lse_v = lse.host_mut::<f32>(&[DType::F32])?;
    dst.par_chunks_mut(heads * D).zip(lse_v.par_chunks_mut(heads)).enumerate().try_for_each_init(
        Scratch::default,
        |s, (ti, (o, l))| -> Result<()> {
            ctx.candidates(ti, &mut s.cands);
            let n = s.cands.len();
            let parts = if t >= 2 * threads { 1 } else { (2 * threads).div_ceil(t).min(n / MIN_SPLIT).max(1) };
            let st = if parts == 1 {
                run_job(&ctx, s, ti, (0, n))?
            } else {
                let len = n.div_ceil(parts).div_ceil(ROW_TILE) * ROW_TILE;
                let partials: Vec<Partial> = (0..n)
                    .step_by(len)
                    .collect::<Vec<_>>()
                    .into_par_iter()
                    .map_init(Scratch::default, |s2, lo| run_job(&ctx, s2, ti, (lo, n.min(lo + len))))
                    .collect::<Result<_>>()?;
                let mut it = partials.into_iter();
                let mut st = it.next().expect("at least one part");
                it.for_each(|p| st.merge(&p));
                st
            };
            let r = rot.as_ref().map(|(pos, f, table)| Rotation::at(pos.get(ti), f, true, *table));
            finish(&st, &sink_v, r.as_ref(), o, l);
            Ok(())
        },
    )
}

/// The GPU form of [`sparse_attention`] (cuda/attention.cu), after the checks they share.
///
/// # Safety
/// As [`sparse_attention`].
#[allow(clippy::too_many_arguments)]
unsafe fn sparse_attention_gpu(
    dev: i32,
    stream: usize,
    q: &TensorRef,
    a: Candidates,
    b: Option<Candidates>,
    sink: &TensorRef,
    scale: f32,
    derotate: Option<Derotate>,
    workspace: &TensorRef,
    out: &TensorRef,
    lse: &TensorRef,
) -> Result<()> {
    let (t, heads) = (q.dim(0), q.dim(1));
    q.expect_dtype(&[DType::F32, DType::BF16])?;
    sink.expect_dtype(&[DType::F32])?;
    out.expect_dtype(&[DType::F32, DType::BF16])?;
    out.expect_shape(&[Some(t), Some(heads), Some(D)])?;
    lse.expect_dtype(&[DType::F32])?;
    lse.expect_shape(&[Some(t), Some(heads)])?;
    for c in std::iter::once(&a).chain(&b) {
        match cache_kind(c.cache, D)? {
            CacheKind::Packed(f) if f == MAIN_ENTRY => {}
            CacheKind::PlainBf16 => {}
            _ => return Err(Error::dtype(c.cache.name, "the GPU reads 584-byte FP8 entries or bfloat16 rows")),
        }
        c.indices.expect_dtype(&[DType::I32, DType::I64])?;
        c.indices.expect_shape(&[Some(t), None])?;
        if let Some(l) = c.lengths {
            l.expect_dtype(&[DType::I32, DType::I64])?;
            l.expect_shape(&[Some(t)])?;
        }
    }
    if let Some(d) = &derotate {
        d.positions.expect_dtype(&[DType::I32, DType::I64])?;
        d.positions.expect_shape(&[Some(t)])?;
        d.inv_freq.expect_dtype(&[DType::F32, DType::F64])?;
        d.inv_freq.expect_shape(&[Some(ROPE_DIM / 2)])?;
    }
    let args = AttentionArgs {
        q,
        a,
        b,
        sink,
        scale,
        derotate: derotate.map(|d| (d.positions, d.inv_freq, d.table)),
        workspace,
        out,
        lse,
    };
    gpu::attention::sparse_attention(dev, stream, &args)
}
