//! Launcher of cuda/route.cu. Shapes, dtypes and devices are checked by the caller
//! (`crate::route`).

use super::{launch, Kernel, Launch};
use crate::error::Result;
use crate::kernel_args;
use crate::tensor::{DType, TensorRef};

/// Tokens a block (a warp each), or the warps of a token's block in the wide form.
const WARPS: usize = 4;

/// Calls of at most this many tokens (a decode step's) take the wide form: a block a token, its
/// warps computing the affinities together (cuda/route.cu), the same values.
pub const WIDE_MAX_TOKENS: usize = 128;

/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` with the shapes `crate::route`
/// checks; `stream` belongs to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn moe_route(
    dev: i32, stream: usize, logits: &TensorRef, bias: Option<&TensorRef>, hash: Option<(&TensorRef, &TensorRef)>,
    idx: &TensorRef, w: &TensorRef, scale: f32, norm: bool,
) -> Result<()> {
    let (tokens, experts, k) = (logits.dim(0), logits.dim(1), idx.dim(1));
    if tokens == 0 {
        return Ok(());
    }
    let (lp, lb) = (logits.ptr as u64, (logits.dtype == DType::BF16) as i32);
    let (t, e, kk) = (tokens as i64, experts as i32, k as i32);
    let bp = bias.map_or(0, |b| b.ptr as u64);
    let (tp, t64, vocab, ip, i64_) = match hash {
        Some((tab, ids)) => {
            (tab.ptr as u64, (tab.dtype == DType::I64) as i32, tab.dim(0) as i64, ids.ptr as u64, (ids.dtype == DType::I64) as i32)
        }
        None => (0, 0, 0, 0, 0),
    };
    let (normed, op, wp) = (norm as i32, idx.ptr as u64, w.ptr as u64);
    let wide = tokens <= WIDE_MAX_TOKENS;
    let (blocks, token_rows) = if wide { (tokens, 1) } else { (tokens.div_ceil(WARPS), WARPS) };
    let cfg = Launch {
        grid: (blocks as u32, 1, 1),
        block: (32 * WARPS as u32, 1, 1),
        shared_bytes: (token_rows * 2 * experts * 4) as u32,
        stream,
    };
    let wide = wide as i32;
    launch(dev, Kernel::MoeRoute, &cfg, &mut kernel_args!(lp, lb, t, e, kk, bp, tp, t64, vocab, ip, i64_, scale, normed, op, wp, wide))
}
