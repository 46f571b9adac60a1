//! RoPE (docs/model.md section 2): pair `j` of the last `2 R` dims, `(x[D-2R+2j], x[D-2R+2j+1])`, is
//! rotated by `pos * inv_freq[j]`. How the angle's sine and cosine are computed is a
//! [`RopeTable`]; the rotation itself is computed in f64. The GPU form is cuda/rope.cu, with the
//! angles of cuda/include/rope.cuh.

use rayon::prelude::*;

use crate::error::{Error, Result};
pub use crate::formats::RopeTable;
use crate::gpu;
use crate::rows::{Floats, Ids};
use crate::tensor::{same_device, DType, Device, TensorRef};

/// `(cos, sin)` of every pair's angle at one position.
pub struct Rotation(Vec<(f64, f64)>);

impl Rotation {
    /// The rotation at position `pos` (by `-pos` when `inverse`: the sines negated).
    pub fn at(pos: i64, inv_freq: &[f64], inverse: bool, table: RopeTable) -> Self {
        let sign = if inverse { -1.0 } else { 1.0 };
        Rotation(inv_freq.iter().map(|f| table.cos_sin(pos, *f)).map(|(c, s)| (c, sign * s)).collect())
    }

    /// Rotates the last `2 * inv_freq.len()` values of `x` in place.
    pub fn apply(&self, x: &mut [f32]) {
        let start = x.len() - 2 * self.0.len();
        for (pair, (c, s)) in x[start..].chunks_exact_mut(2).zip(&self.0) {
            let (x0, x1) = (pair[0] as f64, pair[1] as f64);
            pair[0] = (x0 * c - x1 * s) as f32;
            pair[1] = (x0 * s + x1 * c) as f32;
        }
    }
}

/// Checks inverse frequencies (float32/float64 `[R]`) that rotate at most `dim` dims.
fn check_inv_freq(inv_freq: &TensorRef, dim: usize) -> Result<()> {
    inv_freq.expect_shape(&[None])?;
    inv_freq.expect_dtype(&[DType::F32, DType::F64])?;
    let pairs = inv_freq.dim(0);
    if 2 * pairs > dim {
        return Err(Error::value(
            inv_freq.name,
            format!("{pairs} frequencies rotate {} dims, but the rows have only {dim}", 2 * pairs),
        ));
    }
    Ok(())
}

/// Reads inverse frequencies (float32/float64 `[R]`, finite) that rotate at most `dim` dims.
///
/// # Safety
/// `inv_freq` satisfies [`TensorRef`]'s contract.
pub unsafe fn inv_freq_values(inv_freq: &TensorRef, dim: usize) -> Result<Vec<f64>> {
    inv_freq.expect_device(Device::Cpu)?;
    check_inv_freq(inv_freq, dim)?;
    let v: Vec<f64> = match inv_freq.dtype {
        DType::F64 => inv_freq.host::<f64>(&[DType::F64])?.to_vec(),
        _ => inv_freq.host::<f32>(&[DType::F32])?.iter().map(|f| *f as f64).collect(),
    };
    if let Some(i) = v.iter().position(|f| !f.is_finite()) {
        return Err(Error::value(inv_freq.name, format!("contains a non-finite value at index {i}")));
    }
    Ok(v)
}

/// RoPE of `x` (float32/bfloat16 `[T, ..., D]`) at `positions` (int32/int64 `[T]`) into `out`
/// (float32, the shape of `x`); `inverse` rotates by `-positions`; `table` says how the angles'
/// sines and cosines are computed. On a GPU the call runs on
/// `stream` (cuda/rope.cu) with the same math; non-finite values are not checked there (that
/// would need a synchronization) and propagate.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `out` is not aliased by the others; `stream`
/// is a `CUstream` of the tensors' GPU when they live on one.
pub unsafe fn rope(
    x: &TensorRef,
    positions: &TensorRef,
    inv_freq: &TensorRef,
    out: &TensorRef,
    inverse: bool,
    table: RopeTable,
    stream: usize,
) -> Result<()> {
    if x.shape.len() < 2 {
        return Err(Error::value(x.name, format!("expected shape [T, ..., D], got {:?}", x.shape)));
    }
    let (t, dim) = (x.dim(0), x.shape[x.shape.len() - 1]);
    positions.expect_shape(&[Some(t)])?;
    out.expect_dtype(&[DType::F32])?;
    let want: Vec<Option<usize>> = x.shape.iter().map(|s| Some(*s)).collect();
    out.expect_shape(&want)?;
    if let Device::Cuda(dev) = same_device(&[x, positions, inv_freq, out])? {
        x.expect_dtype(&[DType::F32, DType::BF16])?;
        positions.expect_dtype(&[DType::I32, DType::I64])?;
        check_inv_freq(inv_freq, dim)?;
        return gpu::rope::rope(dev, stream, x, positions, inv_freq, out, inverse, table);
    }
    rotate_on_cpu(x, positions, inv_freq, out, inverse, table, |src, first, o| src.read(first, o))
}

