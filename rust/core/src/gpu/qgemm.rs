//! Launchers of cuda/qgemm.cu: the block-scaled FP8 / MXFP4 linear (W8A8 or bf16 activations) and
//! the fused MoE (activation quantization, plan, gate-up GEMM with clamped SwiGLU, down GEMM,
//! combine). Shapes and dtypes are checked by the caller (`crate::qgemm`); this file checks what
//! only the GPU path needs (alignment, grid limits, shared memory). Nothing here reads device
//! memory on the host, so every call can be captured in a CUDA graph.

use std::ffi::c_void;

use super::{
    attribute, launch, launch_after, launch_in_clusters, tma_2d, tma_bf16_2d, tma_map, Kernel, Launch, TmaType,
    MAX_CLUSTER,
};
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};

/// A weight as stored: FP8 e4m3 `[R, K]` codes with float32 scales `[ceil(R/128), ceil(K/128)]`,
/// or MXFP4 `[R, K/2]` bytes (low nibble first) with UE8M0 codes `[R, K/32]`. For experts the
/// leading dimension is `E` (`[E, N, ...]`), the rows of expert `e` being `e N .. (e + 1) N`.
///
/// `tiles`: the same bytes in 64-row tiles, one K step (128 values: 64 bytes MXFP4, 128 FP8) of
/// rows `64 b .. 64 b + 63` together, a row block's tiles in K order (cuda/include/qgemm.cuh
/// `w_row`; python `dsv4rs.ops.weight_tiles`). The scales keep their layout.
pub struct Weights<'a> {
    pub data: &'a TensorRef,
    pub scale: &'a TensorRef,
    pub fp4: bool,
    pub tiles: bool,
}

impl Weights<'_> {
    /// The reduced dimension K.
    fn k(&self) -> usize {
        let cols = self.data.dim(self.data.shape.len() - 1);
        if self.fp4 {
            2 * cols
        } else {
            cols
        }
    }
}

const THREADS: u32 = 128;
const KC: usize = 128;
const BN: usize = 64;
/// Pipeline stages of the tiled form (cuda/qgemm.cu `STAGES`).
const STAGES: usize = 3;
const A_ROW_BYTES: usize = 272;
/// Tokens per pass of the fused MoE for `k` choices over `experts` experts: enough for experts to
/// average about 384 rows (3 of the tiled forms' 128-row tiles), between 4,096 and 16,384 tokens,
/// which bounds the workspace (about 170 KB a token at V4-Flash width). Each row tile decodes its
/// expert's weights once: 4,096-token passes give V4-Flash's experts 96 rows each, one mostly
/// partial tile a pass (measured on the H200: 16,384 tokens took 16.8 ms in such passes, 14.7 in
/// one). A longer prefill runs in passes over one workspace.
pub fn moe_pass_tokens(k: usize, experts: usize) -> usize {
    (384 * experts / k.max(1)).clamp(MOE_PASS_MIN, MOE_PASS_MAX)
}
const MOE_PASS_MIN: usize = 4096;
const MOE_PASS_MAX: usize = 16384;
/// Most routed experts the GPU plan holds in shared memory.
pub const MAX_EXPERTS: usize = 2048;
/// Most K a block's weight scales may span in shared memory.
pub const MAX_K: usize = 32768;
const MAX_GRID_Y: usize = 65535;
const MAX_SPLITS: usize = 32;

/// Mirror of `GemmParams` in cuda/qgemm.cu (same field order and C layout); both sides check its
/// size and a few offsets at compile time.
#[repr(C)]
struct GemmParams {
    a: u64,
    a_row_stride: i64,
    a_group_stride: i64,
    a_rows: u64,
    w: u64,
    w_scale: u64,
    tiles: u64,
    tile_count: u64,
    out: u64,
    m: i64,
    out_row_stride: i64,
    out_group_stride: i64,
    out_split_stride: i64,
    a_div: i32,
    n: i32,
    k: i32,
    m_tiles: i32,
    swiglu: i32,
    limit: f32,
    out_bf16: i32,
    k_steps_per_split: i32,
    a_scale: u64,
    x: u64,
    x_bf16: i32,
    w_tiles: i32,
    weights_first: i32,
    pad_: i32,
}
const _: () = assert!(std::mem::size_of::<GemmParams>() == 168);
const _: () = assert!(
    std::mem::offset_of!(GemmParams, m) == 72
        && std::mem::offset_of!(GemmParams, a_div) == 104
        && std::mem::offset_of!(GemmParams, limit) == 124
        && std::mem::offset_of!(GemmParams, a_scale) == 136
        && std::mem::offset_of!(GemmParams, x_bf16) == 152
);

/// How a call's GEMM runs: the decode form (`qgemv`: weights as the mma's A operand, 8 or 16
/// activation rows a block, 16 weight rows a warp, K split over the block's warps) for a few rows
/// per weight, on bf16 tensor cores (`Gemv`) or FP8 ones (`GemvF8`: FP8 activations, sm_89 and
/// later, see [`use_f8`]; on Hopper `GemvWg`, the same on `wgmma`, cuda/qgemm_sm90a.cu: 64
/// weight rows a block, see [`use_wg_decode`] and [`WG_DECODE_MIN_K`]), else a tiled form:
/// `mma.sync` (`Gemm`, 64 rows a block, 64 weight rows; every GPU) or, on Hopper, `wgmma`
/// (`Wgmma`, cuda/qgemm_sm90a.cu: 128 rows a block, 64 weight rows a warpgroup; see
/// [`use_wgmma`] and [`wg_warpgroups`]; for FP8 weights and activations on FP8 tensor cores
/// `WgmmaF8`, 192 weight rows a block, see [`use_wgf8`]).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Form {
    Gemv,
    GemvF8,
    GemvWg,
    Gemm,
    Wgmma,
    WgmmaF8,
}

impl Form {
    /// Whether the form reads FP8 activation codes with their scales apart (`dsv4_act_quant_f8`).
    fn f8(self) -> bool {
        matches!(self, Form::GemvF8 | Form::GemvWg | Form::WgmmaF8)
    }
}

/// The kernel for a weight format, form and row tile.
fn gemm_kernel(fp4: bool, form: Form, bm: usize) -> Kernel {
    match (fp4, form, bm) {
        (false, Form::Gemv, 8) => Kernel::QgemvFp8N8,
        (false, Form::Gemv, _) => Kernel::QgemvFp8N16,
        (true, Form::Gemv, 8) => Kernel::QgemvFp4N8,
        (true, Form::Gemv, _) => Kernel::QgemvFp4N16,
        (false, Form::GemvF8, 8) => Kernel::QgemvF8Fp8N8,
        (false, Form::GemvF8, _) => Kernel::QgemvF8Fp8N16,
        (true, Form::GemvF8, 8) => Kernel::QgemvF8Fp4N8,
        (true, Form::GemvF8, _) => Kernel::QgemvF8Fp4N16,
        (false, Form::GemvWg, 8) => Kernel::QgemvWgFp8N8,
        (false, Form::GemvWg, 32) => Kernel::QgemvWgFp8N32,
        (false, Form::GemvWg, 64) => Kernel::QgemvWgFp8N64,
        (false, Form::GemvWg, _) => Kernel::QgemvWgFp8N16,
        (true, Form::GemvWg, 8) => Kernel::QgemvWgFp4N8,
        (true, Form::GemvWg, _) => Kernel::QgemvWgFp4N16,
        (false, Form::Gemm, _) => Kernel::QgemmFp8M64,
        (true, Form::Gemm, _) => Kernel::QgemmFp4M64,
        (false, Form::Wgmma, _) => Kernel::QgemmFp8Wgmma,
        (true, Form::Wgmma, _) => Kernel::QgemmFp4Wgmma,
        // FP8 weights only: `tiled_form` never takes it for MXFP4 ones.
        (_, Form::WgmmaF8, _) => Kernel::QgemmFp8Wgf8,
    }
}

/// The Hopper decode form's fused kernel (a dense linear in one launch: cuda/qgemm_sm90a.cu
/// `WgLayout`) for a weight format and row tile.
fn fused_kernel(fp4: bool, bm: usize) -> Kernel {
    match (fp4, bm) {
        (false, 8) => Kernel::QgemvWgFusedFp8N8,
        (false, _) => Kernel::QgemvWgFusedFp8N16,
        (true, 8) => Kernel::QgemvWgFusedFp4N8,
        (true, _) => Kernel::QgemvWgFusedFp4N16,
    }
}

/// Weight rows a block covers (a grid column): 16 in the portable decode forms, 64 in the Hopper
/// one and the portable tiled one, 192 (MXFP4) or 128 (FP8) in the Hopper tiled one, 192 in its
/// FP8 tensor-core form (FP8 weights).
fn block_rows(form: Form, fp4: bool) -> usize {
    match form {
        Form::Gemv | Form::GemvF8 => 16,
        Form::GemvWg => WG_DECODE_ROWS,
        Form::Gemm => BN,
        Form::Wgmma => 64 * wg_warpgroups(fp4),
        Form::WgmmaF8 => 64 * WGF8_WARPGROUPS,
    }
}

/// Warpgroups a block of the Hopper tiled form on FP8 tensor cores and its pipeline stages
/// (cuda/qgemm_sm90a.cu `wgf8`).
const WGF8_WARPGROUPS: usize = 3;
const WGF8_STAGES: usize = 5;

