//! The one mapping from `dsv4rs_core::Error` to Python exceptions, and the wrapper every binding
//! runs its work in: GIL released, panics caught (no panic crosses into Python).

use std::panic::{catch_unwind, AssertUnwindSafe};

use dsv4rs_core::Error;
use pyo3::exceptions::{PyIndexError, PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(_core, CudaError, PyRuntimeError, "A CUDA driver call failed, or no GPU is usable.");
pyo3::create_exception!(_core, OutOfPagesError, PyMemoryError, "The KV-cache pool has too few free pages.");
pyo3::create_exception!(_core, CacheStateError, PyValueError, "A KV-cache call does not fit the cache's state.");

pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Value { .. } => PyValueError::new_err(msg),
        Error::Type { .. } => PyTypeError::new_err(msg),
        Error::Index { .. } => PyIndexError::new_err(msg),
        Error::NoDevice(_) | Error::NoKernels | Error::Cuda { .. } => CudaError::new_err(msg),
        Error::OutOfPages(_) => OutOfPagesError::new_err(msg),
        Error::State(_) => CacheStateError::new_err(msg),
    }
}

/// Runs `f` without the GIL; errors become Python exceptions and a panic becomes RuntimeError.
pub fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> dsv4rs_core::Result<T> + Send) -> PyResult<T> {
    let r = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(PyRuntimeError::new_err(format!("dsv4rs internal error (please report): {what}")))
        }
    }
}
