//! Launcher of cuda/gemv.cu. Shapes, dtypes and alignment are checked by the caller (`crate::gemv`).

use super::{is_bf16, launch, Kernel, Launch};
use crate::error::Result;
use crate::kernel_args;
use crate::tensor::TensorRef;

/// Warps a block (cuda/gemv.cu `WARPS`): `WARPS / split` weight rows.
const WARPS: usize = 8;

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` (x `[rows, k]`, w `[n, k]`, y
/// `[rows, n]`, x and w 16-byte aligned, `k` a multiple of 8, `split` 1, 2, 4 or 8); `stream`
/// belongs to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn linear_rows(
    dev: i32, stream: usize, x: &TensorRef, w: &TensorRef, y: &TensorRef, rows: usize, n: usize, k: usize, split: usize,
) -> Result<()> {
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let (xp, xb, wp, wb, yp, yb) = (x.ptr as u64, is_bf16(x), w.ptr as u64, is_bf16(w), y.ptr as u64, is_bf16(y));
    debug_assert!(matches!(split, 1 | 2 | 4 | 8), "split {split}: 1, 2, 4 or 8");
    let (r, nn, kk, s) = (rows as i32, n as i32, k as i32, split as i32);
    let cfg = Launch { grid: (n.div_ceil(WARPS / split) as u32, 1, 1), block: (32 * WARPS as u32, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::GemvRows, &cfg, &mut kernel_args!(xp, xb, wp, wb, r, nn, kk, s, yp, yb))
}
