//! Tensors arrive from python/dsv4rs/_tensor.py as plain tuples
//! `(data_ptr, shape, dtype_name, device_index, row_stride)`, device_index -1 meaning the CPU and
//! row_stride the elements from one row of the last dimension to the next (the last dimension's
//! size for a contiguous tensor, -1 where the rows are not one stride apart).

use dsv4rs_core::tensor::{DType, Device, TensorRef};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// The tuple form of a tensor.
pub type Spec = (usize, Vec<usize>, String, i32, i64);

/// Builds a `TensorRef` named `name` of a contiguous tensor.
///
/// SAFETY (contract with the Python caller, which is private to the package): the pointer is the
/// tensor's `data_ptr()`, the tensor outlives the call, and `row_stride` is `_tensor.row_stride`.
pub fn tref(name: &'static str, spec: Spec) -> PyResult<TensorRef> {
    match build(name, spec)? {
        Some(t) if t.is_dense() => Ok(t),
        _ => Err(PyValueError::new_err(format!("{name}: must be contiguous (call .contiguous())"))),
    }
}

/// [`tref`] for an argument whose rows the op reads at a stride (a column range of a matrix).
pub fn tref_rows(name: &'static str, spec: Spec) -> PyResult<TensorRef> {
    build(name, spec)?.ok_or_else(|| {
        let msg = format!("{name}: its rows must be one stride apart, each row's values adjacent (call .contiguous())");
        PyValueError::new_err(msg)
    })
}

/// The reference, or `None` where the rows are not one stride apart (an unsupported dtype is an
/// error first).
fn build(name: &'static str, spec: Spec) -> PyResult<Option<TensorRef>> {
    let (ptr, shape, dtype, device, row_stride) = spec;
    let dtype = DType::parse(&dtype)
        .ok_or_else(|| PyTypeError::new_err(format!("{name}: unsupported dtype {dtype}")))?;
    let device = if device < 0 { Device::Cpu } else { Device::Cuda(device) };
    Ok(usize::try_from(row_stride).ok().map(|row_stride| TensorRef { name, ptr, shape, dtype, device, row_stride }))
}

