//! Launcher of cuda/sample.cu. Shapes and dtypes are checked by the caller (`crate::sample`).

use super::{launch, Kernel, Launch};
use crate::error::Result;
use crate::kernel_args;
use crate::tensor::TensorRef;

const THREADS: u32 = 512;

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` with the shapes `crate::sample`
/// checks; `stream` belongs to that device.
pub unsafe fn sample_gumbel(
    dev: i32, stream: usize, logits: &TensorRef, temperature: &TensorRef, seeds: &TensorRef, steps: &TensorRef,
    out: &TensorRef,
) -> Result<()> {
    let (rows, vocab) = (logits.dim(0), logits.dim(1));
    if rows == 0 {
        return Ok(());
    }
    let (lp, stride, v) = (logits.ptr as u64, vocab as i64, vocab as i32);
    let (tp, sp, pp, op) = (temperature.ptr as u64, seeds.ptr as u64, steps.ptr as u64, out.ptr as u64);
    let cfg = Launch { grid: (rows as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::SampleGumbel, &cfg, &mut kernel_args!(lp, stride, v, tp, sp, pp, op))
}
