//! Launchers of cuda/compress.cu: the compressor's pooling, finishing and state kernels, for one
//! sequence or a batch. Shapes and dtypes are checked by the caller (`crate::compress`).

use std::ffi::c_void;

use super::{launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::formats::{Quant, RopeTable};
use crate::tensor::{DType, TensorRef};

const THREADS: u32 = 128;
/// Tokens a state-kernel block replays a turn (`CHUNK` in cuda/compress.cu).
const STATE_CHUNK: usize = 8;

/// Blocks that share a state column's replay of up to `tokens` tokens: without overlap each
/// chunk of the last `ratio` tokens has its own (their slots are distinct); the overlapping
/// form is one block's work. At most 65,535 (the grid's z limit; the blocks then take several
/// chunks each).
fn state_parts(ratio: usize, overlap: bool, tokens: usize) -> u32 {
    if overlap { 1 } else { ratio.min(tokens).div_ceil(STATE_CHUNK).clamp(1, 65_535) as u32 }
}
/// Widest entry the pooling kernel holds in shared memory.
pub const MAX_DIM: usize = 512;

/// Mirror of `Params` in cuda/compress.cu (same field order and C layout); both sides check its
/// size and a few offsets at compile time.
#[repr(C)]
struct Params {
    kv: u64,
    score: u64,
    ape: u64,
    norm_weight: u64,
    inv_freq: u64,
    rope_mode: i32,
    rope_pairs: i32,
    kv_state: u64,
    score_state: u64,
    out: u64,
    start: i64,
    tokens: i32,
    ratio: i32,
    overlap: i32,
    dim: i32,
    eps: f32,
    quant: Quant,
}
const _: () = assert!(std::mem::size_of::<Params>() == 104);
const _: () = assert!(std::mem::offset_of!(Params, start) == 72 && std::mem::offset_of!(Params, quant) == 100);

/// What both forms of the call share, already validated: the inputs, the learned parameters,
/// the output and the scalars.
#[derive(Clone, Copy)]
pub struct Common<'a> {
    pub kv: &'a TensorRef,
    pub score: &'a TensorRef,
    pub ape: &'a TensorRef,
    pub norm_weight: &'a TensorRef,
    pub inv_freq: &'a TensorRef,
    pub out: &'a TensorRef,
    pub ratio: usize,
    pub eps: f32,
    pub quant: Quant,
    pub rope: RopeTable,
}

impl Common<'_> {
    /// The kernels' parameters of these (the per-call fields zero), once the GPU's limit on the
    /// entry width `D` is checked.
    fn params(&self) -> Result<Params> {
        let d = self.norm_weight.dim(0);
        if d > MAX_DIM || (self.quant == Quant::Fp8 && d != 512) {
            return Err(Error::value(self.norm_weight.name, format!("the GPU compressor takes D <= {MAX_DIM}, got {d}")));
        }
        Ok(Params {
            kv: self.kv.ptr as u64,
            score: self.score.ptr as u64,
            ape: self.ape.ptr as u64,
            norm_weight: self.norm_weight.ptr as u64,
            inv_freq: self.inv_freq.ptr as u64,
            rope_mode: self.rope.kernel_mode(self.inv_freq),
            rope_pairs: self.inv_freq.numel() as i32,
            kv_state: 0,
            score_state: 0,
            out: self.out.ptr as u64,
            start: 0,
            tokens: 0,
            ratio: self.ratio as i32,
            overlap: (self.ratio == 4) as i32,
            dim: d as i32,
            eps: self.eps,
            quant: self.quant,
        })
    }
}

/// One sequence's call: the shared part, its states and the position of its first token.
pub struct CompressArgs<'a> {
    pub common: Common<'a>,
    pub kv_state: &'a TensorRef,
    pub score_state: &'a TensorRef,
    pub start: usize,
}

