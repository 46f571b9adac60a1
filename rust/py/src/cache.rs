//! Bindings of `dsv4rs_core::cache`: the cache layout (geometry and byte accounting) and the
//! cache manager. The manager sits behind a mutex, so one Python object can serve several
//! threads; its calls run without the GIL. Integer arrays come back as native-endian
//! `bytearray`s that python/dsv4rs/cache.py wraps as tensors without copying.

use std::sync::{Mutex, MutexGuard};

use dsv4rs_core::cache::{Appended, CacheLayout, CacheManager, Family, Footprint, SeqId};
use dsv4rs_core::formats::{IndexFormat, MainFormat, Named};
use dsv4rs_core::tensor::{DType, Device};
use dsv4rs_core::{Error, Result};
use pyo3::prelude::*;
use pyo3::types::PyByteArray;

use crate::errors::run;
use crate::tensor::{tref, Spec};

/// `(window, csa_main, csa_index, hca, state)` bytes.
type FootprintTuple = (u128, u128, u128, u128, u128);

fn footprint(f: Footprint) -> FootprintTuple {
    (f.window, f.csa_main, f.csa_index, f.hca, f.state)
}

/// Integer types whose bytes can be handed out as they lie in memory.
trait Plain: Copy {}
impl Plain for i32 {}
impl Plain for i64 {}

fn byte_array<'py, T: Plain>(py: Python<'py>, values: &[T]) -> Bound<'py, PyByteArray> {
    // SAFETY: `Plain` types are integers: no padding, every byte initialized.
    let bytes = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) };
    PyByteArray::new(py, bytes)
}

#[pyclass(name = "CacheLayout", module = "dsv4rs._core", frozen)]
pub struct PyCacheLayout(CacheLayout);

#[pymethods]
impl PyCacheLayout {
    #[new]
    fn new(
        py: Python<'_>,
        compress_ratios: Vec<usize>,
        window: usize,
        main_format: &str,
        index_format: &str,
    ) -> PyResult<Self> {
        run(py, || {
            let main = MainFormat::parse("main_format", main_format)?;
            let index = IndexFormat::parse("index_format", index_format)?;
            Ok(PyCacheLayout(CacheLayout::new(compress_ratios, window, main, index)?))
        })
    }

    #[staticmethod]
    fn v4_pro_ratios() -> Vec<usize> {
        dsv4rs_core::cache::v4_pro_ratios()
    }

    #[staticmethod]
    fn v4_flash_ratios() -> Vec<usize> {
        dsv4rs_core::cache::v4_flash_ratios()
    }

    fn layers(&self, py: Python<'_>, family: &str) -> PyResult<usize> {
        run(py, || Ok(self.0.layers(Family::parse("family", family)?)))
    }

    fn page_bytes(&self, py: Python<'_>, family: &str) -> PyResult<u128> {
        run(py, || Ok(self.0.page_bytes(Family::parse("family", family)?)))
    }

    fn rebuild_tokens(&self, py: Python<'_>) -> PyResult<usize> {
        run(py, || Ok(self.0.rebuild_tokens()))
    }

    fn footprint(&self, py: Python<'_>, seq_len: usize) -> PyResult<FootprintTuple> {
        run(py, || Ok(footprint(self.0.footprint(seq_len))))
    }

    fn bytes_per_token(&self, py: Python<'_>, seq_len: usize) -> PyResult<f64> {
        run(py, || self.0.bytes_per_token(seq_len))
    }

    fn sequences_that_fit(&self, py: Python<'_>, seq_len: usize, budget_bytes: u64) -> PyResult<u64> {
        run(py, || self.0.sequences_that_fit(seq_len, budget_bytes))
    }

    fn longest_context(&self, py: Python<'_>, budget_bytes: u64) -> PyResult<Option<u64>> {
        run(py, || Ok(self.0.longest_context(budget_bytes)))
    }

    fn pages_for_budget(&self, py: Python<'_>, budget_bytes: u64, seq_len: usize) -> PyResult<[usize; 4]> {
        run(py, || self.0.pages_for_budget(budget_bytes, seq_len))
    }
}

