//! The `dsv4rs._core` extension: argument conversion, error mapping and GIL release around
//! dsv4rs-core. Each module below binds one part of the core; Python-facing docs live in
//! python/dsv4rs/_core.pyi.

mod cache;
mod errors;
mod info;
mod kv;
mod ops;
mod tensor;

use pyo3::prelude::*;

/// dsv4rs-core for Python: the ops, the KV-cache allocator and the format constants.
#[pymodule]
mod _core {
    use dsv4rs_core::formats::{IndexFormat, Named};
    use dsv4rs_core::quant;
    use pyo3::prelude::*;
    use pyo3::types::PyDict;

    #[pymodule_export]
    use super::cache::{PyCacheLayout, PyCacheManager};
    #[pymodule_export]
    use super::errors::{CacheStateError, CudaError, OutOfPagesError};
    #[pymodule_export]
    use super::info::{attention_kernel, attention_stores_bf16, build_info, cuda_devices, warm_up};
    #[pymodule_export]
    use super::kv::{copy_rows, hadamard128, index_key_read, index_key_round_trip, index_key_write, kv_read, kv_write};
    #[pymodule_export]
    use super::ops::{
        attention_workspace_bytes, compress, compress_batch, indexer_scores, indexer_topk, indexer_workspace_bytes,
        linear_rows, mhc_collapse, mhc_combine, mhc_mix, mhc_mix_workspace_len, mhc_pre, mhc_pre_workspace_len, mhc_weights, moe_experts, moe_pass_tokens, moe_route,
        moe_workspace_bytes, quant_linear, quant_linear_workspace_bytes, rms_norm, rms_norm_rope, rope, sample_gumbel, sparse_attention,
        step_rows, swiglu,
    };

    // The cache formats, as dsv4rs-core defines them (python/dsv4rs/ops.py re-exports them).
    #[pymodule_export]
    const PAGE_ROWS: usize = quant::PAGE_ROWS;
    #[pymodule_export]
    const ENTRY_DIM: usize = quant::ENTRY_DIM;
    #[pymodule_export]
    const NOPE_DIM: usize = quant::NOPE_DIM;
    #[pymodule_export]
    const ROPE_DIM: usize = quant::ROPE_DIM;
    #[pymodule_export]
    const INDEX_DIM: usize = quant::INDEX_DIM;
    #[pymodule_export]
    const MAIN_ENTRY_BYTES: usize = quant::MAIN_ENTRY.row_bytes();
    #[pymodule_export]
    const MAIN_DATA_BYTES: usize = quant::MAIN_ENTRY.data_bytes;
    #[pymodule_export]
    const FP8_BLOCK: usize = quant::FP8_BLOCK;
    #[pymodule_export]
    const FP4_BLOCK: usize = quant::FP4_BLOCK;
    // Limits of the ops' integer arguments.
    #[pymodule_export]
    const MAX_LINEAR_ROWS: usize = dsv4rs_core::gemv::MAX_ROWS;
    #[pymodule_export]
    const MAX_TOPK: usize = dsv4rs_core::topk::MAX_TOPK;
    #[pymodule_export]
    const MAX_SINKHORN_ITERS: usize = dsv4rs_core::mhc::MAX_ITERS;
    #[pymodule_export]
    const MAX_ROUTE_EXPERTS: usize = dsv4rs_core::route::MAX_EXPERTS;
    #[pymodule_export]
    const MAX_ROUTE_K: usize = dsv4rs_core::route::MAX_K;
    #[pymodule_export]
    const NORM_ROPE_ROW_MAX: usize = dsv4rs_core::gpu::rope::NORM_ROPE_ROW_MAX;
    // Pages one pool of the cache manager holds at most.
    #[pymodule_export]
    const MAX_PAGES: usize = dsv4rs_core::cache::manager::MAX_PAGES;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        // Bytes of one indexer key row per packed format name.
        let key_bytes = PyDict::new(m.py());
        for f in IndexFormat::PACKED {
            key_bytes.set_item(f.name(), f.row_bytes())?;
        }
        m.add("INDEX_KEY_BYTES", key_bytes)
    }
}