/// Warpgroups a block of the Hopper tiled form: 3 for MXFP4 weights, 2 for FP8 (cuda/qgemm_sm90a.cu
/// `Shape`); 128 threads and 64 weight rows each.
const fn wg_warpgroups(fp4: bool) -> usize {
    if fp4 {
        3
    } else {
        2
    }
}
/// Activation rows a block of the Hopper tiled form and its pipeline stages (`BT`, `STAGES`).
const WG_BT: usize = 128;
const WG_STAGES: usize = 4;

/// Orders of the quantized activations (cuda/include/qgemm.cuh `ActLayout`): what the GEMM form
/// that reads them expects.
const ACT_NATURAL: i32 = 0;
const ACT_INTERLEAVED: i32 = 1;
const ACT_WGMMA_FP8: i32 = 2;
const ACT_WGMMA_FP4: i32 = 3;

fn act_layout(form: Form, fp4: bool) -> i32 {
    match (form, fp4) {
        (Form::Wgmma, false) => ACT_WGMMA_FP8,
        (Form::Wgmma, true) => ACT_WGMMA_FP4,
        (_, true) => ACT_INTERLEAVED,
        (_, false) => ACT_NATURAL,
    }
}

/// Stages of a warp's ring in the FP8 decode form (cuda/qgemm.cu `F8Layout::STAGES`).
const F8_STAGES: usize = 4;
/// Weight rows a block of the Hopper decode form (cuda/qgemm_sm90a.cu `WgLayout`).
const WG_DECODE_ROWS: usize = 64;

/// Pipeline stages of the Hopper decode form (cuda/qgemm_sm90a.cu `WgLayout::STAGES`): 6 for the
/// unfused MXFP4 kernels (their copies issued three steps at once), 4 for the others.
const fn wg_decode_stages(fp4: bool, fused: bool) -> usize {
    if fp4 && !fused {
        6
    } else {
        4
    }
}

/// Orders of the FP8 activation codes (cuda/qgemm.cu `F8ActLayout`): what the FP8 decode form
/// that reads them expects, per weight format.
const F8_MMA_FP8: i32 = 0;
const F8_MMA_FP4: i32 = 1;
const F8_WG_FP8: i32 = 2;
const F8_WG_FP4: i32 = 3;

fn f8_layout(form: Form, fp4: bool) -> i32 {
    match (form, fp4) {
        // Both of the form's operands come from shared memory in K order, as the Hopper decode
        // form's activations for FP8 weights.
        (Form::WgmmaF8, _) | (Form::GemvWg, false) => F8_WG_FP8,
        (Form::GemvWg, true) => F8_WG_FP4,
        (_, false) => F8_MMA_FP8,
        (_, true) => F8_MMA_FP4,
    }
}

/// Dynamic shared memory of a GEMM block: the pipeline stages and the block's weight scales (the
/// tiled form), the warps' rings of weight, activation and scale stages (the FP8 decode form), or
/// none (the decode form).
fn gemm_shared_bytes(fp4: bool, form: Form, bm: usize, k: usize) -> usize {
    match form {
        Form::Gemv => 0,
        Form::GemvF8 => {
            // cuda/qgemm.cu `F8Layout`: 16 weight rows, bm activation rows of a K step, 16 x 4 B
            // of weight scales, bm float activation scales.
            let stage = 16 * if fp4 { 64 } else { 128 } + bm * KC + 64 + bm * 4;
            (THREADS as usize / 32) * F8_STAGES * stage
        }
        Form::GemvWg => wg_decode_stages(fp4, false) * wg_decode_stage(fp4, bm),
        Form::Gemm => {
            let b_row = if fp4 { 64 } else { 128 };
            let scales = if fp4 { BN * (k / 32) } else { BN * k.div_ceil(KC) * 4 };
            STAGES * (bm * A_ROW_BYTES + BN * b_row) + scales.next_multiple_of(16)
        }
        Form::Wgmma => {
            // cuda/qgemm_sm90a.cu `Stage`: the activation tile, each lane's raw weight bytes of its
            // two rows and their scale words; 1 KB of slack to align the stages to 1 KB.
            let threads = 128 * wg_warpgroups(fp4);
            let stage = WG_BT * KC * 2 + if fp4 { 2 * threads * 16 } else { 2 * 2 * threads * 16 } + 2 * threads * 4;
            WG_STAGES * stage + 1024
        }
        Form::WgmmaF8 => {
            // cuda/qgemm_sm90a.cu `wgf8`: a step's weight rows, activation codes and their float
            // scales, 1 KB aligned; 1 KB of slack.
            let stage = 64 * WGF8_WARPGROUPS * KC + WG_BT * KC + WG_BT * 4;
            WGF8_STAGES * stage.next_multiple_of(1024) + 1024
        }
    }
}

/// Most activation code bytes (row tile x the K of a split) a block of the fused kernels
/// quantizes into its shared memory: with the stages, 50 KB, four blocks an SM.
const WG_FUSED_CODES: usize = 16384;

/// Dynamic shared memory of a fused kernel's block ([`fused_kernel`]): the stages without the
/// activations (weights and their scales), then the block's activation codes and scales for `per`
/// K steps of `bm` rows.
fn fused_shared_bytes(fp4: bool, bm: usize, per: usize) -> usize {
    wg_decode_stages(fp4, true) * wg_decode_stage(fp4, 0) + per * bm * (KC + 4)
}

/// A stage of the Hopper decode form (cuda/qgemm_sm90a.cu `WgLayout::STAGE`): `rows` activation
/// rows of a K step (none in the fused kernels), 64 weight rows, 64 x 4 B of weight scales, `rows`
/// float activation scales, 128-byte aligned.
fn wg_decode_stage(fp4: bool, rows: usize) -> usize {
    (rows * KC + WG_DECODE_ROWS * if fp4 { 64 } else { 128 } + WG_DECODE_ROWS * 4 + rows * 4).next_multiple_of(128)
}

/// Whether a call that takes a tiled form runs the Hopper one (`wgmma`): compute capability 9.0
/// with the sm_90a kernels loaded, K a multiple of 128 (and for the MoE, I too) and room for its
/// shared memory. `DSV4RS_QGEMM_TILED=auto|wgmma|mma` forces the choice (for tests and
/// benchmarks: `mma` is the portable tiled form every GPU runs); forcing `wgmma` where it cannot
/// run is an error.
fn use_wgmma(dev: i32, k_ok: bool) -> Result<bool> {
    static CAPABLE: DeviceFlags = DeviceFlags::new(Vec::new());
    let capable = || {
        per_device(&CAPABLE, dev, || {
            let most = gemm_shared_bytes(false, Form::Wgmma, WG_BT, KC).max(gemm_shared_bytes(true, Form::Wgmma, WG_BT, KC));
            Ok(super::compute_capability(dev)? == (9, 0)
                && super::shared_memory_limit(dev)? >= most
                && super::has_kernel(dev, Kernel::QgemmFp4Wgmma)
                && super::has_kernel(dev, Kernel::QgemmFp8Wgmma))
        })
    };
    forced_or_auto(dev, "DSV4RS_QGEMM_TILED", "wgmma", "mma", k_ok, capable)
}

/// Whether a call of FP8 weights (`fp8_weights`) in `groups` groups of `n` rows that takes the
/// Hopper tiled form runs it on FP8 tensor cores: FP8 activations where [`use_f8`] allows them
/// (`decode_f8`: so `DSV4RS_QGEMM_KERNEL=bf16` keeps the bf16 form), one group or groups of a
/// multiple of 64 rows (the kernel loads each warpgroup's 64 rows as a TMA box, one 64-row tile
/// in the tiles layout, under one 128-row scale block), the kernel loaded and room for its shared
/// memory. MXFP4 weights keep the bf16 form: on their FP8 tensor-core form (each 32-block widened
/// to e4m3 at its step's largest exponent, two warpgroups a block) the MoE's prefill measured 1.2x
/// slower on the H100 (4.77 / 16.2 ms against 3.88 / 13.6 ms at 4,096 / 16,384 tokens of V4-Flash).
fn use_wgf8(dev: i32, decode_f8: bool, fp8_weights: bool, groups: usize, n: usize) -> Result<bool> {
    static CAPABLE: DeviceFlags = DeviceFlags::new(Vec::new());
    if !decode_f8 || !fp8_weights || !(groups == 1 || n.is_multiple_of(64)) {
        return Ok(false);
    }
    per_device(&CAPABLE, dev, || {
        Ok(super::shared_memory_limit(dev)? >= gemm_shared_bytes(false, Form::WgmmaF8, WG_BT, KC)
            && super::has_kernel(dev, Kernel::QgemmFp8Wgf8))
    })
}

/// The tiled form a call of `groups` groups of `n` weight rows runs: the Hopper one where
/// [`use_wgmma`] allows (on FP8 tensor cores where [`use_wgf8`] does), else the portable one.
fn tiled_form(dev: i32, k_ok: bool, decode: Form, fp4: bool, groups: usize, n: usize) -> Result<Form> {
    Ok(match use_wgmma(dev, k_ok)? {
        true if use_wgf8(dev, decode.f8(), !fp4, groups, n)? => Form::WgmmaF8,
        true => Form::Wgmma,
        false => Form::Gemm,
    })
}

/// A kernel choice an environment variable may force: unset, empty or `auto` takes the special
/// kernel where the call `fits` and the GPU is `capable`; `off` never takes it; `on` takes it
/// where the call fits and is an error on a GPU that cannot run it, as is any other value.
fn forced_or_auto(
    dev: i32, var: &str, on: &str, off: &str, fits: bool, capable: impl Fn() -> Result<bool>,
) -> Result<bool> {
    match std::env::var(var).ok().as_deref() {
        None | Some("") | Some("auto") => Ok(fits && capable()?),
        Some(v) if v == off => Ok(false),
        Some(v) if v == on && capable()? => Ok(fits),
        Some(other) => {
            Err(Error::value(var, format!("must be auto, {on} or {off}, and one GPU {dev} runs (got {other:?})")))
        }
    }
}

