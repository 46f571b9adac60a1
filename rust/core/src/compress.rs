//! The compressor (docs/model.md section 3) in one form for prefill and decode.
//!
//! A call consumes the tokens at positions `start .. start + S` and returns the entries they
//! complete. Entry `i` pools, per channel, with one softmax, the tokens of its own block and (in
//! the overlapping form, ratio 4) of the previous block. Every candidate is read where it lives:
//! this call's input, or the decode state left by earlier calls, which holds the tokens of blocks
//! not pooled yet in the layout `reference.compressor_step` keeps (logits stored as
//! `score + ape`). The arithmetic per candidate is the same wherever it comes from, so any split
//! of a sequence into calls gives bit-identical entries.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::Quant;
use crate::gpu;
use crate::quant::{self, INDEX_KEY_FP4_CODEC, MAIN_ENTRY_CODEC};
use crate::rope::{inv_freq_values, RopeTable, Rotation};
use crate::rows::Ids;
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
    /// How the entries' RoPE angles are computed.
    pub rope: RopeTable,
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

/// The projections `kv` and `score` on the host as float32, checked for shape: float32 borrowed,
/// bfloat16 widened (exactly) into a copy.
///
/// # Safety
/// As [`floats`].
unsafe fn inputs<'a>(t: &'a TensorRef, shape: &[Option<usize>]) -> Result<Cow<'a, [f32]>> {
    t.expect_device(Device::Cpu)?;
    t.expect_shape(shape)?;
    Ok(match t.expect_dtype(&[DType::F32, DType::BF16])? {
        DType::BF16 => Cow::Owned(t.host::<u16>(&[DType::BF16])?.iter().map(|&b| quant::bf16_to_f32(b)).collect()),
        _ => Cow::Borrowed(t.host::<f32>(&[DType::F32])?),
    })
}

/// `kv` and `score`: both float32 or both bfloat16.
fn check_input_dtypes(kv: &TensorRef, score: &TensorRef) -> Result<()> {
    let dtype = kv.expect_dtype(&[DType::F32, DType::BF16])?;
    score.expect_dtype(&[dtype])?;
    Ok(())
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
    check_input_dtypes(kv, score)?;
    for t in [ape, norm_weight, kv_state, score_state, out] {
        t.expect_dtype(&[DType::F32])?;
    }
    for (t, shape) in expected {
        t.expect_shape(shape)?;
    }
    check_inv_freq_gpu(inv_freq, d)?;
    let (eps, quant, rope) = (cfg.eps, cfg.quant, cfg.rope);
    let common = gpu::compress::Common { kv, score, ape, norm_weight, inv_freq, out, ratio: r, eps, quant, rope };
    let args = gpu::compress::CompressArgs { common, kv_state, score_state, start: cfg.start };
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
    /// `[S, D]`: each entry at the row of the token that completes it ([`compress_batch`]).
    AtTokens,
}

/// What every sequence of a call shares: the weights, checked and read, and the scalars.
struct Compressor<'a> {
    ape: &'a [f32],
    weight: &'a [f32],
    freqs: &'a [f64],
    rope: RopeTable,
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

/// What a CPU call's compressors share, checked once: the RMSNorm weight, the positional biases,
/// the RoPE frequencies and table and a `coff D` row of zeros (the `ape` of candidates read from
/// a state).
struct Shared<'a> {
    weight: &'a [f32],
    ape: &'a [f32],
    freqs: Vec<f64>,
    rope: RopeTable,
    zeros: Vec<f32>,
}

impl<'a> Shared<'a> {
    /// # Safety
    /// The tensors satisfy [`TensorRef`]'s contract.
    unsafe fn new(
        norm_weight: &'a TensorRef,
        ape: &'a TensorRef,
        inv_freq: &TensorRef,
        rope: RopeTable,
        ratio: usize,
        coff: usize,
        dim: usize,
    ) -> Result<Self> {
        let weight = floats(norm_weight, &[Some(dim)])?;
        let ape_v = floats(ape, &[Some(ratio), Some(coff * dim)])?;
        let freqs = inv_freq_values(inv_freq, dim)?;
        expect_finite(norm_weight.name, weight)?;
        expect_finite(ape.name, ape_v)?;
        Ok(Shared { weight, ape: ape_v, freqs, rope, zeros: vec![0f32; coff * dim] })
    }

