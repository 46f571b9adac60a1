//! KV-entry formats of docs/model.md section 5 and the Hadamard-128 transform, on the CPU.
//!
//! Every format is a page of [`PAGE_ROWS`] rows laid out as FlashMLA does: all rows' data first,
//! then all rows' scales. Scales are UE8M0 powers of two, chosen as the smallest `2^e` with
//! `amax <= qmax * 2^e` (amax floored at 1e-4), so quantization is exact scaling plus one
//! round-to-nearest-even; the CUDA kernels (cuda/include/quant.cuh) and reference.py follow the
//! same rules and produce the same bytes.

use crate::simd::multiversion;

/// Rows per cache page, for every cache family.
pub const PAGE_ROWS: usize = 64;
/// Width of one KV entry (K = V).
pub const ENTRY_DIM: usize = 512;
/// Leading dims of an entry stored as FP8 ("NoPE" dims).
pub const NOPE_DIM: usize = 448;
/// Trailing dims of an entry stored as BF16 (RoPE dims).
pub const ROPE_DIM: usize = 64;
/// NoPE values sharing one FP8 scale.
pub const FP8_BLOCK: usize = 64;
/// Width of an indexer key.
pub const INDEX_DIM: usize = 128;
/// Indexer-key values sharing one FP4 scale.
pub const FP4_BLOCK: usize = 32;

/// Largest finite FP8 e4m3 and FP4 e2m1 magnitudes.
pub const FP8_MAX: f32 = 448.0;
pub const FP4_MAX: f32 = 6.0;
/// Block maxima below this are raised to it before the scale is chosen.
pub const AMAX_FLOOR: f32 = 1e-4;
/// FP4's block-maximum floor, as DeepSeek's FP4 quantizer has it: `6 * 2^-126`, the largest FP4
/// value times the smallest normal float32 scale (a block of tiny values keeps its resolution
/// instead of collapsing to zero under FP8's 1e-4).
pub const FP4_AMAX_FLOOR: f32 = FP4_MAX * f32::MIN_POSITIVE;

/// The byte layout of one cache family's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowFormat {
    pub name: &'static str,
    /// Values per row before quantization.
    pub dim: usize,
    /// Bytes of one row's data part.
    pub data_bytes: usize,
    /// Bytes of one row's scale part (padding included).
    pub scale_bytes: usize,
}

impl RowFormat {
    pub const fn row_bytes(&self) -> usize {
        self.data_bytes + self.scale_bytes
    }
    pub const fn page_bytes(&self) -> usize {
        PAGE_ROWS * self.row_bytes()
    }
    /// Byte offsets of row `row`'s data and scales inside a flat cache buffer.
    pub const fn offsets(&self, row: usize) -> (usize, usize) {
        let (page, r) = (row / PAGE_ROWS, row % PAGE_ROWS);
        let base = page * self.page_bytes();
        (base + r * self.data_bytes, base + PAGE_ROWS * self.data_bytes + r * self.scale_bytes)
    }
}

/// Main KV entry: 448 x FP8 e4m3 + 64 x BF16, then 7 UE8M0 scales + 1 pad byte = 584 bytes.
pub const MAIN_ENTRY: RowFormat =
    RowFormat { name: "fp8 main entry", dim: ENTRY_DIM, data_bytes: NOPE_DIM + 2 * ROPE_DIM, scale_bytes: 8 };
/// Indexer key, FP4: 128 x e2m1 (two per byte, even index in the low nibble), then 4 UE8M0 scales.
pub const INDEX_KEY_FP4: RowFormat =
    RowFormat { name: "fp4 indexer key", dim: INDEX_DIM, data_bytes: INDEX_DIM / 2, scale_bytes: 4 };
/// Indexer key, FP8: 128 x e4m3, then one fp32 scale (a power of two).
pub const INDEX_KEY_FP8: RowFormat =
    RowFormat { name: "fp8 indexer key", dim: INDEX_DIM, data_bytes: INDEX_DIM, scale_bytes: 4 };

