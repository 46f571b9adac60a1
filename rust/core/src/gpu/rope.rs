//! Launcher of cuda/rope.cu. Shapes and dtypes are checked by the caller (`crate::rope`).

use super::{launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::formats::RopeTable;
use crate::kernel_args;
use crate::tensor::{DType, TensorRef};

const THREADS: u32 = 256;
/// Values a thread (`VALUES` in cuda/rope.cu).
const VALUES: usize = 8;

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
    let blocks = n.div_ceil(THREADS as usize * VALUES);
    if blocks > i32::MAX as usize || dim > i32::MAX as usize {
        return Err(Error::value(x.name, format!("{n} values are more than one launch takes")));
    }
    let (xp, xb, pp, p64) = (x.ptr as u64, (x.dtype == DType::BF16) as i32, positions.ptr as u64, (positions.dtype == DType::I64) as i32);
    let (fp, mode, pairs) = (inv_freq.ptr as u64, table.kernel_mode(inv_freq), inv_freq.numel() as i32);
    let (nn, d, per_token, inv, op) = (n as i64, dim as i32, (n / t) as i64, inverse as i32, out.ptr as u64);
    let cfg = Launch { grid: (blocks as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::Rope, &cfg, &mut kernel_args!(xp, xb, pp, p64, fp, mode, pairs, nn, d, per_token, inv, op))
}