#[pyclass(name = "CacheManager", module = "dsv4rs._core", frozen)]
pub struct PyCacheManager(Mutex<CacheManager>);

impl PyCacheManager {
    fn lock(&self) -> Result<MutexGuard<'_, CacheManager>> {
        // A panic inside a call (caught by `run`) may have left the manager half-updated.
        self.0
            .lock()
            .map_err(|_| Error::State("the cache manager failed inside an earlier call; build a new one".into()))
    }
}

#[pymethods]
impl PyCacheManager {
    #[new]
    fn new(py: Python<'_>, layout: &PyCacheLayout, pages: [usize; 4]) -> PyResult<Self> {
        run(py, || Ok(PyCacheManager(Mutex::new(CacheManager::new(layout.0.clone(), pages)?))))
    }

    fn add_sequence(&self, py: Python<'_>, prompt: Vec<u32>) -> PyResult<(SeqId, usize, usize)> {
        run(py, || {
            let (id, hit) = self.lock()?.add_sequence(&prompt);
            Ok((id, hit.cached_tokens, hit.recompute_from))
        })
    }

    fn lookup_prefix(&self, py: Python<'_>, prompt: Vec<u32>) -> PyResult<(usize, usize)> {
        run(py, || {
            let hit = self.lock()?.lookup_prefix(&prompt);
            Ok((hit.cached_tokens, hit.recompute_from))
        })
    }

    fn fork(&self, py: Python<'_>, seq_id: SeqId) -> PyResult<SeqId> {
        run(py, || self.lock()?.fork(seq_id))
    }

    fn release(&self, py: Python<'_>, seq_id: SeqId) -> PyResult<()> {
        run(py, || self.lock()?.release(seq_id))
    }

    fn length(&self, py: Python<'_>, seq_id: SeqId) -> PyResult<usize> {
        run(py, || self.lock()?.length(seq_id))
    }

    fn sequence_ids(&self, py: Python<'_>) -> PyResult<Vec<SeqId>> {
        run(py, || Ok(self.lock()?.sequence_ids()))
    }

