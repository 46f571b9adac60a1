//! Build and device facts for `dsv4rs info`.

use dsv4rs_core::gpu;
use dsv4rs_core::quant;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::run;

/// Version, embedded kernel modules and their GPU targets, and the cache byte formats.
#[pyfunction]
pub fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    let modules: Vec<(&str, usize)> = gpu::kernels::FATBINS.iter().map(|(n, b)| (*n, b.len())).collect();
    d.set_item("kernel_modules", modules)?;
    d.set_item("gpu_targets", gpu::kernels::TARGETS.to_vec())?;
    d.set_item("page_rows", quant::PAGE_ROWS)?;
    d.set_item("main_entry_bytes", quant::MAIN_ENTRY.row_bytes())?;
    d.set_item("index_key_fp4_bytes", quant::INDEX_KEY_FP4.row_bytes())?;
    d.set_item("index_key_fp8_bytes", quant::INDEX_KEY_FP8.row_bytes())?;
    Ok(d)
}

/// `(index, name, (major, minor), multiprocessors)` of one GPU.
type DeviceTuple = (i32, String, (i32, i32), i32);

/// `(driver_version, [DeviceTuple])`; raises CudaError when no driver can be loaded.
#[pyfunction]
pub fn cuda_devices(py: Python<'_>) -> PyResult<(i32, Vec<DeviceTuple>)> {
    run(py, || {
        let v = gpu::driver_version()?;
        let devs = gpu::devices()?;
        Ok((v, devs.into_iter().map(|d| (d.index, d.name, d.compute_capability, d.multiprocessors)).collect()))
    })
}

/// Loads the kernel modules on a device now (do this before capturing a CUDA graph).
#[pyfunction]
pub fn warm_up(py: Python<'_>, device: i32) -> PyResult<()> {
    run(py, || gpu::warm_up(device))
}

/// The sparse-attention kernel launched on a device: "wgmma", "mma" or "portable".
#[pyfunction]
pub fn attention_kernel(py: Python<'_>, device: i32) -> PyResult<&'static str> {
    run(py, || gpu::attention::kernel_name(device))
}

/// Whether a GPU `sparse_attention` call of `queries` queries over `max_candidates` candidates
/// stores a bfloat16 output itself (else its caller casts the float32 one).
#[pyfunction]
pub fn attention_stores_bf16(py: Python<'_>, device: i32, queries: usize, heads: usize, max_candidates: usize) -> PyResult<bool> {
    run(py, || gpu::attention::stores_bf16(device, queries, heads, max_candidates))
}
