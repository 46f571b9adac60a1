//! CUDA through the driver API, loaded at run time (no cudart is linked, so the library loads on
//! machines without a GPU). Kernels come from the fatbins build.rs embedded; modules are loaded
//! into each device's primary context (the one PyTorch uses) on first use, and launches go to
//! the raw stream handle the caller passes.

pub mod attention;
pub mod compress;
pub mod gemv;
pub mod indexer;
pub mod mhc;
pub mod norm;
pub mod qgemm;
pub mod quant;
pub mod rope;
pub mod route;
pub mod sample;
pub mod step_rows;
pub mod swiglu;

use std::ffi::{c_void, CStr, CString};
use std::sync::Mutex;

use cudarc::driver::sys;

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};

/// The embedded fatbins (`FATBINS`) and the GPU targets they carry (`TARGETS`).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Declares [`Kernel`]: one variant per `extern "C" __global__` function of cuda/*.cu, each with
/// its symbol and the module (the .cu file's stem) that defines it.
macro_rules! declare_kernels {
    ($($variant:ident = $symbol:literal in $module:literal,)*) => {
        /// A kernel of the embedded modules. Launches name kernels by variant, so a kernel is
        /// looked up only in its own module, once per device.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Kernel {
            $($variant,)*
        }

        impl Kernel {
            pub const ALL: &'static [Kernel] = &[$(Kernel::$variant,)*];
            pub const COUNT: usize = Self::ALL.len();

            /// The kernel's name in its module.
            pub const fn symbol(self) -> &'static str {
                match self {
                    $(Kernel::$variant => $symbol,)*
                }
            }

            /// The module that defines it: the stem of its cuda/*.cu file.
            pub const fn module(self) -> &'static str {
                match self {
                    $(Kernel::$variant => $module,)*
                }
            }
        }
    };
}

