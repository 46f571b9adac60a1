//! Bindings of the ops: RoPE, RMSNorm, the mHC weights, collapse and combine, the compressor, the indexer's top-k, sparse attention,
//! the quantized linear and the fused MoE. Outputs are allocated by the caller (python/dsv4rs/ops.py) and filled here.

use dsv4rs_core::attention::{Candidates, Derotate};
use dsv4rs_core::compress::{BatchConfig, Config};
use dsv4rs_core::formats::{Named, Quant};
use dsv4rs_core::tensor::TensorRef;
use dsv4rs_core::qgemm::{self, Act};
use dsv4rs_core::rope::RopeTable;
use dsv4rs_core::{
    attention as attention_op, compress as compress_op, gemv, indexer as indexer_op, mhc, norm, rope as rope_op, route, sample,
    step_rows as step_rows_op, swiglu as swiglu_op,
};
use pyo3::prelude::*;

use crate::errors::{run, to_py};
use crate::tensor::{tref, tref_rows, Spec};

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn rope(
    py: Python<'_>,
    x: Spec,
    positions: Spec,
    inv_freq: Spec,
    out: Spec,
    inverse: bool,
    table: &str,
    stream: usize,
) -> PyResult<()> {
    let table = RopeTable::parse("table", table).map_err(to_py)?;
    let (x, p, f, o) = (tref("x", x)?, tref("positions", positions)?, tref("inv_freq", inv_freq)?, tref("out", out)?);
    // SAFETY: TensorRefs built from live tensors (see tensor.rs); `out` is a fresh tensor.
    run(py, || unsafe { rope_op::rope(&x, &p, &f, &o, inverse, table, stream) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, bias, table, ids, idx, w, scale, norm, stream))]
pub fn moe_route(
    py: Python<'_>,
    logits: Spec,
    bias: Option<Spec>,
    table: Option<Spec>,
    ids: Option<Spec>,
    idx: Spec,
    w: Spec,
    scale: f32,
    norm: bool,
    stream: usize,
) -> PyResult<()> {
    let (l, b, t, i) = (tref("logits", logits)?, opt("bias", bias)?, opt("table", table)?, opt("ids", ids)?);
    let (o, ow) = (tref("idx", idx)?, tref("w", w)?);
    // SAFETY: as rope; `idx` and `w` are fresh tensors.
    run(py, || unsafe { route::moe_route(&l, b.as_ref(), t.as_ref(), i.as_ref(), &o, &ow, scale, norm, stream) })
}