    /// `(bytes, slot_counts, copy_counts)`: one int64 array holding every family's slots, then
    /// every family's `(src, dst)` copy pairs (one buffer: wrapping each array as its own tensor
    /// would cost more than the append itself).
    fn append<'py>(
        &self,
        py: Python<'py>,
        seq_ids: Vec<SeqId>,
        tokens: Vec<Vec<u32>>,
    ) -> PyResult<(Bound<'py, PyByteArray>, [usize; 4], [usize; 4])> {
        let out = run(py, || {
            one_per_id("tokens", "token list", seq_ids.len(), tokens.len())?;
            let batch: Vec<(SeqId, &[u32])> = seq_ids.iter().copied().zip(tokens.iter().map(Vec::as_slice)).collect();
            Ok(flatten(self.lock()?.append(&batch)?))
        })?;
        Ok(appended(py, out))
    }

    /// As `append`, `counts[i]` tokens whose ids come later (`resolve`).
    fn append_unresolved<'py>(
        &self,
        py: Python<'py>,
        seq_ids: Vec<SeqId>,
        counts: Vec<usize>,
    ) -> PyResult<(Bound<'py, PyByteArray>, [usize; 4], [usize; 4])> {
        let out = run(py, || {
            one_per_id("counts", "count", seq_ids.len(), counts.len())?;
            let batch: Vec<(SeqId, usize)> = seq_ids.iter().copied().zip(counts.iter().copied()).collect();
            Ok(flatten(self.lock()?.append_unresolved(&batch)?))
        })?;
        Ok(appended(py, out))
    }

    fn resolve(&self, py: Python<'_>, seq_id: SeqId, ids: Vec<u32>) -> PyResult<()> {
        run(py, || self.lock()?.resolve(seq_id, &ids))
    }

    fn unresolved(&self, py: Python<'_>, seq_id: SeqId) -> PyResult<usize> {
        run(py, || self.lock()?.unresolved(seq_id))
    }

    /// `(int32 bytes, width)` of the padded page tables.
    #[pyo3(signature = (family, seq_ids, width=None))]
    fn page_tables<'py>(
        &self,
        py: Python<'py>,
        family: &str,
        seq_ids: Vec<SeqId>,
        width: Option<usize>,
    ) -> PyResult<(Bound<'py, PyByteArray>, usize)> {
        let (tables, width) = run(py, || self.lock()?.page_tables(Family::parse("family", family)?, &seq_ids, width))?;
        Ok((byte_array(py, &tables), width))
    }

    /// Fills `out` (int64, shape of `logical`) with the physical rows of `logical`
    /// (int64 `[len(seq_ids), k]`, on the CPU).
    fn physical_rows(
        &self,
        py: Python<'_>,
        family: &str,
        seq_ids: Vec<SeqId>,
        logical: Spec,
        out: Spec,
    ) -> PyResult<()> {
        let (logical, out) = (tref("logical", logical)?, tref("out", out)?);
        run(py, || {
            let family = Family::parse("family", family)?;
            for t in [&logical, &out] {
                t.expect_device(Device::Cpu)?;
                t.expect_shape(&[Some(seq_ids.len()), None])?;
            }
            // SAFETY: both come from live tensors (see tensor.rs); `out` is a fresh tensor.
            let (l, o) = unsafe { (logical.host::<i64>(&[DType::I64])?, out.host_mut::<i64>(&[DType::I64])?) };
            self.lock()?.physical_rows(family, &seq_ids, l, o)
        })
    }

    fn sequence_footprint(&self, py: Python<'_>, seq_id: SeqId) -> PyResult<FootprintTuple> {
        run(py, || Ok(footprint(self.lock()?.sequence_footprint(seq_id)?)))
    }

    fn used_footprint(&self, py: Python<'_>) -> PyResult<FootprintTuple> {
        run(py, || Ok(footprint(self.lock()?.used_footprint())))
    }

    fn pool_footprint(&self, py: Python<'_>) -> PyResult<FootprintTuple> {
        run(py, || Ok(footprint(self.lock()?.pool_footprint())))
    }

    /// `(num_pages, free_pages)` per family, in `Family::ALL` order.
    fn pages(&self, py: Python<'_>) -> PyResult<[(usize, usize); 4]> {
        run(py, || {
            let m = self.lock()?;
            Ok(Family::ALL.map(|f| (m.pool(f).num_pages(), m.pool(f).free_pages())))
        })
    }

    /// int32 bytes of every page's refcount.
    fn refcounts<'py>(&self, py: Python<'py>, family: &str) -> PyResult<Bound<'py, PyByteArray>> {
        let refs = run(py, || {
            let refs = self.lock()?.refcounts(Family::parse("family", family)?);
            Ok(refs.into_iter().map(|r| r as i32).collect::<Vec<i32>>())
        })?;
        Ok(byte_array(py, &refs))
    }

    fn cached_units(&self, py: Python<'_>) -> PyResult<usize> {
        run(py, || Ok(self.lock()?.cached_units()))
    }

    fn check(&self, py: Python<'_>) -> PyResult<()> {
        run(py, || self.lock()?.check())
    }
}

/// An append's slots and copies as one int64 array and the length of each part.
fn flatten(a: Appended) -> (Vec<i64>, [usize; 4], [usize; 4]) {
    let mut flat: Vec<i64> = a.slots.concat();
    flat.extend(a.copies.iter().flatten().flat_map(|(src, dst)| [*src as i64, *dst as i64]));
    (flat, a.slots.each_ref().map(Vec::len), a.copies.each_ref().map(Vec::len))
}

/// Refuses a batch argument `arg` whose length `got` is not one `what` per sequence id.
fn one_per_id(arg: &str, what: &str, ids: usize, got: usize) -> Result<()> {
    if ids != got {
        return Err(Error::value(arg, format!("expected one {what} per sequence id ({ids}), got {got}")));
    }
    Ok(())
}

fn appended(
    py: Python<'_>,
    (flat, slot_counts, copy_counts): (Vec<i64>, [usize; 4], [usize; 4]),
) -> (Bound<'_, PyByteArray>, [usize; 4], [usize; 4]) {
    (byte_array(py, &flat), slot_counts, copy_counts)
}