declare_kernels! {
    SparseAttention = "dsv4_sparse_attention" in "attention",
    SparseAttentionPortable = "dsv4_sparse_attention_portable" in "attention",
    SparseAttentionPortable16 = "dsv4_sparse_attention_portable16" in "attention",
    AttentionCombine = "dsv4_attention_combine" in "attention",
    SparseAttentionWgmma = "dsv4_sparse_attention_wgmma" in "attention_sm90a",
    SparseAttentionWgmmaBf16 = "dsv4_sparse_attention_wgmma_bf16" in "attention_sm90a",
    SparseAttentionWgmmaCluster = "dsv4_sparse_attention_wgmma_cluster" in "attention_sm90a",
    CompressPool = "dsv4_compress_pool" in "compress",
    CompressFinish = "dsv4_compress_finish" in "compress",
    CompressEntry = "dsv4_compress_entry" in "compress",
    CompressBatchPool = "dsv4_compress_batch_pool" in "compress",
    CompressBatchFinish = "dsv4_compress_batch_finish" in "compress",
    CompressPoolBf16 = "dsv4_compress_pool_bf16" in "compress_bf16",
    CompressFinishBf16 = "dsv4_compress_finish_bf16" in "compress_bf16",
    CompressEntryBf16 = "dsv4_compress_entry_bf16" in "compress_bf16",
    CompressBatchPoolBf16 = "dsv4_compress_batch_pool_bf16" in "compress_bf16",
    CompressBatchFinishBf16 = "dsv4_compress_batch_finish_bf16" in "compress_bf16",
    IndexerScore = "dsv4_indexer_score" in "indexer",
    IndexerScoreDense = "dsv4_indexer_score_dense" in "indexer",
    IndexerMerge = "dsv4_indexer_merge" in "indexer",
    IndexerScoreWgmma = "dsv4_indexer_score_wgmma" in "indexer_sm90a",
    IndexerScoreWgmmaDense = "dsv4_indexer_score_wgmma_dense" in "indexer_sm90a",
    MhcWeights = "dsv4_mhc_weights" in "mhc",
    MhcCollapse = "dsv4_mhc_collapse" in "mhc",
    MhcCombine = "dsv4_mhc_combine" in "mhc",
    MhcCombineAdd = "dsv4_mhc_combine_add" in "mhc",
    MhcMix = "dsv4_mhc_mix" in "mhc",
    MhcPre = "dsv4_mhc_pre" in "mhc",
    MhcMixRows = "dsv4_mhc_mix_rows" in "mhc",
    MhcMixMma = "dsv4_mhc_mix_mma" in "mhc",
    MhcMixFinish = "dsv4_mhc_mix_finish" in "mhc",
    RmsNorm = "dsv4_rms_norm" in "norm",
    GemvRows = "dsv4_gemv_rows" in "gemv",
    QgemmFp8M64 = "dsv4_qgemm_fp8_m64" in "qgemm",
    QgemmFp4M64 = "dsv4_qgemm_fp4_m64" in "qgemm",
    QgemmFp8Wgmma = "dsv4_qgemm_fp8_wgmma" in "qgemm_sm90a",
    QgemmFp4Wgmma = "dsv4_qgemm_fp4_wgmma" in "qgemm_sm90a",
    QgemmFp8Wgf8 = "dsv4_qgemm_fp8_wgf8" in "qgemm_sm90a",
    QgemvFp8N8 = "dsv4_qgemv_fp8_n8" in "qgemm",
    QgemvFp8N16 = "dsv4_qgemv_fp8_n16" in "qgemm",
    QgemvFp4N8 = "dsv4_qgemv_fp4_n8" in "qgemm",
    QgemvFp4N16 = "dsv4_qgemv_fp4_n16" in "qgemm",
    QgemvF8Fp8N8 = "dsv4_qgemv_f8_fp8_n8" in "qgemm",
    QgemvF8Fp8N16 = "dsv4_qgemv_f8_fp8_n16" in "qgemm",
    QgemvF8Fp4N8 = "dsv4_qgemv_f8_fp4_n8" in "qgemm",
    QgemvF8Fp4N16 = "dsv4_qgemv_f8_fp4_n16" in "qgemm",
    QgemvWgFp8N8 = "dsv4_qgemv_wg_fp8_n8" in "qgemm_sm90a",
    QgemvWgFp8N16 = "dsv4_qgemv_wg_fp8_n16" in "qgemm_sm90a",
    QgemvWgFp8N32 = "dsv4_qgemv_wg_fp8_n32" in "qgemm_sm90a",
    QgemvWgFp8N64 = "dsv4_qgemv_wg_fp8_n64" in "qgemm_sm90a",
    QgemvWgFp4N8 = "dsv4_qgemv_wg_fp4_n8" in "qgemm_sm90a",
    QgemvWgFp4N16 = "dsv4_qgemv_wg_fp4_n16" in "qgemm_sm90a",
    QgemvWgFusedFp8N8 = "dsv4_qgemv_wg_fused_fp8_n8" in "qgemm_sm90a",
    QgemvWgFusedFp8N16 = "dsv4_qgemv_wg_fused_fp8_n16" in "qgemm_sm90a",
    QgemvWgFusedFp4N8 = "dsv4_qgemv_wg_fused_fp4_n8" in "qgemm_sm90a",
    QgemvWgFusedFp4N16 = "dsv4_qgemv_wg_fused_fp4_n16" in "qgemm_sm90a",
    ActQuant = "dsv4_act_quant" in "qgemm",
    ActQuantF8 = "dsv4_act_quant_f8" in "qgemm",
    ActQuantWide = "dsv4_act_quant_wide" in "qgemm",
    ActQuantF8Wide = "dsv4_act_quant_f8_wide" in "qgemm",
    MoePlan = "dsv4_moe_plan" in "qgemm",
    MoeCombine = "dsv4_moe_combine" in "qgemm",
    SplitkReduce = "dsv4_splitk_reduce" in "qgemm",
    KvWrite = "dsv4_kv_write" in "quant",
    KvRead = "dsv4_kv_read" in "quant",
    IndexKeyWrite = "dsv4_index_key_write" in "quant",
    IndexKeyRead = "dsv4_index_key_read" in "quant",
    IndexKeyRoundTrip = "dsv4_index_key_round_trip" in "quant",
    CopyRows = "dsv4_copy_rows" in "quant",
    Hadamard128 = "dsv4_hadamard128" in "quant",
    Rope = "dsv4_rope" in "rope",
    RopeOne = "dsv4_rope_one" in "rope",
    RmsNormRope = "dsv4_rms_norm_rope" in "rope",
    MoeRoute = "dsv4_moe_route" in "route",
    SampleGumbel = "dsv4_sample_gumbel" in "sample",
    StepRows = "dsv4_step_rows" in "step_rows",
    Swiglu = "dsv4_swiglu" in "swiglu",
}

