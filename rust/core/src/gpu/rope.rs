//! Launcher of cuda/rope.cu. Shapes and dtypes are checked by the caller (`crate::rope`).

use super::{four_wide, is_bf16, launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::formats::RopeTable;
use crate::kernel_args;
use crate::tensor::{DType, TensorRef};

const THREADS: u32 = 256;
/// Values a thread of `dsv4_rope` (cuda/rope.cu).
const VALUES: usize = 8;
/// Fewest blocks of `dsv4_rope` a call takes; a smaller one takes `dsv4_rope_one`, a value a
/// thread: there each thread's chain of 8 double-precision angles is the time (a decode step's
/// 64 indexer heads, 8,192 values, are 4 blocks of `dsv4_rope`).
const MIN_BLOCKS: usize = 132;

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` (x float32/bfloat16 `[T, ..., D]`,
/// positions int32/int64 `[T]`, inv_freq float32/float64 `[R]` with `2 R <= D`, out float32
/// shaped as x); `stream` belongs to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rope(
    dev: i32,
    stream: usize,
    x: &TensorRef,
    positions: &TensorRef,
    inv_freq: &TensorRef,
    out: &TensorRef,
    inverse: bool,
    table: RopeTable,
) -> Result<()> {
    let (n, t, dim) = (x.numel(), x.dim(0), x.shape[x.shape.len() - 1]);
    if n == 0 {
        return Ok(());
    }
    let (kernel, values) = if n.div_ceil(THREADS as usize * VALUES) < MIN_BLOCKS { (Kernel::RopeOne, 1) } else { (Kernel::Rope, VALUES) };
    let blocks = n.div_ceil(THREADS as usize * values);
    if blocks > i32::MAX as usize || dim > i32::MAX as usize {
        return Err(Error::value(x.name, format!("{n} values are more than one launch takes")));
    }
    let (xp, xb, pp, p64) = (x.ptr as u64, (x.dtype == DType::BF16) as i32, positions.ptr as u64, (positions.dtype == DType::I64) as i32);
    let (fp, mode, pairs) = (inv_freq.ptr as u64, table.kernel_mode(inv_freq), inv_freq.numel() as i32);
    let (nn, d, per_token, inv, op) = (n as i64, dim as i32, (n / t) as i64, inverse as i32, out.ptr as u64);
    let cfg = Launch { grid: (blocks as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, kernel, &cfg, &mut kernel_args!(xp, xb, pp, p64, fp, mode, pairs, nn, d, per_token, inv, op))
}

/// Most values a row of [`rms_norm_rope`] holds (cuda/rope.cu `NORM_ROPE_ROW_MAX`).
pub const NORM_ROPE_ROW_MAX: usize = 512;

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` (x float32/bfloat16 `[T, ..., D]`, its
/// rows `x.row_stride` apart; weight float32/bfloat16 `[D]`, positions int32/int64 `[T]`,
/// inv_freq float32/float64 `[R]` with `2 R <= D`, out float32 shaped as x, contiguous); `stream`
/// belongs to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rms_norm_rope(
    dev: i32,
    stream: usize,
    x: &TensorRef,
    weight: Option<&TensorRef>,
    eps: f32,
    round_bf16: bool,
    positions: &TensorRef,
    inv_freq: &TensorRef,
    out: &TensorRef,
    table: RopeTable,
) -> Result<()> {
    let (n, t, dim) = (x.numel(), x.dim(0), x.shape[x.shape.len() - 1]);
    let mut rowed = vec![x];
    rowed.extend(weight);
    // The norm's arithmetic for a row of a warp, four values a load (cuda/norm.cu, lanes = 32).
    if dim > NORM_ROPE_ROW_MAX || !four_wide(dim, &rowed) || !out.ptr.is_multiple_of(16) {
        let msg = format!("rows of {dim} values (at most {NORM_ROPE_ROW_MAX}, a multiple of 4, four-value aligned) for one kernel");
        return Err(Error::value(x.name, msg));
    }
    if n == 0 {
        return Ok(());
    }
    let rows = n / dim;
    let blocks = rows.div_ceil(4);
    if blocks > i32::MAX as usize {
        return Err(Error::value(x.name, format!("{rows} rows are more than one launch takes")));
    }
    let (wp, wk) = match weight {
        Some(w) => (w.ptr as u64, 1 + is_bf16(w)),
        None => (0u64, 0),
    };
    let (xp, xb, xs, r, d, rb) = (x.ptr as u64, is_bf16(x), x.row_stride as i64, rows as i64, dim as i32, round_bf16 as i32);
    let (pp, p64) = (positions.ptr as u64, (positions.dtype == DType::I64) as i32);
    let (fp, mode, pairs) = (inv_freq.ptr as u64, table.kernel_mode(inv_freq), inv_freq.numel() as i32);
    let (per_token, op) = ((rows / t) as i64, out.ptr as u64);
    let cfg = Launch { grid: (blocks as u32, 1, 1), block: (128, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::RmsNormRope, &cfg, &mut kernel_args!(xp, xb, xs, wp, wk, r, d, eps, rb, pp, p64, fp, mode, pairs, per_token, op))
}
