//! Launchers of cuda/compress.cu: the compressor's pooling, finishing and state kernels, for one
//! sequence or a batch. Shapes and dtypes are checked by the caller (`crate::compress`).

use std::ffi::c_void;

use super::{four_wide, launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::formats::{Quant, RopeTable};
use crate::tensor::{DType, TensorRef};

const THREADS: u32 = 128;
/// Tokens a state block replays a turn (`CHUNK` in cuda/compress.cu).
const STATE_CHUNK: usize = 8;

/// Blocks that share a state column's replay of up to `tokens` tokens: without overlap each
/// chunk of the last `ratio` tokens has its own (their slots are distinct); the overlapping
/// form is one block's work. At most 65,535 (the blocks then take several chunks each).
fn state_parts(ratio: usize, overlap: bool, tokens: usize) -> u32 {
    if overlap { 1 } else { ratio.min(tokens).div_ceil(STATE_CHUNK).clamp(1, 65_535) as u32 }
}
/// The kernels for the projections' dtype: float32 (cuda/compress.cu) or bfloat16
/// (cuda/compress_bf16.cu, the same code with each input widened as it is loaded).
#[derive(Clone, Copy)]
struct Kernels {
    pool: Kernel,
    finish: Kernel,
    entry: Kernel,
    batch_pool: Kernel,
    batch_finish: Kernel,
}

impl Kernels {
    fn of(kv: &TensorRef) -> Self {
        if kv.dtype == DType::BF16 {
            Kernels {
                pool: Kernel::CompressPoolBf16,
                finish: Kernel::CompressFinishBf16,
                entry: Kernel::CompressEntryBf16,
                batch_pool: Kernel::CompressBatchPoolBf16,
                batch_finish: Kernel::CompressBatchFinishBf16,
            }
        } else {
            Kernels {
                pool: Kernel::CompressPool,
                finish: Kernel::CompressFinish,
                entry: Kernel::CompressEntry,
                batch_pool: Kernel::CompressBatchPool,
                batch_finish: Kernel::CompressBatchFinish,
            }
        }
    }
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
/// checks (kv and score both float32 or both bfloat16; float32 ape/norm/state; inv_freq float32
/// or float64); `stream` belongs to that device.
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
    // The entries first: their pooling reads the state that the state blocks overwrite (same
    // stream, in order).
    let width = if overlap { 2 * d } else { d };
    let parts = state_parts(c.ratio, overlap, tokens) as usize;
    let state_blocks = if tokens == 0 { 0 } else { width.div_ceil(THREADS as usize) * parts };
    let mut pa = parts as i32;
    let pa = &mut pa as *mut i32 as *mut c_void;
    let fused = overlap && entries >= FUSED_MIN_ENTRIES;
    let vec4 = four_wide(d, &[c.kv, c.score, c.ape, c.norm_weight, c.out, a.kv_state, a.score_state]);
    let state = States { blocks: state_blocks, free: state_free(c.ratio, overlap, a.start) };
    let k = Kernels::of(c.kv);
    if !overlap && entries >= ENTRY_MIN_ENTRIES {
        return entry_launches(dev, stream, k, c.out, (entries, state_blocks, parts), state.free, vec4, pp);
    }
    finish_launches(dev, stream, k.finish, k.pool, (entries, d), state, fused, vec4, c.out, &mut [pp, pa])
}

/// The non-overlapping form's long calls: `dsv4_compress_entry` over the entries (a block each,
/// pooled and finished there), with the state's `parts` blocks in the same launch where
/// `state_free` (no entry reads the old state), else the finish kernel's `state_blocks` (column
/// groups x parts) in a launch after it. `counts`: (entries, state_blocks, parts).
///
/// # Safety
/// As [`compress`]'s; `pp` points at the call's `Params`.
#[allow(clippy::too_many_arguments)]
unsafe fn entry_launches(
    dev: i32, stream: usize, k: Kernels, name: &TensorRef, counts: (usize, usize, usize), state_free: bool,
    vec4: bool, pp: *mut c_void,
) -> Result<()> {
    let (entries, state_blocks, parts) = counts;
    let together = if state_free && state_blocks > 0 { parts } else { 0 };
    let (mut first, mut v4) = (together as i32, vec4 as i32);
    let (fp, vp) = (&mut first as *mut i32 as *mut c_void, &mut v4 as *mut i32 as *mut c_void);
    let grid = (grid_x(name, together + entries)?, 1, 1);
    let cfg = Launch { grid, block: (ENTRY_THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, k.entry, &cfg, &mut [pp, fp, vp])?;
    if together > 0 || state_blocks == 0 {
        return Ok(());
    }
    // dsv4_compress_finish with no entry blocks: its blocks are all state blocks.
    let (mut none, mut pa, mut pool) = (0i32, parts as i32, 0i32);
    let cfg = Launch { grid: (grid_x(name, state_blocks)?, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    let (np, pap, poolp) = (&mut none as *mut i32 as *mut c_void, &mut pa as *mut i32 as *mut c_void,
                            &mut pool as *mut i32 as *mut c_void);
    launch(dev, k.finish, &cfg, &mut [pp, np, pap, poolp, vp])
}

/// Whether no entry of a call starting at `start` reads the old state: without overlap when the
/// call starts a block (its entries' tokens are all inputs), with overlap only at the sequence's
/// start (entry `i` also reads block `i - 1`, which for the call's first entry is in the state).
/// The fused form's state blocks then run in the entries' launch, not a launch of their own.
fn state_free(ratio: usize, overlap: bool, start: usize) -> bool {
    if overlap { start == 0 } else { start.is_multiple_of(ratio) }
}

/// A call's state blocks (`blocks`) and whether they may run beside its entries (`free`: see
/// `state_free`; never for a batch, whose starts are on the device).
#[derive(Clone, Copy)]
struct States {
    blocks: usize,
    free: bool,
}

/// The launches of a call after its arguments are set. Usually the pool kernel over (entry or
/// row, channel group), then `finish` over the entries (a warp each) with the state blocks after
/// them in the same launch. With `fused` (the overlapping form, many entries) `finish` pools each
/// entry itself (`pool` = 1: the pooled entry never goes through memory) and so takes the state
/// blocks in a second launch of its own (no entries), as the pooling reads the state they
/// overwrite, unless `state.free` (no entry reads the old state: the state blocks then follow the
/// entries in the same launch, a launch fewer; measured on an H200, 64K tokens of FP4 keys, 42.2
/// -> 39.0 us of kernel time). `rows.0`: the entries (rows of the batch), `rows.1`: D. `vec4`:
/// every row the finish kernel reads or writes is four-wide (`four_wide`). `extra`: the kernel's
/// arguments after `finish_blocks` and before `pool`, the first being the parameters (the pool
/// kernel's only one).
///
/// # Safety
/// As the callers'.
#[allow(clippy::too_many_arguments)]
unsafe fn finish_launches(
    dev: i32, stream: usize, finish: Kernel, pool: Kernel, rows: (usize, usize), state: States, fused: bool,
    vec4: bool, name: &TensorRef, extra: &mut [*mut c_void],
) -> Result<()> {
    let block = (THREADS, 1, 1);
    let (n, d) = rows;
    let state_blocks = state.blocks;
    let finish_blocks = n.div_ceil(FINISH_ROWS);
    let (mut pool_flag, mut vec4) = (fused as i32, vec4 as i32);
    let mut launch_finish = |blocks: usize, first: usize| -> Result<()> {
        let grid = grid_x(name, blocks)?;
        let mut fb = first as i32;
        let mut args: Vec<*mut c_void> = vec![extra[0], &mut fb as *mut i32 as *mut c_void];
        args.extend_from_slice(&extra[1..]);
        args.push(&mut pool_flag as *mut i32 as *mut c_void);
        args.push(&mut vec4 as *mut i32 as *mut c_void);
        launch(dev, finish, &Launch { grid: (grid, 1, 1), block, shared_bytes: 0, stream }, &mut args)
    };
    if fused && state.free {
        launch_finish(finish_blocks + state_blocks, finish_blocks)
    } else if fused {
        launch_finish(finish_blocks, finish_blocks)?;
        launch_finish(state_blocks, 0)
    } else {
        let groups = d.div_ceil(THREADS as usize) as u32;
        let pool_launch = Launch { grid: (grid_x(name, n)?, groups, 1), block, shared_bytes: 0, stream };
        launch(dev, pool, &pool_launch, &mut [extra[0]])?;
        launch_finish(finish_blocks + state_blocks, finish_blocks)
    }
}

/// Threads of a `dsv4_compress_entry` block (`ENTRY_THREADS` in cuda/compress.cu): a channel each.
const ENTRY_THREADS: u32 = MAX_DIM as u32;

/// Entries from which the non-overlapping form takes `dsv4_compress_entry` (a block an entry, two
/// an SM) rather than the pool and finish kernels: from about two blocks a multiprocessor of a
/// large GPU. Measured on an H100 at 65,536 tokens (512 entries): 101 against 105 us a call;
/// at 8,192 tokens (64 entries, half the multiprocessors idle) the pool kernel's 256 blocks win.
const ENTRY_MIN_ENTRIES: usize = 256;

/// Entry rows a finish block takes (a warp each; `FINISH_ROWS` in cuda/compress.cu).
const FINISH_ROWS: usize = THREADS as usize / 32;

/// Entries from which the overlapping form pools in the finish kernel (a warp an entry, its
/// channel groups one after another) rather than in the pool kernel (a thread a channel). Below
/// it too few warps are resident to keep memory busy: measured on an H200 (D = 512), 2,048
/// entries (8K tokens) took 0.042 ms fused against 0.034-0.035 through the pool kernel, and
/// 16,384 entries 0.153-0.155 fused against 0.182-0.185 before the finish took a warp an entry.
const FUSED_MIN_ENTRIES: usize = 4096;

/// A one-dimensional grid of `blocks` blocks, or an error naming `t` (what sets its size) when
/// that exceeds the grid's limit.
fn grid_x(t: &TensorRef, blocks: usize) -> Result<u32> {
    u32::try_from(blocks)
        .ok()
        .filter(|b| *b <= i32::MAX as u32)
        .ok_or_else(|| Error::value(t.name, format!("needs {blocks} blocks, more than a launch takes")))
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

/// Two launches whatever the batch (see `finish_launches`): the rows' entries (a warp a row), and
/// the states' advance over (sequence, column group, part). Nothing depends on device data, so
/// the call can be captured in a CUDA graph.
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
    let width = if overlap { 2 * d } else { d };
    let columns = width.div_ceil(THREADS as usize);
    let parts = state_parts(c.ratio, overlap, total) as usize;
    let state_blocks = batch.saturating_mul(columns * parts);
    let (mut co, mut pa) = (columns as i32, parts as i32);
    // A row completes at most one entry, one in 4 for a sequence's run of tokens.
    let fused = overlap && total / 4 >= FUSED_MIN_ENTRIES;
    let vec4 = four_wide(d, &[c.kv, c.score, c.ape, c.norm_weight, c.out, a.state]);
    let state = States { blocks: state_blocks, free: false };
    let k = Kernels::of(c.kv);
    finish_launches(dev, stream, k.batch_finish, k.batch_pool, (total, d), state, fused, vec4, a.state_slots,
                    &mut [pp, &mut co as *mut i32 as *mut c_void, &mut pa as *mut i32 as *mut c_void])
}

#[cfg(test)]
mod tests {
    use super::state_free;

    #[test]
    fn a_call_reads_no_old_state_only_from_a_block_start_or_the_sequence_start() {
        // No overlap (r = 128): the call's first entry starts at `start` only on a block start.
        assert!(state_free(128, false, 0) && state_free(128, false, 128) && state_free(128, false, 1 << 20));
        assert!(!state_free(128, false, 1) && !state_free(128, false, 255));
        // Overlap (r = 4): every entry but the sequence's first also reads the block before it.
        assert!(state_free(4, true, 0));
        assert!(!state_free(4, true, 4) && !state_free(4, true, 3) && !state_free(4, true, 4096));
    }
}