/// 1 for a bfloat16 tensor, 0 otherwise: the kernels' `*_bf16` flags.
pub(crate) fn is_bf16(t: &TensorRef) -> i32 {
    (t.dtype == DType::BF16) as i32
}

/// Whether `blocks` blocks of `bytes` of dynamic shared memory each fit one H200 multiprocessor
/// (228 KiB, at most 227 KiB a block, 1 KiB reserved a block): the occupancy the kernels' shared
/// memory is sized for, which tests pin.
#[cfg(test)]
pub(crate) fn h200_blocks_fit(bytes: usize, blocks: usize) -> bool {
    bytes <= 227 * 1024 && blocks * (bytes + 1024) <= 228 * 1024
}

/// Whether rows of `d` values of these tensors can be read four at a time (cuda/include/floats.cuh):
/// `d` a multiple of 4, every pointer aligned to four values, and so every row start: a tensor
/// whose rows are not adjacent ([`TensorRef::is_dense`]) needs its row stride a multiple of 4.
pub(crate) fn four_wide(d: usize, tensors: &[&TensorRef]) -> bool {
    d.is_multiple_of(4)
        && tensors
            .iter()
            .all(|t| t.ptr.is_multiple_of(4 * t.dtype.size()) && (t.is_dense() || t.row_stride.is_multiple_of(4)))
}

fn check(res: sys::CUresult, call: &str) -> Result<()> {
    if res == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut msg: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string or leaves it null.
    unsafe { sys::cuGetErrorString(res, &mut msg) };
    let text = if msg.is_null() {
        format!("{res:?}")
    } else {
        // SAFETY: non-null results of cuGetErrorString are NUL-terminated static strings.
        unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned()
    };
    Err(Error::Cuda { call: call.to_string(), msg: text })
}

/// Loads libcuda and initializes it, once. Errors say why no GPU can be used.
fn init() -> Result<()> {
    static INIT: Mutex<Option<Result<()>>> = Mutex::new(None);
    let mut done = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = done.as_ref() {
        return r.clone();
    }
    // SAFETY: probing for the library has no preconditions; cuInit is called once.
    let r = if unsafe { sys::is_culib_present() } {
        check(unsafe { sys::cuInit(0) }, "cuInit").map_err(|e| Error::NoDevice(e.to_string()))
    } else {
        Err(Error::NoDevice("the CUDA driver library (libcuda.so) was not found".to_string()))
    };
    *done = Some(r.clone());
    r
}

/// The CUDA driver's version (e.g. 13000 for 13.0).
pub fn driver_version() -> Result<i32> {
    init()?;
    let mut v = 0;
    check(unsafe { sys::cuDriverGetVersion(&mut v) }, "cuDriverGetVersion")?;
    Ok(v)
}

/// What `dsv4rs info` shows about a GPU.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub index: i32,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
}

