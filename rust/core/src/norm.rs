//! RMSNorm over the last dim (docs/model.md section 2): `y = (x * rsqrt(mean(x^2) + eps)) * w`
//! in float32, rounded once to the output's dtype. The input and output may each be float32 or
//! bfloat16, so the casts the model puts around a norm are part of the one call. The GPU form is
//! cuda/norm.cu, with the same math (the sum of squares in its own order and precision).

use crate::error::{Error, Result};
use crate::gpu;
use crate::rows::{fill_rows, Floats};
use crate::tensor::{same_device, DType, Device, TensorRef};

/// One row: the scale `rsqrt(mean(x^2) + eps)`, then `(x * scale) * w`, in float32. The sum of
/// squares is added in float64 and rounded once: a float32 running sum drifts over a long row
/// (3.5e-5 relative at most over 131,075 random values, in 20 draws), where the GPU's, spread over
/// many threads, does not.
pub fn row(x: &[f32], weight: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let ss = x.iter().map(|v| *v as f64 * *v as f64).sum::<f64>() as f32;
    let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    match weight {
        Some(w) => out.iter_mut().zip(x.iter().zip(w)).for_each(|(o, (v, g))| *o = (v * scale) * g),
        None => out.iter_mut().zip(x).for_each(|(o, v)| *o = v * scale),
    }
}

/// Checks a norm's weight (float32/bfloat16 `[dim]` or none) and `eps` (finite, > 0).
pub(crate) fn check_weight_eps(weight: Option<&TensorRef>, dim: usize, eps: f32) -> Result<()> {
    if let Some(w) = weight {
        w.expect_dtype(&[DType::F32, DType::BF16])?;
        w.expect_shape(&[Some(dim)])?;
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::value("eps", format!("must be finite and > 0, got {eps}")));
    }
    Ok(())
}

/// A CPU norm weight's `dim` values as float32 (none for no weight).
///
/// # Safety
/// `weight` satisfies [`TensorRef`]'s contract.
pub(crate) unsafe fn weight_values(weight: Option<&TensorRef>, dim: usize) -> Result<Option<Vec<f32>>> {
    let Some(w) = weight else { return Ok(None) };
    let mut v = vec![0f32; dim];
    Floats::new(w)?.read(0, &mut v);
    Ok(Some(v))
}

/// `out = rms_norm(x) * weight` over the last dim of `x` (float32/bfloat16 `[..., D]`, `D >= 1`);
/// `weight` float32/bfloat16 `[D]` or none; `out` float32/bfloat16 shaped as `x`; `eps` finite and
/// positive. On a GPU the call runs on `stream` and non-finite values propagate; on the CPU they
/// raise.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `out` aliases nothing; `stream` is a
/// `CUstream` of the tensors' GPU when they live on one.
pub unsafe fn rms_norm(x: &TensorRef, weight: Option<&TensorRef>, out: &TensorRef, eps: f32, stream: usize) -> Result<()> {
    x.expect_dtype(&[DType::F32, DType::BF16])?;
    out.expect_dtype(&[DType::F32, DType::BF16])?;
    let dim = match x.shape.last() {
        Some(d) if *d > 0 => *d,
        _ => return Err(Error::value(x.name, format!("expected shape [..., D] with D >= 1, got {:?}", x.shape))),
    };
    if dim > i32::MAX as usize {
        return Err(Error::value(x.name, format!("rows of {dim} values are more than a launch takes")));
    }
    let want: Vec<Option<usize>> = x.shape.iter().map(|s| Some(*s)).collect();
    out.expect_shape(&want)?;
    check_weight_eps(weight, dim, eps)?;
    let mut all = vec![x, out];
    all.extend(weight);
    let rows = x.numel() / dim;
    match same_device(&all)? {
        Device::Cuda(dev) => gpu::norm::rms_norm(dev, stream, x, weight, out, rows, dim, eps),
        Device::Cpu => {
            let src = Floats::new(x)?;
            let w = weight_values(weight, dim)?;
            fill_rows(out, dim, |r, o| {
                let mut v = vec![0f32; dim];
                src.read(r * dim, &mut v);
                row(&v, w.as_deref(), eps, o);
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_has_unit_mean_square() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let mut y = vec![0f32; 64];
        row(&x, None, 1e-6, &mut y);
        let ms = y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 64.0;
        assert!((ms - 1.0).abs() < 1e-5, "mean square {ms}");
        let w: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
        let mut yw = vec![0f32; 64];
        row(&x, Some(&w), 1e-6, &mut yw);
        assert!(yw.iter().zip(&y).zip(&w).all(|((a, b), g)| *a == b * g));
    }
}
