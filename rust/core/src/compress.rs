//! The compressor (docs/model.md section 3) in one form for prefill and decode.
//!
//! A call consumes the tokens at positions `start .. start + S` and returns the entries they
//! complete. Entry `i` pools, per channel, with one softmax, the tokens of its own block and (in
//! the overlapping form, ratio 4) of the previous block. Every candidate is read where it lives:
//! this call's input, or the decode state left by earlier calls, which holds the tokens of blocks
//! not pooled yet in the layout `reference.compressor_step` keeps (logits stored as
//! `score + ape`). The arithmetic per candidate is the same wherever it comes from, so any split
//! of a sequence into calls gives bit-identical entries.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::Quant;
use crate::gpu;
use crate::quant::{self, INDEX_KEY_FP4_CODEC, MAIN_ENTRY_CODEC};
use crate::rope::{inv_freq_values, Rotation};
use crate::simd::{multiversion, F32x16, LANES};
use crate::tensor::{same_device, DType, Device, TensorRef};

/// Scalars of a compressor call.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Position of the first token of the call.
    pub start: usize,
    pub ratio: usize,
    pub eps: f32,
    pub quant: Quant,
}

/// One pooling candidate: a token's values and logits over the `D` channels of the entry it
/// feeds, and the `ape` row added to its logits (zeros for state rows, which hold the sum).
#[derive(Clone, Copy)]
struct Candidate<'a> {
    kv: &'a [f32],
    score: &'a [f32],
    ape: &'a [f32],
}

/// Lanes `start .. start + n` of `s` (`n <= 16`), zero-padded.
#[inline(always)]
fn load_lanes(s: &[f32], start: usize, n: usize) -> F32x16 {
    if n == LANES {
        return F32x16::load(&s[start..]);
    }
    let mut v = [0f32; LANES];
    v[..n].copy_from_slice(&s[start..start + n]);
    F32x16(v)
}

/// Channels `c0 .. c0 + n` of a candidate's logits, `score + ape`.
#[inline(always)]
fn logit(c: &Candidate, c0: usize, n: usize) -> F32x16 {
    load_lanes(c.score, c0, n) + load_lanes(c.ape, c0, n)
}

/// Per-channel running values of [`pool`], `D` rounded up to whole vectors.
struct PoolScratch {
    max: Vec<f32>,
    den: Vec<f32>,
    num: Vec<f32>,
}

impl PoolScratch {
    fn new(d: usize) -> Self {
        let n = d.next_multiple_of(LANES);
        PoolScratch { max: vec![0.0; n], den: vec![0.0; n], num: vec![0.0; n] }
    }
}

/// Candidates whose rows [`pool`] walks side by side: enough concurrent memory streams to
/// hide DRAM latency, few enough for the hardware prefetchers to follow.
const STREAMS: usize = 8;

multiversion! {
    /// Per channel, the softmax over the candidates' logits `score + ape` weighting their values,
    /// in two passes (max, then sums). Candidates go in groups of [`STREAMS`], a group 16
    /// channels at a time; per-channel running values live in `s`. Each channel sums its
    /// candidates in list order.
    fn pool(cands: &[Candidate], out: &mut [f32], s: &mut PoolScratch) {
        let d = out.len();
        s.max.fill(f32::NEG_INFINITY);
        for group in cands.chunks(STREAMS) {
            for c0 in (0..d).step_by(LANES) {
                let n = LANES.min(d - c0);
                let mut m = F32x16::load(&s.max[c0..]);
                for c in group {
                    m = m.max(logit(c, c0, n));
                }
                m.store(&mut s.max[c0..]);
            }
        }
        s.den.fill(0.0);
        s.num.fill(0.0);
        for group in cands.chunks(STREAMS) {
            for c0 in (0..d).step_by(LANES) {
                let n = LANES.min(d - c0);
                let m = F32x16::load(&s.max[c0..]);
                let (mut den, mut num) = (F32x16::load(&s.den[c0..]), F32x16::load(&s.num[c0..]));
                for c in group {
                    let w = (logit(c, c0, n) - m).exp();
                    den = den + w;
                    num = w.mul_add(load_lanes(c.kv, c0, n), num);
                }
                den.store(&mut s.den[c0..]);
                num.store(&mut s.num[c0..]);
            }
        }
        for ((o, a), b) in out.iter_mut().zip(&s.num).zip(&s.den) {
            *o = a / b;
        }
    }
}