/// A property of each GPU, probed once per process (what it is and which kernels load on it do
/// not change).
type DeviceFlags = std::sync::Mutex<Vec<(i32, bool)>>;

fn per_device(cache: &DeviceFlags, dev: i32, probe: impl FnOnce() -> Result<bool>) -> Result<bool> {
    let mut seen = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, v)) = seen.iter().find(|(d, _)| *d == dev) {
        return Ok(*v);
    }
    let v = probe()?;
    seen.push((dev, v));
    Ok(v)
}

/// Whether a decode-form call runs on FP8 `mma.sync`: FP8 activations, K a multiple of 128, and
/// a GPU of compute capability 8.9 or later running code built for it (not the build's portable
/// PTX, which predates FP8 `mma`). `DSV4RS_QGEMM_KERNEL=auto|fp8|bf16` forces the choice (for
/// tests and benchmarks: `bf16` keeps the bf16 decode form, whose sums are float32 throughout);
/// forcing `fp8` where it cannot run is an error.
fn use_f8(dev: i32, act_fp8: bool, k: usize) -> Result<bool> {
    static CAPABLE: DeviceFlags = DeviceFlags::new(Vec::new());
    let capable = || {
        per_device(&CAPABLE, dev, || {
            Ok(super::compute_capability(dev)? >= (8, 9) && super::ptx_version(dev, Kernel::QgemvF8Fp4N8)? >= 89)
        })
    };
    forced_or_auto(dev, "DSV4RS_QGEMM_KERNEL", "fp8", "bf16", act_fp8 && k.is_multiple_of(KC), capable)
}

/// Whether a call that takes the FP8 decode form runs the Hopper one (`wgmma`): compute capability
/// 9.0 with the sm_90a kernels loaded. `DSV4RS_QGEMM_DECODE=auto|wgmma|mma` forces the choice (for
/// tests and benchmarks: `mma` is the `mma.sync` form that GPUs of compute capability 8.9 and 12.x
/// run); forcing `wgmma` where it cannot run is an error.
fn use_wg_decode(dev: i32) -> Result<bool> {
    static CAPABLE: DeviceFlags = DeviceFlags::new(Vec::new());
    let capable = || {
        per_device(&CAPABLE, dev, || {
            Ok(super::compute_capability(dev)? == (9, 0)
                && [Kernel::QgemvWgFp8N8, Kernel::QgemvWgFp8N16, Kernel::QgemvWgFp4N8, Kernel::QgemvWgFp4N16]
                    .into_iter()
                    .all(|kernel| super::has_kernel(dev, kernel)))
        })
    };
    forced_or_auto(dev, "DSV4RS_QGEMM_DECODE", "wgmma", "mma", true, capable)
}

/// The decode form of a call: FP8 on `wgmma` or `mma.sync` where [`use_f8`] allows, else bf16.
fn decode_form(dev: i32, act_fp8: bool, k: usize) -> Result<Form> {
    Ok(match use_f8(dev, act_fp8, k)? {
        false => Form::Gemv,
        true if use_wg_decode(dev)? => Form::GemvWg,
        true => Form::GemvF8,
    })
}

/// K below which a dense linear keeps the `mma.sync` FP8 decode form on Hopper. Measured on the
/// H200 (V4-Flash's q_b, K 1,024, 32,768 rows; two runs each): 8 rows took 0.023-0.024 ms on
/// `wgmma` against 0.019-0.020 on `mma.sync` (1 row: 0.019 both); every linear with K of 2,048
/// or more was as fast or faster on `wgmma`.
const WG_DECODE_MIN_K: usize = 2048;

/// [`decode_form`] for a dense linear of `m` rows, and whether it takes the wide tiles (FP8
/// weights only; see [`use_wg_wide`]): for K below [`WG_DECODE_MIN_K`] the Hopper decode form
/// only in its wide tiles.
fn linear_decode_form(dev: i32, act_fp8: bool, k: usize, m: usize, fp4: bool) -> Result<(Form, bool)> {
    let form = decode_form(dev, act_fp8, k)?;
    // (`use_wg_wide` is asked for MXFP4 weights too, so that a bad DSV4RS_QGEMM_WIDE is refused
    // whatever the weights.)
    let wide = form == Form::GemvWg
        && (17..=WG_WIDE_MAX_ROWS).contains(&m)
        && use_wg_wide(dev, k >= WG_WIDE_MIN_K)?
        && !fp4;
    Ok(match form {
        Form::GemvWg if k < WG_DECODE_MIN_K && !wide => (Form::GemvF8, false),
        form => (form, wide),
    })
}

/// Most rows a dense call takes the Hopper decode form's wide tiles for (32 or 64 activation rows
/// a block: `dsv4_qgemv_wg_fp8_n32` / `_n64`, FP8 weights), which read each weight once where
/// 16-row tiles read it once a tile.
const WG_WIDE_MAX_ROWS: usize = 64;

/// K from which a dense call of 17 to [`WG_WIDE_MAX_ROWS`] rows takes the wide tiles by default.
/// Measured on the H200 at 64 rows (V4-Flash's linears, `DSV4RS_QGEMM_WIDE=off|on python
/// benches/gpu_bench.py --quick --only linear`, two runs each, ms, 16-row tiles against wide):
/// o_b (K 8192) 0.046 against 0.039; but q_a 0.010 / 0.013, kv 0.008 / 0.011, o_a 0.042 /
/// 0.047 and the shared expert's gate 0.017 / 0.019 (K 4096), its down 0.017 / 0.017 (K 2048),
/// q_b (K 1024, the tiled form) 0.041 / 0.045. Where the weights are small, or K short, the
/// 16-row tiles' four times as many blocks (the weights read again from L2) keep more loads in
/// flight than one wide tile, whose block does four times the work a step at three blocks an SM.
const WG_WIDE_MIN_K: usize = 8192;

/// Whether a dense FP8 call of 17 to [`WG_WIDE_MAX_ROWS`] rows on the Hopper decode form runs its
/// wide tiles: by default where it `pays` (K of at least [`WG_WIDE_MIN_K`]) on every GPU that
/// runs the form. `DSV4RS_QGEMM_WIDE=auto|on|off` forces the choice (for tests and benchmarks:
/// `on` for every K; `off` keeps 16-row tiles or the tiled form).
fn use_wg_wide(dev: i32, pays: bool) -> Result<bool> {
    static CAPABLE: DeviceFlags = DeviceFlags::new(Vec::new());
    pays_or_forced(dev, "DSV4RS_QGEMM_WIDE", &CAPABLE, &[Kernel::QgemvWgFp8N32, Kernel::QgemvWgFp8N64], pays)
}

/// A Hopper decode kernel choice that `var=auto|on|off` may force: by default where the call
/// `pays` on every GPU that holds all of `kernels` (probed once a device into `capable`); `on`
/// wherever it runs, whether it pays or not; `off` never.
fn pays_or_forced(dev: i32, var: &str, capable: &DeviceFlags, kernels: &[Kernel], pays: bool) -> Result<bool> {
    let auto = matches!(std::env::var(var).ok().as_deref(), None | Some("") | Some("auto"));
    let has = || per_device(capable, dev, || Ok(kernels.iter().all(|kernel| super::has_kernel(dev, *kernel))));
    Ok(forced_or_auto(dev, var, "on", "off", true, has)? && (pays || !auto))
}

fn check_k(w: &Weights) -> Result<usize> {
    let k = w.k();
    if !k.is_multiple_of(32) || k == 0 || k > MAX_K {
        return Err(Error::value(
            w.data.name,
            format!("the GPU kernels take K (the reduced dimension) a multiple of 32 in 32..={MAX_K}, got {k}"),
        ));
    }
    Ok(k)
}

/// Weights in tiles ([`Weights::tiles`]) hold whole tiles: `rows` (an expert's, or all of a
/// linear's) a multiple of 64 and K of 128.
fn check_tiles(w: &Weights, rows: usize) -> Result<()> {
    if w.tiles && (!rows.is_multiple_of(64) || !w.k().is_multiple_of(KC)) {
        return Err(Error::value(
            w.data.name,
            format!("weights in tiles need rows a multiple of 64 and K of 128, got {rows} rows and K {}", w.k()),
        ));
    }
    Ok(())
}

/// Tensors the kernels copy 16 bytes at a time start 16-byte aligned; MXFP4 scale codes 4-byte
/// aligned (a row's codes of a 128-wide K step are copied as one word; FP8 scales are float32,
/// aligned by type).
fn check_aligned(t: &TensorRef, bytes: usize) -> Result<()> {
    if !t.ptr.is_multiple_of(bytes) {
        return Err(Error::value(
            t.name,
            format!("the GPU kernels need {bytes}-byte aligned tensors (pass a fresh contiguous tensor)"),
        ));
    }
    Ok(())
}


/// A carved region of the workspace: byte offset and size, each 256-byte aligned.
struct Carve {
    at: usize,
}

impl Carve {
    fn take(&mut self, bytes: usize) -> usize {
        let at = self.at;
        self.at += bytes.next_multiple_of(256);
        at
    }
}