/// The GPUs the driver sees (empty list when it sees none).
pub fn devices() -> Result<Vec<DeviceInfo>> {
    init()?;
    let mut count = 0;
    check(unsafe { sys::cuDeviceGetCount(&mut count) }, "cuDeviceGetCount")?;
    (0..count)
        .map(|index| {
            let dev = device(index)?;
            let mut name = [0 as std::ffi::c_char; 256];
            check(unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), 256, dev) }, "cuDeviceGetName")?;
            Ok(DeviceInfo {
                index,
                // SAFETY: cuDeviceGetName wrote a NUL-terminated string into the buffer.
                name: unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned(),
                compute_capability: compute_capability(index)?,
                multiprocessors: attribute(index, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            })
        })
        .collect()
}

fn device(index: i32) -> Result<sys::CUdevice> {
    let mut dev = 0;
    check(unsafe { sys::cuDeviceGet(&mut dev, index) }, "cuDeviceGet")
        .map_err(|_| Error::NoDevice(format!("there is no CUDA device {index}")))?;
    Ok(dev)
}

/// A device's primary context, the modules loaded into it and the kernels looked up so far.
struct Loaded {
    ctx: sys::CUcontext,
    /// One per entry of `kernels::FATBINS`; `None` for a Hopper-only module on another GPU.
    modules: Vec<Option<sys::CUmodule>>,
    /// Indexed by `Kernel as usize`.
    functions: [Option<Function>; Kernel::COUNT],
}

/// A kernel looked up on a device.
#[derive(Clone, Copy)]
struct Function {
    f: sys::CUfunction,
    /// The virtual architecture its code was compiled from ([`ptx_version`]).
    ptx: i32,
}

// SAFETY: driver handles are process-wide and usable from any thread; access is serialized by
// the mutex below.
unsafe impl Send for Loaded {}

static LOADED: Mutex<Vec<(i32, Loaded)>> = Mutex::new(Vec::new());

/// Runs `f` with the device's primary context current on this thread, restoring the previous one.
fn with_context<T>(ctx: sys::CUcontext, f: impl FnOnce() -> Result<T>) -> Result<T> {
    check(unsafe { sys::cuCtxPushCurrent_v2(ctx) }, "cuCtxPushCurrent")?;
    let r = f();
    let mut prev = std::ptr::null_mut();
    check(unsafe { sys::cuCtxPopCurrent_v2(&mut prev) }, "cuCtxPopCurrent")?;
    r
}

/// Looks up (loading every module on first use) a kernel on a device.
fn function(index: i32, kernel: Kernel) -> Result<(sys::CUcontext, Function)> {
    if kernels::FATBINS.is_empty() {
        return Err(Error::NoKernels);
    }
    init()?;
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let pos = match loaded.iter().position(|(i, _)| *i == index) {
        Some(p) => p,
        None => {
            let dev = device(index)?;
            let mut ctx = std::ptr::null_mut();
            check(unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) }, "cuDevicePrimaryCtxRetain")?;
            let modules = with_context(ctx, || {
                kernels::FATBINS
                    .iter()
                    .map(|(module, image)| {
                        let mut m = std::ptr::null_mut();
                        // SAFETY: `image` is a complete fatbin, 64-byte aligned, alive for 'static.
                        let r = unsafe { sys::cuModuleLoadData(&mut m, image.as_ptr() as *const c_void) };
                        if r != sys::CUresult::CUDA_SUCCESS && module.ends_with("_sm90a") {
                            return Ok(None); // Hopper-only kernels: other GPUs run the portable ones
                        }
                        check(r, &format!("cuModuleLoadData({module}): no kernel image for this GPU?"))?;
                        Ok(Some(m))
                    })
                    .collect::<Result<Vec<_>>>()
            })?;
            loaded.push((index, Loaded { ctx, modules, functions: [None; Kernel::COUNT] }));
            loaded.len() - 1
        }
    };
    let l = &mut loaded[pos].1;
    if let Some(f) = l.functions[kernel as usize] {
        return Ok((l.ctx, f));
    }
    let (symbol, module) = (kernel.symbol(), kernel.module());
    let not_here = |msg: String| Error::Cuda { call: "cuModuleGetFunction".into(), msg };
    let m = match kernels::FATBINS.iter().position(|(name, _)| *name == module) {
        None => return Err(not_here(format!("kernel {symbol}: module {module} is not in this build"))),
        Some(i) => l.modules[i].ok_or_else(|| not_here(format!("kernel {symbol}: module {module} does not load on GPU {index}")))?,
    };
    let cname = CString::new(symbol).expect("kernel names have no NUL");
    let mut f = std::ptr::null_mut();
    // SAFETY: `m` is a module loaded into `l.ctx`; the name is NUL-terminated.
    check(unsafe { sys::cuModuleGetFunction(&mut f, m, cname.as_ptr()) }, &format!("cuModuleGetFunction({symbol})"))?;
    let ptx = with_context(l.ctx, || {
        let mut v = 0;
        // SAFETY: `f` is a function of a module loaded in `l.ctx`, current on this thread.
        check(
            unsafe { sys::cuFuncGetAttribute(&mut v, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PTX_VERSION, f) },
            &format!("cuFuncGetAttribute({symbol}, PTX_VERSION)"),
        )?;
        Ok(v)
    })?;
    let found = Function { f, ptx };
    l.functions[kernel as usize] = Some(found);
    Ok((l.ctx, found))
}