/// RMSNorm with `weight` (without the bf16 cast docs/model.md section 3 puts before it, as the reference),
/// then the rotation `rot` and `quant`, in place on one entry.
fn finish(x: &mut [f32], weight: &[f32], rot: &Rotation, eps: f32, quant: Quant) {
    let ms = x.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps as f64).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = (*v as f64 * r * *w as f64) as f32;
    }
    rot.apply(x);
    match quant {
        Quant::None => {}
        Quant::Fp8 => MAIN_ENTRY_CODEC.round_trip(x),
        Quant::Fp4 => {
            quant::hadamard128(x);
            INDEX_KEY_FP4_CODEC.round_trip(x);
        }
    }
}

/// A borrowed float32 host tensor, checked for shape.
///
/// # Safety
/// `t` satisfies [`TensorRef`]'s contract and is not written while borrowed.
unsafe fn floats<'a>(t: &'a TensorRef, shape: &[Option<usize>]) -> Result<&'a [f32]> {
    t.expect_device(Device::Cpu)?;
    t.expect_dtype(&[DType::F32])?;
    t.expect_shape(shape)?;
    t.host::<f32>(&[DType::F32])
}

/// The frequencies a GPU call takes: float32 or float64 `[R]`, `2 R <= D` (their values are not
/// read on the host).
fn check_inv_freq_gpu(inv_freq: &TensorRef, d: usize) -> Result<()> {
    inv_freq.expect_dtype(&[DType::F32, DType::F64])?;
    inv_freq.expect_shape(&[None])?;
    if 2 * inv_freq.dim(0) > d {
        return Err(Error::value(inv_freq.name, format!("rotates {} dims, more than D = {d}", 2 * inv_freq.dim(0))));
    }
    Ok(())
}

/// The GPU form of [`compress`]: the same shape checks, then the kernels.
///
/// # Safety
/// As [`compress`].
unsafe fn compress_gpu(dev: i32, stream: usize, t: [&TensorRef; 8], cfg: Config) -> Result<()> {
    let [kv, score, ape, norm_weight, inv_freq, kv_state, score_state, out] = t;
    let (r, d) = (cfg.ratio, norm_weight.dim(0));
    let coff = if r == 4 { 2 } else { 1 };
    let (s, n_out) = (kv.dim(0), entries_completed(cfg.start, kv.dim(0), r));
    let expected: [(&TensorRef, &[Option<usize>]); 7] = [
        (kv, &[Some(s), Some(coff * d)]),
        (score, &[Some(s), Some(coff * d)]),
        (ape, &[Some(r), Some(coff * d)]),
        (norm_weight, &[Some(d)]),
        (kv_state, &[Some(coff * r), Some(coff * d)]),
        (score_state, &[Some(coff * r), Some(coff * d)]),
        (out, &[Some(n_out), Some(d)]),
    ];
    for (t, shape) in expected {
        t.expect_dtype(&[DType::F32])?;
        t.expect_shape(shape)?;
    }
    check_inv_freq_gpu(inv_freq, d)?;
    let args = gpu::compress::CompressArgs {
        kv,
        score,
        ape,
        norm_weight,
        inv_freq,
        kv_state,
        score_state,
        out,
        start: cfg.start,
        ratio: r,
        eps: cfg.eps,
        quant: cfg.quant,
    };
    gpu::compress::compress(dev, stream, &args)
}

/// The tokens a call can see, by position: this call's input from `start` on; before that the
/// state, where the block of the last entry completed before this call has been shifted down to
/// slots `0..r` in the overlapping form, and later tokens sit at slot `(coff - 1) r + j % r`.
struct Tokens<'a> {
    kv: &'a [f32],
    score: &'a [f32],
    ape: &'a [f32],
    kv_state: &'a [f32],
    score_state: &'a [f32],
    zeros: &'a [f32],
    start: usize,
    ratio: usize,
    coff: usize,
    /// Channels of a token, `coff * D`.
    width: usize,
}

impl<'a> Tokens<'a> {
    /// Channels `[c D, (c + 1) D)` of token `j` as a pooling candidate.
    fn candidate(&self, j: usize, c: usize) -> Candidate<'a> {
        let (r, w) = (self.ratio, self.width);
        let (kv, score, ape, row) = if j >= self.start {
            (self.kv, self.score, &self.ape[(j % r) * w..][..w], j - self.start)
        } else {
            let shifted = j < (self.start / r) * r;
            let slot = if self.coff == 2 && !shifted { r + j % r } else { j % r };
            (self.kv_state, self.score_state, self.zeros, slot)
        };
        let d = w / self.coff;
        Candidate { kv: &kv[row * w + c * d..][..d], score: &score[row * w + c * d..][..d], ape: &ape[c * d..][..d] }
    }
}

fn expect_finite(name: &str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::value(name, format!("contains a non-finite value at flat index {i}"))),
    }
}