/// Rows of a dense call up to which the FP8 decode form runs (in tiles of 16), for K of at least
/// `F8_DECODE_MIN_K`. Measured on the H200 at V4-Flash's shapes, 64 rows: the decode form took
/// 0.020 / 0.050 / 0.026 / 0.024 ms for q_a, o_b, the shared expert's gate and down (K 4096, 8192,
/// 4096, 2048) against 0.027 / 0.056 / 0.030 / 0.029 for the tiled form; q_b (K 1024: two K steps
/// a warp, each row tile paying the pipeline's start) 0.087 against 0.060.
const F8_DECODE_MAX_ROWS: usize = 64;
const F8_DECODE_MIN_K: usize = 2048;

/// A dense call's shape: form, row tile, split-K count and K steps per split. Up to 16 rows
/// (decode) take the decode form with 8- or 16-row tiles (on FP8 `mma.sync` with `f8`); 17 to 64
/// rows take the Hopper decode form's wide tiles of 32 or 64 rows where they run (FP8 weights,
/// [`use_wg_wide`]), else, with `f8` and a long K, the decode form in tiles of 16 (each tile
/// reads the weights again, mostly from L2); more rows take the tiled form with 64. K is split
/// so that the grid covers the GPU four times when it would not (a decode linear has few weight
/// rows and must keep many loads in flight), the decode form keeping at least a step per warp,
/// the Hopper one in at most [`MAX_CLUSTER`] splits. `fused`: the Hopper decode form's fused kernel runs the call
/// (its row tile's activation codes of a split fit [`WG_FUSED_CODES`]): the activations
/// quantized by each block, the splits added within their cluster, one launch.
struct LinearShape {
    form: Form,
    bm: usize,
    splits: usize,
    per: usize,
    fused: bool,
}