    /// The compressor of these parameters (`kv`, `score`: the argument names for errors).
    #[allow(clippy::too_many_arguments)]
    fn compressor<'b>(&'b self, ratio: usize, coff: usize, dim: usize, eps: f32, quant: Quant, kv: &'b str, score: &'b str)
        -> Compressor<'b> {
        Compressor {
            ape: self.ape,
            weight: self.weight,
            freqs: &self.freqs,
            rope: self.rope,
            zeros: &self.zeros,
            ratio,
            coff,
            dim,
            eps,
            quant,
            kv_name: kv,
            score_name: score,
        }
    }
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
            Placement::AtTokens => (r - 1 - t.start % r, r),
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
            finish(entry, self.weight, &Rotation::at((r * i) as i64, self.freqs, false, self.rope), self.eps, self.quant);
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

/// Compresses `kv`, `score` (both float32 or both bfloat16 `[S, coff D]`, tokens at
/// `cfg.start ..`; bfloat16 values are widened exactly, so they give the float32 bits) into `out`
/// (float32 `[E, D]`, the entries these tokens complete) and advances `kv_state`, `score_state`
/// (float32 `[coff r, coff D]`) in place. `ape`: `[r, coff D]`; `norm_weight`: `[D]`;
/// `inv_freq`: `[R]`, `2 R <= D`. `coff` is 2 for ratio 4 and 1 otherwise. Scores may hold
/// `-inf` (a token that takes no part); any other non-finite input is an error, raised before
/// the state is touched.
///
/// On a GPU the same call runs two kernels on `stream` (cuda/compress.cu); non-finite inputs
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
    check_input_dtypes(kv, score)?;
    let kv_c = inputs(kv, &[None, Some(coff * d)])?;
    let s = kv.dim(0);
    let score_c = inputs(score, &[Some(s), Some(coff * d)])?;
    let (kv_v, score_v): (&[f32], &[f32]) = (&kv_c, &score_c);
    let kv_st = floats(kv_state, &[Some(coff * r), Some(coff * d)])?;
    let score_st = floats(score_state, &[Some(coff * r), Some(coff * d)])?;
    let n_out = entries_completed(cfg.start, s, r);
    floats(out, &[Some(n_out), Some(d)])?;
    let shared = Shared::new(norm_weight, ape, inv_freq, cfg.rope, r, coff, d)?;
    let comp = shared.compressor(r, coff, d, cfg.eps, cfg.quant, kv.name, score.name);
    let tokens = comp.tokens(kv_v, score_v, kv_st, score_st, cfg.start);
    comp.entries(&tokens, out.host_mut::<f32>(&[DType::F32])?, Placement::Compact)?;
    comp.check_replayed(kv_v, score_v, cfg.start)?;
    let kv_st = kv_state.host_mut::<f32>(&[DType::F32])?;
    let score_st = score_state.host_mut::<f32>(&[DType::F32])?;
    comp.advance(kv_v, score_v, cfg.start, kv_st, score_st);
    Ok(())
}

/// Scalars of a batched compressor call.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub ratio: usize,
    pub eps: f32,
    pub quant: Quant,
    /// How the entries' RoPE angles are computed.
    pub rope: RopeTable,
}

/// One sequence of a batch: its tokens (rows `lo .. hi` of the input) and, unless it is a
/// padding row, its slot and the position of its first token.
#[derive(Clone, Copy)]
struct BatchRow {
    lo: usize,
    hi: usize,
    live: Option<(usize, usize)>,
}

/// Prefixes `sequence b: ` to the message of an error about one sequence.
fn in_sequence(b: usize, e: Error) -> Error {
    match e {
        Error::Value { arg, msg } => Error::Value { arg, msg: format!("sequence {b}: {msg}") },
        other => other,
    }
}

