//! Launcher of cuda/swiglu.cu. Shapes and dtypes are checked by the caller (`crate::swiglu`).

use super::{four_wide, is_bf16, launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::kernel_args;
use crate::tensor::TensorRef;

const THREADS: usize = 256;

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` (`gate`, `up` and `out` of `n` values
/// each, one shape; `gate`'s and `up`'s rows at their row strides, `out` contiguous); `stream`
/// belongs to that device.
pub unsafe fn swiglu(
    dev: i32, stream: usize, gate: &TensorRef, up: &TensorRef, out: &TensorRef, n: usize, limit: f32,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    // Contiguous inputs are one row (any length takes four values a thread).
    let (width, gs, us) = if gate.is_dense() && up.is_dense() {
        (n, n, n)
    } else {
        (gate.shape.last().copied().unwrap_or(1), gate.row_stride, up.row_stride)
    };
    let vec4 = four_wide(width, &[gate, up, out]); // the row strides too, where the rows are not adjacent
    let per = if vec4 { 4 } else { 1 };
    let blocks = n.div_ceil(per * THREADS);
    if blocks > i32::MAX as usize {
        return Err(Error::value(gate.name, format!("{n} values are more than one launch takes")));
    }
    let (gp, gb, gs, up_, ub, us) = (gate.ptr as u64, is_bf16(gate), gs as i64, up.ptr as u64, is_bf16(up), us as i64);
    let (op, ob, nn, w, v4) = (out.ptr as u64, is_bf16(out), n as i64, width as i64, vec4 as i32);
    let cfg = Launch { grid: (blocks as u32, 1, 1), block: (THREADS as u32, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::Swiglu, &cfg, &mut kernel_args!(gp, gb, gs, up_, ub, us, op, ob, nn, w, limit, v4))
}
