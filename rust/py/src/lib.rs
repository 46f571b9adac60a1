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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    cache::register(m)?;
    info::register(m)?;
    kv::register(m)?;
    ops::register(m)?;
    Ok(())
}
