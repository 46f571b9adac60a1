//! Launcher of cuda/swiglu.cu. Shapes and dtypes are checked by the caller (`crate::swiglu`).

use super::{four_wide, is_bf16, launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::kernel_args;
use crate::tensor::TensorRef;

const THREADS: usize = 256;

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` (`gate`, `up` and `out` of `n` values
/// each); `stream` belongs to that device.
pub unsafe fn swiglu(
    dev: i32, stream: usize, gate: &TensorRef, up: &TensorRef, out: &TensorRef, n: usize, limit: f32,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let vec4 = four_wide(n, &[gate, up, out]);
    let per = if vec4 { 4 } else { 1 };
    let blocks = n.div_ceil(per * THREADS);
    if blocks > i32::MAX as usize {
        return Err(Error::value(gate.name, format!("{n} values are more than one launch takes")));
    }
    let (gp, gb, up_, ub, op, ob) = (gate.ptr as u64, is_bf16(gate), up.ptr as u64, is_bf16(up), out.ptr as u64, is_bf16(out));
    let (nn, v4) = (n as i64, vec4 as i32);
    let cfg = Launch { grid: (blocks as u32, 1, 1), block: (THREADS as u32, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::Swiglu, &cfg, &mut kernel_args!(gp, gb, up_, ub, op, ob, nn, limit, v4))
}
