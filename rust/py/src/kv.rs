//! Bindings of `dsv4rs_core::kv`: writing, reading and copying paged cache rows, the indexer-key
//! round trip, Hadamard-128.

use dsv4rs_core::formats::IndexFormat;
use dsv4rs_core::kv;
use pyo3::prelude::*;

use crate::errors::run;
use crate::tensor::{tref, Spec};

#[pyfunction]
pub fn kv_write(py: Python<'_>, cache: Spec, slots: Spec, x: Spec, stream: usize) -> PyResult<()> {
    let (c, s, x) = (tref("cache", cache)?, tref("slots", slots)?, tref("entries", x)?);
    // SAFETY: TensorRefs built from live tensors (see tensor.rs); cache is written in place only.
    run(py, || unsafe { kv::kv_write(&c, &s, &x, stream) })
}

#[pyfunction]
pub fn kv_read(py: Python<'_>, cache: Spec, rows: Spec, out: Spec, stream: usize) -> PyResult<()> {
    let (c, r, o) = (tref("cache", cache)?, tref("rows", rows)?, tref("out", out)?);
    // SAFETY: as kv_write; `out` is a fresh tensor.
    run(py, || unsafe { kv::kv_read(&c, &r, &o, stream) })
}

#[pyfunction]
pub fn index_key_write(py: Python<'_>, cache: Spec, slots: Spec, x: Spec, fmt: &str, stream: usize) -> PyResult<()> {
    let fmt = IndexFormat::parse_packed("fmt", fmt).map_err(crate::errors::to_py)?;
    let (c, s, x) = (tref("cache", cache)?, tref("slots", slots)?, tref("keys", x)?);
    // SAFETY: as kv_write.
    run(py, || unsafe { kv::index_key_write(&c, &s, &x, fmt, stream) })
}

#[pyfunction]
pub fn index_key_read(py: Python<'_>, cache: Spec, rows: Spec, out: Spec, fmt: &str, stream: usize) -> PyResult<()> {
    let fmt = IndexFormat::parse_packed("fmt", fmt).map_err(crate::errors::to_py)?;
    let (c, r, o) = (tref("cache", cache)?, tref("rows", rows)?, tref("out", out)?);
    // SAFETY: as kv_read.
    run(py, || unsafe { kv::index_key_read(&c, &r, &o, fmt, stream) })
}

#[pyfunction]
pub fn index_key_round_trip(py: Python<'_>, x: Spec, out: Spec, fmt: &str, stream: usize) -> PyResult<()> {
    let fmt = IndexFormat::parse_packed("fmt", fmt).map_err(crate::errors::to_py)?;
    let (x, o) = (tref("keys", x)?, tref("out", out)?);
    // SAFETY: as kv_read.
    run(py, || unsafe { kv::index_key_round_trip(&x, &o, fmt, stream) })
}

#[pyfunction]
pub fn copy_rows(py: Python<'_>, dst: Spec, dst_rows: Spec, src: Spec, src_rows: Spec, stream: usize) -> PyResult<()> {
    let (d, dr) = (tref("dst", dst)?, tref("dst_rows", dst_rows)?);
    let (s, sr) = (tref("src", src)?, tref("src_rows", src_rows)?);
    // SAFETY: as kv_write; dst is written in place, and the core checks that src does not overlap it.
    run(py, || unsafe { kv::copy_rows(&d, &dr, &s, &sr, stream) })
}

#[pyfunction]
pub fn hadamard128(py: Python<'_>, x: Spec, out: Spec, stream: usize) -> PyResult<()> {
    let (x, o) = (tref("x", x)?, tref("out", out)?);
    // SAFETY: as kv_read.
    run(py, || unsafe { kv::hadamard128(&x, &o, stream) })
}