/// Round-to-nearest-even f32 -> bf16 bits (finite inputs).
pub fn bf16_from_f32(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rounded to the nearest bfloat16 (even on ties), as float32 (finite inputs).
pub fn bf16_round(x: f32) -> f32 {
    bf16_to_f32(bf16_from_f32(x))
}

/// Exponent `e` of the UE8M0 scale: the smallest integer with `max(amax, floor) <= qmax * 2^e`,
/// the floor [`AMAX_FLOOR`] for FP8 and [`FP4_AMAX_FLOOR`] for FP4 (`qmax` tells them apart).
pub fn ue8m0_exponent(amax: f32, qmax: f32) -> i32 {
    if amax.is_infinite() {
        // As the GPU kernels: the UE8M0 code 255 (NaN). The CPU ops refuse non-finite input
        // before they get here; this keeps the search below finite for any caller.
        return 128;
    }
    let floor = if qmax == FP4_MAX { FP4_AMAX_FLOOR } else { AMAX_FLOOR };
    let a = amax.max(floor) as f64;
    let q = qmax as f64;
    let mut e = (a / q).log2().ceil() as i32;
    while q * 2f64.powi(e) < a {
        e += 1;
    }
    while q * 2f64.powi(e - 1) >= a {
        e -= 1;
    }
    e
}

/// Exact 2^e as f32 for the exponents the scales can take.
pub fn exp2i(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Magnitude code of a non-negative value on a minifloat grid with `man` mantissa bits and
/// exponent bias `bias` (no infinities), round to nearest even; `a` must already be clamped.
fn minifloat_code(a: f32, man: u32, bias: i32) -> u32 {
    let min_e = 1 - bias;
    let bits_e = ((a.to_bits() >> 23) & 0xFF) as i32 - 127;
    let e = bits_e.max(min_e);
    let q = (a * exp2i(man as i32 - e)).round_ties_even() as u32;
    (((e - min_e) as u32) << man) + q
}

fn minifloat_value(code: u32, man: u32, bias: i32) -> f32 {
    let (exp, m) = ((code >> man) as i32, code & ((1 << man) - 1));
    let min_e = 1 - bias;
    if exp == 0 {
        m as f32 * exp2i(min_e - man as i32)
    } else {
        (1.0 + m as f32 / (1 << man) as f32) * exp2i(exp - bias)
    }
}

/// FP8 e4m3 byte of `x * 2^-e`, saturated at 448.
pub fn fp8_encode(x: f32, e: i32) -> u8 {
    let a = (x.abs() * exp2i(-e)).min(FP8_MAX);
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    sign | minifloat_code(a, 3, 7) as u8
}

/// Value of an FP8 e4m3fn byte; 0x7F and 0xFF are NaN (no encoder writes them: they mark a
/// corrupted row, which the readers' non-finite checks then refuse).
pub fn fp8_decode(b: u8) -> f32 {
    if b & 0x7F == 0x7F {
        return f32::NAN;
    }
    let v = minifloat_value((b & 0x7F) as u32, 3, 7);
    if b & 0x80 != 0 { -v } else { v }
}

/// FP4 e2m1 nibble of `x * 2^-e`, saturated at 6.
pub fn fp4_encode(x: f32, e: i32) -> u8 {
    let a = (x.abs() * exp2i(-e)).min(FP4_MAX);
    let sign = if x.is_sign_negative() { 0x8 } else { 0 };
    sign | minifloat_code(a, 1, 1) as u8
}

pub fn fp4_decode(nibble: u8) -> f32 {
    let v = minifloat_value((nibble & 0x7) as u32, 1, 1);
    if nibble & 0x8 != 0 { -v } else { v }
}

fn amax(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Quantizes one 512-d entry into `data` (576 bytes) and `scales` (8 bytes).
pub fn encode_main_entry(x: &[f32], data: &mut [u8], scales: &mut [u8]) {
    for (b, block) in x[..NOPE_DIM].chunks_exact(FP8_BLOCK).enumerate() {
        let e = ue8m0_exponent(amax(block), FP8_MAX);
        scales[b] = (e + 127) as u8;
        for (i, v) in block.iter().enumerate() {
            data[b * FP8_BLOCK + i] = fp8_encode(*v, e);
        }
    }
    scales[NOPE_DIM / FP8_BLOCK] = 0;
    for (i, v) in x[NOPE_DIM..].iter().enumerate() {
        let h = bf16_from_f32(*v).to_le_bytes();
        data[NOPE_DIM + 2 * i..NOPE_DIM + 2 * i + 2].copy_from_slice(&h);
    }
}

/// Value of an FP8 e4m3 byte by bit arithmetic: the same value as [`fp8_decode`] (NaN codes
/// included), but branch-free so that row decoders vectorize.
#[inline(always)]
fn fp8_value(b: u8) -> f32 {
    let (e, m, sign) = ((b as u32 >> 3) & 0xF, b as u32 & 7, (b as u32 & 0x80) << 24);
    let normal = f32::from_bits(((e + 120) << 23) | (m << 20));
    let v = if e == 0 { m as f32 * exp2i(-9) } else { normal };
    let v = f32::from_bits(v.to_bits() | sign);
    if b & 0x7F == 0x7F { f32::NAN } else { v }
}

/// Value of an FP4 e2m1 nibble by bit arithmetic, as [`fp8_value`] for [`fp4_decode`].
#[inline(always)]
fn fp4_value(n: u8) -> f32 {
    let (e, m, sign) = ((n as u32 >> 1) & 3, n as u32 & 1, (n as u32 & 8) << 28);
    let normal = f32::from_bits(((e + 126) << 23) | (m << 22));
    let v = if e == 0 { m as f32 * 0.5 } else { normal };
    f32::from_bits(v.to_bits() | sign)
}

multiversion! {
    pub fn decode_main_entry(data: &[u8], scales: &[u8], out: &mut [f32]) {
        for (b, (o, d)) in out[..NOPE_DIM].chunks_exact_mut(FP8_BLOCK).zip(data.chunks_exact(FP8_BLOCK)).enumerate() {
            let s = exp2i(scales[b] as i32 - 127);
            for (o, d) in o.iter_mut().zip(d) {
                *o = fp8_value(*d) * s;
            }
        }
        for (o, h) in out[NOPE_DIM..ENTRY_DIM].iter_mut().zip(data[NOPE_DIM..].chunks_exact(2)) {
            *o = bf16_to_f32(u16::from_le_bytes([h[0], h[1]]));
        }
    }
}

pub fn encode_index_key_fp4(x: &[f32], data: &mut [u8], scales: &mut [u8]) {
    for (b, block) in x.chunks_exact(FP4_BLOCK).enumerate() {
        let e = ue8m0_exponent(amax(block), FP4_MAX);
        scales[b] = (e + 127) as u8;
        for (i, pair) in block.chunks_exact(2).enumerate() {
            data[b * FP4_BLOCK / 2 + i] = fp4_encode(pair[0], e) | (fp4_encode(pair[1], e) << 4);
        }
    }
}

multiversion! {
    pub fn decode_index_key_fp4(data: &[u8], scales: &[u8], out: &mut [f32]) {
        for (b, (o, d)) in out.chunks_exact_mut(FP4_BLOCK).zip(data.chunks_exact(FP4_BLOCK / 2)).enumerate() {
            let s = exp2i(scales[b] as i32 - 127);
            for (pair, byte) in o.chunks_exact_mut(2).zip(d) {
                pair[0] = fp4_value(byte & 0xF) * s;
                pair[1] = fp4_value(byte >> 4) * s;
            }
        }
    }
}

pub fn encode_index_key_fp8(x: &[f32], data: &mut [u8], scales: &mut [u8]) {
    let e = ue8m0_exponent(amax(x), FP8_MAX);
    for (d, v) in data.iter_mut().zip(x) {
        *d = fp8_encode(*v, e);
    }
    scales.copy_from_slice(&exp2i(e).to_le_bytes());
}

multiversion! {
    pub fn decode_index_key_fp8(data: &[u8], scales: &[u8], out: &mut [f32]) {
        let s = f32::from_le_bytes([scales[0], scales[1], scales[2], scales[3]]);
        for (o, d) in out.iter_mut().zip(data) {
            *o = fp8_value(*d) * s;
        }
    }
}

/// A packed row format with the encoder and decoder of one row's `data` and `scales` parts.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub rows: RowFormat,
    pub encode: fn(&[f32], &mut [u8], &mut [u8]),
    pub decode: fn(&[u8], &[u8], &mut [f32]),
}

impl Codec {
    /// Replaces the row `x` by what a cache returns for it: encoded, then decoded.
    pub fn round_trip(&self, x: &mut [f32]) {
        let mut buf = [0u8; MAIN_ENTRY.row_bytes()]; // the largest packed row
        let (data, rest) = buf.split_at_mut(self.rows.data_bytes);
        let scales = &mut rest[..self.rows.scale_bytes];
        (self.encode)(x, data, scales);
        (self.decode)(data, scales, x);
    }
}

pub const MAIN_ENTRY_CODEC: Codec = Codec { rows: MAIN_ENTRY, encode: encode_main_entry, decode: decode_main_entry };
pub const INDEX_KEY_FP4_CODEC: Codec =
    Codec { rows: INDEX_KEY_FP4, encode: encode_index_key_fp4, decode: decode_index_key_fp4 };
pub const INDEX_KEY_FP8_CODEC: Codec =
    Codec { rows: INDEX_KEY_FP8, encode: encode_index_key_fp8, decode: decode_index_key_fp8 };
/// Every packed format.
pub const CODECS: [Codec; 3] = [MAIN_ENTRY_CODEC, INDEX_KEY_FP4_CODEC, INDEX_KEY_FP8_CODEC];

/// `128^-0.5` rounded to f32, the scale of the normalized Hadamard-128 transform.
pub const HADAMARD_SCALE: f32 = 0.088_388_35;

/// In-place normalized Walsh-Hadamard transform of 128 values (Sylvester order:
/// `H[i][j] = (-1)^popcount(i & j)`), butterflies in a fixed order, then one scaling.
pub fn hadamard128(x: &mut [f32]) {
    debug_assert_eq!(x.len(), INDEX_DIM);
    let mut h = 1;
    while h < INDEX_DIM {
        for i in (0..INDEX_DIM).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    for v in x.iter_mut() {
        *v *= HADAMARD_SCALE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_grid_round_trips() {
        for b in 0u8..=255 {
            if b & 0x7F == 0x7F {
                continue; // NaN codes
            }
            assert_eq!(fp8_encode(fp8_decode(b), 0), b, "code {b:#x}");
        }
        assert_eq!(fp8_decode(0x7E), 448.0);
        assert_eq!(fp8_decode(0x01), 2f32.powi(-9));
        assert!(fp8_decode(0x7F).is_nan() && fp8_decode(0xFF).is_nan());
        assert_eq!(fp8_encode(1000.0, 0), 0x7E);
    }

    #[test]
    fn fp8_rounds_half_to_even() {
        // 1.0625 lies halfway between 1.0 (even mantissa) and 1.125.
        assert_eq!(fp8_decode(fp8_encode(1.0625, 0)), 1.0);
        assert_eq!(fp8_decode(fp8_encode(1.1875, 0)), 1.25);
    }

    #[test]
    fn fp4_grid_and_ties() {
        let grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for (code, v) in grid.iter().enumerate() {
            assert_eq!(fp4_decode(code as u8), *v);
            assert_eq!(fp4_encode(*v, 0), code as u8);
            assert_eq!(fp4_decode(code as u8 | 8), -*v);
        }
        let ties = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (7.0, 6.0)];
        for (x, want) in ties {
            assert_eq!(fp4_decode(fp4_encode(x, 0)), want, "{x}");
        }
    }

    #[test]
    fn scale_is_smallest_power_covering_amax() {
        assert_eq!(ue8m0_exponent(448.0, FP8_MAX), 0);
        assert_eq!(ue8m0_exponent(448.00003, FP8_MAX), 1);
        assert_eq!(ue8m0_exponent(224.0, FP8_MAX), -1);
        assert_eq!(ue8m0_exponent(0.0, FP8_MAX), ue8m0_exponent(AMAX_FLOOR, FP8_MAX));
        assert_eq!(ue8m0_exponent(6.0, FP4_MAX), 0);
        assert_eq!(ue8m0_exponent(0.0, FP4_MAX), -126);
        assert_eq!(ue8m0_exponent(1e-6, FP4_MAX), -22); // 1e-6 <= 6 * 2^-22 = 1.43e-6
        assert_eq!(ue8m0_exponent(6.1, FP4_MAX), 1);
    }

    #[test]
    fn main_entry_round_trip_within_fp8_bound() {
        let x: Vec<f32> = (0..ENTRY_DIM).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0).collect();
        let (mut data, mut scales, mut out) = ([0u8; 576], [0u8; 8], [0f32; ENTRY_DIM]);
        encode_main_entry(&x, &mut data, &mut scales);
        decode_main_entry(&data, &scales, &mut out);
        for (b, scale) in scales.iter().enumerate().take(NOPE_DIM / FP8_BLOCK) {
            let s = exp2i(*scale as i32 - 127);
            for i in b * FP8_BLOCK..(b + 1) * FP8_BLOCK {
                // e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, plus the
                // subnormal step 2^-9 of the scaled value.
                assert!((out[i] - x[i]).abs() <= x[i].abs() / 16.0 + s * 2f32.powi(-10), "{i}");
            }
        }
        for i in NOPE_DIM..ENTRY_DIM {
            assert!((out[i] - x[i]).abs() <= x[i].abs() / 256.0);
        }
    }

    #[test]
    fn row_decoders_match_the_per_value_decoders() {
        for b in 0..=255u8 {
            assert_eq!(fp8_value(b).to_bits(), fp8_decode(b).to_bits(), "fp8 {b:#x}");
        }
        for n in 0..16u8 {
            assert_eq!(fp4_value(n).to_bits(), fp4_decode(n).to_bits(), "fp4 {n:#x}");
        }
        let data: Vec<u8> = (0..576).map(|i| (i * 37 % 256) as u8).collect();
        let scales = [120u8, 127, 130, 1, 200, 127, 126, 0];
        let mut out = [0f32; ENTRY_DIM];
        decode_main_entry(&data, &scales, &mut out);
        for i in 0..NOPE_DIM {
            let want = fp8_decode(data[i]) * exp2i(scales[i / FP8_BLOCK] as i32 - 127);
            assert!(out[i] == want || out[i].is_nan() && want.is_nan(), "dim {i}");
        }
        let mut key = [0f32; INDEX_DIM];
        decode_index_key_fp4(&data[..64], &scales[..4], &mut key);
        for i in 0..INDEX_DIM {
            let nibble = (data[i / 2] >> (4 * (i % 2))) & 0xF;
            assert_eq!(key[i], fp4_decode(nibble) * exp2i(scales[i / FP4_BLOCK] as i32 - 127));
        }
    }

    #[test]
    fn hadamard_is_an_involution() {
        let x: Vec<f32> = (0..INDEX_DIM).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = x.clone();
        hadamard128(&mut y);
        hadamard128(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn page_offsets_put_rows_then_scales() {
        assert_eq!(MAIN_ENTRY.row_bytes(), 584);
        assert_eq!(INDEX_KEY_FP4.row_bytes(), 68);
        assert_eq!(INDEX_KEY_FP8.row_bytes(), 132);
        assert_eq!(MAIN_ENTRY.offsets(0), (0, 64 * 576));
        assert_eq!(MAIN_ENTRY.offsets(65), (37376 + 576, 37376 + 64 * 576 + 8));
    }
}
