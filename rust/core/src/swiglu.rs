//! Clamped SwiGLU (docs/model.md section 7): `h = silu(min(g, l)) * clamp(u, -l, l)` with
//! `silu(x) = x / (1 + e^-x)`, in float32, rounded once to the output's dtype (cuda/swiglu.cu is
//! the GPU form: the same float32 operations; the CPU's `exp` may round differently by an ulp).

use crate::error::{Error, Result};
use crate::gpu;
use crate::rows::{fill_rows, Floats};
use crate::tensor::{same_device, DType, Device, TensorRef};

/// One value.
pub fn value(g: f32, u: f32, limit: f32) -> f32 {
    let g = if g > limit { limit } else { g };
    let u = if u > limit {
        limit
    } else if u < -limit {
        -limit
    } else {
        u
    };
    g / (1.0 + (-g).exp()) * u
}

/// `out = silu(min(gate, limit)) * clamp(up, -limit, limit)`, element by element: `gate`, `up`
/// and `out` float32/bfloat16 of one shape, `limit > 0` (infinity: no clamp). On a GPU the call
/// runs on `stream` and non-finite values propagate; on the CPU they raise.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `out` aliases nothing; `stream` is a
/// `CUstream` of the tensors' GPU when they live on one.
pub unsafe fn swiglu(gate: &TensorRef, up: &TensorRef, out: &TensorRef, limit: f32, stream: usize) -> Result<()> {
    for t in [gate, up, out] {
        t.expect_dtype(&[DType::F32, DType::BF16])?;
    }
    let want: Vec<Option<usize>> = gate.shape.iter().map(|s| Some(*s)).collect();
    up.expect_shape(&want)?;
    out.expect_shape(&want)?;
    if limit.is_nan() || limit <= 0.0 {
        return Err(Error::value("limit", format!("must be > 0, got {limit}")));
    }
    let n = gate.numel();
    match same_device(&[gate, up, out])? {
        Device::Cuda(dev) => gpu::swiglu::swiglu(dev, stream, gate, up, out, n, limit),
        Device::Cpu => {
            let (g, u) = (Floats::new(gate)?, Floats::new(up)?);
            // Rows of the last dimension (a 0-d tensor: one value).
            let width = gate.shape.last().copied().unwrap_or(1);
            fill_rows(out, width, |r, o| {
                let (mut gv, mut uv) = (vec![0f32; width], vec![0f32; width]);
                g.read(r * width, &mut gv);
                u.read(r * width, &mut uv);
                for ((o, g), u) in o.iter_mut().zip(&gv).zip(&uv) {
                    *o = value(*g, *u, limit);
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_then_gates() {
        assert_eq!(value(0.0, 5.0, 10.0), 0.0);
        assert_eq!(value(100.0, 1.0, 10.0), value(10.0, 1.0, 10.0));
        assert_eq!(value(1.0, -100.0, 10.0), value(1.0, -10.0, 10.0));
        assert!(value(f32::NAN, 1.0, 10.0).is_nan() && value(1.0, f32::NAN, 10.0).is_nan());
        assert_eq!(value(2.0, 3.0, f32::INFINITY), 2.0 / (1.0 + (-2.0f32).exp()) * 3.0);
    }
}