/// Reads and checks `state_slots`, `starts` and `cu_tokens` (B sequences of `tokens` rows in
/// all, `slots` state slots) into the rows of the batch.
///
/// # Safety
/// The tensors satisfy [`TensorRef`]'s contract, live on the CPU and have the shapes `[B]`,
/// `[B]`, `[B + 1]`.
unsafe fn batch_rows(
    state_slots: &TensorRef,
    starts: &TensorRef,
    cu_tokens: &TensorRef,
    tokens: usize,
    slots: usize,
) -> Result<Vec<BatchRow>> {
    let b = state_slots.dim(0);
    let (sl, st, cu) = (Ids::new(state_slots)?, Ids::new(starts)?, Ids::new(cu_tokens)?);
    if cu.get(0) != 0 {
        return Err(Error::value(cu_tokens.name, format!("must start at 0, got {}", cu.get(0))));
    }
    if let Some(i) = (0..b).find(|&i| cu.get(i + 1) < cu.get(i)) {
        return Err(Error::value(
            cu_tokens.name,
            format!("must not decrease, got {} then {} at index {}", cu.get(i), cu.get(i + 1), i + 1),
        ));
    }
    if cu.get(b) != tokens as i64 {
        return Err(Error::value(cu_tokens.name, format!("must end at T = {tokens} (the rows of kv), got {}", cu.get(b))));
    }
    sl.expect_range(state_slots.name, -1, slots as i64, "a slot of state, or -1 for a padding row")?;
    let mut owner = vec![usize::MAX; slots];
    let mut rows = Vec::with_capacity(b);
    for i in 0..b {
        let (lo, hi) = (cu.get(i) as usize, cu.get(i + 1) as usize);
        let slot = sl.get(i);
        if slot < 0 {
            rows.push(BatchRow { lo, hi, live: None });
            continue;
        }
        let slot = slot as usize;
        if owner[slot] != usize::MAX {
            return Err(Error::value(
                state_slots.name,
                format!("sequences {} and {i} both use slot {slot}; live slots must be distinct", owner[slot]),
            ));
        }
        owner[slot] = i;
        let start = st.get(i);
        if start < 0 {
            return Err(Error::value(starts.name, format!("must be >= 0, got {start} for sequence {i}")));
        }
        rows.push(BatchRow { lo, hi, live: Some((slot, start as usize)) });
    }
    Ok(rows)
}