/// Loads every module on `index` now, so that later launches can be captured in a CUDA graph.
pub fn warm_up(index: i32) -> Result<()> {
    function(index, Kernel::Hadamard128).map(|_| ())
}

/// A device attribute of device `index` (cached).
fn attribute(index: i32, attr: sys::CUdevice_attribute) -> Result<i32> {
    static VALUES: Mutex<Vec<(i32, sys::CUdevice_attribute, i32)>> = Mutex::new(Vec::new());
    let mut values = VALUES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, v)) = values.iter().find(|(i, a, _)| *i == index && *a == attr) {
        return Ok(*v);
    }
    init()?;
    let mut v = 0;
    check(unsafe { sys::cuDeviceGetAttribute(&mut v, attr, device(index)?) }, "cuDeviceGetAttribute")?;
    values.push((index, attr, v));
    Ok(v)
}

/// The most dynamic shared memory a block may opt into on device `index`.
fn shared_memory_limit(index: i32) -> Result<usize> {
    attribute(index, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).map(|v| v as usize)
}

/// The compute capability of device `index`, e.g. (9, 0).
fn compute_capability(index: i32) -> Result<(i32, i32)> {
    use sys::CUdevice_attribute::*;
    Ok((
        attribute(index, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attribute(index, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    ))
}

/// The virtual architecture (e.g. 90 for compute_90) the code of `kernel` that device `index`
/// runs was compiled from: below a GPU's own when the driver compiled it from the build's
/// portable PTX (a GPU newer than every target of the build).
fn ptx_version(index: i32, kernel: Kernel) -> Result<i32> {
    function(index, kernel).map(|(_, f)| f.ptx)
}

/// Whether launches run as programmatic dependents (cuda/include/grid.cuh): a kernel may start
/// its blocks while the one before it on the stream finishes, each waiting in `grid_begin`
/// for that kernel's completion. On by default; `DSV4RS_PDL=off` launches every kernel after
/// the one before it has completed (`on`, or unset, the default).
fn dependent_launches() -> Result<bool> {
    match std::env::var("DSV4RS_PDL").ok().as_deref() {
        None | Some("") | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(Error::value("DSV4RS_PDL", format!("must be on or off, got {other:?}"))),
    }
}

/// Whether `kernel` is in this build and loads on device `index`.
fn has_kernel(index: i32, kernel: Kernel) -> bool {
    function(index, kernel).is_ok()
}

/// A TMA tensor map (cuda/include/wgmma.cuh `TmaDesc`), passed to a kernel by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TmaDesc(sys::CUtensorMap);

/// The element type of a tensor map ([`tma_2d`]).
#[derive(Clone, Copy)]
pub enum TmaType {
    Bf16,
    U8,
    F32,
}

/// The tensor map of a row-major bf16 matrix of `rows` rows of `cols` elements, `row_bytes` apart
/// (a multiple of 16), at device address `addr` (16-byte aligned), loaded in boxes of `box_cols`
/// x `box_rows` elements with the 128-byte swizzle (`box_cols` 64 at most) and zeros past the
/// matrix.
pub fn tma_bf16_2d(addr: u64, cols: u64, rows: u64, row_bytes: u64, box_cols: u32, box_rows: u32) -> Result<TmaDesc> {
    tma_2d(TmaType::Bf16, true, addr, cols, rows, row_bytes, box_cols, box_rows)
}

/// [`tma_bf16_2d`] for elements of type `ty`, with the 128-byte swizzle (a box row of at most 128
/// bytes) or none (`swizzle` false; a box row a multiple of 16 bytes).
#[allow(clippy::too_many_arguments)]
pub fn tma_2d(
    ty: TmaType, swizzle: bool, addr: u64, cols: u64, rows: u64, row_bytes: u64, box_cols: u32, box_rows: u32,
) -> Result<TmaDesc> {
    tma_map(ty, swizzle, addr, &[cols, rows], &[row_bytes], &[box_cols, box_rows])
}

/// The tensor map of a tensor of `dims.len()` (1 to 5) dimensions, the first contiguous: `dims`
/// elements each, `strides` bytes between consecutive indices of the others (multiples of 16),
/// loaded in boxes of `boxes` elements (swizzle as [`tma_2d`]), zeros past the tensor.
pub fn tma_map(ty: TmaType, swizzle: bool, addr: u64, dims: &[u64], strides: &[u64], boxes: &[u32]) -> Result<TmaDesc> {
    use sys::*;
    let rank = dims.len();
    if !(1..=5).contains(&rank) || strides.len() + 1 != rank || boxes.len() != rank {
        let (s, b) = (strides.len(), boxes.len());
        return Err(Error::value("tensor map", format!("{rank} dimensions, {s} strides, {b} box sizes")));
    }
    init()?;
    let dtype = match ty {
        TmaType::Bf16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        TmaType::U8 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        TmaType::F32 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
    };
    let swizzle = if swizzle {
        CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B
    } else {
        CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE
    };
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
    let steps = [1u32; 5];
    // SAFETY: `dims`, `boxes` and `steps` hold at least `rank` entries and `strides` rank - 1
    // (checked above); `map` is written on success.
    check(
        unsafe {
            cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                dtype,
                rank as u32,
                addr as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                steps.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        },
        "cuTensorMapEncodeTiled",
    )?;
    // SAFETY: initialized by the successful call above.
    Ok(TmaDesc(unsafe { map.assume_init() }))
}

/// A kernel launch: grid, block, dynamic shared memory and the raw `CUstream` handle.
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
    pub stream: usize,
}

/// Launches `kernel` on device `index`.
///
/// # Safety
/// `args` must point at values whose types and order match the kernel's parameters, and every
/// device pointer among them must address memory of the sizes the kernel assumes.
pub unsafe fn launch(index: i32, kernel: Kernel, cfg: &Launch, args: &mut [*mut c_void]) -> Result<()> {
    launch_with(index, kernel, cfg, 1, true, args)
}

/// [`launch`] without the programmatic dependency: the kernel's blocks start only once the kernel
/// before it on the stream has completed (for kernels measured slower when started early; the
/// kernel still calls `grid_begin`, which then returns at once).
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_after(index: i32, kernel: Kernel, cfg: &Launch, args: &mut [*mut c_void]) -> Result<()> {
    launch_with(index, kernel, cfg, 1, false, args)
}

/// Most blocks of a thread-block cluster that every GPU with clusters (compute capability 9.0
/// and later) schedules.
pub const MAX_CLUSTER: usize = 8;

/// [`launch`] with the grid's blocks in thread-block clusters of `cluster_z` blocks along z
/// (1: no cluster; else compute capability 9.0 or later, `cluster_z` dividing the grid's z and
/// at most [`MAX_CLUSTER`]).
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_in_clusters(
    index: i32, kernel: Kernel, cfg: &Launch, cluster_z: u32, args: &mut [*mut c_void],
) -> Result<()> {
    launch_with(index, kernel, cfg, cluster_z, true, args)
}

/// The launches above; `overlap`: as a programmatic dependent where the kernel's code allows it.
unsafe fn launch_with(
    index: i32, kernel: Kernel, cfg: &Launch, cluster_z: u32, overlap: bool, args: &mut [*mut c_void],
) -> Result<()> {
    if cluster_z == 0 || cluster_z as usize > MAX_CLUSTER || !cfg.grid.2.is_multiple_of(cluster_z) {
        return Err(Error::Cuda {
            call: kernel.symbol().to_string(),
            msg: format!("a cluster of {cluster_z} blocks does not tile a grid z of {}", cfg.grid.2),
        });
    }
    if cfg.grid.0 == 0 || cfg.grid.1 == 0 || cfg.grid.2 == 0 {
        return Ok(());
    }
    let (ctx, Function { f, ptx }) = function(index, kernel)?;
    let name = kernel.symbol();
    // Only code compiled for compute_90 or later waits in `grid_begin` (below that the
    // instructions do not exist, and a GPU newer than the build's targets runs the compute_80 PTX).
    let dependent = overlap && ptx >= 90 && dependent_launches()?;
    if cfg.shared_bytes > 48 * 1024 {
        let most = shared_memory_limit(index)?;
        if cfg.shared_bytes as usize > most {
            return Err(Error::Cuda {
                call: name.to_string(),
                msg: format!(
                    "needs {} KiB of shared memory per block and GPU {index} allows {} KiB",
                    cfg.shared_bytes / 1024,
                    most / 1024
                ),
            });
        }
    }
    with_context(ctx, || {
        if cfg.shared_bytes > 48 * 1024 {
            check(
                sys::cuFuncSetAttribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cfg.shared_bytes as i32,
                ),
                &format!("cuFuncSetAttribute({name}, {} B of shared memory)", cfg.shared_bytes),
            )?;
        }
        if cluster_z == 1 && !dependent {
            return check(
                sys::cuLaunchKernel(
                    f,
                    cfg.grid.0,
                    cfg.grid.1,
                    cfg.grid.2,
                    cfg.block.0,
                    cfg.block.1,
                    cfg.block.2,
                    cfg.shared_bytes,
                    cfg.stream as sys::CUstream,
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
                name,
            );
        }
        // SAFETY (of the zeroed values): plain C unions of integers; the fields used are set below.
        let mut attrs: [sys::CUlaunchAttribute; 2] = [std::mem::zeroed(), std::mem::zeroed()];
        let mut count = 0;
        if cluster_z > 1 {
            attrs[count].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attrs[count].value.clusterDim.x = 1;
            attrs[count].value.clusterDim.y = 1;
            attrs[count].value.clusterDim.z = cluster_z;
            count += 1;
        }
        if dependent {
            attrs[count].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[count].value.programmaticStreamSerializationAllowed = 1;
            count += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid.0,
            gridDimY: cfg.grid.1,
            gridDimZ: cfg.grid.2,
            blockDimX: cfg.block.0,
            blockDimY: cfg.block.1,
            blockDimZ: cfg.block.2,
            sharedMemBytes: cfg.shared_bytes,
            hStream: cfg.stream as sys::CUstream,
            attrs: attrs.as_mut_ptr(),
            numAttrs: count as u32,
        };
        check(sys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()), name)
    })
}

/// Builds the `void**` argument array of a launch from local variables.
#[macro_export]
macro_rules! kernel_args {
    ($($a:expr),* $(,)?) => {
        [$(std::ptr::addr_of!($a) as *mut std::ffi::c_void),*]
    };
}
