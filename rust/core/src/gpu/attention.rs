//! Launchers of cuda/attention.cu: sparse attention with sink over paged KV entries. Shapes,
//! dtypes and index ranges are checked by the caller (`crate::attention`); this module chooses
//! the split of the candidate axis and lays out the kernel's parameter block.

use std::ffi::c_void;

use super::{launch, launch_in_clusters, Kernel, Launch, MAX_CLUSTER};
use crate::error::{Error, Result};
use crate::formats::{MainFormat, RopeTable};
use crate::quant::{MAIN_ENTRY, PAGE_ROWS};
use crate::tensor::{DType, TensorRef};

const THREADS: u32 = 256;
const HEADS_PER_BLOCK: usize = 64;
const TILE: usize = 32;
/// Blocks to aim for: one wave of the 64-head kernels, which run one block per multiprocessor (an
/// H100/H200 has 132). Splitting further only adds waves, partial outputs and the combine pass.
const TARGET_BLOCKS: usize = 132;
/// Most splits of one query's list: the combine pass folds every split's partials, so beyond this
/// it costs more than the extra parallelism gives (H200, one query of 8,320 candidates: 130 splits
/// 56 us, 65 splits 37 us, 32 splits 36 us; a 640-candidate list, 10 splits, is unaffected).
const MAX_SPLITS: usize = 64;
/// Raw tiles staged ahead (`STAGES` in cuda/attention.cu), of `TILE` rows.
const STAGES: usize = 3;
/// `dsv4_sparse_attention` (mma.sync, 64 heads): the bf16 queries and tile in padded rows, the
/// per-warp partial scores and the staged raw tiles (rows of 1024 bytes and 64 of padding).
const SHARED_BYTES: u32 =
    ((HEADS_PER_BLOCK + TILE) * (512 + 8) * 2 + 4 * 2 * 16 * (TILE + 8) * 4 + STAGES * TILE * (1024 + 64)) as u32;
/// `dsv4_sparse_attention_wgmma` (sm_90a, 64 heads, 512 threads: two producer and two consumer
/// warpgroups): the bf16 queries and two decoded tiles in core matrices, the two consumers'
/// partial scores and two staged raw tiles (rows of 1024 bytes and 16 of padding).
const WGMMA_SHARED_BYTES: u32 =
    ((HEADS_PER_BLOCK + 2 * TILE) * 512 * 2 + 2 * HEADS_PER_BLOCK * (TILE + 8) * 4 + 2 * TILE * (1024 + 16)) as u32;
const WGMMA_THREADS: u32 = 512;
/// `dsv4_sparse_attention_portable` (64 heads, 512 threads: 16 warps, 4 a head tile): the bf16
/// tile of 16 candidates in padded rows, the 16 warps' partial scores and 3 staged raw tiles;
/// the queries stay in registers. For GPUs that allow less than `SHARED_BYTES` per block (sm_80
/// 163 KiB, sm_86/89/120 99 KiB).
const PORTABLE_TILE: usize = 16;
const PORTABLE_THREADS: u32 = 512;
const PORTABLE_SHARED_BYTES: u32 = (PORTABLE_TILE * (512 + 8) * 2
    + 16 * 16 * (PORTABLE_TILE + 8) * 4
    + STAGES * PORTABLE_TILE * (1024 + 64)) as u32;
/// `dsv4_sparse_attention_portable16`, the portable kernel's block for small grids: 16 heads,
/// 256 threads (8 warps), the same tile and stages with 8 warps' partial scores.
const PORTABLE16_HEADS: usize = 16;
const PORTABLE16_SHARED_BYTES: u32 = (PORTABLE_TILE * (512 + 8) * 2
    + 8 * 16 * (PORTABLE_TILE + 8) * 4
    + STAGES * PORTABLE_TILE * (1024 + 64)) as u32;

/// Whether the portable kernel takes its 16-head block: for at most 16 heads (the 64-head block
/// would idle three of its four head tiles), or where the 64-head grid (`grid64` blocks) would
/// fill less than half the SMs, there four blocks of 16 heads a split keep more SMs busy. On the
/// H200 at batch 1 the 64-head block took 1.2-1.5x the 16-head one's time (grids of 10-52
/// blocks), and 0.58-0.77x from batch 32 on (128 blocks and more).
fn portable16(heads: usize, grid64: usize) -> bool {
    heads <= PORTABLE16_HEADS || grid64 < TARGET_BLOCKS / 2
}