/// Compresses the tokens of `B` sequences in one call: sequence `b` holds rows
/// `cu_tokens[b] .. cu_tokens[b + 1]` of `kv`, `score` (float32 or bfloat16 `[T, coff D]`, one
/// dtype), its first token
/// sits at position `starts[b]`, and its decode state is slot `state_slots[b]` of `state`
/// (float32 `[S, 2, coff r, coff D]`: kv, then scores, as [`compress`] takes them), advanced in
/// place. `out` (float32 `[T, D]`) gets at row `t` the entry token `t` completes, as
/// [`compress`] computes it, and zeros at every other row. A slot of -1 marks a padding row:
/// its tokens give zero rows and no state is read or written. `state_slots`, `starts` and
/// `cu_tokens` are int32 or int64 (`[B]`, `[B]`, `[B + 1]`).
///
/// On the CPU, slots must be distinct and in range, `starts >= 0`, and `cu_tokens` must go from
/// 0 to `T` without decreasing; non-finite inputs are errors as in [`compress`], raised before
/// any state changes. On a GPU (two kernels on `stream`, cuda/compress.cu) nothing is checked
/// against device data: slots outside `[0, S)` count as padding, `starts` and `cu_tokens` are
/// clamped so that no access leaves the tensors, and duplicate live slots give undefined states.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `out` and `state` alias nothing else;
/// `stream` is a `CUstream` of the tensors' GPU when they live on one.
#[allow(clippy::too_many_arguments)]
pub unsafe fn compress_batch(
    kv: &TensorRef,
    score: &TensorRef,
    ape: &TensorRef,
    norm_weight: &TensorRef,
    inv_freq: &TensorRef,
    state: &TensorRef,
    state_slots: &TensorRef,
    starts: &TensorRef,
    cu_tokens: &TensorRef,
    out: &TensorRef,
    cfg: BatchConfig,
    stream: usize,
) -> Result<()> {
    let r = cfg.ratio;
    let (coff, d) = check_scalars(norm_weight, r, cfg.eps, cfg.quant)?;
    let width = coff * d;
    kv.expect_shape(&[None, Some(width)])?;
    let t = kv.dim(0);
    state_slots.expect_shape(&[None])?;
    starts.expect_shape(&[None])?;
    let b = state_slots.dim(0);
    if starts.dim(0) != b {
        return Err(Error::value(
            state_slots.name,
            format!("has {b} rows but starts has {}; both take one per sequence", starts.dim(0)),
        ));
    }
    let expected: [(&TensorRef, &[Option<usize>]); 6] = [
        (score, &[Some(t), Some(width)]),
        (ape, &[Some(r), Some(width)]),
        (norm_weight, &[Some(d)]),
        (state, &[None, Some(2), Some(coff * r), Some(width)]),
        (cu_tokens, &[Some(b + 1)]),
        (out, &[Some(t), Some(d)]),
    ];
    let device = same_device(&[kv, score, ape, norm_weight, inv_freq, state, state_slots, starts, cu_tokens, out])?;
    for (x, shape) in expected {
        x.expect_shape(shape)?;
    }
    check_input_dtypes(kv, score)?;
    for x in [ape, norm_weight, state, out] {
        x.expect_dtype(&[DType::F32])?;
    }
    for ids in [state_slots, starts, cu_tokens] {
        ids.expect_dtype(&[DType::I32, DType::I64])?;
    }
    if let Device::Cuda(dev) = device {
        check_inv_freq_gpu(inv_freq, d)?;
        let (eps, quant, rope) = (cfg.eps, cfg.quant, cfg.rope);
    let common = gpu::compress::Common { kv, score, ape, norm_weight, inv_freq, out, ratio: r, eps, quant, rope };
        let args = gpu::compress::BatchArgs { common, state, state_slots, starts, cu_tokens };
        return gpu::compress::compress_batch(dev, stream, &args);
    }
    let rows = batch_rows(state_slots, starts, cu_tokens, t, state.dim(0))?;
    let kv_c = inputs(kv, &[Some(t), Some(width)])?;
    let score_c = inputs(score, &[Some(t), Some(width)])?;
    let (kv_v, score_v): (&[f32], &[f32]) = (&kv_c, &score_c);
    let shared = Shared::new(norm_weight, ape, inv_freq, cfg.rope, r, coff, d)?;
    let comp = shared.compressor(r, coff, d, cfg.eps, cfg.quant, kv.name, score.name);

    // Split the output by sequence and the state by slot; each live sequence takes its slot.
    let per_slot = 2 * coff * r * width;
    let mut slots: Vec<Option<&mut [f32]>> = state.host_mut::<f32>(&[DType::F32])?.chunks_mut(per_slot).map(Some).collect();
    let mut rest = out.host_mut::<f32>(&[DType::F32])?;
    let mut work = Vec::with_capacity(b);
    for (i, row) in rows.iter().enumerate() {
        let (seq_out, tail) = std::mem::take(&mut rest).split_at_mut((row.hi - row.lo) * d);
        rest = tail;
        seq_out.fill(0.0);
        if let Some((slot, start)) = row.live {
            let st = slots[slot].take().expect("live slots are distinct (checked)");
            work.push((i, row.lo, row.hi, start, seq_out, st));
        }
    }

    // Entries first, for every sequence: any error leaves every state as it was.
    work.par_iter_mut().try_for_each(|(i, lo, hi, start, seq_out, st)| -> Result<()> {
        let (kv_s, score_s) = (&kv_v[*lo * width..*hi * width], &score_v[*lo * width..*hi * width]);
        let (kv_st, score_st) = st.split_at(per_slot / 2);
        let tokens = comp.tokens(kv_s, score_s, kv_st, score_st, *start);
        comp.entries(&tokens, seq_out, Placement::AtTokens).map_err(|e| in_sequence(*i, e))?;
        comp.check_replayed(kv_s, score_s, *start).map_err(|e| in_sequence(*i, e))
    })?;
    work.par_iter_mut().for_each(|(_, lo, hi, start, _, st)| {
        let (kv_s, score_s) = (&kv_v[*lo * width..*hi * width], &score_v[*lo * width..*hi * width]);
        let (kv_st, score_st) = st.split_at_mut(per_slot / 2);
        comp.advance(kv_s, score_s, *start, kv_st, score_st);
    });
    Ok(())
}
