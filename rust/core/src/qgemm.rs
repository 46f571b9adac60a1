//! Weights as DeepSeek ships them: the block-scaled FP8 / MXFP4 linear and the fused MoE over
//! MXFP4 experts, with their argument checks, a CPU twin and the dispatch to the GPU launchers
//! (`gpu::qgemm`).
//!
//! Numerics (the same on the CPU and the GPU up to float32 summation order):
//! - the activation `A(v)` of a vector `v` of length `K`: with [`Act::Fp8`], `v` is cut into
//!   blocks of [`ACT_BLOCK`] values (the last one may be shorter); per block
//!   `e = ue8m0_exponent(amax, 448)` (amax floored at 1e-4) and each value becomes
//!   `fp8_decode(fp8_encode(v, e)) * 2^e` (round to nearest even, saturating at 448). A block
//!   holding a non-finite value becomes NaN (the GPU's scale code 255). With [`Act::Bf16`] each
//!   value is rounded to bfloat16 (nearest even).
//! - the weights: FP8 e4m3 `fp8_decode(code) * scale[r / 128][k / 128]` (float32 scales), MXFP4
//!   `fp4_decode(nibble) * 2^(code - 127)` (UE8M0 code per 32 values, even index in the low
//!   nibble; code 255 is NaN).
//! - the products summed in float32, cast to the dtype of `x` at the end.
//! - out of range: on the CPU, scales that put weights past float32's range (UE8M0 codes above
//!   [`MAX_FP4_SCALE_CODE`], float32 scales `s` with `448 s` not finite) are errors naming the
//!   scale, and so is a result that is not finite (the sums overflowed, or an FP8 NaN code),
//!   naming the inputs. The GPU looks for neither (it would synchronize the host): such calls
//!   give inf or NaN there.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::Named;
use crate::gpu;
use crate::quant::{self, FP8_MAX};
use crate::rows::{fill_rows, Floats};
use crate::simd::{multiversion, F32x16, LANES};
use crate::tensor::{same_device, DType, Device, TensorRef};

/// Activation values sharing one UE8M0 scale when activations are quantized to FP8.
pub const ACT_BLOCK: usize = 128;
/// Rows and columns of an FP8 weight sharing one float32 scale.
pub const FP8_WEIGHT_BLOCK: usize = 128;
/// Values of an MXFP4 weight sharing one UE8M0 code; the reduced dimension of every quantized
/// weight is a multiple of it.
pub const MX_BLOCK: usize = 32;
/// Weight rows one CPU task dequantizes and multiplies at a time.
const TILE: usize = 8;

/// How activations enter the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// FP8 e4m3 per block of [`ACT_BLOCK`] with a UE8M0 scale (DeepSeek's reference W8A8).
    Fp8,
    /// bfloat16, nearest even.
    Bf16,
}

impl Named for Act {
    const ALL: &'static [Self] = &[Act::Fp8, Act::Bf16];
    fn name(self) -> &'static str {
        match self {
            Act::Fp8 => "fp8",
            Act::Bf16 => "bf16",
        }
    }
}

/// The largest UE8M0 code whose MXFP4 values (at most 6 = 1.5 * 2^2) stay finite in float32:
/// `6 * 2^(252 - 127)` is about 2.6e38; code 253 would give 5.1e38.
pub const MAX_FP4_SCALE_CODE: u8 = 252;

/// The value of a UE8M0 code: `2^(code - 127)`, code 0 being the subnormal `2^-127` and code
/// 255 NaN.
pub fn ue8m0_value(code: u8) -> f32 {
    match code {
        255 => f32::NAN,
        0 => f32::from_bits(1 << 22),
        c => quant::exp2i(c as i32 - 127),
    }
}

/// Rounds `v` in place to what the products see of it (see the module's numerics).
pub fn quantize_act(v: &mut [f32], act: Act) {
    match act {
        Act::Bf16 => {
            for x in v.iter_mut() {
                if x.is_finite() {
                    *x = quant::bf16_round(*x);
                }
            }
        }
        Act::Fp8 => {
            for block in v.chunks_mut(ACT_BLOCK) {
                if block.iter().any(|x| !x.is_finite()) {
                    block.fill(f32::NAN);
                    continue;
                }
                let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let e = quant::ue8m0_exponent(amax, FP8_MAX);
                let s = quant::exp2i(e);
                for x in block.iter_mut() {
                    *x = quant::fp8_decode(quant::fp8_encode(*x, e)) * s;
                }
            }
        }
    }
}

/// A quantized weight on the host: `rows` rows of `k` values.
struct HostWeight<'a> {
    data: &'a [u8],
    k: usize,
    kind: HostScales<'a>,
}

