//! Launcher of cuda/norm.cu. Shapes and dtypes are checked by the caller (`crate::norm`).

use super::mhc::four_wide;
use super::{launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::kernel_args;
use crate::tensor::{DType, TensorRef};

const THREADS: usize = 256;
/// Rows at least this long take a block each; shorter ones a warp.
const BLOCK_ROW: usize = 2048;

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` (x float32/bfloat16 `[rows * dim]`,
/// weight float32/bfloat16 `[dim]`, out float32/bfloat16 shaped as x); `stream` belongs to that
/// device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rms_norm(
    dev: i32, stream: usize, x: &TensorRef, weight: Option<&TensorRef>, out: &TensorRef, rows: usize, dim: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let lanes = if dim >= BLOCK_ROW { THREADS } else { 32 };
    let blocks = rows.div_ceil(THREADS / lanes);
    if blocks > i32::MAX as usize {
        return Err(Error::value(x.name, format!("{rows} rows are more than one launch takes")));
    }
    let mut rowed = vec![x, out];
    rowed.extend(weight);
    let vec4 = four_wide(dim, &rowed) as i32;
    let bf16 = |t: &TensorRef| (t.dtype == DType::BF16) as i32;
    let (wp, wk) = match weight {
        Some(w) => (w.ptr as u64, 1 + bf16(w)),
        None => (0u64, 0),
    };
    let (xp, xb, yp, yb, r, d, l) = (x.ptr as u64, bf16(x), out.ptr as u64, bf16(out), rows as i64, dim as i32, lanes as i32);
    let cfg = Launch { grid: (blocks as u32, 1, 1), block: (THREADS as u32, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::RmsNorm, &cfg, &mut kernel_args!(xp, xb, wp, wk, yp, yb, r, d, l, vec4, eps))
}