/// The CPU form of [`rope`] and [`rms_norm_rope`]: a token at a time, in parallel, `fill(src,
/// first, o)` writes the token's values of `out` from `x` (read through `src` from flat index
/// `first`), then each of its rows of `D` is rotated at the token's position.
///
/// # Safety
/// As [`rope`], the tensors on the CPU and checked.
unsafe fn rotate_on_cpu(
    x: &TensorRef,
    positions: &TensorRef,
    inv_freq: &TensorRef,
    out: &TensorRef,
    inverse: bool,
    table: RopeTable,
    fill: impl Fn(&Floats, usize, &mut [f32]) + Sync,
) -> Result<()> {
    let (t, dim) = (x.dim(0), x.shape[x.shape.len() - 1]);
    let freqs = inv_freq_values(inv_freq, dim)?;
    let pos = Ids::new(positions)?;
    let src = Floats::new(x)?;
    let dst = out.host_mut::<f32>(&[DType::F32])?;
    let per_token = x.numel() / t.max(1);
    if per_token == 0 {
        return Ok(());
    }
    dst.par_chunks_mut(per_token).enumerate().for_each(|(i, o)| {
        let rot = Rotation::at(pos.get(i), &freqs, inverse, table);
        fill(&src, i * per_token, o);
        o.chunks_exact_mut(dim).for_each(|row| rot.apply(row));
    });
    Ok(())
}

/// `out = rope(round(rms_norm(x, weight, eps)))`: each row of the last dim of `x` (float32/bfloat16
/// `[T, ..., D]`) RMS-normalized (as [`crate::norm::rms_norm`]: `weight` float32/bfloat16 `[D]` or
/// none), rounded to bfloat16 when `round_bf16` (the dtype the model's norm returns), then rotated
/// as [`rope`] does at `positions` (int32/int64 `[T]`), into `out` (float32, the shape of `x`).
/// The two ops one after the other give the same values: on a GPU one kernel where a row has at
/// most [`gpu::rope::NORM_ROPE_ROW_MAX`] values, a multiple of 4, and `x` and `weight` start
/// four values aligned (the norm's own arithmetic for such rows; else ValueError naming `x`, and
/// the caller runs the two ops); on the CPU the norm's then the rotation's.
///
/// # Safety
/// As [`rope`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn rms_norm_rope(
    x: &TensorRef,
    weight: Option<&TensorRef>,
    eps: f32,
    round_bf16: bool,
    positions: &TensorRef,
    inv_freq: &TensorRef,
    out: &TensorRef,
    table: RopeTable,
    stream: usize,
) -> Result<()> {
    if x.shape.len() < 2 || x.shape[x.shape.len() - 1] == 0 {
        return Err(Error::value(x.name, format!("expected shape [T, ..., D] with D >= 1, got {:?}", x.shape)));
    }
    x.expect_dtype(&[DType::F32, DType::BF16])?;
    let (t, dim) = (x.dim(0), x.shape[x.shape.len() - 1]);
    positions.expect_shape(&[Some(t)])?;
    out.expect_dtype(&[DType::F32])?;
    let want: Vec<Option<usize>> = x.shape.iter().map(|s| Some(*s)).collect();
    out.expect_shape(&want)?;
    crate::norm::check_weight_eps(weight, dim, eps)?;
    let mut all = vec![x, positions, inv_freq, out];
    all.extend(weight);
    if let Device::Cuda(dev) = same_device(&all)? {
        positions.expect_dtype(&[DType::I32, DType::I64])?;
        check_inv_freq(inv_freq, dim)?;
        return gpu::rope::rms_norm_rope(dev, stream, x, weight, eps, round_bf16, positions, inv_freq, out, table);
    }
    let w = crate::norm::weight_values(weight, dim)?;
    rotate_on_cpu(x, positions, inv_freq, out, false, table, |src, first, o| {
        let mut v = vec![0f32; dim];
        for (r, row) in o.chunks_exact_mut(dim).enumerate() {
            src.read(first + r * dim, &mut v);
            crate::norm::row(&v, w.as_deref(), eps, row);
            if round_bf16 {
                row.iter_mut().for_each(|u| *u = crate::quant::bf16_to_f32(crate::rows::bf16_bits(*u)));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_undoes_the_rotation() {
        let freqs: Vec<f64> = (0..32).map(|j| 10000f64.powf(-(j as f64) / 32.0)).collect();
        let x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.3).cos()).collect();
        for table in [RopeTable::Official, RopeTable::Exact] {
            let mut y = x.clone();
            Rotation::at(1 << 20, &freqs, false, table).apply(&mut y);
            assert_eq!(&y[..448], &x[..448]);
            assert!(y[448..].iter().zip(&x[448..]).any(|(a, b)| (a - b).abs() > 0.1));
            Rotation::at(1 << 20, &freqs, true, table).apply(&mut y);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn official_angles_are_float32_products() {
        // 2^24 + 1 rounds to 2^24 in f32, and the f32 product rounds again: the angles differ by 0.1.
        let (pos, f) = ((1i64 << 24) + 1, 0.1f32 as f64);
        let want = ((pos as f32) * 0.1f32) as f64;
        let (c, s) = RopeTable::Official.cos_sin(pos, f);
        assert_eq!((c, s), (want.cos() as f32 as f64, want.sin() as f32 as f64));
        let (ce, se) = RopeTable::Exact.cos_sin(pos, f);
        assert!((ce - c).abs() > 1e-3 || (se - s).abs() > 1e-3);
    }
}
