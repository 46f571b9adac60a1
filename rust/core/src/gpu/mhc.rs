//! Launcher of cuda/mhc.cu. Shapes and dtypes are checked by the caller (`crate::mhc`).

use super::{launch, Kernel, Launch};
use crate::error::Result;
use crate::kernel_args;
use crate::tensor::TensorRef;

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` with the shapes `crate::mhc` checks;
/// `stream` belongs to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn mhc_weights(
    dev: i32, stream: usize, mix: &TensorRef, scale: &TensorRef, base: &TensorRef, pre: &TensorRef, post: &TensorRef,
    comb: &TensorRef, n: usize, iters: usize, eps: f32,
) -> Result<()> {
    let tokens = mix.dim(0) as i64;
    let (mp, sp, bp, pp, op, cp) = (mix.ptr as u64, scale.ptr as u64, base.ptr as u64, pre.ptr as u64, post.ptr as u64, comb.ptr as u64);
    let (n, iters) = (n as i32, iters.min(i32::MAX as usize) as i32);
    // A token per group of lanes (cuda/mhc.cu `group_lanes`: the next power of two >= n).
    let lanes = (n as u64).next_power_of_two();
    let blocks = (tokens as u64 * lanes).div_ceil(128) as u32;
    let cfg = Launch { grid: (blocks, 1, 1), block: (128, 1, 1), shared_bytes: 0, stream };
    launch(dev, Kernel::MhcWeights, &cfg, &mut kernel_args!(mp, sp, bp, tokens, n, iters, eps, pp, op, cp))
}
