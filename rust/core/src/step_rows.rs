//! The cache rows a decode step's tokens attend, planned once for every layer
//! (docs/runtime.md, "One step"): the sliding window's rows in each sequence's ring and the HCA
//! layers' compressed rows, from the step's integers. For token `t` of batch row
//! `b = token_seq[t]` at position `p = positions[t]`:
//!
//! ```text
//! window  j in [0, W):  q = p - W + 1 + j;  -1 where q < origins[b],
//!                       else r = max(q, 0) mod W at window_table[b, r / 64] * 64 + r mod 64
//! hca     k in [0, K):  -1 where k >= floor((p + 1) / ratio),
//!                       else hca_table[b, min(k / 64, pages - 1)] * 64 + k mod 64
//!                       (K <= 64 pages is checked, so the min only guards)
//! ```
//!
//! A token whose `b` lies outside `[0, B)` gets -1 throughout (torch's indexing would raise, which
//! a GPU can only do by stopping). The int64 sums wrap as torch's do. The GPU kernel
//! (cuda/step_rows.cu) computes the same integers: one launch for what the torch form ran as 25
//! tensor ops.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gpu;
use crate::tensor::{same_device, DType, Device, TensorRef};

/// Rows of a cache page.
pub const PAGE: i64 = 64;

/// The step's integers and tables, borrowed on the host or addressed on the GPU.
pub struct Step<'a> {
    pub positions: &'a TensorRef,
    pub token_seq: &'a TensorRef,
    pub origins: &'a TensorRef,
}

/// `floor(a / b)` for `b >= 1`.
fn floor_div(a: i64, b: i64) -> i64 {
    let q = a / b;
    if a % b != 0 && a < 0 {
        q - 1
    } else {
        q
    }
}

/// Token `t`'s window rows (`out` of `W` values).
pub fn window_row(p: i64, b: Option<usize>, origins: &[i64], table: &[i32], pages: usize, out: &mut [i64]) {
    let w = out.len() as i64;
    for (j, o) in out.iter_mut().enumerate() {
        *o = match b {
            Some(b) => {
                let q = p.wrapping_add(j as i64 + 1 - w);
                if q < origins[b] {
                    -1
                } else {
                    let r = q.max(0) % w;
                    table[b * pages + (r / PAGE) as usize] as i64 * PAGE + r % PAGE
                }
            }
            None => -1,
        };
    }
}

/// Token `t`'s HCA rows (`out` of `K` values).
pub fn hca_row(p: i64, b: Option<usize>, table: &[i32], pages: usize, ratio: i64, out: &mut [i64]) {
    let visible = floor_div(p.wrapping_add(1), ratio);
    for (k, o) in out.iter_mut().enumerate() {
        let k = k as i64;
        *o = match b {
            Some(b) if k < visible => {
                let page = ((k / PAGE) as usize).min(pages - 1);
                table[b * pages + page] as i64 * PAGE + k % PAGE
            }
            _ => -1,
        };
    }
}