/// Number of entries completed by `len` tokens from position `start`: the positions `p` with
/// `(p + 1) % ratio == 0`.
pub fn entries_completed(start: usize, len: usize, ratio: usize) -> usize {
    (start + len) / ratio - start / ratio
}

/// The scalars every call checks the same way: `(coff, D)`.
fn check_scalars(norm_weight: &TensorRef, ratio: usize, eps: f32, quant: Quant) -> Result<(usize, usize)> {
    if ratio == 0 {
        return Err(Error::value("ratio", "must be >= 1"));
    }
    let coff = if ratio == 4 { 2 } else { 1 };
    norm_weight.expect_shape(&[None])?;
    let d = norm_weight.dim(0);
    if d == 0 {
        return Err(Error::value(norm_weight.name, "must not be empty"));
    }
    if let Some(qd) = quant.dim().filter(|qd| *qd != d) {
        return Err(Error::value("quant", format!("{quant:?} needs D = {qd}, got D = {d}")));
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::value("eps", format!("must be finite and >= 0, got {eps}")));
    }
    Ok((coff, d))
}

/// Where the entries of a call go in its output.
#[derive(Clone, Copy)]
enum Placement {
    /// `[E, D]`: entry after entry ([`compress`]).
    Compact,
}

/// What every sequence of a call shares: the weights, checked and read, and the scalars.
struct Compressor<'a> {
    ape: &'a [f32],
    weight: &'a [f32],
    freqs: &'a [f64],
    /// `coff D` zeros: the `ape` of candidates read from the state.
    zeros: &'a [f32],
    ratio: usize,
    coff: usize,
    dim: usize,
    eps: f32,
    quant: Quant,
    /// Argument names for errors.
    kv_name: &'a str,
    score_name: &'a str,
}

impl<'a> Compressor<'a> {
    fn width(&self) -> usize {
        self.coff * self.dim
    }

    /// The tokens one sequence's call sees: `kv`, `score` (`[S, coff D]`) from position `start`
    /// on, and its state before the call.
    fn tokens(&self, kv: &'a [f32], score: &'a [f32], kv_state: &'a [f32], score_state: &'a [f32], start: usize) -> Tokens<'a> {
        Tokens {
            kv,
            score,
            ape: self.ape,
            kv_state,
            score_state,
            zeros: self.zeros,
            start,
            ratio: self.ratio,
            coff: self.coff,
            width: self.width(),
        }
    }

    /// Pools, normalizes, rotates and quantizes the entries the tokens of `t` complete into
    /// `out` as `place` says (rows of `AtTokens` that complete no entry are left as they are).
    /// A non-finite pooled entry is an error.
    fn entries(&self, t: &Tokens, out: &mut [f32], place: Placement) -> Result<()> {
        let (r, d) = (self.ratio, self.dim);
        let s = t.kv.len() / self.width();
        let n = entries_completed(t.start, s, r);
        if n == 0 {
            return Ok(());
        }
        // Entry e is completed by position r (first + e) + r - 1, row r - 1 - start % r + r e.
        let (skip, stride) = match place {
            Placement::Compact => (0, 1),
        };
        let first = t.start / r;
        out[skip * d..].par_chunks_mut(stride * d).take(n).enumerate().try_for_each(|(e, rows)| -> Result<()> {
            let entry = &mut rows[..d];
            let i = first + e;
            let mut cands = Vec::with_capacity(self.coff * r);
            if self.coff == 2 {
                cands.extend((r * i.saturating_sub(1)..r * i).map(|j| t.candidate(j, 0)));
            }
            cands.extend((r * i..r * i + r).map(|j| t.candidate(j, self.coff - 1)));
            pool(&cands, entry, &mut PoolScratch::new(d));
            if entry.iter().any(|v| !v.is_finite()) {
                return Err(Error::value(
                    self.kv_name,
                    format!(
                        "kv or score holds a non-finite value among the tokens of entry {i} (positions up to {})",
                        r * i + r - 1
                    ),
                ));
            }
            finish(entry, self.weight, &Rotation::at((r * i) as i64, self.freqs, false), self.eps, self.quant);
            Ok(())
        })
    }

    /// The positions whose tokens end up in the state after `s` tokens from `start`: only the
    /// last `coff r` (earlier writes are all overwritten).
    fn replayed(&self, start: usize, s: usize) -> std::ops::Range<usize> {
        let end = start + s;
        start.max(end.saturating_sub(self.coff * self.ratio))..end
    }

    /// Checks the tokens [`Self::advance`] will copy into the state: finite kv; scores finite or
    /// `-inf`.
    fn check_replayed(&self, kv: &[f32], score: &[f32], start: usize) -> Result<()> {
        let w = self.width();
        for p in self.replayed(start, kv.len() / w) {
            let t = p - start;
            expect_finite(self.kv_name, &kv[t * w..][..w])?;
            if let Some(c) = score[t * w..][..w].iter().position(|v| v.is_nan() || *v == f32::INFINITY) {
                return Err(Error::value(self.score_name, format!("non-finite value at row {t}, channel {c}")));
            }
        }
        Ok(())
    }

    /// Advances a state by the tokens at positions `start ..` as reference.compressor_step does
    /// token by token, replaying only those that stay.
    fn advance(&self, kv: &[f32], score: &[f32], start: usize, kv_st: &mut [f32], score_st: &mut [f32]) {
        let (r, w) = (self.ratio, self.width());
        for p in self.replayed(start, kv.len() / w) {
            let (t, slot) = (p - start, p % r);
            let row = (self.coff - 1) * r + slot;
            kv_st[row * w..][..w].copy_from_slice(&kv[t * w..][..w]);
            for ((st, sc), a) in
                score_st[row * w..][..w].iter_mut().zip(&score[t * w..][..w]).zip(&self.ape[slot * w..][..w])
            {
                *st = sc + a;
            }
            if self.coff == 2 && (p + 1) % r == 0 {
                kv_st.copy_within(r * w..2 * r * w, 0);
                score_st.copy_within(r * w..2 * r * w, 0);
            }
        }
    }
}