fn linear_shape(dev: i32, m: usize, groups: usize, n: usize, k: usize, fp4: bool, act_fp8: bool) -> Result<LinearShape> {
    let sms = attribute(dev, cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
    let (decode, wide) = linear_decode_form(dev, act_fp8, k, m, fp4)?;
    let tiled = || tiled_form(dev, k.is_multiple_of(KC), decode, fp4, groups, n);
    plan_linear(m, groups, n, k, fp4, decode, wide, sms, tiled, |pays| use_wg_fused(dev, pays))
}

/// [`linear_shape`]'s rule for a GPU of `sms` SMs: `wide` whether 17 to [`WG_WIDE_MAX_ROWS`]
/// rows take the Hopper decode form's wide tiles (`decode` is then that form), `tiled` the tiled
/// form the GPU runs (asked only for calls that take one), `fused(pays)` whether the fused kernel
/// runs a call that fits it (see [`use_wg_fused`]).
#[allow(clippy::too_many_arguments)]
fn plan_linear(
    m: usize, groups: usize, n: usize, k: usize, fp4: bool, decode: Form, wide: bool, sms: usize,
    tiled: impl FnOnce() -> Result<Form>, fused: impl FnOnce(bool) -> Result<bool>,
) -> Result<LinearShape> {
    let (form, bm) = match m {
        0..=8 => (decode, 8),
        9..=16 => (decode, 16),
        17..=32 if wide => (decode, 32),
        33..=WG_WIDE_MAX_ROWS if wide => (decode, 64),
        17..=F8_DECODE_MAX_ROWS if decode.f8() && k >= F8_DECODE_MIN_K => (decode, 16),
        _ => match tiled()? {
            form @ (Form::Wgmma | Form::WgmmaF8) => (form, WG_BT),
            _ => (Form::Gemm, 64),
        },
    };
    let steps = k.div_ceil(KC);
    let blocks = n.div_ceil(block_rows(form, fp4)) * groups * m.div_ceil(bm);
    // The Hopper tiled form holds one block an SM: covering the GPU once suffices, with at least
    // 4 K steps a slice to fill its pipeline.
    let (cover, most) = match form {
        Form::Gemv | Form::GemvF8 => (4 * sms, steps.div_ceil(THREADS as usize / 32)),
        // The wide tiles' kernels hold three blocks an SM (registers).
        Form::GemvWg => (if bm > 16 { 3 } else { 4 } * sms, steps.min(MAX_CLUSTER)),
        Form::Gemm => (4 * sms, steps),
        Form::Wgmma | Form::WgmmaF8 => (sms, steps / 4),
    };
    let want = cover.div_ceil(blocks.max(1)).clamp(1, MAX_SPLITS.min(most).max(1));
    let per = steps.div_ceil(want);
    let splits = steps.div_ceil(per);
    let fused = form == Form::GemvWg
        && bm <= 16
        && bm * per * KC <= WG_FUSED_CODES
        && fused(m <= 16 && blocks * splits <= WG_FUSED_MAX_BLOCKS_PER_SM * sms)?;
    Ok(LinearShape { form, bm, splits, per, fused })
}

/// Blocks per SM up to which a dense call takes the fused kernel by default (with one row tile).
/// Measured on the H200 at V4-Flash's shapes, one row and eight (ms, fused against three
/// kernels, the same wheel alternating): q_a (128 blocks) 0.007 / 0.007 against 0.007 / 0.007,
/// kv (64) 0.006 / 0.006 against 0.007-0.008 / 0.008, the shared expert's gate (256) 0.008 /
/// 0.009 against 0.009 / 0.009-0.010; but o_a (640 blocks) 0.022 / 0.024 against 0.016 / 0.017,
/// o_b and the shared expert's down (512) 0.021 / 0.024 and 0.011 / 0.011 against 0.016 / 0.017
/// and 0.009 / 0.010, and 64 rows (four row tiles) slower throughout.
const WG_FUSED_MAX_BLOCKS_PER_SM: usize = 2;

/// Whether a dense call on the Hopper decode form whose activation codes fit runs its fused
/// kernel: by default where it `pays` (see [`WG_FUSED_MAX_BLOCKS_PER_SM`]) on every GPU that
/// runs the form (the kernels are built beside it). `DSV4RS_QGEMM_FUSED=auto|on|off` forces the
/// choice (for tests and benchmarks: `on` wherever the codes fit; `off` runs the activation
/// quantization, the GEMM and the split-K sum as three kernels).
fn use_wg_fused(dev: i32, pays: bool) -> Result<bool> {
    static CAPABLE: DeviceFlags = DeviceFlags::new(Vec::new());
    let kernels =
        [Kernel::QgemvWgFusedFp8N8, Kernel::QgemvWgFusedFp8N16, Kernel::QgemvWgFusedFp4N8, Kernel::QgemvWgFusedFp4N16];
    pays_or_forced(dev, "DSV4RS_QGEMM_FUSED", &CAPABLE, &kernels, pays)
}

/// Bytes of device workspace [`linear`] needs: the quantized activations (unless `x` is bf16,
/// `act_fp8` false and the weight FP8, when `x` is read directly) and the split-K partial sums.
#[allow(clippy::too_many_arguments)]
pub fn linear_workspace_bytes(
    dev: i32, m: usize, groups: usize, n: usize, k: usize, x_bf16: bool, act_fp8: bool, fp4: bool,
) -> Result<usize> {
    if m == 0 {
        return Ok(0);
    }
    let shape = linear_shape(dev, m, groups, n, k, fp4, act_fp8)?;
    if shape.fused {
        return Ok(0);
    }
    Ok(linear_layout(m, groups, n, k, quantizes_x(x_bf16, act_fp8, fp4, shape.form), shape.splits).total)
}

/// Regions of a [`linear`] call's workspace: byte offsets of the quantized activations and of the
/// split-K partial sums, where the call has them.
struct LinearLayout {
    a: Option<usize>,
    partial: Option<usize>,
    total: usize,
}

fn linear_layout(m: usize, groups: usize, n: usize, k: usize, quantize: bool, splits: usize) -> LinearLayout {
    let mut c = Carve { at: 0 };
    let a = quantize.then(|| c.take(m * groups * k * 2));
    let partial = (splits > 1).then(|| c.take(splits * m * groups * n * 4));
    LinearLayout { a, partial, total: c.at }
}

/// Quantizes (FP8 per 1x128, UE8M0) or rounds (bf16) `rows` rows of `k` values into bf16 `out`,
/// in the order the GEMM form reading them expects (`layout`, see [`act_layout`]).
#[allow(clippy::too_many_arguments)]
unsafe fn act_quant(
    dev: i32, stream: usize, x: u64, x_bf16: bool, rows: usize, k: usize, act_fp8: bool, layout: i32, out: u64,
) -> Result<()> {
    act_quant_gather(dev, stream, x, x_bf16, rows, k, act_fp8, layout, out, None)
}

/// [`act_quant`] of gathered rows: with `gather = (map, div, count)`, output row `i` is input
/// row `map[i] / div` for the first `*count` rows (device memory) and zeros past them.
#[allow(clippy::too_many_arguments)]
unsafe fn act_quant_gather(
    dev: i32, stream: usize, x: u64, x_bf16: bool, rows: usize, k: usize, act_fp8: bool, layout: i32, out: u64,
    gather: Option<(u64, i32, u64)>,
) -> Result<()> {
    let (x_bf16, rows64, k32, act) = (x_bf16 as i32, rows as i64, k as i32, act_fp8 as i32);
    let (map, div, count) = gather.unwrap_or((0, 1, 0));
    let (kernel, cols) = match quant_wide(rows)? {
        true => (Kernel::ActQuantWide, k.div_ceil(2 * KC * WIDE_PASSES)),
        false => (Kernel::ActQuant, k.div_ceil(KC)),
    };
    let cfg = Launch { grid: (rows.div_ceil(4) as u32, cols as u32, 1), block: (128, 1, 1), shared_bytes: 0, stream };
    launch(dev, kernel, &cfg, &mut crate::kernel_args!(x, x_bf16, rows64, k32, act, layout, out, map, div, count))
}

/// Quantizes `rows` rows of `k` values (k % 128 == 0) for an FP8 form into the region at `out`
/// (`2 rows k` bytes, as [`act_quant`]'s): FP8 codes `[rows, k]` in the order of cuda/qgemm.cu
/// `f8_act_pos` for `layout` ([`f8_layout`]), then float32 scales: `[rows, k / 128]` for the
/// decode forms, or for the Hopper tiled form ([`F8Scales::Steps`]) a step's scales of
/// consecutive rows together, the rows padded to a multiple of 4 (its TMA loads; [`f8_scale_rows`]).
/// Returns the scales' address.
#[allow(clippy::too_many_arguments)]
unsafe fn act_quant_f8(
    dev: i32, stream: usize, x: u64, x_bf16: bool, rows: usize, k: usize, layout: i32, out: u64, scales_by: F8Scales,
) -> Result<u64> {
    let scales = f8_scales_at(out, rows, k);
    let (x_bf16, rows64, k32) = (x_bf16 as i32, rows as i64, k as i32);
    let (scale_rows, groups) = match scales_by {
        F8Scales::Rows => (0i64, 1i32),
        F8Scales::Steps { groups } => (f8_scale_rows(rows / groups) as i64, groups as i32),
    };
    let (kernel, cols) = match quant_wide(rows)? {
        true => (Kernel::ActQuantF8Wide, (k / KC).div_ceil(2 * WIDE_PASSES)),
        false => (Kernel::ActQuantF8, k / KC),
    };
    let cfg = Launch { grid: (rows.div_ceil(4) as u32, cols as u32, 1), block: (128, 1, 1), shared_bytes: 0, stream };
    launch(
        dev,
        kernel,
        &cfg,
        &mut crate::kernel_args!(x, x_bf16, rows64, k32, layout, out, scales, scale_rows, groups),
    )?;
    Ok(scales)
}

/// Passes of a warp of the wide quantization kernels (cuda/qgemm.cu `WIDE_PASSES`), two 128-blocks
/// each.
const WIDE_PASSES: usize = 2;

/// Rows from which a call quantizes its activations with the wide kernels (`dsv4_act_quant_wide`,
/// `dsv4_act_quant_f8_wide`: a half warp a 128-block, two passes a warp, the same values), nearer
/// the copy rate for a prefill's many rows; fewer rows (a decode step's) keep the warp a block,
/// whose chain is shorter. Measured on an H100 at V4-Flash width (docs/kernels/qgemm.md): the wide
/// form took a prefill's FP8 quantization from 2.83 to 1.23 ms a step, and at batch 1 lengthened
/// the step (0.192 -> 0.200 ms a layer with two passes a warp, 0.190 -> 0.196 with one).
const WIDE_QUANT_ROWS: usize = 256;

/// Whether a call of `rows` rows takes the wide kernels: `DSV4RS_ACT_QUANT=auto` (or unset: from
/// [`WIDE_QUANT_ROWS`] rows), `wide` or `narrow` (every call; the tests compare the two).
fn quant_wide(rows: usize) -> Result<bool> {
    match std::env::var("DSV4RS_ACT_QUANT").ok().as_deref() {
        None | Some("") | Some("auto") => Ok(rows >= WIDE_QUANT_ROWS),
        Some("wide") => Ok(true),
        Some("narrow") => Ok(false),
        Some(other) => Err(Error::value("DSV4RS_ACT_QUANT", format!("must be auto, wide or narrow (got {other:?})"))),
    }
}

/// Where [`act_quant_f8`]'s scales start: right after the `rows x k` codes at `out`.
fn f8_scales_at(out: u64, rows: usize, k: usize) -> u64 {
    out + (rows * k) as u64
}

/// How [`act_quant_f8`] lays out the activations' scales: `[rows, k / 128]` (the decode forms), or
/// by step for the Hopper tiled form's TMA loads: `rows` being `m` rows of `groups` groups each,
/// row `r`'s scale of block `c` of group `g` at `(g k / 128 + c) f8_scale_rows(m) + r`.
#[derive(Clone, Copy)]
enum F8Scales {
    Rows,
    Steps { groups: usize },
}

/// Rows of the by-step scale layout ([`F8Scales::Steps`]): `m` padded to a multiple of 4 (a TMA
/// tensor's rows lie a multiple of 16 bytes apart).
fn f8_scale_rows(m: usize) -> usize {
    m.next_multiple_of(4)
}

/// Whether [`linear`] reads a quantized copy of `x` rather than `x` itself: always for FP8
/// activations or float32 `x`, for MXFP4 weights (their activations are interleaved) and for the
/// Hopper tiled form (its own order).
fn quantizes_x(x_bf16: bool, act_fp8: bool, fp4: bool, form: Form) -> bool {
    act_fp8 || !x_bf16 || fp4 || form == Form::Wgmma
}

/// Launches the GEMM over `p`: grid columns of [`block_rows`] weight rows (of SwiGLU pairs
/// with `p.swiglu`, half as many intermediate columns), `tiles_y` row tiles, `splits` K slices.
/// The Hopper form also gets the tensor map of its activations, `a_rows` rows of
/// `p.a_row_stride` elements at `p.a` (rows read directly: `p.a_rows` unused), and on FP8 tensor
/// cores (dense calls only) that of its `w_rows` weight rows (groups flattened). `fused`: the
/// Hopper decode form's fused kernel, its splits a cluster.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    dev: i32, stream: usize, fp4: bool, form: Form, bm: usize, tiles_y: usize, splits: usize, a_rows: usize,
    w_rows: usize, fused: bool, p: &mut GemmParams,
) -> Result<()> {
    let k = p.k as usize;
    let cols = if p.swiglu != 0 { p.n as usize / 2 } else { p.n as usize };
    let per_block = if p.swiglu != 0 { block_rows(form, fp4) / 2 } else { block_rows(form, fp4) };
    let grid = (cols.div_ceil(per_block) as u32, tiles_y as u32, splits as u32);
    let threads = match form {
        // The warpgroups that compute and the one that issues their activation tiles' TMA loads.
        Form::Wgmma => 128 * (wg_warpgroups(fp4) as u32 + 1),
        // Three warpgroups and the one that issues their TMA loads (cuda/qgemm_sm90a.cu `wgf8`).
        Form::WgmmaF8 => 128 * (WGF8_WARPGROUPS as u32 + 1),
        _ => THREADS,
    };
    if fused {
        let shared_bytes = fused_shared_bytes(fp4, bm, p.k_steps_per_split as usize) as u32;
        let cfg = Launch { grid, block: (threads, 1, 1), shared_bytes, stream };
        return launch_in_clusters(dev, fused_kernel(fp4, bm), &cfg, splits as u32, &mut [p as *mut GemmParams as *mut c_void]);
    }
    let cfg = Launch { grid, block: (threads, 1, 1), shared_bytes: gemm_shared_bytes(fp4, form, bm, k) as u32, stream };
    if form == Form::Wgmma {
        let stride = p.a_row_stride as u64;
        let mut map = tma_bf16_2d(p.a, stride, a_rows as u64, 2 * stride, KC as u32 / 2, WG_BT as u32)?;
        return launch(dev, gemm_kernel(fp4, form, bm), &cfg, &mut [p as *mut GemmParams as *mut c_void, &mut map as *mut _ as *mut c_void]);
    }
    if form == Form::WgmmaF8 {
        // The weights: a step's 64 rows a warpgroup, one box of DeepSeek's rows or (tiles: the
        // 128-byte rows of a 64-row tile, its steps, the tiles) a tile a warpgroup in one box;
        // the activation codes, a step a 128 x 128 box; all swizzled as wgmma reads them. The
        // codes' scales by step (`F8Scales::Steps`: a step's 128 rows from the tile's first, one
        // box).
        let (k64, rows) = (k as u64, w_rows as u64);
        let rows_box = 64 * WGF8_WARPGROUPS as u32;
        let mut weights = match p.w_tiles != 0 {
            true => tma_map(
                TmaType::U8,
                true,
                p.w,
                &[KC as u64, 64, k64 / KC as u64, rows / 64],
                &[KC as u64, 64 * KC as u64, 64 * k64],
                &[KC as u32, 64, 1, rows_box / 64],
            )?,
            false => tma_2d(TmaType::U8, true, p.w, k64, rows, k64, KC as u32, rows_box)?,
        };
        let stride = p.a_row_stride as u64;
        let scale_rows = f8_scale_rows(a_rows) as u64;
        let mut map = tma_2d(TmaType::U8, true, p.a, stride, a_rows as u64, stride, KC as u32, WG_BT as u32)?;
        let mut scales =
            tma_2d(TmaType::F32, false, p.a_scale, scale_rows, stride / KC as u64, 4 * scale_rows, WG_BT as u32, 1)?;
        let mut args = [
            p as *mut GemmParams as *mut c_void,
            &mut weights as *mut _ as *mut c_void,
            &mut map as *mut _ as *mut c_void,
            &mut scales as *mut _ as *mut c_void,
        ];
        return launch(dev, gemm_kernel(fp4, form, bm), &cfg, &mut args);
    }
    // The MoE's GEMMs on these forms (work items from the plan) start after the kernel before
    // them: at V4-Flash's shapes and one token the MoE took 50 us a layer with them started early
    // as programmatic dependents, waiting first, 45 us launched so (docs/kernels/qgemm.md). The
    // down GEMM on the Hopper decode form with `weights_first` is the exception: it starts early
    // and issues its first weight copies before it waits.
    if p.tiles != 0 {
        let mut cfg = cfg;
        if form == Form::GemvWg {
            cfg.shared_bytes = spread_shared_bytes(dev, &cfg)?;
        }
        let args = &mut [p as *mut GemmParams as *mut c_void];
        return match p.weights_first != 0 {
            true => launch(dev, gemm_kernel(fp4, form, bm), &cfg, args),
            false => launch_after(dev, gemm_kernel(fp4, form, bm), &cfg, args),
        };
    }
    launch(dev, gemm_kernel(fp4, form, bm), &cfg, &mut [p as *mut GemmParams as *mut c_void])
}