/// The attention kernels a GPU can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Wgmma,
    Mma,
    Portable,
}

impl Variant {
    /// Kernel, heads a block, threads a block, dynamic shared memory.
    fn launch_shape(self) -> (Kernel, usize, u32, u32) {
        match self {
            Variant::Wgmma => (Kernel::SparseAttentionWgmma, HEADS_PER_BLOCK, WGMMA_THREADS, WGMMA_SHARED_BYTES),
            Variant::Mma => (Kernel::SparseAttention, HEADS_PER_BLOCK, THREADS, SHARED_BYTES),
            Variant::Portable => {
                (Kernel::SparseAttentionPortable, HEADS_PER_BLOCK, PORTABLE_THREADS, PORTABLE_SHARED_BYTES)
            }
        }
    }
}

/// Which attention kernel runs on GPU `dev`: the wgmma one on compute capability 9.0 (sm_90a),
/// else the 64-head mma.sync one where its shared memory fits, else the portable one.
/// `DSV4RS_ATTENTION_KERNEL=wgmma|mma|portable` forces one (for tests and benchmarks); forcing
/// one the GPU cannot run is an error.
fn choose(dev: i32) -> Result<Variant> {
    let fits = |k: Variant| -> Result<bool> { Ok(super::shared_memory_limit(dev)? >= k.launch_shape().3 as usize) };
    let wgmma_ok = || -> Result<bool> {
        Ok(super::compute_capability(dev)? == (9, 0) && fits(Variant::Wgmma)? && super::has_kernel(dev, Variant::Wgmma.launch_shape().0))
    };
    match std::env::var("DSV4RS_ATTENTION_KERNEL").ok().as_deref() {
        None | Some("") | Some("auto") => {}
        Some("portable") => return Ok(Variant::Portable),
        Some("mma") if fits(Variant::Mma)? => return Ok(Variant::Mma),
        Some("wgmma") if wgmma_ok()? => return Ok(Variant::Wgmma),
        Some(other) => {
            return Err(Error::value(
                "DSV4RS_ATTENTION_KERNEL",
                format!("must be auto, wgmma, mma or portable, and one GPU {dev} runs (got {other:?})"),
            ))
        }
    }
    Ok(if wgmma_ok()? {
        Variant::Wgmma
    } else if fits(Variant::Mma)? {
        Variant::Mma
    } else {
        Variant::Portable
    })
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Cache {
    base: u64,
    rows: i64,
    fmt: MainFormat,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct List {
    ids: u64,
    counts: u64,
    stride: i32,
    ids64: i32,
    counts64: i32,
}

/// Mirror of `Params` in cuda/include/attention.cuh (same field order and C layout); both sides
/// check its size and a few offsets at compile time.
#[repr(C)]
struct Params {
    q: u64,
    q_bf16: i32,
    heads: i32,
    a: Cache,
    b: Cache,
    la: List,
    lb: List,
    sink: u64,
    scale: f32,
    positions: u64,
    positions64: i32,
    inv_freq: u64,
    rope_mode: i32,
    splits: i32,
    split_len: i32,
    out: u64,
    lse: u64,
    part_o: u64,
    part_ml: u64,
    out_bf16: i32,
}
const _: () = assert!(std::mem::size_of::<Cache>() == 24 && std::mem::size_of::<List>() == 32);
const _: () = assert!(std::mem::size_of::<Params>() == 224);
const _: () = assert!(
    std::mem::offset_of!(Params, sink) == 128
        && std::mem::offset_of!(Params, part_ml) == 208
        && std::mem::offset_of!(Params, out_bf16) == 216
);

/// The attention kernel `sparse_attention` launches on GPU `dev`: "wgmma", "mma" or "portable"
/// (after `DSV4RS_ATTENTION_KERNEL`).
pub fn kernel_name(dev: i32) -> Result<&'static str> {
    Ok(match choose(dev)? {
        Variant::Wgmma => "wgmma",
        Variant::Mma => "mma",
        Variant::Portable => "portable",
    })
}

/// Whether a call of `t` queries over `width` candidates stores a bfloat16 output itself: where
/// its candidates go in several splits (the combine rounds as it stores), or on the wgmma kernel,
/// whose bfloat16 build (`dsv4_sparse_attention_wgmma_bf16`) stores a single split's rounded in
/// its epilogue. Elsewhere the caller casts the float32 output (python ops/attention.py), so the
/// float32 kernels keep their code.
pub fn stores_bf16(dev: i32, t: usize, heads: usize, width: usize) -> Result<bool> {
    Ok(split(t, heads, width).0 > 1
        || (choose(dev)? == Variant::Wgmma && super::has_kernel(dev, Kernel::SparseAttentionWgmmaBf16)))
}

/// When the wgmma kernel runs a query's splits as one thread-block cluster that folds their
/// partials on chip (`dsv4_sparse_attention_wgmma_cluster`) instead of writing them for the
/// combine kernel. `DSV4RS_ATTENTION_CLUSTER` chooses (for tests and benchmarks): `auto` (the
/// default: [`clustered`]), `off` (never), `on` (wherever a call has 2 to [`MAX_CLUSTER`]
/// splits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clusters {
    Auto,
    Off,
    On,
}

