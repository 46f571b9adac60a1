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
    use pyo3::prelude::*;

    #[pymodule_export]
    use super::cache::{PyCacheLayout, PyCacheManager};
    #[pymodule_export]
    use super::errors::{CacheStateError, CudaError, OutOfPagesError};
    #[pymodule_export]
    use super::info::{attention_kernel, build_info, cuda_devices, warm_up};
    #[pymodule_export]
    use super::kv::{hadamard128, index_key_read, index_key_write, kv_read, kv_write};
    #[pymodule_export]
    use super::ops::{
        attention_workspace_bytes, compress, indexer_topk, indexer_workspace_bytes, mhc_weights, rope, sparse_attention,
    };

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}