/// # Safety
/// Every tensor satisfies `TensorRef`'s contract on device `dev` with the shapes `crate::compress`
/// checks (float32 kv/score/ape/norm/state, inv_freq float32 or float64); `stream` belongs to
/// that device.
pub unsafe fn compress(dev: i32, stream: usize, a: &CompressArgs) -> Result<()> {
    let c = &a.common;
    let (d, tokens, entries, overlap) = (c.norm_weight.dim(0), c.kv.dim(0), c.out.dim(0), c.ratio == 4);
    let mut p = Params {
        kv_state: a.kv_state.ptr as u64,
        score_state: a.score_state.ptr as u64,
        start: a.start as i64,
        tokens: tokens as i32,
        ..c.params()?
    };
    let pp = &mut p as *mut Params as *mut c_void;
    // Pool first: it reads the state the update below overwrites (same stream, in order).
    let groups = d.div_ceil(THREADS as usize) as u32;
    let pool = Launch { grid: (entries as u32, groups, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::CompressPool, &pool, &mut [pp])?;
    let finish = Launch { grid: (entries as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::CompressFinish, &finish, &mut [pp])?;
    let width = if overlap { 2 * d } else { d };
    let state = Launch {
        grid: (if tokens == 0 { 0 } else { width.div_ceil(THREADS as usize) as u32 }, 1, state_parts(c.ratio, overlap, tokens)),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
        stream,
    };
    launch(dev, Kernel::CompressState, &state, &mut [pp])
}

/// Mirror of `BatchParams` in cuda/compress.cu (same field order and C layout); both sides check
/// its size and a few offsets at compile time.
#[repr(C)]
struct BatchParams {
    base: Params,
    state: u64,
    state_slots: u64,
    starts: u64,
    cu_tokens: u64,
    slots: i64,
    total: i64,
    batch: i32,
    slots64: i32,
    starts64: i32,
    cu64: i32,
}
const _: () = assert!(std::mem::size_of::<BatchParams>() == 168);
const _: () = assert!(
    std::mem::offset_of!(BatchParams, state) == 104
        && std::mem::offset_of!(BatchParams, total) == 144
        && std::mem::offset_of!(BatchParams, cu64) == 164
);

/// A batched call: the shared part, the states and the batch's layout.
pub struct BatchArgs<'a> {
    pub common: Common<'a>,
    pub state: &'a TensorRef,
    pub state_slots: &'a TensorRef,
    pub starts: &'a TensorRef,
    pub cu_tokens: &'a TensorRef,
}

/// Three launches whatever the batch: pool over (row, channel group), finish over rows, state
/// over (sequence, column group). Nothing depends on device data, so the call can be captured
/// in a CUDA graph.
///
/// # Safety
/// Every tensor satisfies `TensorRef`'s contract on device `dev` with the shapes
/// `crate::compress::compress_batch` checks; `stream` belongs to that device.
pub unsafe fn compress_batch(dev: i32, stream: usize, a: &BatchArgs) -> Result<()> {
    let c = &a.common;
    let base = c.params()?;
    let (d, total, batch, overlap) = (c.norm_weight.dim(0), c.kv.dim(0), a.state_slots.dim(0), c.ratio == 4);
    if total > i32::MAX as usize {
        return Err(Error::value(c.kv.name, format!("the GPU compressor takes at most {} rows, got {total}", i32::MAX)));
    }
    if batch > i32::MAX as usize - 1 {
        return Err(Error::value(a.state_slots.name, format!("too many sequences: {batch}")));
    }
    let is64 = |t: &TensorRef| (t.dtype == DType::I64) as i32;
    let mut p = BatchParams {
        base,
        state: a.state.ptr as u64,
        state_slots: a.state_slots.ptr as u64,
        starts: a.starts.ptr as u64,
        cu_tokens: a.cu_tokens.ptr as u64,
        slots: a.state.dim(0) as i64,
        total: total as i64,
        batch: batch as i32,
        slots64: is64(a.state_slots),
        starts64: is64(a.starts),
        cu64: is64(a.cu_tokens),
    };
    let pp = &mut p as *mut BatchParams as *mut c_void;
    // Pool first: it reads the states the last kernel overwrites (same stream, in order).
    let groups = d.div_ceil(THREADS as usize) as u32;
    let pool = Launch { grid: (total as u32, groups, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::CompressBatchPool, &pool, &mut [pp])?;
    let finish = Launch { grid: (total as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::CompressBatchFinish, &finish, &mut [pp])?;
    let width = if overlap { 2 * d } else { d };
    let columns = width.div_ceil(THREADS as usize) as u32;
    let parts = state_parts(c.ratio, overlap, total);
    let state = Launch { grid: (batch as u32, columns, parts), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::CompressBatchState, &state, &mut [pp])
}