fn clusters() -> Result<Clusters> {
    match std::env::var("DSV4RS_ATTENTION_CLUSTER").ok().as_deref() {
        None | Some("") | Some("auto") => Ok(Clusters::Auto),
        Some("off") => Ok(Clusters::Off),
        Some("on") => Ok(Clusters::On),
        Some(other) => {
            Err(Error::value("DSV4RS_ATTENTION_CLUSTER", format!("must be auto, on or off (got {other:?})")))
        }
    }
}

/// Whether a call's splits ([`split`]'s) run as clusters: by default only two splits in a grid
/// of more than half [`TARGET_BLOCKS`] blocks, where the partials' round trip through memory
/// costs more than the fold on two SMs (one H100, V4-Flash's CSA at batch 64: 40.8 us against
/// 45.4). The fold runs on the cluster's SMs alone (about 9.5 us for 32 heads a block), so at
/// small grids the combine's 64 blocks a query are faster (SWA at batch 1: 21.9 us against
/// 14.0), and clusters of 4 or 8 in a full grid wait for SMs free together in one GPC (CSA at
/// batch 32: 48.6 us against 31.1). docs/kernels/attention.md has the table.
fn clustered(queries: usize, heads: usize, width: usize, mode: Clusters) -> bool {
    let splits = split(queries, heads, width).0;
    let blocks = queries * heads.div_ceil(HEADS_PER_BLOCK) * splits;
    (2..=MAX_CLUSTER).contains(&splits)
        && match mode {
            Clusters::Off => false,
            Clusters::On => true,
            Clusters::Auto => splits == 2 && blocks > TARGET_BLOCKS / 2,
        }
}

/// Candidate-axis split: number of splits and candidates per split (a multiple of the tile).
pub fn split(queries: usize, heads: usize, max_candidates: usize) -> (usize, usize) {
    let blocks = queries.max(1) * heads.div_ceil(HEADS_PER_BLOCK);
    let wanted = (TARGET_BLOCKS / blocks).max(1);
    let most = max_candidates.div_ceil(2 * TILE).max(1);
    let splits = wanted.min(most).min(MAX_SPLITS);
    let len = max_candidates.div_ceil(splits).next_multiple_of(TILE).max(TILE);
    (max_candidates.div_ceil(len).max(1), len)
}

/// Workspace bytes (float32 partial outputs and softmax statistics) for more than one split.
pub fn workspace_bytes(queries: usize, heads: usize, max_candidates: usize) -> usize {
    let (splits, _) = split(queries, heads, max_candidates);
    if splits == 1 {
        0
    } else {
        queries * splits * heads * (512 + 2) * 4
    }
}

/// A candidate list: row ids `indices` (`[T, K]`, -1 masked) into `cache`, of which the first
/// `lengths[t]` count for query t (all K without `lengths`). The op takes a main list and an
/// optional second one (e.g. the sliding window, whose rows live in another cache).
pub struct Candidates<'a> {
    pub cache: &'a TensorRef,
    pub indices: &'a TensorRef,
    pub lengths: Option<&'a TensorRef>,
}

/// Arguments of one launch, already validated.
pub struct AttentionArgs<'a> {
    pub q: &'a TensorRef,
    pub a: Candidates<'a>,
    pub b: Option<Candidates<'a>>,
    pub sink: &'a TensorRef,
    pub scale: f32,
    /// Positions, inverse frequencies and table of the output's inverse RoPE.
    pub derotate: Option<(&'a TensorRef, &'a TensorRef, RopeTable)>,
    pub workspace: &'a TensorRef,
    pub out: &'a TensorRef,
    pub lse: &'a TensorRef,
}

