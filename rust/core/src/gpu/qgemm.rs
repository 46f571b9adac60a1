//! Launchers of cuda/qgemm.cu: the block-scaled FP8 / MXFP4 linear (W8A8 or bf16 activations) and
//! the fused MoE (plan, gate-up GEMM with clamped SwiGLU, down GEMM, combine). Shapes and dtypes
//! are checked by the caller (`crate::qgemm`).

use crate::error::{Error, Result};
use crate::tensor::TensorRef;

/// A weight as stored: FP8 e4m3 `[R, K]` codes with float32 scales `[ceil(R/128), ceil(K/128)]`,
/// or MXFP4 `[R, K/2]` bytes (low nibble first) with UE8M0 codes `[R, K/32]`. For experts the
/// leading dimension is `E` (`[E, N, ...]`), the rows of expert `e` being `e N .. (e + 1) N`.
pub struct Weights<'a> {
    pub data: &'a TensorRef,
    pub scale: &'a TensorRef,
    pub fp4: bool,
}

/// Bytes of device workspace [`moe`] needs for `pairs = T k` (token, choice) pairs.
pub fn moe_workspace_bytes(pairs: usize, experts: usize, inter: usize, dim: usize) -> usize {
    let _ = (pairs, experts, inter, dim);
    0
}

/// `out = A(x) W^T` per group (see `crate::qgemm::linear`).
///
/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` with the shapes `crate::qgemm` checks;
/// `stream` belongs to that device.
pub unsafe fn linear(
    dev: i32, stream: usize, x: &TensorRef, w: &Weights, groups: usize, act_fp8: bool, out: &TensorRef,
) -> Result<()> {
    let _ = (dev, stream, x, w, groups, act_fp8, out);
    Err(Error::value("weight", "the GPU quantized linear is not built yet"))
}

/// The routed experts of `x` (see `crate::qgemm::moe`).
///
/// # Safety
/// As [`linear`]; `workspace` is a uint8 tensor of at least [`moe_workspace_bytes`] bytes.
#[allow(clippy::too_many_arguments)]
pub unsafe fn moe(
    dev: i32, stream: usize, x: &TensorRef, idx: &TensorRef, weights: &TensorRef, gate_up: &Weights, down: &Weights,
    limit: f32, act_fp8: bool, workspace: &TensorRef, out: &TensorRef,
) -> Result<()> {
    let _ = (dev, stream, x, idx, weights, gate_up, down, limit, act_fp8, workspace, out);
    Err(Error::value("gate_up", "the GPU fused MoE is not built yet"))
}