/// Dynamic shared memory for a launch of the Hopper decode form whose grid is under the GPU's
/// blocks at full occupancy: enough that an SM holds at most `ceil(blocks / SMs)` of them, so
/// that the blocks spread evenly however many SMs the kernels before them still hold (an SM
/// left with twice its share sets the kernel's time); `cfg`'s own where that is more, or where
/// `DSV4RS_MOE_SPREAD=off`.
fn spread_shared_bytes(dev: i32, cfg: &Launch) -> Result<u32> {
    use cudarc::driver::sys::CUdevice_attribute::*;
    if !switched_on(dev, "DSV4RS_MOE_SPREAD")? {
        return Ok(cfg.shared_bytes);
    }
    let sms = attribute(dev, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
    let per_sm = attribute(dev, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)? as usize;
    let per_block = attribute(dev, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
    let blocks = cfg.grid.0 as usize * cfg.grid.1 as usize * cfg.grid.2 as usize;
    let share = blocks.div_ceil(sms.max(1)).max(1);
    // An SM reserves 1 KB a block beside its dynamic shared memory.
    let bytes = (per_sm / share).saturating_sub(1024) / 128 * 128;
    Ok(bytes.min(per_block).max(cfg.shared_bytes as usize) as u32)
}

/// Whether the MoE's down GEMM on the Hopper decode form starts as a programmatic dependent of h's
/// quantization and issues its first weight copies before it waits (by default);
/// `DSV4RS_MOE_DOWN_EARLY=off` launches it after that kernel has completed (the same bits).
fn moe_down_early(dev: i32) -> Result<bool> {
    switched_on(dev, "DSV4RS_MOE_DOWN_EARLY")
}

/// Most 128-value blocks of the tokens' activations (tokens x d / 128) that the MoE plan's block
/// quantizes itself, saving `dsv4_act_quant_f8`'s launch: a block of 32 warps takes up to 8
/// each (8 tokens at V4-Flash's width).
const PLAN_QUANT_MAX_BLOCKS: usize = 256;

/// Whether the MoE plan's block quantizes few tokens' activations itself (by default);
/// `DSV4RS_MOE_PLAN_QUANT=off` launches `dsv4_act_quant_f8` apart (the same codes and scales).
fn plan_quantizes(dev: i32) -> Result<bool> {
    switched_on(dev, "DSV4RS_MOE_PLAN_QUANT")
}

/// cuda/include/qgemm.cuh `OUT_H_BF16_ODD`: the Hopper tiled form's gate-up GEMM stores h rounded
/// to odd in bfloat16 for its FP8 quantization, which then reads the float32 h's codes and
/// scales bit for bit from half the bytes (by default; `DSV4RS_MOE_H_ODD=off` stores float32).
const OUT_H_BF16_ODD: i32 = 2;

fn h_round_odd(dev: i32) -> Result<bool> {
    switched_on(dev, "DSV4RS_MOE_H_ODD")
}

/// A switch that is on by default ([`forced_or_auto`] with nothing to probe): `var` unset,
/// empty, `auto` or `on`; `off` turns it off; any other value is an error naming `var`.
fn switched_on(dev: i32, var: &str) -> Result<bool> {
    forced_or_auto(dev, var, "on", "off", true, || Ok(true))
}

/// `out = A(x) W^T` per group (see `crate::qgemm::linear`): x `[M, K]` or `[M, g, K]`, out
/// `[M, g N]`, workspace of [`linear_workspace_bytes`] bytes.
///
/// # Safety
/// Tensors satisfy `TensorRef`'s contract on device `dev` with the shapes `crate::qgemm` checks;
/// `stream` belongs to that device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn linear(
    dev: i32, stream: usize, x: &TensorRef, w: &Weights, groups: usize, act_fp8: bool, workspace: &TensorRef,
    out: &TensorRef,
) -> Result<()> {
    let k = check_k(w)?;
    let n = w.data.dim(0) / groups;
    check_tiles(w, w.data.dim(0))?;
    let m = x.numel() / (groups * k);
    if m == 0 || n == 0 {
        return Ok(());
    }
    for t in [x, w.data, workspace, out] {
        check_aligned(t, 16)?;
    }
    if w.fp4 {
        check_aligned(w.scale, 4)?;
    }
    let x_bf16 = x.dtype == DType::BF16;
    let LinearShape { form, bm, splits, per, fused } =
        linear_shape(dev, m, groups, n, k, w.fp4, act_fp8)?;
    let lay = match fused {
        true => LinearLayout { a: None, partial: None, total: 0 },
        false => linear_layout(m, groups, n, k, quantizes_x(x_bf16, act_fp8, w.fp4, form), splits),
    };
    let have = workspace.numel() * workspace.dtype.size();
    if have < lay.total {
        return Err(Error::value(workspace.name, format!("needs {} bytes, got {have}", lay.total)));
    }
    let m_tiles = m.div_ceil(bm);
    if groups * m_tiles > MAX_GRID_Y {
        return Err(Error::value(x.name, format!("too many rows for one call: {m} (at most {})", MAX_GRID_Y / groups * bm)));
    }
    let at = |off: usize| workspace.ptr as u64 + off as u64;
    let (a, a_scale) = match lay.a {
        Some(off) if form.f8() => {
            let layout = f8_layout(form, w.fp4);
            let by = if form == Form::WgmmaF8 { F8Scales::Steps { groups } } else { F8Scales::Rows };
            (at(off), act_quant_f8(dev, stream, x.ptr as u64, x_bf16, m * groups, k, layout, at(off), by)?)
        }
        Some(off) => {
            act_quant(dev, stream, x.ptr as u64, x_bf16, m * groups, k, act_fp8, act_layout(form, w.fp4), at(off))?;
            (at(off), 0)
        }
        None => (x.ptr as u64, 0),
    };
    let out_bf16 = out.dtype == DType::BF16;
    let partial = lay.partial.map_or(0, at);
    let mut p = GemmParams {
        a,
        a_row_stride: (groups * k) as i64,
        a_group_stride: k as i64,
        a_rows: 0,
        w: w.data.ptr as u64,
        w_scale: w.scale.ptr as u64,
        tiles: 0,
        tile_count: 0,
        out: if splits > 1 && !fused { partial } else { out.ptr as u64 },
        m: m as i64,
        out_row_stride: (groups * n) as i64,
        out_group_stride: n as i64,
        out_split_stride: if fused { 0 } else { (m * groups * n) as i64 },
        a_div: 1,
        n: n as i32,
        k: k as i32,
        m_tiles: m_tiles as i32,
        swiglu: 0,
        limit: 0.0,
        out_bf16: (out_bf16 && (splits == 1 || fused)) as i32,
        k_steps_per_split: per as i32,
        a_scale,
        x: x.ptr as u64,
        x_bf16: x_bf16 as i32,
        w_tiles: w.tiles as i32,
        weights_first: 0,
        pad_: 0,
    };
    gemm(dev, stream, w.fp4, form, bm, groups * m_tiles, splits, m, w.data.dim(0), fused, &mut p)?;
    if splits > 1 && !fused {
        let total = (m * groups * n) as i64;
        let (s, ob) = (splits as i32, out_bf16 as i32);
        let o = out.ptr as u64;
        let cfg = Launch { grid: ((total as usize).div_ceil(256) as u32, 1, 1), block: (256, 1, 1), shared_bytes: 0, stream };
        launch(dev, Kernel::SplitkReduce, &cfg, &mut crate::kernel_args!(partial, s, total, o, ob))?;
    }
    Ok(())
}

/// Form and row tile of the MoE GEMMs: a decode form (on FP8 `mma.sync` with `f8`) while
/// experts average at most 16 rows (tiles of 8 rows up to an average of 2, or 4 on FP8 tensor
/// cores, whose 16-row tiles cost twice the 8-row ones' mma work, else 16), else a tiled form:
/// the Hopper one with 128 (`wgmma`) or the portable one with 64. Measured on the H200 at
/// V4-Flash width, the decode form is faster than the portable tiled one up to that average (2.8 /
/// 3.2 against 5.1 ms at 400 / 512 tokens of top-6 over 256 experts).
fn moe_shape(pairs: usize, experts: usize, decode: Form, wgmma: bool) -> (Form, usize) {
    if pairs <= if decode.f8() { 4 } else { 2 } * experts {
        (decode, 8)
    } else if pairs <= 16 * experts {
        (decode, 16)
    } else if wgmma {
        (Form::Wgmma, WG_BT)
    } else {
        (Form::Gemm, 64)
    }
}

/// Upper bound on the plan's row tiles: each expert with rows adds at most one partial tile.
fn moe_max_tiles(pairs: usize, experts: usize, bm: usize) -> usize {
    experts.min(pairs) + pairs / bm
}

/// Regions of one MoE pass (`tokens` tokens, `k` choices): byte offsets into the workspace.
struct MoeLayout {
    xq: usize,
    offsets: usize,
    order: usize,
    slot_of: usize,
    tiles: usize,
    tile_count: usize,
    hy: usize,
    hq: usize,
    total: usize,
}

fn moe_layout(tokens: usize, k: usize, experts: usize, inter: usize, dim: usize) -> MoeLayout {
    let t = tokens.min(moe_pass_tokens(k, experts));
    let pairs = t * k;
    let mut c = Carve { at: 0 };
    let xq = c.take(pairs * dim * 2); // a row per token, or per sorted slot for the Hopper form
    let offsets = c.take((experts + 1) * 4);
    let order = c.take(pairs * 4);
    let slot_of = c.take(pairs * 4);
    let tiles = c.take(moe_max_tiles(pairs, experts, 8) * 12);
    let tile_count = c.take(4);
    let hy = c.take(pairs * inter.max(dim) * 4); // h (float32) then, once quantized, y
    let hq = c.take(pairs * inter * 2);
    MoeLayout { xq, offsets, order, slot_of, tiles, tile_count, hy, hq, total: c.at }
}

/// Bytes of device workspace [`moe`] needs for `tokens` tokens of `k` choices each (passes of at
/// most [`moe_pass_tokens`] tokens reuse it).
pub fn moe_workspace_bytes(tokens: usize, k: usize, experts: usize, inter: usize, dim: usize) -> usize {
    if tokens == 0 {
        return 0;
    }
    moe_layout(tokens, k, experts, inter, dim).total
}

/// The routed experts of `x` (see `crate::qgemm::moe`): x `[T, d]`, idx `[T, k]`, weights
/// `[T, k]` float32, MXFP4 `gate_up [E, 2I, d/2]` and `down [E, d, I/2]`, out `[T, d]`.
///
/// # Safety
/// As [`linear`]; `workspace` is a tensor of at least [`moe_workspace_bytes`] bytes.
#[allow(clippy::too_many_arguments)]
pub unsafe fn moe(
    dev: i32, stream: usize, x: &TensorRef, idx: &TensorRef, weights: &TensorRef, gate_up: &Weights, down: &Weights,
    limit: f32, act_fp8: bool, workspace: &TensorRef, out: &TensorRef,
) -> Result<()> {
    if !gate_up.fp4 || !down.fp4 {
        return Err(Error::value(gate_up.data.name, "the GPU fused MoE takes MXFP4 experts"));
    }
    let (tokens, dim, k) = (x.dim(0), x.dim(1), idx.dim(1));
    let (experts, inter) = (gate_up.data.dim(0), gate_up.data.dim(1) / 2);
    if tokens == 0 {
        return Ok(());
    }
    if experts > MAX_EXPERTS {
        return Err(Error::value(gate_up.data.name, format!("the GPU fused MoE takes at most {MAX_EXPERTS} experts, got {experts}")));
    }
    check_k(gate_up)?;
    check_k(down)?;
    check_tiles(gate_up, 2 * inter)?;
    check_tiles(down, dim)?;
    for t in [x, gate_up.data, down.data, workspace, out] {
        check_aligned(t, 16)?;
    }
    for t in [gate_up.scale, down.scale] {
        check_aligned(t, 4)?;
    }
    let lay = moe_layout(tokens, k, experts, inter, dim);
    let have = workspace.numel() * workspace.dtype.size();
    if have < lay.total {
        return Err(Error::value(workspace.name, format!("needs {} bytes, got {have}", lay.total)));
    }
    let ws = workspace.ptr as u64;
    let at = |off: usize| ws + off as u64;
    let x_bf16 = x.dtype == DType::BF16;
    let (x_elt, idx_elt) = (x.dtype.size(), idx.dtype.size());
    let out_bf16 = out.dtype == DType::BF16;
    let idx64 = (idx.dtype == DType::I64) as i32;
    let decode = match decode_form(dev, act_fp8, dim)? {
        f if f.f8() && !inter.is_multiple_of(KC) => Form::Gemv,
        f => f,
    };
    let wgmma_ok = use_wgmma(dev, dim.is_multiple_of(KC) && inter.is_multiple_of(KC))?;
    let pass = moe_pass_tokens(k, experts);
    let mut t0 = 0;
    while t0 < tokens {
        let t = (tokens - t0).min(pass);
        let pairs = t * k;
        let (form, bm) = moe_shape(pairs, experts, decode, wgmma_ok);
        let layout = act_layout(form, true);
        let f8 = form.f8();
        let max_tiles = moe_max_tiles(pairs, experts, bm);
        if max_tiles > MAX_GRID_Y {
            return Err(Error::value(idx.name, format!("too many (token, choice) pairs per pass: {pairs} over {experts} experts")));
        }
        let x_at = x.ptr as u64 + (t0 * dim * x_elt) as u64;
        let a = at(lay.xq);
        // The plan.
        let idx_at = idx.ptr as u64 + (t0 * k * idx_elt) as u64;
        let (pairs64, e32, bm32) = (pairs as i64, experts as i32, bm as i32);
        let (offsets, order, slot_of, tiles, count) =
            (at(lay.offsets), at(lay.order), at(lay.slot_of), at(lay.tiles), at(lay.tile_count));
        // A few tokens' FP8 codes are the plan's block's work too ([`PLAN_QUANT_MAX_BLOCKS`]).
        let plan_quant = f8 && t * dim.div_ceil(KC) <= PLAN_QUANT_MAX_BLOCKS && plan_quantizes(dev)?;
        let (qx, qbf16, qrows, qk, qlayout, qscales) = match plan_quant {
            true => (x_at, x_bf16 as i32, t as i32, dim as i32, f8_layout(form, true), f8_scales_at(a, t, dim)),
            false => (0u64, 0i32, 0i32, 0i32, 0i32, 0u64),
        };
        let cfg = Launch { grid: (1, 1, 1), block: (1024, 1, 1), shared_bytes: (3 * experts * 4) as u32, stream };
        launch(
            dev,
            Kernel::MoePlan,
            &cfg,
            &mut crate::kernel_args!(
                idx_at, idx64, pairs64, e32, bm32, offsets, order, slot_of, tiles, count, qx, qbf16, qrows, qk, qlayout, a,
                qscales
            ),
        )?;
        // The activations: one row per token, read through the plan's order; for the Hopper form
        // (whose tiles load rows by TMA) one row per sorted slot, gathered here.
        let sorted = form == Form::Wgmma;
        let a_scale = if plan_quant {
            qscales
        } else if f8 {
            act_quant_f8(dev, stream, x_at, x_bf16, t, dim, f8_layout(form, true), a, F8Scales::Rows)?
        } else if sorted {
            let rows_valid = offsets + (experts * 4) as u64; // offsets[experts]: the valid slots
            act_quant_gather(dev, stream, x_at, x_bf16, pairs, dim, act_fp8, layout, a, Some((order, k as i32, rows_valid)))?;
            0
        } else {
            act_quant(dev, stream, x_at, x_bf16, t, dim, act_fp8, layout, a)?;
            0
        };
        // Gate and up projections with SwiGLU: h [pairs, I] in sorted order (float32 to be
        // quantized next, or bfloat16 rounded to odd for the Hopper tiled form's quantization, or
        // directly the bf16 rounding).
        let odd_h = sorted && act_fp8 && h_round_odd(dev)?;
        let mut p = GemmParams {
            a,
            a_row_stride: dim as i64,
            a_group_stride: 0,
            a_rows: if sorted { 0 } else { order },
            w: gate_up.data.ptr as u64,
            w_scale: gate_up.scale.ptr as u64,
            tiles,
            tile_count: count,
            out: if act_fp8 { at(lay.hy) } else { at(lay.hq) },
            m: 0,
            out_row_stride: inter as i64,
            out_group_stride: 0,
            out_split_stride: 0,
            a_div: k as i32,
            n: (2 * inter) as i32,
            k: dim as i32,
            m_tiles: 0,
            swiglu: 1,
            limit,
            out_bf16: if odd_h { OUT_H_BF16_ODD } else { (!act_fp8) as i32 },
            k_steps_per_split: dim.div_ceil(KC) as i32,
            a_scale,
            x: 0,
            x_bf16: 0,
            w_tiles: gate_up.tiles as i32,
            weights_first: 0,
            pad_: 0,
        };
        if sorted {
            p.a_div = 1;
        }
        gemm(dev, stream, true, form, bm, max_tiles, 1, pairs, 0, false, &mut p)?;
        let mut h_scale = 0;
        if f8 {
            h_scale = act_quant_f8(dev, stream, at(lay.hy), false, pairs, inter, f8_layout(form, true), at(lay.hq), F8Scales::Rows)?;
        } else if act_fp8 {
            act_quant(dev, stream, at(lay.hy), odd_h, pairs, inter, true, layout, at(lay.hq))?;
        }
        // Down projection: y [pairs, d] in sorted order, in the output's dtype (over h's dead copy).
        let mut p = GemmParams {
            a: at(lay.hq),
            a_row_stride: inter as i64,
            a_rows: 0,
            a_div: 1,
            w: down.data.ptr as u64,
            w_scale: down.scale.ptr as u64,
            out: at(lay.hy),
            out_row_stride: dim as i64,
            n: dim as i32,
            k: inter as i32,
            swiglu: 0,
            out_bf16: out_bf16 as i32,
            k_steps_per_split: inter.div_ceil(KC) as i32,
            a_scale: h_scale,
            w_tiles: down.tiles as i32,
            // The plan whose tiles this GEMM reads completed before the gate-up GEMM started (`gemm`
            // launches that one after the kernel before it), so this one may start early.
            weights_first: (form == Form::GemvWg && moe_down_early(dev)?) as i32,
            ..p
        };
        gemm(dev, stream, true, form, bm, max_tiles, 1, pairs, 0, false, &mut p)?;
        // Combine each token's choices in order.
        let (y, w_at) = (at(lay.hy), weights.ptr as u64 + (t0 * k * 4) as u64);
        let o = out.ptr as u64 + (t0 * dim * out.dtype.size()) as u64;
        let (k32, d32, ob) = (k as i32, dim as i32, out_bf16 as i32);
        let cfg = Launch { grid: (t as u32, dim.div_ceil(512) as u32, 1), block: (128, 1, 1), shared_bytes: 0, stream };
        launch(dev, Kernel::MoeCombine, &cfg, &mut crate::kernel_args!(y, ob, slot_of, w_at, k32, d32, o, ob))?;
        t0 += t;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H200_SMS: usize = 132;

    /// The rule for an H200 with the Hopper tiled form, the fused kernel taken where it pays
    /// (`auto`) or wherever it fits (`on`).
    fn plan(m: usize, groups: usize, n: usize, k: usize, fp4: bool, decode: Form, on: bool) -> LinearShape {
        plan_linear(m, groups, n, k, fp4, decode, false, H200_SMS, || Ok(Form::Wgmma), |pays| Ok(pays || on)).unwrap()
    }

    /// The rule with the wide tiles allowed (FP8 weights on the Hopper decode form).
    fn plan_wide(m: usize, groups: usize, n: usize, k: usize) -> LinearShape {
        plan_linear(m, groups, n, k, false, Form::GemvWg, true, H200_SMS, || Ok(Form::Wgmma), Ok).unwrap()
    }

    fn summary(s: &LinearShape) -> (Form, usize, usize, usize, bool) {
        (s.form, s.bm, s.splits, s.per, s.fused)
    }

    #[test]
    fn prefill_on_fp8_tensor_cores_takes_the_bf16_forms_row_tiles_and_splits() {
        // o_b at 4,096 rows: 22 columns of 192 weight rows (32 of 128 in the bf16 form) x 32 row
        // tiles, one K slice; q_a at 256 rows: 6 x 2 = 12 blocks (8 x 2 = 16), so K (32 steps)
        // splits 8 ways (the most, 4 steps a slice) to cover the 132 SMs.
        for (m, n, k, splits) in [(4096, 4096, 8192, 1), (256, 1024, 4096, 8)] {
            let f8 = plan_linear(m, 1, n, k, false, Form::GemvWg, false, H200_SMS, || Ok(Form::WgmmaF8), |_| Ok(false));
            let bf16 = plan(m, 1, n, k, false, Form::GemvWg, false);
            assert_eq!(summary(&f8.unwrap()), (Form::WgmmaF8, WG_BT, splits, k / KC / splits, false));
            assert_eq!(summary(&bf16), (Form::Wgmma, WG_BT, splits, k / KC / splits, false));
        }
        assert_eq!((block_rows(Form::WgmmaF8, false), block_rows(Form::Wgmma, false)), (192, 128));
        // Its stages fit the H100's and H200's 227 KB of shared memory a block.
        assert!(gemm_shared_bytes(false, Form::WgmmaF8, WG_BT, KC) <= 227 * 1024);
    }

    #[test]
    fn hopper_decode_stages_fit_the_blocks_an_sm_of_their_launch_bounds() {
        // cuda/qgemm_sm90a.cu: dsv4_qgemv_wg_fp4_n8 (the MoE's decode kernel) runs 6 blocks an SM,
        // the other unfused decode kernels 4.
        let fits = super::super::h200_blocks_fit;
        for (fp4, rows, blocks, bytes) in [(true, 8, 6, 33_024), (true, 16, 4, 39_168), (false, 8, 4, 38_400), (false, 16, 4, 42_496)] {
            let b = gemm_shared_bytes(fp4, Form::GemvWg, rows, 4096);
            assert_eq!(b, bytes, "fp4 {fp4}, {rows} rows");
            assert!(fits(b, blocks), "fp4 {fp4}, {rows} rows: {b} B");
        }
        // The MoE's kernel has no room for a seventh stage at 6 blocks an SM.
        assert!(!fits(33_024 + wg_decode_stage(true, 8), 6));
    }

    #[test]
    fn small_decode_linears_take_the_fused_kernel_on_hopper() {
        // V4-Flash's q_a and kv at one row: 16 and 8 grid columns, K 4096 in 8 splits of 4 steps.
        assert_eq!(summary(&plan(1, 1, 1024, 4096, false, Form::GemvWg, false)), (Form::GemvWg, 8, 8, 4, true));
        assert_eq!(summary(&plan(8, 1, 512, 4096, false, Form::GemvWg, false)), (Form::GemvWg, 8, 8, 4, true));
        // MXFP4 weights alike; 16 rows: one 16-row tile.
        assert_eq!(summary(&plan(9, 1, 200, 2048, true, Form::GemvWg, false)), (Form::GemvWg, 16, 8, 2, true));
    }

    #[test]
    fn large_grids_and_several_row_tiles_keep_three_kernels_unless_forced() {
        // o_a at one row: 16 columns x 8 groups x 5 splits = 640 blocks, past 2 an SM.
        let o_a = plan(1, 8, 1024, 4096, false, Form::GemvWg, false);
        assert_eq!(summary(&o_a), (Form::GemvWg, 8, 5, 7, false));
        assert!(plan(1, 8, 1024, 4096, false, Form::GemvWg, true).fused);
        // 40 rows: three 16-row tiles.
        assert_eq!(summary(&plan(40, 1, 1536, 4096, false, Form::GemvWg, false)), (Form::GemvWg, 16, 8, 4, false));
        assert!(plan(40, 1, 1536, 4096, false, Form::GemvWg, true).fused);
        // Codes past WG_FUSED_CODES (16 rows x 16 steps of 128) never fuse, even forced.
        let wide = plan(16, 1, 40_000, 2048, false, Form::GemvWg, true);
        assert_eq!((wide.bm * wide.per * KC > WG_FUSED_CODES, wide.fused), (true, false));
    }

    #[test]
    fn wide_tiles_take_17_to_64_rows_in_one_row_tile_and_never_fuse() {
        // V4-Flash's o_b at 64 rows (4096 columns, K 8192): one 64-row tile, 64 grid columns, K in
        // 7 splits of 10 steps (448 blocks, about three an SM).
        assert_eq!(summary(&plan_wide(64, 1, 4096, 8192)), (Form::GemvWg, 64, 7, 10, false));
        // Never the fused kernels (16-row tiles at most), even where the codes would fit.
        assert!(!plan_linear(40, 1, 64, 2048, false, Form::GemvWg, true, H200_SMS, || Ok(Form::Wgmma), |_| Ok(true))
            .unwrap()
            .fused);
        assert_eq!(summary(&plan_wide(33, 1, 4096, 8192)).1, 64);
        // 17-32 rows: 32-row tiles; q_b's K (1024) in one split.
        assert_eq!(summary(&plan_wide(32, 1, 32768, 1024)), (Form::GemvWg, 32, 1, 8, false));
        assert_eq!(summary(&plan_wide(17, 8, 1024, 4096)).1, 32);
        // Up to 16 rows the narrow tiles, past 64 the tiled form, as without them.
        assert_eq!(summary(&plan_wide(16, 1, 4096, 8192)).1, 16);
        assert_eq!(summary(&plan_wide(65, 1, 4096, 8192)).0, Form::Wgmma);
        // The grid stays within the three blocks an SM the kernels hold, less a split's rounding.
        for (m, n, k) in [(64, 1024, 4096), (40, 4096, 2048), (64, 512, 4096), (24, 32768, 1024)] {
            let s = plan_wide(m, 1, n, k);
            let blocks = n.div_ceil(64) * s.splits;
            assert!(s.splits == 1 || blocks <= 3 * H200_SMS + n.div_ceil(64), "{m} {n} {k}: {blocks} blocks");
        }
    }

    #[test]
    fn hopper_wide_stages_fit_three_blocks_an_sm() {
        let fits = super::super::h200_blocks_fit;
        for (rows, bytes) in [(32, 50_688), (64, 67_584)] {
            let b = gemm_shared_bytes(false, Form::GemvWg, rows, 4096);
            assert_eq!(b, bytes, "{rows} rows");
            assert!(fits(b, 3), "{rows} rows: {b} B");
        }
    }

    #[test]
    fn only_the_hopper_decode_form_fuses_and_its_splits_fit_a_cluster() {
        for (m, groups, n, k) in [(1, 1, 64, 8192), (1, 1, 1024, 4096), (4, 8, 1024, 4096), (16, 1, 64, 32768), (64, 1, 64, 8192)] {
            for fp4 in [false, true] {
                let wg = plan(m, groups, n, k, fp4, Form::GemvWg, true);
                if wg.form == Form::GemvWg {
                    assert!(wg.splits <= MAX_CLUSTER && wg.splits * wg.per >= k / KC, "{m} {n} {k}: {}", wg.splits);
                    assert!((wg.splits - 1) * wg.per < k / KC, "no empty split");
                }
                for decode in [Form::Gemv, Form::GemvF8] {
                    let s = plan(m, groups, n, k, fp4, decode, true);
                    assert!(!s.fused && s.splits <= MAX_SPLITS);
                }
            }
        }
        // The portable decode form still splits K past a cluster's 8 where the grid is small.
        assert_eq!(plan(1, 1, 64, 8192, false, Form::Gemv, false).splits, 16);
        // Prefill rows take the tiled form the GPU runs, and never fuse.
        assert_eq!(summary(&plan(4096, 1, 1024, 4096, false, Form::GemvWg, true)).0, Form::Wgmma);
    }
}