fn cache(c: &TensorRef) -> Cache {
    let fp8 = c.dtype == DType::U8;
    let rows = if fp8 { c.dim(0) * PAGE_ROWS } else { c.numel() / 512 };
    debug_assert!(!fp8 || c.dim(1) == MAIN_ENTRY.page_bytes());
    Cache { base: c.ptr as u64, rows: rows as i64, fmt: if fp8 { MainFormat::Fp8 } else { MainFormat::Bf16 } }
}

fn list(c: &Candidates) -> List {
    List {
        ids: c.indices.ptr as u64,
        counts: c.lengths.map_or(0, |l| l.ptr as u64),
        stride: c.indices.dim(1) as i32,
        ids64: (c.indices.dtype == DType::I64) as i32,
        counts64: c.lengths.is_some_and(|l| l.dtype == DType::I64) as i32,
    }
}

/// # Safety
/// Every tensor satisfies `TensorRef`'s contract on device `dev` with the shapes `crate::attention`
/// checks (bf16 rows caches `[P, 64, 512]`, FP8 caches `[P, 37376]`, q bf16/f32, out f32 or
/// bf16 (see [`stores_bf16`]), sink and inv_freq float32); `stream` belongs to that device.
pub unsafe fn sparse_attention(dev: i32, stream: usize, a: &AttentionArgs) -> Result<()> {
    let (t, heads) = (a.q.dim(0), a.q.dim(1));
    let width = a.a.indices.dim(1) + a.b.as_ref().map_or(0, |b| b.indices.dim(1));
    let (splits, split_len) = split(t, heads, width);
    let out_bf16 = a.out.dtype == DType::BF16;
    if out_bf16 && !stores_bf16(dev, t, heads, width)? {
        return Err(Error::dtype(
            a.out.name,
            "a bfloat16 output needs a call whose candidates go in several splits, or the wgmma kernel",
        ));
    }
    let need = workspace_bytes(t, heads, width);
    if a.workspace.numel() * a.workspace.dtype.size() < need || !a.workspace.ptr.is_multiple_of(16) {
        return Err(Error::value(a.workspace.name, format!("needs at least {need} bytes, 16-byte aligned")));
    }
    if t == 0 {
        return Ok(());
    }
    let none = List { ids: 0, counts: 0, stride: 0, ids64: 0, counts64: 0 };
    let part_o = a.workspace.ptr as u64;
    let mut p = Params {
        q: a.q.ptr as u64,
        q_bf16: (a.q.dtype == DType::BF16) as i32,
        heads: heads as i32,
        a: cache(a.a.cache),
        b: a.b.as_ref().map_or(Cache { base: 0, rows: 0, fmt: MainFormat::Fp8 }, |b| cache(b.cache)),
        la: list(&a.a),
        lb: a.b.as_ref().map_or(none, list),
        sink: a.sink.ptr as u64,
        scale: a.scale,
        positions: a.derotate.map_or(0, |d| d.0.ptr as u64),
        positions64: a.derotate.is_some_and(|d| d.0.dtype == DType::I64) as i32,
        inv_freq: a.derotate.map_or(0, |d| d.1.ptr as u64),
        rope_mode: a.derotate.map_or(0, |d| d.2.kernel_mode(d.1)),
        splits: splits as i32,
        split_len: split_len as i32,
        out: a.out.ptr as u64,
        lse: a.lse.ptr as u64,
        part_o,
        part_ml: part_o + (t * splits * heads * 512 * 4) as u64,
        out_bf16: out_bf16 as i32,
    };
    let variant = choose(dev)?;
    let mode = clusters()?;
    if variant == Variant::Wgmma
        && clustered(t, heads, width, mode)
        && super::has_kernel(dev, Kernel::SparseAttentionWgmmaCluster)
    {
        // No partials in the workspace: the cluster folds them in shared memory.
        let pp = &mut p as *mut Params as *mut c_void;
        let (_, per_block, threads, shared_bytes) = variant.launch_shape();
        let cfg = Launch {
            grid: (heads.div_ceil(per_block) as u32, t as u32, splits as u32),
            block: (threads, 1, 1),
            shared_bytes,
            stream,
        };
        return launch_in_clusters(dev, Kernel::SparseAttentionWgmmaCluster, &cfg, splits as u32, &mut [pp]);
    }
    let pp = &mut p as *mut Params as *mut c_void;
    let (kernel, per_block, threads, shared_bytes) =
        if variant == Variant::Portable && portable16(heads, splits * t * heads.div_ceil(HEADS_PER_BLOCK)) {
            (Kernel::SparseAttentionPortable16, PORTABLE16_HEADS, THREADS, PORTABLE16_SHARED_BYTES)
        } else {
            variant.launch_shape()
        };
    // A single split's bfloat16 output: the wgmma kernel built to store it (stores_bf16).
    let kernel = if out_bf16 && splits == 1 { Kernel::SparseAttentionWgmmaBf16 } else { kernel };
    let main = Launch {
        grid: (splits as u32, heads.div_ceil(per_block) as u32, t as u32),
        block: (threads, 1, 1),
        shared_bytes,
        stream,
    };
    launch(dev, kernel, &main, &mut [pp])?;
    if splits > 1 {
        let combine = Launch { grid: (heads as u32, t as u32, 1), block: (128, 1, 1), shared_bytes: 0, stream };
        launch(dev, Kernel::AttentionCombine, &combine, &mut [pp])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_of_the_variants() {
        assert_eq!(SHARED_BYTES, 224_768); // 219.5 KiB: sm_90 and sm_100 (227 KiB per block)
        assert_eq!(WGMMA_SHARED_BYTES, 218_112); // 213 KiB, plus 512 B static: sm_90 (227 KiB)
        assert_eq!(PORTABLE_SHARED_BYTES, 93_440); // 91.25 KiB, plus 256 B static: every sm_80+ GPU (99 KiB or more)
        assert_eq!(PORTABLE16_SHARED_BYTES, 81_152); // 79.25 KiB
    }

    #[test]
    fn the_portable_kernel_takes_its_16_head_block_for_small_grids() {
        let grid = |t: usize, h: usize, n: usize| split(t, h, n).0 * t * h.div_ceil(HEADS_PER_BLOCK);
        // Batch 1 (V4-Flash CSA 640 candidates: 10 blocks; HCA at 1M: 52) and a few queries.
        assert!(portable16(64, grid(1, 64, 640)) && portable16(64, grid(1, 64, 8320)));
        assert!(portable16(64, grid(4, 64, 640)));
        // Batch 32 and more, V4-Pro's 128 heads at batch 2, prefill: the 64-head block.
        assert!(!portable16(64, grid(32, 64, 640)) && !portable16(128, grid(2, 128, 1152)));
        assert!(!portable16(64, grid(8192, 64, 640)));
        // At most 16 heads: always the 16-head block.
        assert!(portable16(16, grid(64, 16, 192)) && portable16(1, grid(4096, 1, 640)));
    }

    #[test]
    fn splits_cover_every_candidate() {
        for (t, h, n) in [(1, 64, 640), (128, 128, 1152), (1, 1, 1), (2, 64, 8320), (3, 16, 0)] {
            let (s, len) = split(t, h, n);
            assert!(s * len >= n && len % TILE == 0 && s >= 1);
            assert!((s - 1) * len < n.max(1), "no empty trailing split");
            assert!(s <= MAX_SPLITS);
        }
        assert_eq!(split(1, 64, 8320), (52, 160)); // one long list: capped at 64 splits, rounded to tiles
        assert_eq!(split(1, 64, 640).0, 10); // a short one: two tiles a split
        assert_eq!(split(32, 64, 640).0, 4); // a batch: one wave of blocks
    }

    #[test]
    fn clusters_take_two_splits_of_a_full_grid() {
        let auto = |t, h, n| clustered(t, h, n, Clusters::Auto);
        // V4-Flash's layers at batch 64 (two splits, 128 blocks), V4-Pro's CSA at batch 32.
        assert!(auto(64, 64, 640) && auto(64, 64, 128) && auto(32, 128, 1152));
        // Small grids (batch 1: SWA's two splits, CSA's ten), more splits (CSA at batch 32: four)
        // and single splits keep the combine, unless forced where 2 to 8 splits are.
        assert!(!auto(1, 64, 128) && !auto(1, 64, 640) && !auto(32, 64, 640) && !auto(128, 64, 640));
        assert!(clustered(1, 64, 128, Clusters::On) && clustered(32, 64, 640, Clusters::On));
        assert!(!clustered(1, 64, 640, Clusters::On) && !clustered(128, 64, 640, Clusters::On));
        assert!(!clustered(64, 64, 640, Clusters::Off));
    }
}