#[pyfunction]
pub fn swiglu(py: Python<'_>, gate: Spec, up: Spec, out: Spec, limit: f32, stream: usize) -> PyResult<()> {
    let (g, u, o) = (tref_rows("gate", gate)?, tref_rows("up", up)?, tref("out", out)?);
    // SAFETY: as rope; `out` is a fresh tensor.
    run(py, || unsafe { swiglu_op::swiglu(&g, &u, &o, limit, stream) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn step_rows(
    py: Python<'_>,
    positions: Spec,
    token_seq: Spec,
    origins: Spec,
    window_table: Option<Spec>,
    window_rows: Option<Spec>,
    hca_table: Option<Spec>,
    hca_rows: Option<Spec>,
    hca_ratio: i64,
    stream: usize,
) -> PyResult<()> {
    let (p, s, o) = (tref("positions", positions)?, tref("token_seq", token_seq)?, tref("origins", origins)?);
    let (wt, wo) = (opt("window_table", window_table)?, opt("window_rows", window_rows)?);
    let (ht, ho) = (opt("hca_table", hca_table)?, opt("hca_rows", hca_rows)?);
    let window = match (&wt, &wo) {
        (Some(t), Some(o)) => Some((t, o)),
        (None, None) => None,
        _ => return Err(to_py(dsv4rs_core::Error::value("window_table", "comes with window_rows, or neither"))),
    };
    let hca = match (&ht, &ho) {
        (Some(t), Some(o)) => Some((t, o, hca_ratio)),
        (None, None) => None,
        _ => return Err(to_py(dsv4rs_core::Error::value("hca_table", "comes with hca_rows, or neither"))),
    };
    let step = step_rows_op::Step { positions: &p, token_seq: &s, origins: &o };
    // SAFETY: as rope; the row outputs are fresh tensors.
    run(py, || unsafe { step_rows_op::step_rows(&step, window, hca, stream) })
}

#[pyfunction]
pub fn sample_gumbel(
    py: Python<'_>,
    logits: Spec,
    temperature: Spec,
    seeds: Spec,
    steps: Spec,
    out: Spec,
    stream: usize,
) -> PyResult<()> {
    let (l, t) = (tref("logits", logits)?, tref("temperature", temperature)?);
    let (s, p, o) = (tref("seeds", seeds)?, tref("steps", steps)?, tref("out", out)?);
    // SAFETY: as rope; `out` is a fresh tensor.
    run(py, || unsafe { sample::sample_gumbel(&l, &t, &s, &p, &o, stream) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn mhc_weights(
    py: Python<'_>,
    mix: Spec,
    scale: Spec,
    base: Spec,
    pre: Spec,
    post: Spec,
    comb: Spec,
    iters: usize,
    eps: f32,
    stream: usize,
) -> PyResult<()> {
    let (m, s, b) = (tref("mix", mix)?, tref("scale", scale)?, tref("base", base)?);
    let (pr, po, co) = (tref("pre", pre)?, tref("post", post)?, tref("comb", comb)?);
    // SAFETY: as rope; the three outputs are fresh tensors.
    run(py, || unsafe { mhc::mhc_weights(&m, &s, &b, &pr, &po, &co, mhc::Config { iters, eps }, stream) })
}

#[pyfunction]
pub fn mhc_collapse(py: Python<'_>, x: Spec, pre: Spec, y: Spec, stream: usize) -> PyResult<()> {
    let (x, p, y) = (tref("x", x)?, tref("pre", pre)?, tref("y", y)?);
    // SAFETY: as rope; `y` is a fresh tensor.
    run(py, || unsafe { mhc::mhc_collapse(&x, &p, &y, stream) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn mhc_combine(
    py: Python<'_>, x: Spec, f: Spec, f2: Option<Spec>, post: Spec, comb: Spec, y: Spec, stream: usize,
) -> PyResult<()> {
    let (x, f, po, co, y) = (tref("x", x)?, tref("f", f)?, tref("post", post)?, tref("comb", comb)?, tref("y", y)?);
    let f2 = f2.map(|s| tref("f2", s)).transpose()?;
    // SAFETY: as rope; `y` is a fresh tensor.
    run(py, || unsafe { mhc::mhc_combine(&x, &f, f2.as_ref(), &po, &co, &y, stream) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn mhc_pre(
    py: Python<'_>,
    x: Spec,
    proj: Spec,
    scale: Spec,
    base: Spec,
    workspace: Option<Spec>,
    post: Spec,
    comb: Spec,
    y: Spec,
    iters: usize,
    eps: f32,
    norm_eps: f32,
    stream: usize,
) -> PyResult<()> {
    let (x, f, s, b, w) = (tref("x", x)?, tref("proj", proj)?, tref("scale", scale)?, tref("base", base)?, opt("workspace", workspace)?);
    let (po, co, y) = (tref("post", post)?, tref("comb", comb)?, tref("y", y)?);
    let cfg = mhc::Config { iters, eps };
    // SAFETY: as rope; the outputs and the workspace are fresh tensors.
    run(py, || unsafe { mhc::mhc_pre(&x, &f, &s, &b, w.as_ref(), &po, &co, &y, cfg, norm_eps, stream) })
}

#[pyfunction]
pub fn mhc_mix(
    py: Python<'_>, x: Spec, proj: Spec, workspace: Option<Spec>, mix: Spec, norm_eps: f32, stream: usize,
) -> PyResult<()> {
    let (x, f, w, o) = (tref("x", x)?, tref("proj", proj)?, opt("workspace", workspace)?, tref("mix", mix)?);
    // SAFETY: as rope; the output and the workspace are fresh tensors.
    run(py, || unsafe { mhc::mhc_mix(&x, &f, w.as_ref(), &o, norm_eps, stream) })
}

#[pyfunction]
#[pyo3(signature = (x, weight, out, eps, stream))]
pub fn rms_norm(py: Python<'_>, x: Spec, weight: Option<Spec>, out: Spec, eps: f32, stream: usize) -> PyResult<()> {
    let (x, w, o) = (tref_rows("x", x)?, opt("weight", weight)?, tref("out", out)?);
    // SAFETY: as rope; `out` is a fresh tensor.
    run(py, || unsafe { norm::rms_norm(&x, w.as_ref(), &o, eps, stream) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_rope(
    py: Python<'_>,
    x: Spec,
    weight: Option<Spec>,
    eps: f32,
    round_bf16: bool,
    positions: Spec,
    inv_freq: Spec,
    out: Spec,
    table: &str,
    stream: usize,
) -> PyResult<()> {
    let table = RopeTable::parse("table", table).map_err(to_py)?;
    let (x, w, p) = (tref_rows("x", x)?, opt("weight", weight)?, tref("positions", positions)?);
    let (f, o) = (tref("inv_freq", inv_freq)?, tref("out", out)?);
    // SAFETY: as rope; `out` is a fresh tensor.
    run(py, || unsafe { rope_op::rms_norm_rope(&x, w.as_ref(), eps, round_bf16, &p, &f, &o, table, stream) })
}

#[pyfunction]
pub fn linear_rows(py: Python<'_>, x: Spec, weight: Spec, out: Spec, stream: usize) -> PyResult<()> {
    let (x, w, o) = (tref("x", x)?, tref("weight", weight)?, tref("out", out)?);
    // SAFETY: as rope; `out` is a fresh tensor.
    run(py, || unsafe { gemv::linear_rows(&x, &w, &o, stream) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn compress(
    py: Python<'_>,
    kv: Spec,
    score: Spec,
    ape: Spec,
    norm_weight: Spec,
    inv_freq: Spec,
    kv_state: Spec,
    score_state: Spec,
    out: Spec,
    start_pos: usize,
    ratio: usize,
    eps: f32,
    quant: &str,
    rope_table: &str,
    stream: usize,
) -> PyResult<()> {
    let quant = Quant::parse("quant", quant).map_err(to_py)?;
    let rope = RopeTable::parse("rope_table", rope_table).map_err(to_py)?;
    let cfg = Config { start: start_pos, ratio, eps, quant, rope };
    let (kv, sc, ape, w) = (tref("kv", kv)?, tref("score", score)?, tref("ape", ape)?, tref("norm_weight", norm_weight)?);
    let (f, ks, ss, o) =
        (tref("inv_freq", inv_freq)?, tref("kv_state", kv_state)?, tref("score_state", score_state)?, tref("out", out)?);
    // SAFETY: as rope; the states are written in place and alias no other argument (checked in
    // ops.py).
    run(py, || unsafe { compress_op::compress(&kv, &sc, &ape, &w, &f, &ks, &ss, &o, cfg, stream) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn compress_batch(
    py: Python<'_>,
    kv: Spec,
    score: Spec,
    ape: Spec,
    norm_weight: Spec,
    inv_freq: Spec,
    state: Spec,
    state_slots: Spec,
    starts: Spec,
    cu_tokens: Spec,
    out: Spec,
    ratio: usize,
    eps: f32,
    quant: &str,
    rope_table: &str,
    stream: usize,
) -> PyResult<()> {
    let quant = Quant::parse("quant", quant).map_err(to_py)?;
    let rope = RopeTable::parse("rope_table", rope_table).map_err(to_py)?;
    let cfg = BatchConfig { ratio, eps, quant, rope };
    let (kv, sc, ape, w) = (tref("kv", kv)?, tref("score", score)?, tref("ape", ape)?, tref("norm_weight", norm_weight)?);
    let (f, st) = (tref("inv_freq", inv_freq)?, tref("state", state)?);
    let (sl, s0, cu) = (tref("state_slots", state_slots)?, tref("starts", starts)?, tref("cu_tokens", cu_tokens)?);
    let o = tref("out", out)?;
    // SAFETY: as rope; the state is written in place and aliases no other argument; `out` is a
    // fresh tensor.
    run(py, || unsafe { compress_op::compress_batch(&kv, &sc, &ape, &w, &f, &st, &sl, &s0, &cu, &o, cfg, stream) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn indexer_topk(
    py: Python<'_>,
    q: Spec,
    weights: Spec,
    key_cache: Spec,
    block_table: Spec,
    seq_ids: Spec,
    visible: Spec,
    out_indices: Spec,
    out_scores: Spec,
    k: usize,
    physical: bool,
    workspace: Option<Spec>,
    stream: usize,
) -> PyResult<()> {
    let (q, w, c) = (tref("q", q)?, tref("weights", weights)?, tref("key_cache", key_cache)?);
    let (bt, s, v) = (tref("block_table", block_table)?, tref("seq_ids", seq_ids)?, tref("visible", visible)?);
    let (oi, os, ws) = (tref("indices", out_indices)?, tref("scores", out_scores)?, opt("workspace", workspace)?);
    // SAFETY: as rope; the outputs and the workspace are fresh tensors.
    run(py, || unsafe { indexer_op::indexer_topk(&q, &w, &c, &bt, &s, &v, &oi, &os, k, physical, ws.as_ref(), stream) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn indexer_scores(
    py: Python<'_>,
    q: Spec,
    weights: Spec,
    key_cache: Spec,
    block_table: Spec,
    seq_ids: Spec,
    visible: Spec,
    out: Spec,
    stream: usize,
) -> PyResult<()> {
    let (q, w, c) = (tref("q", q)?, tref("weights", weights)?, tref("key_cache", key_cache)?);
    let (bt, s, v) = (tref("block_table", block_table)?, tref("seq_ids", seq_ids)?, tref("visible", visible)?);
    let o = tref("scores", out)?;
    // SAFETY: as rope; `out` is a fresh tensor.
    run(py, || unsafe { indexer_op::indexer_scores(&q, &w, &c, &bt, &s, &v, &o, stream) })
}

/// Optional tensors cross as `None` or a Spec.
fn opt(name: &'static str, s: Option<Spec>) -> PyResult<Option<TensorRef>> {
    s.map(|s| tref(name, s)).transpose()
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn sparse_attention(
    py: Python<'_>,
    q: Spec,
    cache: Spec,
    indices: Spec,
    lengths: Option<Spec>,
    extra_cache: Option<Spec>,
    extra_indices: Option<Spec>,
    extra_lengths: Option<Spec>,
    sink: Spec,
    scale: f32,
    derotate_positions: Option<Spec>,
    derotate_inv_freq: Option<Spec>,
    rope_table: &str,
    out: Spec,
    lse: Spec,
    workspace: Option<Spec>,
    stream: usize,
) -> PyResult<()> {
    let table = RopeTable::parse("rope_table", rope_table).map_err(to_py)?;
    let (q, c, i, s) = (tref("q", q)?, tref("cache", cache)?, tref("indices", indices)?, tref("sink", sink)?);
    let len = opt("lengths", lengths)?;
    let (ec, ei, el) =
        (opt("extra_cache", extra_cache)?, opt("extra_indices", extra_indices)?, opt("extra_lengths", extra_lengths)?);
    let (dp, df) = (opt("derotate positions", derotate_positions)?, opt("derotate inv_freq", derotate_inv_freq)?);
    let (o, l, ws) = (tref("out", out)?, tref("lse", lse)?, opt("workspace", workspace)?);
    // SAFETY: as rope; the outputs are fresh tensors.
    run(py, || unsafe {
        let extra = match (&ec, &ei) {
            (Some(cache), Some(indices)) => Some(Candidates { cache, indices, lengths: el.as_ref() }),
            _ => None,
        };
        let derotate = match (&dp, &df) {
            (Some(positions), Some(inv_freq)) => Some(Derotate { positions, inv_freq, table }),
            _ => None,
        };
        attention_op::sparse_attention(&q, &c, &i, len.as_ref(), extra, &s, scale, derotate, &o, &l, ws.as_ref(), stream)
    })
}

/// Workspace bytes a GPU `indexer_topk` call needs for `queries` queries over at most
/// `max_keys` keys each.
#[pyfunction]
pub fn indexer_workspace_bytes(queries: usize, max_keys: usize, k: usize) -> usize {
    dsv4rs_core::gpu::indexer::workspace_bytes(queries, max_keys, k)
}

/// Workspace bytes a GPU `sparse_attention` call needs (0 when it runs unsplit).
#[pyfunction]
pub fn attention_workspace_bytes(queries: usize, heads: usize, max_candidates: usize) -> usize {
    dsv4rs_core::gpu::attention::workspace_bytes(queries, heads, max_candidates)
}

/// `out = A(x) W^T` for an FP8 (`weight` uint8 codes `[R, K]`, float32 `scale`) or MXFP4 (`fp4`:
/// `weight` uint8 `[R, K/2]`, uint8 UE8M0 `scale [R, K/32]`) weight, per group.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn quant_linear(
    py: Python<'_>,
    x: Spec,
    weight: Spec,
    scale: Spec,
    fp4: bool,
    groups: usize,
    act: &str,
    tiles: bool,
    workspace: Option<Spec>,
    out: Spec,
    stream: usize,
) -> PyResult<()> {
    let act = Act::parse("act", act).map_err(to_py)?;
    let (x, w, s, o) = (tref("x", x)?, tref("weight", weight)?, tref("scale", scale)?, tref("out", out)?);
    let ws = workspace.map(|t| tref("workspace", t)).transpose()?;
    // SAFETY: as rope; `out` and the workspace are fresh tensors.
    run(py, || unsafe { qgemm::linear(&x, &w, &s, fp4, groups, act, tiles, ws.as_ref(), &o, stream) })
}

/// The routed MXFP4 experts of `x`, combined with the routing weights into `out` (`tiles`: the
/// experts' bytes in 64-row tiles, CUDA only).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn moe_experts(
    py: Python<'_>,
    x: Spec,
    idx: Spec,
    weights: Spec,
    gate_up: Spec,
    gate_up_scale: Spec,
    down: Spec,
    down_scale: Spec,
    limit: f32,
    act: &str,
    tiles: bool,
    workspace: Option<Spec>,
    out: Spec,
    stream: usize,
) -> PyResult<()> {
    let act = Act::parse("act", act).map_err(to_py)?;
    let (x, i, w) = (tref("x", x)?, tref("idx", idx)?, tref("weights", weights)?);
    let (gu, gus) = (tref("gate_up", gate_up)?, tref("gate_up_scale", gate_up_scale)?);
    let (dn, dns) = (tref("down", down)?, tref("down_scale", down_scale)?);
    let (ws, o) = (opt("workspace", workspace)?, tref("out", out)?);
    // SAFETY: as rope; `out` and the workspace are fresh tensors.
    run(py, || unsafe { qgemm::moe(&x, &i, &w, &gu, &gus, &dn, &dns, limit, act, tiles, ws.as_ref(), &o, stream) })
}

/// Tokens per pass of a GPU `moe_experts` call with `k` choices over `experts` experts (longer
/// calls run in passes over one workspace).
#[pyfunction]
pub fn moe_pass_tokens(k: usize, experts: usize) -> usize {
    dsv4rs_core::gpu::qgemm::moe_pass_tokens(k, experts)
}

/// Float32 values of workspace a GPU `mhc_pre` call needs for `tokens` tokens of `n` streams of `d`.
#[pyfunction]
pub fn mhc_pre_workspace_len(tokens: usize, n: usize, d: usize) -> usize {
    dsv4rs_core::mhc::pre_workspace_len(tokens, n, d)
}

/// Float32 values of workspace a GPU `mhc_mix` call needs for `tokens` tokens, `m` projection rows
/// and `k` values a token.
#[pyfunction]
pub fn mhc_mix_workspace_len(tokens: usize, m: usize, k: usize) -> usize {
    dsv4rs_core::mhc::mix_workspace_len(tokens, m, k)
}

/// Workspace bytes a GPU `moe_experts` call needs for `tokens` tokens of `k` choices each.
#[pyfunction]
pub fn moe_workspace_bytes(tokens: usize, k: usize, experts: usize, inter: usize, dim: usize) -> usize {
    dsv4rs_core::gpu::qgemm::moe_workspace_bytes(tokens, k, experts, inter, dim)
}

/// Workspace bytes a GPU `quant_linear` call on CUDA device `device` needs: `m` rows of `groups`
/// groups of `k` values, `n` weight rows per group, FP8 or MXFP4 (`fp4`) weights.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn quant_linear_workspace_bytes(
    device: i32, m: usize, groups: usize, n: usize, k: usize, x_bf16: bool, act: &str, fp4: bool,
) -> PyResult<usize> {
    let act = Act::parse("act", act).map_err(to_py)?;
    dsv4rs_core::gpu::qgemm::linear_workspace_bytes(device, m, groups, n, k, x_bf16, act == Act::Fp8, fp4).map_err(to_py)
}
