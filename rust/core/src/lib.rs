//! dsv4rs-core: DeepSeek-V4's attention machinery without Python.
//!
//! - [`quant`]: the KV-entry byte formats of SPEC.md section 5 and the Hadamard-128 transform.
//! - [`cache`]: the paged KV-cache allocator: pools, page tables, prefix reuse, byte accounting.
//! - [`kv`]: writing entries into paged caches and reading them back, on the CPU or the GPU.
//! - [`gpu`]: the CUDA driver (loaded at run time), the embedded kernels and their launchers.
//! - [`tensor`]: borrowed views of caller-owned tensors and the argument checks of every op.
//! - [`error`]: the one error type every public function returns.

pub mod cache;
pub mod error;
pub mod gpu;
pub mod kv;
pub mod quant;
pub mod tensor;

pub use error::{Error, Result};
