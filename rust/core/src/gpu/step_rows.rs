//! Launcher of cuda/step_rows.cu. Shapes, dtypes and devices are checked by the caller
//! (`crate::step_rows`).

use super::{launch, Kernel, Launch};
use crate::error::Result;
use crate::kernel_args;
use crate::tensor::TensorRef;

const THREADS: usize = 256;

/// `step` is `(positions, token_seq, origins)`.
///
/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` with the shapes `crate::step_rows`
/// checks; `stream` belongs to that device.
pub unsafe fn step_rows(
    dev: i32, stream: usize, step: (&TensorRef, &TensorRef, &TensorRef), window: Option<(&TensorRef, &TensorRef)>,
    hca: Option<(&TensorRef, &TensorRef, i64)>,
) -> Result<()> {
    let (positions, token_seq, origins) = step;
    let tokens = positions.dim(0);
    let (wt, wpages, w, wo) = window.map_or((0, 0, 0, 0), |(t, o)| (t.ptr as u64, t.dim(1) as i64, o.dim(1) as i64, o.ptr as u64));
    let (ht, hpages, ratio, k, ho) =
        hca.map_or((0, 0, 1, 0, 0), |(t, o, r)| (t.ptr as u64, t.dim(1) as i64, r, o.dim(1) as i64, o.ptr as u64));
    let total = tokens * (w + k) as usize;
    if total == 0 {
        return Ok(());
    }
    let (pp, sp, op) = (positions.ptr as u64, token_seq.ptr as u64, origins.ptr as u64);
    let (t, b) = (tokens as i64, origins.dim(0) as i64);
    let cfg = Launch { grid: (total.div_ceil(THREADS) as u32, 1, 1), block: (THREADS as u32, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::StepRows, &cfg, &mut kernel_args!(pp, sp, t, b, op, wt, wpages, w, wo, ht, hpages, ratio, k, ho))
}
