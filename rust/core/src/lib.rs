//! dsv4rs-core: DeepSeek-V4's attention machinery without Python.
//!
//! - [`quant`]: the KV-entry byte formats of docs/model.md section 5 and the Hadamard-128 transform.
//! - [`formats`]: the format codes (entry, indexer-key and compressor quantization) kernels see.
//! - [`cache`]: the paged KV-cache allocator: pools, page tables, prefix reuse, byte accounting.
//! - [`kv`]: writing entries into paged caches and reading them back, on the CPU or the GPU.
//! - [`gpu`]: the CUDA driver (loaded at run time), the embedded kernels and their launchers.
//! - [`rope`], [`compress`], [`indexer`], [`attention`]: the attention ops on the CPU
//!   (docs/model.md sections 2-4), built on [`rows`] (reading inputs and caches as f32 rows), [`simd`]
//!   (vector kernels for the CPU's widest unit) and [`topk`] (running exact top-k selection).
//! - [`qgemm`]: weights as DeepSeek ships them: the block-scaled FP8 / MXFP4 linear and the fused
//!   MoE over MXFP4 experts (argument checks, a CPU twin, the GPU dispatch).
//! - [`route`]: MoE routing from the router's logits (a CPU twin, the GPU dispatch).
//! - [`sample`]: Gumbel-max sampling of one token per row (a CPU twin, the GPU dispatch).
//! - [`step_rows`]: a decode step's window and HCA candidate rows (a CPU twin, the GPU dispatch).
//! - [`swiglu`]: the clamped SwiGLU of the shared expert (a CPU twin, the GPU dispatch).
//! - [`tensor`]: borrowed views of caller-owned tensors and the argument checks of every op.
//! - [`error`]: the one error type every public function returns.

pub mod attention;
pub mod cache;
pub mod compress;
pub mod error;
pub mod formats;
pub mod gemv;
pub mod gpu;
pub mod indexer;
pub mod kv;
pub mod mhc;
pub mod norm;
pub mod qgemm;
pub mod quant;
pub mod rope;
pub mod rows;
pub mod route;
pub mod sample;
pub mod step_rows;
pub mod swiglu;
pub mod simd;
pub mod tensor;
pub mod tile;
pub mod topk;

pub use error::{Error, Result};
