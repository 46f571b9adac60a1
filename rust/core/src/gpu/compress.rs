//! Launchers of cuda/compress.cu: the compressor's pooling, finishing and state kernels, for one
//! sequence or a batch. Shapes and dtypes are checked by the caller (`crate::compress`).

use std::ffi::c_void;

use super::{launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::formats::Quant;
use crate::tensor::{DType, TensorRef};

const THREADS: u32 = 128;
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
    inv_freq64: i32,
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

/// Tensors and scalars of one call, already validated.
pub struct CompressArgs<'a> {
    pub kv: &'a TensorRef,
    pub score: &'a TensorRef,
    pub ape: &'a TensorRef,
    pub norm_weight: &'a TensorRef,
    pub inv_freq: &'a TensorRef,
    pub kv_state: &'a TensorRef,
    pub score_state: &'a TensorRef,
    pub out: &'a TensorRef,
    pub start: usize,
    pub ratio: usize,
    pub eps: f32,
    pub quant: Quant,
}

/// # Safety
/// Every tensor satisfies `TensorRef`'s contract on device `dev` with the shapes `crate::compress`
/// checks (float32 kv/score/ape/norm/state, inv_freq float32 or float64); `stream` belongs to
/// that device.
pub unsafe fn compress(dev: i32, stream: usize, a: &CompressArgs) -> Result<()> {
    let d = a.norm_weight.dim(0);
    if d > MAX_DIM || (a.quant == Quant::Fp8 && d != 512) {
        return Err(Error::value(a.norm_weight.name, format!("the GPU compressor takes D <= {MAX_DIM}, got {d}")));
    }
    let (tokens, entries) = (a.kv.dim(0), a.out.dim(0));
    let overlap = a.ratio == 4;
    let mut p = Params {
        kv: a.kv.ptr as u64,
        score: a.score.ptr as u64,
        ape: a.ape.ptr as u64,
        norm_weight: a.norm_weight.ptr as u64,
        inv_freq: a.inv_freq.ptr as u64,
        inv_freq64: (a.inv_freq.dtype == DType::F64) as i32,
        rope_pairs: a.inv_freq.numel() as i32,
        kv_state: a.kv_state.ptr as u64,
        score_state: a.score_state.ptr as u64,
        out: a.out.ptr as u64,
        start: a.start as i64,
        tokens: tokens as i32,
        ratio: a.ratio as i32,
        overlap: overlap as i32,
        dim: d as i32,
        eps: a.eps,
        quant: a.quant,
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
        grid: (if tokens == 0 { 0 } else { width.div_ceil(THREADS as usize) as u32 }, 1, 1),
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

/// Tensors and scalars of one batched call, already validated.
pub struct BatchArgs<'a> {
    pub kv: &'a TensorRef,
    pub score: &'a TensorRef,
    pub ape: &'a TensorRef,
    pub norm_weight: &'a TensorRef,
    pub inv_freq: &'a TensorRef,
    pub state: &'a TensorRef,
    pub state_slots: &'a TensorRef,
    pub starts: &'a TensorRef,
    pub cu_tokens: &'a TensorRef,
    pub out: &'a TensorRef,
    pub ratio: usize,
    pub eps: f32,
    pub quant: Quant,
}

/// Three launches whatever the batch: pool over (row, channel group), finish over rows, state
/// over (sequence, column group). Nothing depends on device data, so the call can be captured
/// in a CUDA graph.
///
/// # Safety
/// Every tensor satisfies `TensorRef`'s contract on device `dev` with the shapes
/// `crate::compress::compress_batch` checks; `stream` belongs to that device.
pub unsafe fn compress_batch(dev: i32, stream: usize, a: &BatchArgs) -> Result<()> {
    let d = a.norm_weight.dim(0);
    if d > MAX_DIM || (a.quant == Quant::Fp8 && d != 512) {
        return Err(Error::value(a.norm_weight.name, format!("the GPU compressor takes D <= {MAX_DIM}, got {d}")));
    }
    let (total, batch) = (a.kv.dim(0), a.state_slots.dim(0));
    if total > i32::MAX as usize {
        return Err(Error::value(a.kv.name, format!("the GPU compressor takes at most {} rows, got {total}", i32::MAX)));
    }
    if batch > i32::MAX as usize - 1 {
        return Err(Error::value(a.state_slots.name, format!("too many sequences: {batch}")));
    }
    let overlap = a.ratio == 4;
    let is64 = |t: &TensorRef| (t.dtype == DType::I64) as i32;
    let mut p = BatchParams {
        base: Params {
            kv: a.kv.ptr as u64,
            score: a.score.ptr as u64,
            ape: a.ape.ptr as u64,
            norm_weight: a.norm_weight.ptr as u64,
            inv_freq: a.inv_freq.ptr as u64,
            inv_freq64: (a.inv_freq.dtype == DType::F64) as i32,
            rope_pairs: a.inv_freq.numel() as i32,
            kv_state: 0,
            score_state: 0,
            out: a.out.ptr as u64,
            start: 0,
            tokens: 0,
            ratio: a.ratio as i32,
            overlap: overlap as i32,
            dim: d as i32,
            eps: a.eps,
            quant: a.quant,
        },
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
    let state = Launch { grid: (batch as u32, columns, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::CompressBatchState, &state, &mut [pp])
}
