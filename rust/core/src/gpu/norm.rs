//! Launcher of cuda/norm.cu. Shapes and dtypes are checked by the caller (`crate::norm`).

use super::{four_wide, is_bf16, launch, Kernel, Launch};
use crate::error::{Error, Result};
use crate::kernel_args;
use crate::tensor::TensorRef;

/// Threads a block holds at least (rows shorter than that share a block).
const MIN_BLOCK: usize = 256;
/// Threads a row takes at most (cuda/norm.cu MAX_LANES).
const MAX_LANES: usize = 1024;
/// Values a thread reads, as the row's length sets the threads (cuda/norm.cu keeps up to 32 in
/// registers): few enough that a row costs about one memory latency.
const VALUES_PER_LANE: usize = 16;

/// Threads a row of `dim` values takes: a power of two, 32 (a warp) to [`MAX_LANES`].
pub fn lanes(dim: usize) -> usize {
    dim.div_ceil(VALUES_PER_LANE).next_power_of_two().clamp(32, MAX_LANES)
}

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` (x float32/bfloat16, `rows` rows of
/// `dim` values `x.row_stride` apart; weight float32/bfloat16 `[dim]`; out float32/bfloat16 shaped
/// as x, contiguous); `stream` belongs to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rms_norm(
    dev: i32, stream: usize, x: &TensorRef, weight: Option<&TensorRef>, out: &TensorRef, rows: usize, dim: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let lanes = lanes(dim);
    let threads = lanes.max(MIN_BLOCK);
    let blocks = rows.div_ceil(threads / lanes);
    if blocks > i32::MAX as usize {
        return Err(Error::value(x.name, format!("{rows} rows are more than one launch takes")));
    }
    let mut rowed = vec![x, out];
    rowed.extend(weight);
    let vec4 = four_wide(dim, &rowed) as i32;
    let (wp, wk) = match weight {
        Some(w) => (w.ptr as u64, 1 + is_bf16(w)),
        None => (0u64, 0),
    };
    let (xp, xb, xs, yp, yb) = (x.ptr as u64, is_bf16(x), x.row_stride as i64, out.ptr as u64, is_bf16(out));
    let (r, d, l) = (rows as i64, dim as i32, lanes as i32);
    let cfg = Launch { grid: (blocks as u32, 1, 1), block: (threads as u32, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::RmsNorm, &cfg, &mut kernel_args!(xp, xb, xs, wp, wk, yp, yb, r, d, l, vec4, eps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_follow_the_row() {
        // The model's rows: a query head (512), the compressed query (1024), the hidden state
        // (4096), the mHC input (4 x 4096).
        assert_eq!([7, 512, 1024, 4096, 16384, 1 << 20].map(lanes), [32, 32, 64, 256, 1024, 1024]);
    }
}