enum HostScales<'a> {
    /// FP8 codes `[rows, k]`, float32 scales `[ceil(rows / 128), ceil(k / 128)]`.
    Fp8 { scale: &'a [f32], lut: Box<[f32; 256]> },
    /// MXFP4 bytes `[rows, k / 2]`, UE8M0 codes `[rows, k / 32]`; `lut[b]` holds both values of
    /// byte `b` (low nibble first).
    Fp4 { scale: &'a [u8], lut: Box<[[f32; 2]; 256]> },
}

impl<'a> HostWeight<'a> {
    /// Borrows `data` and `scale` (checked by the caller).
    ///
    /// # Safety
    /// Both satisfy [`TensorRef`]'s contract and are not written while borrowed.
    unsafe fn new(data: &'a TensorRef, scale: &'a TensorRef, fp4: bool, k: usize) -> Result<Self> {
        let bytes = data.host::<u8>(&[DType::U8])?;
        let kind = if fp4 {
            let mut lut = Box::new([[0f32; 2]; 256]);
            for (b, pair) in lut.iter_mut().enumerate() {
                *pair = [quant::fp4_decode(b as u8 & 0xF), quant::fp4_decode(b as u8 >> 4)];
            }
            let codes = scale.host::<u8>(&[DType::U8])?;
            if let Some(i) = codes.iter().position(|c| *c > MAX_FP4_SCALE_CODE) {
                return Err(Error::value(
                    scale.name,
                    format!(
                        "UE8M0 code {} at flat index {i} scales FP4 values past float32's range (codes above \
                         {MAX_FP4_SCALE_CODE}; 255 is NaN)",
                        codes[i]
                    ),
                ));
            }
            HostScales::Fp4 { scale: codes, lut }
        } else {
            let mut lut = Box::new([0f32; 256]);
            for (b, v) in lut.iter_mut().enumerate() {
                *v = quant::fp8_decode(b as u8);
            }
            let scales = scale.host::<f32>(&[DType::F32])?;
            if let Some(i) = scales.iter().position(|s| !(s * FP8_MAX).is_finite()) {
                return Err(Error::value(
                    scale.name,
                    format!("{} at flat index {i} scales FP8 values past float32's range", scales[i]),
                ));
            }
            HostScales::Fp8 { scale: scales, lut }
        };
        Ok(HostWeight { data: bytes, k, kind })
    }

    /// Rows `r0 .. r0 + out.len() / k` as float32 into `out`.
    fn dequantize(&self, r0: usize, out: &mut [f32]) {
        let k = self.k;
        for (i, row) in out.chunks_exact_mut(k).enumerate() {
            let r = r0 + i;
            match &self.kind {
                HostScales::Fp8 { scale, lut } => {
                    let blocks = k.div_ceil(FP8_WEIGHT_BLOCK);
                    let scales = &scale[(r / FP8_WEIGHT_BLOCK) * blocks..][..blocks];
                    let codes = &self.data[r * k..][..k];
                    for ((o, c), s) in
                        row.chunks_mut(FP8_WEIGHT_BLOCK).zip(codes.chunks(FP8_WEIGHT_BLOCK)).zip(scales)
                    {
                        for (o, c) in o.iter_mut().zip(c) {
                            *o = lut[*c as usize] * s;
                        }
                    }
                }
                HostScales::Fp4 { scale, lut } => {
                    let codes = &scale[r * (k / MX_BLOCK)..][..k / MX_BLOCK];
                    let bytes = &self.data[r * (k / 2)..][..k / 2];
                    for ((o, b), c) in row.chunks_exact_mut(MX_BLOCK).zip(bytes.chunks_exact(MX_BLOCK / 2)).zip(codes) {
                        let s = ue8m0_value(*c);
                        for (pair, byte) in o.chunks_exact_mut(2).zip(b) {
                            let v = lut[*byte as usize];
                            pair[0] = v[0] * s;
                            pair[1] = v[1] * s;
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// `out[i] = a . w[i k .. (i + 1) k]` with `k = a.len()` (a multiple of 16), float32
    /// multiply-adds in 16 lanes.
    fn dots(a: &[f32], w: &[f32], out: &mut [f32]) {
        let k = a.len();
        let mut i = 0;
        while i + 4 <= out.len() {
            let row = |j: usize| &w[(i + j) * k..][..k];
            let (w0, w1, w2, w3) = (row(0), row(1), row(2), row(3));
            let mut acc = [F32x16::splat(0.0); 4];
            for c in (0..k).step_by(LANES) {
                let x = F32x16::load(&a[c..]);
                acc[0] = x.mul_add(F32x16::load(&w0[c..]), acc[0]);
                acc[1] = x.mul_add(F32x16::load(&w1[c..]), acc[1]);
                acc[2] = x.mul_add(F32x16::load(&w2[c..]), acc[2]);
                acc[3] = x.mul_add(F32x16::load(&w3[c..]), acc[3]);
            }
            for (j, a) in acc.iter().enumerate() {
                out[i + j] = a.reduce_sum();
            }
            i += 4;
        }
        while i < out.len() {
            let wi = &w[i * k..][..k];
            let mut acc = F32x16::splat(0.0);
            for c in (0..k).step_by(LANES) {
                acc = F32x16::load(&a[c..]).mul_add(F32x16::load(&wi[c..]), acc);
            }
            out[i] = acc.reduce_sum();
            i += 1;
        }
    }
}

/// `out[r n + m] = a(m) . w[r]` for `n` activation rows `a(m)` and the dequantized tile `w`
/// (`out.len() / n` rows of `k`): each activation row is read once per tile.
fn tile_product<'a>(n: usize, a: impl Fn(usize) -> &'a [f32], w: &[f32], k: usize, out: &mut [f32]) {
    let rows = w.len() / k;
    let mut col = [0f32; TILE];
    for m in 0..n {
        dots(a(m), w, &mut col[..rows]);
        for (r, v) in col[..rows].iter().enumerate() {
            out[r * n + m] = *v;
        }
    }
}

/// Writes `value(row, col)` into the `[rows, width]` float32 or bfloat16 tensor `out`.
///
/// # Safety
/// `out` satisfies [`TensorRef`]'s contract and nothing else borrows it.
unsafe fn write_out(out: &TensorRef, width: usize, value: impl Fn(usize, usize) -> f32 + Sync) -> Result<()> {
    fill_rows(out, width, |m, row| row.iter_mut().enumerate().for_each(|(c, o)| *o = value(m, c)))
}

/// Refuses a CPU result that is not finite: with finite inputs and weights in range, the float32
/// sums overflowed, and `args` (the inputs that set their size) name the cause.
///
/// # Safety
/// `out` satisfies [`TensorRef`]'s contract (float32 or bfloat16, on the CPU).
unsafe fn finite_out(out: &TensorRef, args: &str) -> Result<()> {
    match Floats::view(out)?.first_non_finite() {
        Some(i) => Err(Error::value(
            args,
            format!("the float32 sums overflow (output {i} is not finite): values or scales too large"),
        )),
        None => Ok(()),
    }
}

/// `x` (checked finite) as float32 rows of `k`, each quantized by `act`.
///
/// # Safety
/// `x` satisfies [`TensorRef`]'s contract and is not written while borrowed.
unsafe fn activations(x: &TensorRef, k: usize, act: Act) -> Result<Vec<f32>> {
    let xs = Floats::new(x)?;
    let mut a = vec![0f32; x.numel()];
    a.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        xs.read(i * k, row);
        quantize_act(row, act);
    });
    Ok(a)
}

/// The reduced dimension `K` of a quantized weight whose last dim is `cols` (`K = 2 cols` for
/// MXFP4), checked to be a positive multiple of [`MX_BLOCK`].
fn reduced_dim(w: &TensorRef, cols: usize, fp4: bool) -> Result<usize> {
    let k = if fp4 { 2 * cols } else { cols };
    if k == 0 || !k.is_multiple_of(MX_BLOCK) {
        let packed = if fp4 { format!(" ({cols} packed bytes per row)") } else { String::new() };
        return Err(Error::value(
            w.name,
            format!("the reduced dimension K = {k}{packed} must be a positive multiple of {MX_BLOCK}"),
        ));
    }
    Ok(k)
}

/// The expected scale shape of a `rows x k` weight.
fn scale_shape(fp4: bool, rows: usize, k: usize) -> [usize; 2] {
    if fp4 {
        [rows, k / MX_BLOCK]
    } else {
        [rows.div_ceil(FP8_WEIGHT_BLOCK), k.div_ceil(FP8_WEIGHT_BLOCK)]
    }
}

/// The workspace of a GPU call: present and uint8. Its size is checked by the launcher, which
/// sizes it (`gpu::qgemm`).
fn gpu_workspace(workspace: Option<&TensorRef>) -> Result<&TensorRef> {
    let ws = workspace.ok_or_else(|| Error::value("workspace", "a GPU call needs a workspace"))?;
    ws.expect_dtype(&[DType::U8])?;
    Ok(ws)
}

/// The CPU twins read DeepSeek's rows only (the Python ops convert tiles back before they call).
fn tiles_on_cpu(weight: &TensorRef) -> Error {
    Error::value(weight.name, "weights in tiles run on CUDA only (ops.weight_rows gives DeepSeek's rows)")
}

/// `out = A(x) W^T` for a quantized weight `W [R, K]`, per group.
///
/// - `weight`: `uint8`, FP8 e4m3 codes `[R, K]` with `scale` float32
///   `[ceil(R/128), ceil(K/128)]`, or (`fp4`) MXFP4 bytes `[R, K/2]` with `scale` UE8M0 codes
///   `uint8 [R, K/32]`; `K` a positive multiple of 32, `R >= 1`.
/// - `groups = 1`: `x [M, K]` -> `out [M, R]`. `groups = g > 1` (dividing `R`, `N = R / g`):
///   `x [M, g, K]`, group `i` uses rows `i N .. (i + 1) N` -> `out [M, g N]`, group-major.
/// - `x` float32 or bfloat16 (finite on the CPU); `out` of the same dtype; `M = 0` is an empty
///   call. Numerics: the module's.
/// - `tiles`: `weight` holds its bytes in 64-row tiles (`gpu::qgemm::Weights::tiles`), on CUDA
///   only: `R` a multiple of 64, `K` of 128.
///
/// # Safety
/// Every tensor satisfies [`TensorRef`]'s contract; `out` aliases nothing; `stream` belongs to the
/// tensors' device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn linear(
    x: &TensorRef, weight: &TensorRef, scale: &TensorRef, fp4: bool, groups: usize, act: Act, tiles: bool,
    workspace: Option<&TensorRef>, out: &TensorRef, stream: usize,
) -> Result<()> {
    let xt = x.expect_dtype(&[DType::F32, DType::BF16])?;
    weight.expect_dtype(&[DType::U8])?;
    scale.expect_dtype(&[if fp4 { DType::U8 } else { DType::F32 }])?;
    out.expect_dtype(&[xt])?;
    weight.expect_shape(&[None, None])?;
    let (rows, k) = (weight.dim(0), reduced_dim(weight, weight.dim(1), fp4)?);
    if rows == 0 {
        return Err(Error::value(weight.name, "must have at least one row"));
    }
    if groups == 0 || !rows.is_multiple_of(groups) {
        let msg = format!("must be >= 1 and divide the {rows} rows of {}, got {groups}", weight.name);
        return Err(Error::value("groups", msg));
    }
    let [s0, s1] = scale_shape(fp4, rows, k);
    scale.expect_shape(&[Some(s0), Some(s1)])?;
    if groups == 1 {
        x.expect_shape(&[None, Some(k)])?;
    } else {
        x.expect_shape(&[None, Some(groups), Some(k)])?;
    }
    let m = x.dim(0);
    out.expect_shape(&[Some(m), Some(rows)])?;
    let mut all = vec![x, weight, scale, out];
    all.extend(workspace);
    let device = same_device(&all)?;
    if m == 0 {
        return Ok(());
    }
    match device {
        Device::Cuda(dev) => {
            let ws = gpu_workspace(workspace)?;
            let w = gpu::qgemm::Weights { data: weight, scale, fp4, tiles };
            gpu::qgemm::linear(dev, stream, x, &w, groups, act == Act::Fp8, ws, out)
        }
        Device::Cpu if tiles => Err(tiles_on_cpu(weight)),
        Device::Cpu => {
            let w = HostWeight::new(weight, scale, fp4, k)?;
            let a = activations(x, k, act)?;
            let n = rows / groups;
            // out^T [R, M], one task per tile of TILE weight rows inside one group.
            let mut out_t = vec![0f32; rows * m];
            let mut tasks = Vec::new();
            for (g, part) in out_t.chunks_mut(n * m).enumerate() {
                for (t, tile) in part.chunks_mut(TILE * m).enumerate() {
                    tasks.push((g, t * TILE, tile));
                }
            }
            tasks.into_par_iter().for_each_init(
                || vec![0f32; TILE * k],
                |buf, (g, r0, tile)| {
                    let w_tile = &mut buf[..tile.len() / m * k];
                    w.dequantize(g * n + r0, w_tile);
                    tile_product(m, |i| &a[(i * groups + g) * k..][..k], w_tile, k, tile);
                },
            );
            write_out(out, rows, |i, r| out_t[r * m + i])?;
            finite_out(out, &format!("{}, {}", x.name, scale.name))
        }
    }
}

/// The routed experts of `x` with clamped SwiGLU, combined with the routing weights.
///
/// - `x [T, d]` float32 or bfloat16 (finite on the CPU); `idx [T, k]` int32 or int64 expert ids
///   (`k >= 1`); `weights [T, k]` float32; `out [T, d]` of the dtype of `x`.
/// - MXFP4 experts: `gate_up uint8 [E, 2I, d/2]` (rows `0..I` gate, `I..2I` up) with
///   `gate_up_scale uint8 [E, 2I, d/32]`, `down uint8 [E, d, I/2]` with
///   `down_scale uint8 [E, d, I/32]`; `d` and `I` positive multiples of 32.
/// - per pair `(t, j)`, `e = idx[t, j]`: `g = A(x_t) . W_gate[e]`, `u = A(x_t) . W_up[e]`,
///   `h = silu(min(g, limit)) * clamp(u, -limit, limit)` (float32), `y = A(h) . W_down[e]` (float32
///   sums, rounded to bfloat16 where `x` is); `out[t] = sum over j = 0..k-1 of weights[t, j] y` in
///   float32, then cast.
/// - `limit > 0` (`+inf`: no clamp). An id of -1 is no expert: the pair adds nothing. On the CPU
///   any other id outside `[0, E)` is an error naming `idx`; on the GPU such a pair contributes
///   zero too (checking would synchronize the host). The GPU needs
///   `workspace`, `uint8` of at least [`gpu::qgemm::moe_workspace_bytes`]`(T, k, E, I, d)` bytes;
///   the CPU ignores it. `T = 0` is an empty call.
/// - `tiles`: `gate_up` and `down` hold their bytes in 64-row tiles (`gpu::qgemm::Weights::tiles`),
///   on CUDA only: rows (2I and d) multiples of 64, K (d and I) of 128.
///
/// # Safety
/// As [`linear`]; `workspace` aliases no other argument.
#[allow(clippy::too_many_arguments)]
pub unsafe fn moe(
    x: &TensorRef, idx: &TensorRef, weights: &TensorRef, gate_up: &TensorRef, gate_up_scale: &TensorRef,
    down: &TensorRef, down_scale: &TensorRef, limit: f32, act: Act, tiles: bool, workspace: Option<&TensorRef>,
    out: &TensorRef, stream: usize,
) -> Result<()> {
    let xt = x.expect_dtype(&[DType::F32, DType::BF16])?;
    idx.expect_dtype(&[DType::I32, DType::I64])?;
    weights.expect_dtype(&[DType::F32])?;
    for w in [gate_up, gate_up_scale, down, down_scale] {
        w.expect_dtype(&[DType::U8])?;
    }
    out.expect_dtype(&[xt])?;
    gate_up.expect_shape(&[None, None, None])?;
    let (experts, two_inter) = (gate_up.dim(0), gate_up.dim(1));
    if experts == 0 || two_inter == 0 || !two_inter.is_multiple_of(2) {
        return Err(Error::value(
            gate_up.name,
            format!("expected [E, 2I, d/2] with E >= 1 and an even, positive 2I, got {:?}", gate_up.shape),
        ));
    }
    let inter = two_inter / 2;
    let dim = reduced_dim(gate_up, gate_up.dim(2), true)?;
    gate_up_scale.expect_shape(&[Some(experts), Some(two_inter), Some(dim / MX_BLOCK)])?;
    down.expect_shape(&[Some(experts), Some(dim), None])?;
    if reduced_dim(down, down.dim(2), true)? != inter {
        return Err(Error::value(
            down.name,
            format!(
                "expected [E, d, I/2] = [{experts}, {dim}, {}] (I = {inter} from gate_up), got {:?}",
                inter / 2,
                down.shape
            ),
        ));
    }
    down_scale.expect_shape(&[Some(experts), Some(dim), Some(inter / MX_BLOCK)])?;
    x.expect_shape(&[None, Some(dim)])?;
    let tokens = x.dim(0);
    idx.expect_shape(&[Some(tokens), None])?;
    let k = idx.dim(1);
    if k == 0 {
        return Err(Error::value(idx.name, "expected at least one expert per token, got shape [T, 0]"));
    }
    weights.expect_shape(&[Some(tokens), Some(k)])?;
    out.expect_shape(&[Some(tokens), Some(dim)])?;
    if limit.is_nan() || limit <= 0.0 {
        return Err(Error::value("limit", format!("must be > 0 (+inf for no clamp), got {limit}")));
    }
    let mut all = vec![x, idx, weights, gate_up, gate_up_scale, down, down_scale, out];
    all.extend(workspace);
    let device = same_device(&all)?;
    if tokens == 0 {
        return Ok(());
    }
    match device {
        Device::Cuda(dev) => {
            let ws = gpu_workspace(workspace)?;
            let gu = gpu::qgemm::Weights { data: gate_up, scale: gate_up_scale, fp4: true, tiles };
            let dn = gpu::qgemm::Weights { data: down, scale: down_scale, fp4: true, tiles };
            gpu::qgemm::moe(dev, stream, x, idx, weights, &gu, &dn, limit, act == Act::Fp8, ws, out)
        }
        Device::Cpu if tiles => Err(tiles_on_cpu(gate_up)),
        Device::Cpu => {
            let ids = expert_ids(idx, experts)?;
            let w = weights.host::<f32>(&[DType::F32])?;
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                return Err(Error::value(weights.name, format!("contains a non-finite value at flat index {i}")));
            }
            let gu = HostWeight::new(gate_up, gate_up_scale, true, dim)?;
            let dn = HostWeight::new(down, down_scale, true, inter)?;
            let ax = activations(x, dim, act)?;
            let plan = Plan::new(&ids, experts);
            let pairs = plan.pairs();
            // gate and up, per expert e: [2I, n_e] at 2I * start[e].
            let mut gate_up_out = vec![0f32; two_inter * pairs];
            plan.run(&mut gate_up_out, two_inter, dim, &gu, |e, q| {
                let t = plan.order[plan.start[e] + q] / k;
                &ax[t * dim..][..dim]
            });
            // h per pair in expert order: [pairs, I], then A(h).
            let mut h = vec![0f32; inter * pairs];
            h.par_chunks_mut(inter).enumerate().for_each(|(s, row)| {
                let e = plan.expert[s];
                let (n, q) = (plan.count(e), s - plan.start[e]);
                let base = &gate_up_out[two_inter * plan.start[e]..];
                for (c, o) in row.iter_mut().enumerate() {
                    let (g, u) = (base[c * n + q], base[(inter + c) * n + q]);
                    let g = if g > limit { limit } else { g };
                    *o = g / (1.0 + (-g).exp()) * u.clamp(-limit, limit);
                }
                quantize_act(row, act);
            });
            // down, per expert e: [d, n_e] at d * start[e], in the dtype of x (as the GPU stores y).
            let mut y = vec![0f32; dim * pairs];
            plan.run(&mut y, dim, inter, &dn, |e, q| &h[(plan.start[e] + q) * inter..][..inter]);
            if xt == DType::BF16 {
                y.par_iter_mut().for_each(|v| *v = quant::bf16_round(*v));
            }
            write_out(out, dim, |t, c| {
                let mut acc = 0f32;
                for (j, wt) in w[t * k..][..k].iter().enumerate() {
                    let s = plan.slot[t * k + j];
                    if s == NO_EXPERT {
                        continue;
                    }
                    let e = plan.expert[s];
                    acc += wt * y[dim * plan.start[e] + c * plan.count(e) + (s - plan.start[e])];
                }
                acc
            })?;
            finite_out(out, &format!("{}, {}, {}", x.name, gate_up_scale.name, down_scale.name))
        }
    }
}

/// A pair whose id is -1: no expert, the pair adds nothing (an expert-parallel rank's pairs for
/// experts it does not hold).
const NO_EXPERT: usize = usize::MAX;

/// Host expert ids, each checked to lie in `[0, experts)` or be -1 ([`NO_EXPERT`]).
///
/// # Safety
/// `idx` satisfies [`TensorRef`]'s contract and is not written while borrowed.
unsafe fn expert_ids(idx: &TensorRef, experts: usize) -> Result<Vec<usize>> {
    let raw: Vec<i64> = match idx.dtype {
        DType::I32 => idx.host::<i32>(&[DType::I32])?.iter().map(|v| *v as i64).collect(),
        _ => idx.host::<i64>(&[DType::I64])?.to_vec(),
    };
    let k = idx.dim(1);
    if let Some(i) = raw.iter().position(|v| *v < -1 || *v >= experts as i64) {
        return Err(Error::value(
            idx.name,
            format!(
                "expert id {} at [{}, {}] lies outside [0, {experts}) and is not -1 (no expert)",
                raw[i],
                i / k,
                i % k
            ),
        ));
    }
    Ok(raw.into_iter().map(|v| if v < 0 { NO_EXPERT } else { v as usize }).collect())
}

/// The (token, choice) pairs grouped by expert, in pair order within an expert; pairs of no
/// expert are left out.
struct Plan {
    /// Pair numbers `t k + j`, sorted by expert.
    order: Vec<usize>,
    /// Where each pair sits in `order` ([`NO_EXPERT`] for a pair of no expert).
    slot: Vec<usize>,
    /// The expert of each position of `order`.
    expert: Vec<usize>,
    /// `start[e] .. start[e + 1]`: expert `e`'s positions in `order`.
    start: Vec<usize>,
}

impl Plan {
    fn new(ids: &[usize], experts: usize) -> Self {
        let mut start = vec![0usize; experts + 1];
        for e in ids.iter().filter(|e| **e != NO_EXPERT) {
            start[e + 1] += 1;
        }
        for e in 0..experts {
            start[e + 1] += start[e];
        }
        let mut next = start.clone();
        let pairs = start[experts];
        let (mut order, mut slot, mut expert) = (vec![0; pairs], vec![NO_EXPERT; ids.len()], vec![0; pairs]);
        for (p, e) in ids.iter().enumerate() {
            if *e == NO_EXPERT {
                continue;
            }
            let s = next[*e];
            next[*e] += 1;
            order[s] = p;
            slot[p] = s;
            expert[s] = *e;
        }
        Plan { order, slot, expert, start }
    }

    fn count(&self, e: usize) -> usize {
        self.start[e + 1] - self.start[e]
    }

    /// Pairs with an expert.
    fn pairs(&self) -> usize {
        self.order.len()
    }

    /// For every expert with pairs, `dst[rows * start[e] ..]` (`[rows, n_e]`) gets the products
    /// of its activation rows `a(e, q)` (`q < n_e`, `k` values each) with its `rows` weight rows
    /// `e rows ..` of `w`; one task per tile of weight rows.
    fn run<'a>(
        &self, dst: &mut [f32], rows: usize, k: usize, w: &HostWeight, a: impl Fn(usize, usize) -> &'a [f32] + Sync,
    ) {
        let mut tasks = Vec::new();
        let mut rest = dst;
        for e in 0..self.start.len() - 1 {
            let n = self.count(e);
            let (part, tail) = rest.split_at_mut(rows * n);
            rest = tail;
            if n > 0 {
                for (t, tile) in part.chunks_mut(TILE * n).enumerate() {
                    tasks.push((e, t * TILE, tile));
                }
            }
        }
        tasks.into_par_iter().for_each_init(
            || vec![0f32; TILE * k],
            |buf, (e, r0, tile)| {
                let n = self.count(e);
                let w_tile = &mut buf[..tile.len() / n * k];
                w.dequantize(e * rows + r0, w_tile);
                tile_product(n, |q| a(e, q), w_tile, k, tile);
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{exp2i, fp4_encode, fp8_decode, fp8_encode, ue8m0_exponent};

    fn tref<T>(name: &'static str, v: &[T], shape: &[usize], dtype: DType) -> TensorRef {
        assert_eq!(v.len(), shape.iter().product::<usize>());
        TensorRef::dense(name, v.as_ptr() as usize, shape.to_vec(), dtype, Device::Cpu)
    }

    /// Deterministic values in about [-2, 2).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// A quantized weight with its float64 values `[rows, k]`.
    struct Quantized {
        data: Vec<u8>,
        scale_f32: Vec<f32>,
        scale_u8: Vec<u8>,
        values: Vec<f64>,
    }

    fn fp8_weight(rows: usize, k: usize, seed: u64) -> Quantized {
        let [s0, s1] = scale_shape(false, rows, k);
        let scale: Vec<f32> = (0..s0 * s1).map(|i| 0.5 + 0.25 * (i % 5) as f32).collect();
        let data: Vec<u8> = values(rows * k, seed).iter().map(|v| fp8_encode(*v, -6)).collect();
        let values = (0..rows * k)
            .map(|i| {
                let (r, c) = (i / k, i % k);
                fp8_decode(data[i]) as f64 * scale[(r / 128) * s1 + c / 128] as f64
            })
            .collect();
        Quantized { data, scale_f32: scale, scale_u8: vec![], values }
    }

    fn fp4_weight(rows: usize, k: usize, seed: u64) -> Quantized {
        let v = values(rows * k, seed);
        let scale: Vec<u8> = (0..rows * k / 32).map(|i| 120 + (i % 9) as u8).collect();
        let data: Vec<u8> = (0..rows * k / 2)
            .map(|i| {
                let e = scale[2 * i / 32] as i32 - 127;
                fp4_encode(v[2 * i] * exp2i(e), e) | (fp4_encode(v[2 * i + 1] * exp2i(e), e) << 4)
            })
            .collect();
        let values = (0..rows * k)
            .map(|i| {
                let nibble = (data[i / 2] >> (4 * (i % 2))) & 0xF;
                quant::fp4_decode(nibble) as f64 * 2f64.powi(scale[i / 32] as i32 - 127)
            })
            .collect();
        Quantized { data, scale_f32: vec![], scale_u8: scale, values }
    }

    /// `A(v)` computed the slow way, one value at a time.
    fn act_ref(v: &[f32], act: Act) -> Vec<f64> {
        let mut out = Vec::new();
        for b in v.chunks(ACT_BLOCK) {
            let e = ue8m0_exponent(b.iter().fold(0f32, |m, x| m.max(x.abs())), FP8_MAX);
            for x in b {
                out.push(match act {
                    Act::Fp8 => fp8_decode(fp8_encode(*x, e)) as f64 * 2f64.powi(e),
                    Act::Bf16 => quant::bf16_round(*x) as f64,
                });
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn run_linear(
        x: &[f32], m: usize, w: &Quantized, fp4: bool, rows: usize, k: usize, groups: usize, act: Act,
    ) -> Vec<f32> {
        let out = vec![0f32; m * rows];
        let xs = if groups == 1 { vec![m, k] } else { vec![m, groups, k] };
        let wshape = if fp4 { [rows, k / 2] } else { [rows, k] };
        let scale = if fp4 {
            tref("scale", &w.scale_u8, &scale_shape(true, rows, k), DType::U8)
        } else {
            tref("scale", &w.scale_f32, &scale_shape(false, rows, k), DType::F32)
        };
        unsafe {
            linear(
                &tref("x", x, &xs, DType::F32), &tref("weight", &w.data, &wshape, DType::U8), &scale, fp4, groups, act,
                false, None, &tref("out", &out, &[m, rows], DType::F32), 0,
            )
            .unwrap();
        }
        out
    }

    fn check_linear(fp4: bool, m: usize, rows: usize, k: usize, groups: usize, act: Act) {
        let w = if fp4 { fp4_weight(rows, k, 7) } else { fp8_weight(rows, k, 7) };
        let x = values(m * groups * k, 11);
        let got = run_linear(&x, m, &w, fp4, rows, k, groups, act);
        let n = rows / groups;
        for i in 0..m {
            for r in 0..rows {
                let a = act_ref(&x[(i * groups + r / n) * k..][..k], act);
                let (want, mag) = (0..k).fold((0f64, 0f64), |(s, m), c| {
                    let p = a[c] * w.values[r * k + c];
                    (s + p, m + p.abs())
                });
                // float32 sums of k products: at most k 2^-24 of the sum of magnitudes.
                let err = (got[i * rows + r] as f64 - want).abs();
                let bound = k as f64 * 2f64.powi(-24) * mag + 1e-30;
                assert!(err <= bound, "fp4 {fp4} [{i}, {r}]: {} vs {want}", got[i * rows + r]);
            }
        }
    }

    #[test]
    fn linear_matches_a_float64_sum_for_partial_blocks_and_groups() {
        for act in [Act::Fp8, Act::Bf16] {
            check_linear(false, 3, 130, 160, 1, act);
            check_linear(false, 2, 260, 96, 2, act);
            check_linear(true, 3, 37, 224, 1, act);
            check_linear(true, 5, 12, 64, 3, act);
        }
    }

    #[test]
    fn one_nonzero_weight_picks_one_scaled_activation() {
        // FP8: code 0x38 = 1.0 at row 129, column 131: block (1, 1) of the scales.
        let (rows, k) = (130, 160);
        let mut data = vec![0u8; rows * k];
        data[129 * k + 131] = 0x38;
        let scale = vec![1.0, 2.0, 4.0, 8.0];
        let w = Quantized { data, scale_f32: scale, scale_u8: vec![], values: vec![] };
        let mut x = vec![0f32; k];
        x[131] = 3.0;
        let got = run_linear(&x, 1, &w, false, rows, k, 1, Act::Fp8);
        assert_eq!(got[129], 24.0);
        assert!(got.iter().enumerate().all(|(r, v)| r == 129 || *v == 0.0));
        // MXFP4: byte 0x70 holds 0 (low nibble, column 32) and 6 (high, column 33), code 128 = 2.
        let mut data = vec![0u8; 2 * k / 2];
        data[k / 2 + 16] = 0x70;
        let w = Quantized { data, scale_f32: vec![], scale_u8: vec![128; 2 * k / 32], values: vec![] };
        let mut x = vec![0f32; k];
        x[32] = 100.0;
        x[33] = 0.5;
        let got = run_linear(&x, 1, &w, true, 2, k, 1, Act::Bf16);
        assert_eq!(got, vec![0.0, 6.0]);
    }

    #[test]
    fn activation_block_amax_sets_the_scale() {
        // amax 900 needs e = 2 (448 * 4 >= 900): 900 / 4 rounds to 224 (step 16), 1.3 / 4 to
        // 0.3125 (step 2^-5), so 1.3 becomes 1.25, and 0.001 / 4 is below half the subnormal step
        // 2^-9: it vanishes. The second block (amax 1) gets e = -8: 0.01 * 256 = 2.56 -> 2.5.
        let mut v = vec![0f32; 160];
        v[0] = 900.0;
        v[1] = 1.3;
        v[2] = 0.001;
        v[128] = 1.0;
        v[129] = 0.01;
        quantize_act(&mut v, Act::Fp8);
        assert_eq!((v[0], v[1], v[2]), (896.0, 1.25, 0.0));
        assert_eq!(v[128], 1.0);
        assert_eq!(v[129], 2.5 / 256.0);
        // a block of zeros stays zero; a non-finite value spoils its block only.
        let mut z = vec![0f32; 200];
        z[150] = f32::INFINITY;
        quantize_act(&mut z, Act::Fp8);
        assert!(z[..128].iter().all(|v| *v == 0.0) && z[128..].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn ue8m0_values_cover_every_code() {
        assert_eq!(ue8m0_value(127), 1.0);
        assert_eq!(ue8m0_value(0) as f64, 2f64.powi(-127));
        assert_eq!(ue8m0_value(1) as f64, 2f64.powi(-126));
        assert_eq!(ue8m0_value(254) as f64, 2f64.powi(127));
        assert!(ue8m0_value(255).is_nan());
    }

    struct Experts {
        gate_up: Quantized,
        down: Quantized,
        experts: usize,
        inter: usize,
        dim: usize,
    }

    impl Experts {
        /// `e` random MXFP4 experts of width `d` and intermediate size `i` (`fp4_weight` seeds).
        fn random(e: usize, i: usize, d: usize, seeds: (u64, u64)) -> Self {
            let (gate_up, down) = (fp4_weight(e * 2 * i, d, seeds.0), fp4_weight(e * d, i, seeds.1));
            Experts { gate_up, down, experts: e, inter: i, dim: d }
        }
    }

    fn run_moe(x: &[f32], ids: &[i64], wts: &[f32], ex: &Experts, limit: f32, act: Act) -> Result<Vec<f32>> {
        let (e, i, d) = (ex.experts, ex.inter, ex.dim);
        let t = x.len() / d;
        let k = ids.len().checked_div(t).unwrap_or(1);
        let out = vec![0f32; t * d];
        unsafe {
            moe(
                &tref("x", x, &[t, d], DType::F32), &tref("idx", ids, &[t, k], DType::I64),
                &tref("weights", wts, &[t, k], DType::F32),
                &tref("gate_up", &ex.gate_up.data, &[e, 2 * i, d / 2], DType::U8),
                &tref("gate_up_scale", &ex.gate_up.scale_u8, &[e, 2 * i, d / 32], DType::U8),
                &tref("down", &ex.down.data, &[e, d, i / 2], DType::U8),
                &tref("down_scale", &ex.down.scale_u8, &[e, d, i / 32], DType::U8), limit, act, false, None,
                &tref("out", &out, &[t, d], DType::F32), 0,
            )?;
        }
        Ok(out)
    }

    /// `g` and `u` of every token for expert `e`, by [`linear`] (the op's own float32 sums: the
    /// CPU MoE runs the same dequantization and the same dot kernel).
    fn gate_up_of(x: &[f32], ex: &Experts, e: usize, act: Act) -> Vec<f32> {
        let (i, d) = (ex.inter, ex.dim);
        let t = x.len() / d;
        let out = vec![0f32; t * 2 * i];
        let data = &ex.gate_up.data[e * 2 * i * d / 2..][..2 * i * d / 2];
        let scale = &ex.gate_up.scale_u8[e * 2 * i * d / 32..][..2 * i * d / 32];
        unsafe {
            let (xr, wr) = (tref("x", x, &[t, d], DType::F32), tref("weight", data, &[2 * i, d / 2], DType::U8));
            let (sr, or) = (tref("scale", scale, &[2 * i, d / 32], DType::U8), tref("out", &out, &[t, 2 * i], DType::F32));
            linear(&xr, &wr, &sr, true, 1, act, false, None, &or, 0)
                .unwrap();
        }
        out
    }

    #[test]
    fn moe_matches_a_float64_sum_built_from_its_own_h() {
        let (e, i, d) = (4, 64, 96);
        let ex = Experts::random(e, i, d, (3, 5));
        let (t, k) = (5, 2);
        let x = values(t * d, 9);
        // expert 3 gets nothing, expert 1 most pairs.
        let ids: Vec<i64> = vec![1, 0, 1, 2, 0, 1, 1, 1, 2, 1];
        let wts: Vec<f32> = (0..t * k).map(|p| 0.25 + 0.1 * p as f32).collect();
        for act in [Act::Fp8, Act::Bf16] {
            let limit = 1.5f32;
            let got = run_moe(&x, &ids, &wts, &ex, limit, act).unwrap();
            let gu: Vec<Vec<f32>> = (0..e).map(|ei| gate_up_of(&x, &ex, ei, act)).collect();
            for tt in 0..t {
                let (mut want, mut mag) = (vec![0f64; d], vec![0f64; d]);
                for j in 0..k {
                    let ei = ids[tt * k + j] as usize;
                    let row = &gu[ei][tt * 2 * i..][..2 * i];
                    let mut h: Vec<f32> = (0..i)
                        .map(|c| {
                            let g = row[c].min(limit);
                            g / (1.0 + (-g).exp()) * row[i + c].clamp(-limit, limit)
                        })
                        .collect();
                    quantize_act(&mut h, act);
                    for c in 0..d {
                        let w = &ex.down.values[(ei * d + c) * i..][..i];
                        let wt = wts[tt * k + j] as f64;
                        want[c] += wt * (0..i).map(|q| h[q] as f64 * w[q]).sum::<f64>();
                        mag[c] += wt * (0..i).map(|q| (h[q] as f64 * w[q]).abs()).sum::<f64>();
                    }
                }
                for c in 0..d {
                    // Only the down projection's and the combine's float32 sums differ from the
                    // float64 ones: at most (I + k) 2^-24 of the sum of magnitudes.
                    let err = (got[tt * d + c] as f64 - want[c]).abs();
                    let bound = (i + k) as f64 * 2f64.powi(-24) * mag[c] + 1e-30;
                    assert!(err <= bound, "{act:?} [{tt}, {c}]: {} vs {}", got[tt * d + c], want[c]);
                }
            }
        }
    }

    #[test]
    fn moe_pairs_of_no_expert_add_nothing() {
        // Pairs of id -1 give what the same pairs give pointed at an expert with weight 0, and the
        // other pairs' sums are unchanged (same order, the skipped terms were zeros).
        let d = 64;
        let ex = Experts::random(3, 32, d, (7, 11));
        let (t, k) = (4, 3);
        let x = values(t * d, 13);
        let ids: Vec<i64> = vec![-1, 0, 2, 1, -1, 1, -1, -1, -1, 2, 2, -1];
        let wts: Vec<f32> = (0..t * k).map(|p| 0.5 - 0.07 * p as f32).collect();
        let zeroed: Vec<f32> = wts.iter().zip(&ids).map(|(w, id)| if *id < 0 { 0.0 } else { *w }).collect();
        let pointed: Vec<i64> = ids.iter().map(|id| (*id).max(0)).collect();
        for act in [Act::Fp8, Act::Bf16] {
            let got = run_moe(&x, &ids, &wts, &ex, 2.0, act).unwrap();
            let want = run_moe(&x, &pointed, &zeroed, &ex, 2.0, act).unwrap();
            assert_eq!(got, want, "{act:?}");
            assert!(got[2 * d..3 * d].iter().all(|v| *v == 0.0), "token 2 has no expert");
        }
    }

    #[test]
    fn moe_refuses_bad_arguments_and_accepts_no_tokens() {
        let ex = Experts::random(2, 32, 32, (3, 5));
        let x = values(32, 1);
        let arg = |r: Result<Vec<f32>>| match r {
            Err(Error::Value { arg, .. }) => arg,
            other => panic!("{other:?}"),
        };
        assert_eq!(arg(run_moe(&x, &[2], &[1.0], &ex, 1.0, Act::Fp8)), "idx");
        assert_eq!(arg(run_moe(&x, &[-2], &[1.0], &ex, 1.0, Act::Fp8)), "idx");
        let none = run_moe(&x, &[-1], &[1.0], &ex, 1.0, Act::Fp8).unwrap();
        assert_eq!(none, vec![0f32; 32], "no expert: nothing added");
        assert_eq!(arg(run_moe(&x, &[1], &[1.0], &ex, f32::NAN, Act::Fp8)), "limit");
        assert_eq!(arg(run_moe(&x, &[1], &[1.0], &ex, 0.0, Act::Fp8)), "limit");
        assert_eq!(arg(run_moe(&x, &[1], &[f32::NAN], &ex, 1.0, Act::Fp8)), "weights");
        assert!(run_moe(&x, &[1], &[1.0], &ex, f32::INFINITY, Act::Fp8).is_ok());
        assert_eq!(run_moe(&[], &[], &[], &ex, 1.0, Act::Fp8).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn linear_refuses_bad_shapes() {
        let w = vec![0u8; 64 * 48];
        let (x, out) = (vec![0f32; 48], vec![0f32; 64]);
        let scale = vec![1f32; 1];
        let (xr, wr) = (tref("x", &x, &[1, 48], DType::F32), tref("weight", &w, &[64, 48], DType::U8));
        let (sr, or) = (tref("scale", &scale, &[1, 1], DType::F32), tref("out", &out, &[1, 64], DType::F32));
        let err = unsafe { linear(&xr, &wr, &sr, false, 1, Act::Fp8, false, None, &or, 0) };
        assert!(matches!(err, Err(Error::Value { ref arg, .. }) if arg == "weight"), "{err:?}");
        let w = vec![0u8; 64 * 64];
        let (x, scale2) = (vec![0f32; 64], vec![1f32; 2]);
        let (xr, wr) = (tref("x", &x, &[1, 64], DType::F32), tref("weight", &w, &[64, 64], DType::U8));
        let call = |scale: &TensorRef, groups: usize| unsafe { linear(&xr, &wr, scale, false, groups, Act::Fp8, false, None, &or, 0) };
        let bad = call(&tref("scale", &scale2, &[1, 2], DType::F32), 1);
        assert!(matches!(bad, Err(Error::Value { ref arg, .. }) if arg == "scale"), "{bad:?}");
        let bad = call(&tref("scale", &scale, &[1, 1], DType::F32), 3);
        assert!(matches!(bad, Err(Error::Value { ref arg, .. }) if arg == "groups"), "{bad:?}");
        let bad = call(&tref("scale", &scale, &[1, 1], DType::F32), 0);
        assert!(matches!(bad, Err(Error::Value { ref arg, .. }) if arg == "groups"), "{bad:?}");
        assert!(call(&tref("scale", &scale, &[1, 1], DType::F32), 1).is_ok());
        assert!(matches!(Act::parse("act", "fp4"), Err(Error::Value { ref arg, .. }) if arg == "act"));
        assert_eq!(Act::parse("act", "bf16"), Ok(Act::Bf16));
    }
}
