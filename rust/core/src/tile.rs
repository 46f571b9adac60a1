//! Register-blocked products of one query's heads with a tile of cache rows: the inner loops of
//! the indexer and of sparse attention.
//!
//! A query is held transposed, `qt[d][h]`, its heads padded with zero heads to whole vectors of
//! 16. A head vector then meets one row value as a broadcast, so rows are used as decoded (no
//! transposition), and a block of [`ROWS`] rows by up to [`HEAD_VECS`] head vectors keeps its
//! 16 accumulators in registers. Every product is accumulated in the same order whatever the
//! blocking, so results do not depend on tile or head-group boundaries.

use crate::rows::Floats;
use crate::simd::{F32x16, LANES};

/// Rows of one register block.
pub const ROWS: usize = 4;
/// Head vectors of one register block.
pub const HEAD_VECS: usize = 4;

/// Heads padded to whole vectors.
pub fn padded_heads(heads: usize) -> usize {
    heads.div_ceil(LANES) * LANES
}

/// Writes query `[heads, dim]` (values `offset ..` of `src`) transposed into `qt`
/// (`[dim, padded_heads(heads)]`, zero heads beyond `heads`); `row` is a `dim`-long scratch.
pub fn transpose_query(src: &Floats, offset: usize, heads: usize, row: &mut [f32], qt: &mut [f32]) {
    let (dim, hp) = (row.len(), padded_heads(heads));
    qt.fill(0.0);
    for h in 0..heads {
        src.read(offset + h * dim, row);
        for (d, v) in row.iter().enumerate() {
            qt[d * hp + h] = *v;
        }
    }
}

/// Head groups `(first column, vectors)` covering `hp` padded heads, at most [`HEAD_VECS`]
/// vectors each.
pub fn head_groups(hp: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..hp).step_by(HEAD_VECS * LANES).map(move |c| (c, HEAD_VECS.min((hp - c) / LANES)))
}

/// `acc[j][v] = sum_d rows[j][d] qt[d][col + 16 v]` for the [`ROWS`] rows of `rows`
/// (`[ROWS, dim]`) and `V` head vectors from column `col`.
#[inline(always)]
pub fn dots<const V: usize>(qt: &[f32], hp: usize, col: usize, rows: &[f32], dim: usize) -> [[F32x16; V]; ROWS] {
    let mut acc = [[F32x16::splat(0.0); V]; ROWS];
    let rows: [&[f32]; ROWS] = std::array::from_fn(|j| &rows[j * dim..(j + 1) * dim]);
    for (d, qrow) in qt.chunks_exact(hp).take(dim).enumerate() {
        let qv: [F32x16; V] = std::array::from_fn(|v| F32x16::load(&qrow[col + v * LANES..]));
        for j in 0..ROWS {
            let a = F32x16::splat(rows[j][d]);
            for v in 0..V {
                acc[j][v] = a.mul_add(qv[v], acc[j][v]);
            }
        }
    }
    acc
}

/// Runs `$body` with `$v` bound to the constant number of head vectors `n` (1 to
/// [`HEAD_VECS`]), so generic kernels get a compile-time vector count.
macro_rules! with_head_vecs {
    ($n:expr, $v:ident => $body:expr) => {
        match $n {
            1 => { const $v: usize = 1; $body }
            2 => { const $v: usize = 2; $body }
            3 => { const $v: usize = 3; $body }
            _ => { const $v: usize = 4; $body }
        }
    };
}
pub(crate) use with_head_vecs;