/// Fills `window_rows` (int64 `[T, W]`, from `window_table` int32 `[B, P]` with `64 P >= W`) and,
/// given, `hca_rows` (int64 `[T, K]`, from `hca_table` int32 `[B, P' >= 1]` and `hca_ratio >= 1`)
/// for the step's `positions` and `token_seq` (int64 `[T]`) and `origins` (int64 `[B]`). Either
/// output may be absent (then its table is too).
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; the outputs alias nothing; `stream` is a
/// `CUstream` of the tensors' GPU when they live on one.
pub unsafe fn step_rows(
    step: &Step, window: Option<(&TensorRef, &TensorRef)>, hca: Option<(&TensorRef, &TensorRef, i64)>,
    stream: usize,
) -> Result<()> {
    let Step { positions, token_seq, origins } = *step;
    for t in [positions, token_seq, origins] {
        t.expect_dtype(&[DType::I64])?;
    }
    positions.expect_shape(&[None])?;
    let tokens = positions.dim(0);
    token_seq.expect_shape(&[Some(tokens)])?;
    origins.expect_shape(&[None])?;
    let batch = origins.dim(0);
    let mut all = vec![positions, token_seq, origins];
    let mut per = 0usize;
    if let Some((table, out)) = window {
        table.expect_dtype(&[DType::I32])?;
        table.expect_shape(&[Some(batch), None])?;
        out.expect_dtype(&[DType::I64])?;
        out.expect_shape(&[Some(tokens), None])?;
        let w = out.dim(1);
        if w == 0 || (table.dim(1) as u128) * (PAGE as u128) < w as u128 {
            return Err(Error::value(
                table.name,
                format!("{} pages a sequence hold fewer than the window's {w} rows", table.dim(1)),
            ));
        }
        per += w;
        all.extend([table, out]);
    }
    if let Some((table, out, ratio)) = hca {
        table.expect_dtype(&[DType::I32])?;
        table.expect_shape(&[Some(batch), None])?;
        if table.dim(1) == 0 {
            return Err(Error::value(table.name, "expected at least one page a sequence, got 0"));
        }
        out.expect_dtype(&[DType::I64])?;
        out.expect_shape(&[Some(tokens), None])?;
        if out.dim(1) as u128 > table.dim(1) as u128 * PAGE as u128 {
            return Err(Error::value(
                "hca_width",
                format!("expected at most the rows of the table's {} pages, got {}", table.dim(1), out.dim(1)),
            ));
        }
        if ratio < 1 {
            return Err(Error::value("hca_ratio", format!("must be >= 1, got {ratio}")));
        }
        per += out.dim(1);
        all.extend([table, out]);
    }
    if tokens.checked_mul(per).is_none_or(|n| n > i32::MAX as usize * 256) {
        return Err(Error::value(positions.name, format!("{tokens} tokens of {per} rows are more than one launch takes")));
    }
    match same_device(&all)? {
        Device::Cuda(dev) => gpu::step_rows::step_rows(dev, stream, (positions, token_seq, origins), window, hca),
        Device::Cpu => {
            let (pos, seq, orig) = (positions.host::<i64>(&[DType::I64])?, token_seq.host::<i64>(&[DType::I64])?,
                                    origins.host::<i64>(&[DType::I64])?);
            let row_of = |t: usize| usize::try_from(seq[t]).ok().filter(|b| *b < batch);
            if let Some((table, out)) = window {
                let (tab, pages) = (table.host::<i32>(&[DType::I32])?, table.dim(1));
                let w = out.dim(1);
                out.host_mut::<i64>(&[DType::I64])?.par_chunks_mut(w).enumerate().for_each(|(t, o)| {
                    window_row(pos[t], row_of(t), orig, tab, pages, o);
                });
            }
            if let Some((table, out, ratio)) = hca {
                let (tab, pages) = (table.host::<i32>(&[DType::I32])?, table.dim(1));
                let k = out.dim(1);
                if k > 0 {
                    out.host_mut::<i64>(&[DType::I64])?.par_chunks_mut(k).enumerate().for_each(|(t, o)| {
                        hca_row(pos[t], row_of(t), tab, pages, ratio, o);
                    });
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_rows_follow_the_ring() {
        // Window 4 in a ring of one page 7: position 5 sees 2..=5, rows 2, 3, 0, 1 of the ring.
        let mut out = [0i64; 4];
        window_row(5, Some(0), &[0], &[7], 1, &mut out);
        assert_eq!(out, [7 * 64 + 2, 7 * 64 + 3, 7 * 64, 7 * 64 + 1]);
        // An origin past the first two positions masks them; no batch row masks all.
        window_row(5, Some(0), &[4], &[7], 1, &mut out);
        assert_eq!(out, [-1, -1, 7 * 64, 7 * 64 + 1]);
        window_row(5, None, &[0], &[7], 1, &mut out);
        assert_eq!(out, [-1; 4]);
    }

    #[test]
    fn hca_rows_are_the_visible_entries() {
        // Ratio 2 at position 5: three entries visible. Past the table the row clamps to its last
        // page, a guard only: the op refuses lists wider than the table.
        let mut out = [0i64; 4];
        hca_row(5, Some(1), &[3, 3, 9, 9], 2, 2, &mut out);
        assert_eq!(out, [9 * 64, 9 * 64 + 1, 9 * 64 + 2, -1]);
        let mut wide = vec![0i64; 130];
        hca_row(1000, Some(0), &[4], 1, 1, &mut wide);
        assert_eq!((wide[64], wide[129]), (4 * 64, 4 * 64 + 1));
        hca_row(i64::MAX, Some(0), &[4], 1, 1, &mut out); // p + 1 wraps: nothing visible
        assert_eq!(out, [-1; 4]);
        assert_eq!((floor_div(-1, 4), floor_div(-4, 4), floor_div(7, 4)), (-1, -1, 1));
    }
}
