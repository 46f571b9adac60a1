//! Tensors arrive from python/dsv4rs/_tensor.py as plain tuples
//! `(data_ptr, shape, dtype_name, device_index, contiguous)`, device_index -1 meaning the CPU.

use dsv4rs_core::tensor::{DType, Device, TensorRef};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// The tuple form of a tensor.
pub type Spec = (usize, Vec<usize>, String, i32, bool);

/// Builds a `TensorRef` named `name`.
///
/// SAFETY (contract with the Python caller, which is private to the package): the pointer is the
/// tensor's `data_ptr()`, the tensor outlives the call, and `contiguous` is `is_contiguous()`.
pub fn tref(name: &'static str, spec: Spec) -> PyResult<TensorRef> {
    let (ptr, shape, dtype, device, contiguous) = spec;
    let dtype = DType::parse(&dtype)
        .ok_or_else(|| PyTypeError::new_err(format!("{name}: unsupported dtype {dtype}")))?;
    if !contiguous {
        return Err(PyValueError::new_err(format!("{name}: must be contiguous (call .contiguous())")));
    }
    let device = if device < 0 { Device::Cpu } else { Device::Cuda(device) };
    Ok(TensorRef { name, ptr, shape, dtype, device })
}