/// Compresses `kv`, `score` (float32 `[S, coff D]`, tokens at `cfg.start ..`) into `out`
/// (float32 `[E, D]`, the entries these tokens complete) and advances `kv_state`, `score_state`
/// (float32 `[coff r, coff D]`) in place. `ape`: `[r, coff D]`; `norm_weight`: `[D]`;
/// `inv_freq`: `[R]`, `2 R <= D`. `coff` is 2 for ratio 4 and 1 otherwise. Scores may hold
/// `-inf` (a token that takes no part); any other non-finite input is an error, raised before
/// the state is touched.
///
/// On a GPU the same call runs three kernels on `stream` (cuda/compress.cu); non-finite inputs
/// are not checked there (that would need a synchronization) and propagate into the entries.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `out` and the states alias nothing else;
/// `stream` is a `CUstream` of the tensors' GPU when they live on one.
#[allow(clippy::too_many_arguments)]
pub unsafe fn compress(
    kv: &TensorRef,
    score: &TensorRef,
    ape: &TensorRef,
    norm_weight: &TensorRef,
    inv_freq: &TensorRef,
    kv_state: &TensorRef,
    score_state: &TensorRef,
    out: &TensorRef,
    cfg: Config,
    stream: usize,
) -> Result<()> {
    let r = cfg.ratio;
    let (coff, d) = check_scalars(norm_weight, r, cfg.eps, cfg.quant)?;
    kv.expect_shape(&[None, Some(coff * d)])?;
    if let Device::Cuda(dev) = same_device(&[kv, score, ape, norm_weight, inv_freq, kv_state, score_state, out])? {
        return compress_gpu(dev, stream, [kv, score, ape, norm_weight, inv_freq, kv_state, score_state, out], cfg);
    }
    let w = floats(norm_weight, &[Some(d)])?;
    let kv_v = floats(kv, &[None, Some(coff * d)])?;
    let s = kv.dim(0);
    let score_v = floats(score, &[Some(s), Some(coff * d)])?;
    let ape_v = floats(ape, &[Some(r), Some(coff * d)])?;
    let kv_st = floats(kv_state, &[Some(coff * r), Some(coff * d)])?;
    let score_st = floats(score_state, &[Some(coff * r), Some(coff * d)])?;
    let n_out = entries_completed(cfg.start, s, r);
    floats(out, &[Some(n_out), Some(d)])?;
    let freqs = inv_freq_values(inv_freq, d)?;
    expect_finite(norm_weight.name, w)?;
    expect_finite(ape.name, ape_v)?;

    let zeros = vec![0f32; coff * d];
    let comp = Compressor {
        ape: ape_v,
        weight: w,
        freqs: &freqs,
        zeros: &zeros,
        ratio: r,
        coff,
        dim: d,
        eps: cfg.eps,
        quant: cfg.quant,
        kv_name: kv.name,
        score_name: score.name,
    };
    let tokens = comp.tokens(kv_v, score_v, kv_st, score_st, cfg.start);
    comp.entries(&tokens, out.host_mut::<f32>(&[DType::F32])?, Placement::Compact)?;
    comp.check_replayed(kv_v, score_v, cfg.start)?;
    let kv_st = kv_state.host_mut::<f32>(&[DType::F32])?;
    let score_st = score_state.host_mut::<f32>(&[DType::F32])?;
    comp.advance(kv_v, score_v, cfg.start, kv_st, score_st);
    Ok(())
}
