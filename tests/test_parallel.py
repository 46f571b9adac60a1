"""Data-parallel attention and expert-parallel MoE (dsv4rs.parallel) on CPU processes over gloo:
2 and 4 ranks give the single-process logits of the same tiny model for prefill, chunked prefill
and decode, with sequences spread unevenly (a rank with none steps empty batches) and experts that
no pair chooses; a rank that dies or stalls ends the others' steps with ParallelError within the
timeout. The ranks run tests/_parallel_worker.py."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Iterator

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _parallel_worker as pw  # noqa: E402
from checkpoints import write_hf  # noqa: E402

from dsv4rs.model import V4Config  # noqa: E402
from dsv4rs.parallel import ParallelConfig, attach, shard  # noqa: E402
from dsv4rs.runtime import Engine  # noqa: E402


def run_ranks(tmp_path, world: int, mode: str = "ok", timeout: float = 60.0) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    store = str(tmp_path / "store")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    procs = [ctx.Process(target=pw.worker, args=(r, world, store, outs[r], mode, timeout)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("a rank did not finish within 240 s (a hang)")
    return [torch.load(o, weights_only=False) if os.path.exists(o) else None for o in outs]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread, as each rank runs: a matmul's float32 sums then take the ranks'
    order whatever the machine's load (a BLAS may use fewer threads on a busy machine, and a
    different order can move an FP8 activation across a rounding midpoint)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single() -> dict:
    """The schedule in one process, every sequence in every step's batch."""
    torch.manual_seed(0)
    engine = Engine(pw.model(), max_sequences=8, max_len=512)
    return pw.run_schedule(engine, sorted(pw.PROMPT_LENS))


@pytest.mark.parametrize(("world", "mode"), [(2, "ok"), (4, "ok"), (2, "lopsided"), (2, "tp"), (4, "tp")])
def test_parallel_logits_equal_one_process(tmp_path, single: dict, world: int, mode: str) -> None:
    """``ok``: data-parallel attention (sequences spread unevenly) and experts by all-to-all
    (the variable form in the step where a rank feeds more than 256 tokens and its MTP draft; the
    fixed form in the others, a 50-token chunk beside decodes included);
    ``lopsided``: the same with rank 0 holding all 8 experts and rank 1 none, so rank 1's
    exchanges receive nothing and every one of its pairs runs on rank 0; ``tp``: every rank runs
    every sequence on its share of the heads and output groups, experts by all-reduce."""
    results = run_ranks(tmp_path, world, mode)
    seen = {}
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, res and res.get("trace")
        held = res["held"]
        assert held[2][0] == held[1] - held[0]  # the rank holds its share only
        seen.update(res["logits"])
        if mode != "tp" and not [s for s, o in pw.OWNERS[world].items() if o == r]:
            assert not res["logits"]  # it stepped empty batches
    assert seen.keys() == single.keys()
    for key, want in single.items():
        torch.testing.assert_close(seen[key], want, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    if mode == "tp":  # every rank ran every sequence on its share of the heads
        cfg = pw.model().config
        for res in results:
            for key, v in res["logits"].items():  # the ranks hold the same hidden states, bit for bit
                assert torch.equal(v, results[0]["logits"][key])
            assert res["heads"][0] == cfg.num_attention_heads // world
            assert res["heads"][1][0] == res["heads"][0] * cfg.head_dim
            assert res["logits"].keys() == single.keys()
            for key, want in single.items():
                torch.testing.assert_close(res["logits"][key], want, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    layers = len(pw.model().model.layers)
    for res in results:
        assert len(res["received"]) == pw.STEPS * (layers + 1)  # every layer's exchange and the MTP block's
        if mode != "tp":  # step 0 (a 300-token prompt) and its draft take the variable form, the rest the fixed
            assert res["forms"] == {"fixed": (pw.STEPS - 1) * (layers + 1), "variable": layers + 1}, res["forms"]
    if mode == "lopsided":
        assert set(results[1]["received"]) == {0} and min(results[0]["received"]) > 0


@pytest.mark.parametrize(("world", "mode", "bucket"), [(2, "ok", 4), (2, "idle", 4), (2, "tp", 4), (4, "ok", 2)])
def test_parallel_graph_replays_equal_one_process(tmp_path, single: dict, world: int, mode: str, bucket: int) -> None:
    """What a parallel engine does with CUDA graphs, on CPU processes: decode steps "replayed"
    from graphs that run eagerly (tests/_parallel_worker.py ``EagerGraphs``: the same buffers,
    padding and outputs overwritten in place). Under "dp" every rank replays the bucket of the
    largest batch (a rank with fewer sequences pads to it, "idle"'s rank 1 and world 4's rank 2
    replay padding rows alone) and the exchanges take their fixed form of one slot a row of it;
    under "tp" the ranks agree on each bucket before its capture. The logits and MTP drafts equal
    one process's as the eager parallel steps' do."""
    results = run_ranks(tmp_path, world, f"graphs:{mode}")
    seen = {}
    for res in results:
        assert res is not None and "error" not in res, res and res.get("trace")
        assert res["graphs"] == [bucket]  # every rank, each the largest batch's bucket, whatever its own
        seen.update(res["logits"])
    if mode == "idle":
        assert not results[1]["logits"]
    assert seen.keys() == single.keys()
    for key, want in single.items():
        torch.testing.assert_close(seen[key], want, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    if mode != "tp":  # step 0 (prompts) takes the variable form, step 1 (a chunk beside decodes) the fixed one
        # eagerly; the decode steps replay: the layers' exchanges ran twice at the capture (warm-up and capture)
        # and once a replay, each step's MTP draft (eager) once
        layers, replays = len(pw.model().model.layers), pw.STEPS - 2
        fixed = (layers + 1) + 2 * layers + replays * (layers + 1)
        assert results[0]["forms"] == {"variable": layers + 1, "fixed": fixed}, results[0]["forms"]


@pytest.mark.parametrize("mode", ["ok", "idle"])
def test_padding_rows_of_a_replayed_bucket_run_no_expert(tmp_path, mode: str) -> None:
    """The rows a data-parallel rank pads its batch with to the agreed bucket (and an idle rank's
    rows, all padding) route to no expert, in the replayed step and in the MTP draft after it:
    the pairs the ranks' experts ran over the whole schedule are the eager steps' pairs, which
    have no padding."""
    (tmp_path / "eager").mkdir()
    (tmp_path / "graphs").mkdir()
    eager, replayed = run_ranks(tmp_path / "eager", 2, mode), run_ranks(tmp_path / "graphs", 2, f"graphs:{mode}")
    for res in eager + replayed:
        assert res is not None and "error" not in res, res and res.get("trace")
    assert replayed[0]["graphs"] == [4]  # rank 1 pads (3 rows of 4 under "ok", all 4 under "idle")
    assert sum(sum(r["received"]) for r in replayed) == sum(sum(r["received"]) for r in eager) > 0


def test_parallel_engines_step_eagerly_unless_asked(solo_group) -> None:
    """A parallel engine replays CUDA graphs only with ``cuda_graphs=True``, which on the CPU is
    refused as one process's is."""
    pc = ParallelConfig(1, 0, (range(8),))
    assert Engine(pw.model(), max_sequences=2, max_len=64, parallel=pc).graphs is None
    with pytest.raises(ValueError, match="^cuda_graphs: a decode step can be captured on a CUDA device"):
        Engine(pw.model(), max_sequences=2, max_len=64, parallel=pc, cuda_graphs=True)
    with pytest.raises(ValueError, match="^cuda_graphs: expected a bool or None, got 'yes'"):
        Engine(pw.model(), max_sequences=2, max_len=64, parallel=pc, cuda_graphs="yes")


def _gpus(world: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(torch.cuda.device_count() < world,
                              reason=f"needs {world} CUDA GPUs (one a rank, over NCCL)")


@pytest.mark.gpu
@pytest.mark.parametrize(("world", "mode"), [pytest.param(w, m, marks=_gpus(w)) for w, m in
                                             [(1, "ok"), (1, "tp"), (2, "ok"), (2, "tp"), (2, "idle")]])
def test_nccl_ranks_give_one_gpus_logits(tmp_path, world: int, mode: str) -> None:
    """The schedule of test_parallel_logits_equal_one_process on GPUs over NCCL, data-parallel
    attention + expert-parallel MoE ("ok"; "idle": rank 0 runs every sequence, rank 1 none) and
    tensor-parallel attention ("tp"), against one GPU running every sequence eagerly. The ranks'
    decode steps replay CUDA graphs with the collectives captured in them (under "dp" every rank
    replays the bucket of the largest batch, an idle rank on padding rows alone); one rank over
    NCCL runs the same capture as two. Tolerance 4e-3 absolute and relative, a bfloat16 step: the
    GPU kernels sum in an order that may depend on the batch (each rank batches its own sequences,
    padded to a bucket, and under "tp" the output projection's partial sums meet in the
    all-reduce)."""
    torch.manual_seed(0)
    one = pw.run_schedule(Engine(pw.model().to("cuda:0"), max_sequences=8, max_len=512, cuda_graphs=False),
                          sorted(pw.PROMPT_LENS))
    results = run_ranks(tmp_path, world, f"cuda:{mode}")
    seen = {}
    for res in results:
        assert res is not None and "error" not in res, res and res.get("trace")
        seen.update(res["logits"])
        assert res["graphs"], "no decode step replayed a graph"  # every rank, the idle one too
    if mode == "idle":
        assert not results[1]["logits"] and results[1]["graphs"] == results[0]["graphs"]
    assert seen.keys() == one.keys()
    for key, want in one.items():
        torch.testing.assert_close(seen[key], want, rtol=4e-3, atol=4e-3, msg=lambda m, k=key: f"{k}: {m}")
    if mode == "tp" and world == 2:
        for key, v in results[1]["logits"].items():  # NCCL's all-reduce gives every rank the same sums
            assert torch.equal(v, results[0]["logits"][key]), key


@pytest.mark.parametrize("kind", ["load", "tpload"])
def test_ranks_loading_their_experts_from_a_checkpoint(tmp_path, single: dict, kind: str) -> None:
    """Each rank reads its experts only (load_checkpoint(experts=...); ``tpload``: under "tp", and
    its attention heads, tp=(rank, world)) and attaches: the same logits as one process."""
    ckpt = tmp_path / "ckpt"
    m = pw.model()
    write_hf(m, ckpt)
    results = run_ranks(tmp_path, 2, f"{kind}:{ckpt}")
    seen = loaded_logits(results, kind, m.config)
    for key, want in single.items():
        torch.testing.assert_close(seen[key], want, rtol=0, atol=1e-5)


def loaded_logits(results: list[dict], kind: str, cfg: V4Config) -> dict:
    """The logits of two ranks that loaded their share of a checkpoint (``load``: 4 of the 8
    experts each; ``tpload``: and half the heads), after checking what each holds."""
    seen = {}
    for res in results:
        assert "error" not in res, res.get("trace")
        assert res["held"][2][0] == 4
        heads = 4 if kind == "tpload" else 8
        assert res["heads"] == (heads, (heads * cfg.head_dim, cfg.q_lora_rank))
        seen.update(res["logits"])
    return seen


@pytest.mark.parametrize("kind", ["load", "tpload"])
def test_ranks_running_quantized_weights(tmp_path, kind: str) -> None:
    """A checkpoint in DeepSeek's layout kept quantized (FP8 linears, MXFP4 experts; an
    ``o_lora_rank`` of 128 so that the tensor-parallel parts start and end on the FP8 blocks):
    each rank loads its experts (``tpload``: and its heads) as stored, and the exchange runs the
    fused MoE op on the rows it brings (``Experts.held_sum``; under "tp" the replicated experts'
    all-reduce).

    ``load``: the logits of one process running the same quantized model (each pair's expert
    output is computed from the same rounded activations; the ranks' sums are added in float32).
    ``tpload``: the output projection's partial sums meet in another order (the all-reduce),
    a float32 difference that now and then moves an activation across an FP8 rounding midpoint,
    where it rounds to the other neighbour (an equally correct rounding); the change then travels
    through the cache to the rest of that sequence (measured: the 300-token sequence, 12 of 48
    logit rows, the others within 2e-7). So the ranks agree bit for bit, and every row is within
    the effect of the activation rounding itself on the same step: the distance between the
    single process's logits with FP8 and with bfloat16 activations (measured: at most 0.7 of it)."""
    from dsv4rs.model import DeepseekV4, init_random, load_checkpoint
    from dsv4rs.reference.export import export_deepseek

    ckpt = tmp_path / "ckpt"
    cfg = V4Config.tiny(num_attention_heads=8, o_groups=4, o_lora_rank=128)
    export_deepseek(init_random(DeepseekV4(cfg), seed=5), ckpt, progress=False)
    one = load_checkpoint(ckpt, progress=False)
    assert one.model.layers[0].mlp.experts.quantized
    with one_thread():  # as the ranks run (tests/_parallel_worker.py)
        single = pw.run_schedule(Engine(one, max_sequences=8, max_len=512), sorted(pw.PROMPT_LENS))
    results = run_ranks(tmp_path, 2, f"{kind}:{ckpt}")
    seen = loaded_logits(results, kind, cfg)  # FP8 codes hold one byte a value, the same shapes
    assert seen.keys() == single.keys()
    if kind == "load":
        for key, want in single.items():
            torch.testing.assert_close(seen[key], want, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        return
    for key in single:
        assert torch.equal(results[1]["logits"][key], results[0]["logits"][key]), key
    bf16 = load_checkpoint(ckpt, progress=False).set_activation_quant("bf16")
    with one_thread():
        rounding = pw.run_schedule(Engine(bf16, max_sequences=8, max_len=512), sorted(pw.PROMPT_LENS))
    for key, want in single.items():
        effect = float((rounding[key] - want).abs().max())
        assert float((seen[key] - want).abs().max()) <= effect, key


def test_tensor_parallel_mxfp4_experts_take_every_pair_in_one_call(tmp_path, monkeypatch) -> None:
    """Under "tp" each rank's MXFP4 experts take all the pairs in one call of the fused op, the
    other ranks' pairs as id -1: two ranks' partial sums add up to the whole layer's (float32, to
    its summation order), a rank holding no expert adds zeros, and nothing picks the pairs on the
    host (torch.nonzero, which waits for the device, is not called)."""
    from dsv4rs.model import DeepseekV4, init_random, load_checkpoint
    from dsv4rs.reference.export import export_deepseek

    cfg = V4Config.tiny()
    export_deepseek(init_random(DeepseekV4(cfg), seed=9), tmp_path, progress=False)
    whole, low, high, none = (load_checkpoint(tmp_path, experts=r, progress=False).model.layers[0].mlp.experts
                              for r in (None, range(0, 3), range(3, 8), range(8, 8)))
    assert whole.quantized and (low.held, high.held, none.held) == (3, 5, 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, cfg.hidden_size, generator=g).bfloat16()
    idx = torch.randint(0, 8, (6, 3), generator=g)
    idx[2] = torch.tensor([3, 4, 7])  # a token none of whose pairs the low rank holds
    w = torch.rand(6, 3, generator=g)
    want = whole.held_sum(x, idx, w)
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: pytest.fail("picked pairs on the host"))
    parts = [m.held_sum(x, idx, w) for m in (low, high, none)]
    assert all(p.dtype == torch.float32 for p in parts) and torch.equal(parts[2], torch.zeros_like(want))
    assert torch.equal(parts[0][2], torch.zeros(cfg.hidden_size))
    torch.testing.assert_close(parts[0] + parts[1], want, rtol=1e-6, atol=1e-6)


@pytest.fixture
def solo_group(tmp_path) -> Iterator[None]:
    """A process group of this process alone (gloo), for an exchange with itself."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/solo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique2", "unique_dim",
              "unique_consecutive", "repeat_interleave"}
"""aten ops that read a tensor's values on the host (on a GPU: wait for it), the scalar read and
the ops whose output's shape depends on the values."""


class NoHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any :data:`HOST_READS` op (and ``Tensor.tolist``, which reads without
    dispatching) outside the calls it is told to let through."""

    def __init__(self) -> None:
        super().__init__()
        self.let, self.seen = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in HOST_READS and not self.let:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

    def through(self, fn):
        def call(*a, **k):
            self.let += 1
            try:
                return fn(*a, **k)
            finally:
                self.let -= 1
        return call


@pytest.mark.parametrize("form", ["float32", "bfloat16"])
@torch.no_grad()
def test_tensor_parallel_held_sums_add_up_in_every_form(gen, form: str) -> None:
    """Under "tp" unquantized experts take every pair in one call too, the other ranks' pairs as
    id -1: the ranks' partial sums add up to the whole layer's, a rank holding no expert adds
    zeros, a step of no tokens (an idle rank's) gives no rows, and bfloat16 experts (the grouped
    GEMMs) read nothing on the host."""
    import copy

    sys.path.insert(0, os.path.dirname(__file__))
    from test_runtime import _experts

    whole = _experts(gen)
    if form == "bfloat16":
        whole = whole.to(torch.bfloat16)
    parts = []
    for held in (range(0, 3), range(3, 8), range(8, 8)):
        part = copy.deepcopy(whole)
        part.keep(held)
        parts.append(part)
    x = torch.randn(6, 64, generator=gen)
    idx = torch.randint(0, 8, (6, 3), generator=gen)
    idx[2] = torch.tensor([3, 4, 7])  # a token none of whose pairs the first rank holds
    w = torch.rand(6, 3, generator=gen)
    want = whole.held_sum(x, idx, w)
    mode = NoHostReads()
    with mode if form == "bfloat16" else contextlib.nullcontext():
        sums = [p.held_sum(x, idx, w) for p in parts]
    assert mode.seen == []
    assert all(p.dtype == torch.float32 for p in sums) and torch.equal(sums[2], torch.zeros_like(want))
    assert torch.equal(sums[0][2], torch.zeros(64))
    torch.testing.assert_close(sums[0] + sums[1], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    for p in parts:  # an idle rank's step (Engine._idle): no tokens, zero rows of sums, in every form
        none = p.held_sum(x[:0].to(next(whole.parameters()).dtype), idx[:0], w[:0])
        assert none.shape == (0, 64) and none.dtype == torch.float32


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("form", ["bfloat16", "mxfp4"])
@torch.no_grad()
def test_held_sums_of_bfloat16_tokens_add_up_to_one_call(gen, form: str, device: str) -> None:
    """What an exchange's owners (and tensor-parallel ranks) compute for bfloat16 tokens: the
    rows through ``held_sum`` (float32 rows, float32 sums) on two ranks' shares of the experts
    add up to the whole module's own bfloat16 call within that call's one rounding to bfloat16
    (float32 rows of bfloat16 values take the same activation codes and expert outputs; a
    different code would move a sum by far more), and with MXFP4 experts within the rounding of
    each expert output ``y`` to bfloat16 too, which the fused op makes for bfloat16 tokens only
    (the bfloat16 experts' grouped GEMMs round it on both sides)."""
    import copy

    sys.path.insert(0, os.path.dirname(__file__))
    from test_runtime import _experts, _quantized_experts

    whole = (_quantized_experts(gen) if form == "mxfp4" else _experts(gen).to(torch.bfloat16)).to(device)
    parts = [copy.deepcopy(whole), copy.deepcopy(whole)]
    parts[0].keep(range(0, 3))
    parts[1].keep(range(3, 8))
    x = torch.randn(37, 64, generator=gen).bfloat16().to(device)
    idx = torch.randint(0, 8, (37, 6), generator=gen).to(device)
    idx[5, 2] = -1
    w = torch.rand(37, 6, generator=gen).to(device)
    one = whole(x, idx, w)
    total = parts[0].held_sum(x, idx, w) + parts[1].held_sum(x, idx, w)
    assert one.dtype == torch.bfloat16 and total.dtype == torch.float32
    err = (one.float() - total).abs()
    bound = total.abs() * 2.0**-8 + 1e-6 * float(total.abs().max())  # a bfloat16 rounding, float32 reordering
    if form == "mxfp4":  # each w_j y_j rounded: sum_j |w_j y_j| 2^-8, each pair's term alone from held_sum
        choice = torch.eye(idx.shape[1], device=device)
        bound += 2.0**-8 * sum(whole.held_sum(x, idx, w * choice[j]).abs() for j in range(idx.shape[1]))
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("form", ["float32", "bfloat16", "mxfp4"])
@torch.no_grad()
def test_fixed_exchange_sums_as_the_variable_one_and_reads_nothing_on_the_host(solo_group, gen, monkeypatch,
                                                                               form: str) -> None:
    """The exchange's fixed form (a step every rank agreed to keep within ``tokens`` tokens: a
    slot per token per rank) gives the variable form's sums and one process's, with
    slack slots left empty and pairs of id -1 (no expert), and nothing in it reads the host: no
    scalar read, no op whose output's shape depends on values (the experts' own call aside,
    whose forms say what they read), no ``tolist``. A step of more tokens than agreed is refused."""
    from dsv4rs.parallel import ExpertExchange

    sys.path.insert(0, os.path.dirname(__file__))
    from test_runtime import _experts, _quantized_experts

    ex = _quantized_experts(gen) if form == "mxfp4" else _experts(gen)
    if form == "bfloat16":
        ex = ex.to(torch.bfloat16)
    x = torch.randn(11, 64, generator=gen).to(torch.bfloat16 if form == "bfloat16" else torch.float32)
    idx = torch.randint(0, 8, (11, 3), generator=gen)
    idx[3, 1] = -1
    w = torch.rand(11, 3, generator=gen)
    one = ex(x, idx, w)
    exchange = ExpertExchange(ParallelConfig(1, 0, (range(8),)), torch.device("cpu"))
    ex.exchange = exchange
    variable = ex(x, idx, w)
    mode = NoHostReads()
    monkeypatch.setattr(ex, "held_sum", mode.through(ex.held_sum))
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (mode.let or mode.seen.append("tolist"), tolist(t))[1])
    with mode:  # the check itself: the variable form reads the counts on the host
        ex(x, idx, w)
    assert "tolist" in mode.seen
    mode.seen.clear()
    exchange.tokens = 16
    with mode:
        fixed = ex(x, idx, w)
    monkeypatch.undo()
    assert mode.seen == []
    assert torch.equal(fixed, variable)
    torch.testing.assert_close(fixed, one, rtol=1e-6, atol=1e-6 * float(one.abs().max()))
    assert exchange.received == [32, 32, 32]  # 33 pairs, one of them no expert's
    exchange.tokens = 10
    with pytest.raises(RuntimeError, match="11 tokens in a step every rank agreed to keep within 10"):
        ex(x, idx, w)


@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The text tests' tiny checkpoint (a BPE tokenizer, FP8 linears, MXFP4 experts, MTP) with
    8 heads in 4 output groups of rank 128, so that its FP8 parts split on their blocks under "tp"."""
    from checkpoints import write_checkpoint

    path = str(tmp_path_factory.mktemp("tiny-v4-tp"))
    write_checkpoint(path, num_attention_heads=8, o_groups=4, o_lora_rank=128)
    return path


@pytest.mark.parametrize(("how", "spec"), [("dp", False), ("dp", True), ("tp", False), ("tp", True)])
def test_parallel_llm_generates_one_processs_text(tmp_path, tp_checkpoint: str, how: str, spec: bool) -> None:
    """``LLM(..., parallel=pc)`` on 2 gloo processes, each loading its share of a quantized
    checkpoint: ``generate`` returns every prompt's completion on every process (under "dp"
    prompt ``i`` ran on rank ``i % 2``, the rank with fewer prompts stepping empty batches
    meanwhile; under "tp" both ran all), the tokens and text of one process's LLM, greedy and
    seeded sampling alike, with and without MTP speculation (every step drafted on both ranks);
    ``stream`` gives both processes the deltas of one process's stream, and one stopped after its
    first delta on both leaves no request and no sequence."""
    from dsv4rs import LLM

    with one_thread():
        one = LLM(tp_checkpoint, max_sequences=4, max_len=256, speculative=spec)
        prompts, params = pw.llm_requests()
        want = [(o.token_ids, o.text, o.finish_reason) for o in one.generate(prompts, params)]
        c = one.generate(prompts[0], params[1])[0]
        it = one.stream(prompts[1], params[0])
        first = next(it).token_ids
        it.close()
    results = run_ranks(tmp_path, 2, f"llm:{how}:{int(spec)}:{tp_checkpoint}")
    for res in results:
        assert res is not None and "error" not in res, res and res.get("trace")
        assert res["outs"] == want
        assert res["stream"] == (c.text, c.token_ids, c.finish_reason)  # rank 0's deltas on both
        assert res["first"] == first and len(first) and not res["unfinished"] and res["left"] == []
        assert res["held"] == 4  # its half of the 8 experts
        assert res["steps"] == results[0]["steps"] > 0  # lockstep
        assert res["drafts"] == (res["steps"] if spec else 0)


@pytest.mark.parametrize("how", ["dp", "tp"])
def test_served_requests_over_processes_give_one_processs_text(tmp_path, tp_checkpoint: str, how: str) -> None:
    """``dsv4rs serve --world 2``'s engine (serve/parallel.py) on 2 gloo processes: rank 0's
    Leader, driven as the server's engine thread drives an LLM, gives each request a rank (dp) or
    every rank (tp); the follower does what each plan says. Idle for 2.5 times the group's
    timeout first (the heartbeats keep the follower's wait alive), then the text and tokens of
    one process's LLM, streamed deltas adding up to the completion, a request aborted after one
    step, and no sequence left on either rank."""
    from dsv4rs import LLM

    with one_thread():
        one = LLM(tp_checkpoint, max_sequences=4, max_len=256, speculative=False)
        prompts, params = pw.llm_requests()
        want = [(o.token_ids, o.text, o.finish_reason) for o in one.generate(prompts, params)]
    results = run_ranks(tmp_path, 2, f"serve:{how}:{tp_checkpoint}", timeout=2.0)
    for res in results:
        assert res is not None and "error" not in res, res and res.get("trace")
        assert res["left"] == []
        assert res["added"] == (4 if how == "tp" else 2)  # dp: the 4 requests spread over the ranks
    assert results[0]["outs"] == want and results[0]["aborted"] == "abort"


def test_parallel_llm_checks_its_arguments(solo_group, tp_checkpoint: str) -> None:
    """A parallel LLM of one process (its own gloo group): ``parallel`` must be a
    ParallelConfig; generate and stream give the plain LLM's tokens and text; has_unfinished asks
    every process. The server's Leader refuses an LLM that is not rank 0 of a parallel one, checks
    a request as LLM.add_request does (nothing queued), runs requests to the same tokens, and
    gives a completion once."""
    from dsv4rs import LLM
    from dsv4rs.llm import SamplingParams
    from dsv4rs.model import V4Config

    with pytest.raises(ValueError, match="^parallel: expected a dsv4rs.parallel.ParallelConfig"):
        LLM(tp_checkpoint, parallel="dp", max_sequences=2, max_len=128)
    pc = ParallelConfig.even(V4Config.from_pretrained(tp_checkpoint), 1, 0)
    prompts, params = pw.llm_requests()
    with one_thread():
        llm = LLM(tp_checkpoint, parallel=pc, max_sequences=4, max_len=256, speculative=False)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        want = [o.token_ids for o in LLM(tp_checkpoint, max_sequences=4, max_len=256,
                                          speculative=False).generate(prompts, params)]
        streamed = "".join(d.text for d in llm.stream(prompts[1], params[1]))
        alone = LLM(tp_checkpoint, max_sequences=4, max_len=256, speculative=False).generate(prompts[1], params[1])
    assert got == want and streamed == alone[0].text and not llm.has_unfinished()
    with pytest.raises(ValueError, match="exceed the context of 256 tokens"):
        next(llm.stream(prompts[0], SamplingParams(max_tokens=1000)))
    from dsv4rs.serve.parallel import Leader

    with pytest.raises(ValueError, match="^llm: a Leader needs rank 0 of a parallel LLM"):
        Leader(LLM(tp_checkpoint, max_sequences=2, max_len=128, speculative=False))
    leader = Leader(llm)  # a server's engine over one process
    with pytest.raises(ValueError, match="exceed the context of 256 tokens"):
        leader.add_request(llm.encode(prompts[0]), SamplingParams(max_tokens=1000))
    with pytest.raises(TypeError, match="^params: expected SamplingParams"):
        leader.add_request(llm.encode(prompts[0]), {"max_tokens": 3})
    assert not leader.has_unfinished()
    keys = [leader.add_request(llm.encode(p), sp) for p, sp in zip(prompts, params)]
    with one_thread():
        while leader.has_unfinished():
            leader.step()
    assert [leader.completion(k).token_ids for k in keys] == want
    with pytest.raises(ValueError, match="^rid: no finished request 0"):
        leader.completion(keys[0])
    leader.close()


def test_world_demo_checks_itself() -> None:
    import subprocess

    for extra in (["--no-quant"], ["--parallel", "tp"]):
        out = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "demo", "--world", "2", "--prompt-len", "160",
                              "--new-tokens", "3", *extra], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stdout.strip().splitlines()
        assert lines[-1] == "OK" and lines[-2].startswith("|logit diff| median"), out.stdout
        assert sum(line.startswith("rank ") for line in lines) == 2
    out = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "demo", "--world", "2", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--world" in out.stderr


@pytest.mark.parametrize("weights", ["bf16", "shipped"])
def test_world_bench_reports_every_rank_beside_one_process(weights: str) -> None:
    import subprocess

    from dsv4rs.bench.model import _config

    out = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "bench", "--only", "model", "--world", "2", "--device",
                          "cpu", "--batch", "1,2", "--context", "256", "--layers", "2", "--weights", weights],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    held = "FP8/MXFP4 weights as shipped" if weights == "shipped" else "bf16 weights"
    assert any(line.startswith("decode over 2 ranks") and held in line for line in lines), out.stdout
    rows = [line.split() for line in lines if line.strip().startswith("b=")]
    assert [(r[0], r[2]) for r in rows] == [("b=1", "0"), ("b=1", "1"), ("b=2", "0"), ("b=2", "1")], out.stdout
    cfg = _config("demo", 2)
    d, k = cfg.hidden_size, cfg.num_experts_per_tok
    for r in rows:  # case (2 words), rank, eager ms, comm, KiB sent, graph ms, nccl, ms/layer, tok/s/rank,
        # 1 process eager ms, ratio, 1 process graph ms, ratio
        ms, comm, kib, per_layer = float(r[3]), float(r[4].rstrip("%")), float(r[5]), float(r[8])
        assert r[6:8] == ["-", "-"]  # no CUDA graphs on the CPU: the eager step is the rank's
        assert ms > 0 and abs(per_layer - ms / 2) < 1e-2 and 0 < comm < 100 and float(r[9]) > 0 and float(r[10]) > 0
        # a fixed-form exchange a layer: to each of 2 ranks a slot a token, a bf16 row and k ids and weights out,
        # a float32 sum back
        batch = int(r[0][2:])
        assert kib == pytest.approx(2 * 2 * batch * (2 * d + 8 * k + 4 * d) / 1024, abs=0.05), r
        assert r[12:] == ["-", "-"]
    prefill = [line for line in lines if line.startswith("prefill T=256 rank ")]
    assert len(prefill) == 2 and all("tokens/s per rank (one process: " in line for line in prefill), out.stdout
    out = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "bench", "--world", "2"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--only model" in out.stderr


def test_ranks_agree_on_each_step(tmp_path) -> None:
    """The agreement before each step: the most tokens any rank runs (the fixed form's, decode
    steps and prompt chunks alike, up to 256), whether every rank decodes, ``None`` tokens when
    no rank runs one or a rank runs more than 256; ranks whose graph buckets differ all get the
    same ValueError."""
    from dsv4rs.parallel import FIXED_MAX_TOKENS, Agreed

    results = run_ranks(tmp_path, 2, "buckets")
    for res in results:
        assert res is not None and "error" not in res, res and res.get("trace")
        assert res["same"] == 1
        assert res["decode"] == Agreed(3, True, 3) and res["prefill"] == Agreed(7, False, 7)
        assert res["none"] == Agreed(None, True, 0) and res["many"] == Agreed(None, True, 300)
        assert res["at_most"] == Agreed(256, False, 256) and FIXED_MAX_TOKENS == 256
        assert res["differ"].startswith("cuda_graphs: the ranks replay different graph buckets")


def test_a_smaller_groups_agreement_takes_the_twin_made_first(tmp_path) -> None:
    """A group smaller than the world whose backend is not gloo (as NCCL's): every process makes
    its gloo twin first (control_group, a collective of the whole world), and the members' steps
    then agree over it without the others (a second making would wait for them forever)."""
    results = run_ranks(tmp_path, 3, "subgroup", timeout=20.0)
    for res in results:
        assert res is not None and "error" not in res, res and res.get("trace")
        assert res["twin"] is True
    assert results[0]["agreed"] == results[1]["agreed"] == 2 and "agreed" not in results[2]


def test_a_dead_rank_ends_the_others_step(tmp_path) -> None:
    results = run_ranks(tmp_path, 2, "die", timeout=60.0)
    assert results[1] is None  # it died before writing anything
    err = results[0]["error"]
    assert err.startswith("ParallelError: rank 0: the step's agreement"), results[0].get("trace")
    assert results[0]["elapsed"] < 60.0


def test_a_stalled_rank_ends_the_others_step_within_the_timeout(tmp_path) -> None:
    results = run_ranks(tmp_path, 2, "stall", timeout=4.0)
    err = results[0]["error"]
    assert err.startswith("ParallelError: rank 0: the step's agreement") and "timeout (4 s)" in err, results[0].get("trace")
    assert 3.0 < results[0]["elapsed"] < 30.0


@pytest.mark.parametrize("dtype,d,k", [(torch.bfloat16, 64, 6), (torch.float32, 7, 1), (torch.float16, 3, 2),
                                       (torch.float64, 5, 3)])
def test_a_token_row_its_ids_and_weights_travel_as_one_row_bit_for_bit(dtype: torch.dtype, d: int, k: int) -> None:
    """The exchange sends each token's row with its ``k`` expert ids (int32) and routing weights
    (float32) appended, one message: unpacking gives the rows' bits, the ids (-1 included) and the
    weights back, for any row width, dtype and ``k``, no rows too; a row of another width is refused."""
    from dsv4rs.parallel import pack_rows, unpack_rows

    g = torch.Generator().manual_seed(d)
    x = torch.randn(5, d, generator=g).to(dtype)
    x[0, 0] = float("nan")
    idx = torch.randint(-1, 384, (5, k), generator=g)
    idx[1, 0] = -1
    w = torch.randn(5, k, generator=g, dtype=torch.float64)  # weights travel as float32
    packed = pack_rows(x, idx, w)
    assert packed.dtype == torch.uint8 and packed.shape == (5, d * x.element_size() + 8 * k)
    rows, ids, weights = unpack_rows(packed, dtype, d, k)
    assert rows.dtype == dtype and torch.equal(rows.view(torch.uint8), x.view(torch.uint8))
    assert ids.dtype == torch.int64 and torch.equal(ids, idx)
    assert weights.dtype == torch.float32 and torch.equal(weights, w.float())
    none = unpack_rows(pack_rows(x[:0], idx[:0], w[:0]), dtype, d, k)
    assert [t.shape for t in none] == [(0, d), (0, k), (0, k)]
    with pytest.raises(ValueError, match="packed: rows of"):
        unpack_rows(packed, dtype, d, k + 1)


def test_parallel_config_checks_its_arguments() -> None:
    cfg = V4Config.tiny()
    pc = ParallelConfig.even(cfg, 3, 1)
    assert pc.expert_ranges == (range(0, 2), range(2, 5), range(5, 8)) and pc.experts == range(2, 5)
    assert ParallelConfig.even(cfg, 16, 15).experts == range(7, 8) and ParallelConfig.even(cfg, 16, 0).experts == range(0, 0)
    for kwargs, name in [(dict(world=0, rank=0, expert_ranges=()), "world"),
                         (dict(world=2, rank=2, expert_ranges=(range(4), range(4, 8))), "rank"),
                         (dict(world=2, rank=0, expert_ranges=(range(4),)), "expert_ranges"),
                         (dict(world=2, rank=0, expert_ranges=(range(4), range(5, 8))), "expert_ranges"),
                         (dict(world=2, rank=0, expert_ranges=(range(0, 4, 2), range(4, 8))), "expert_ranges"),
                         (dict(world=1, rank=0, expert_ranges=None), "expert_ranges"),
                         (dict(world=1, rank=0, expert_ranges=range(8)), "expert_ranges"),
                         (dict(world=1, rank=0, expert_ranges=(range(8),), timeout="x"), "timeout"),
                         (dict(world=1, rank=0, expert_ranges=(range(8),), timeout=0), "timeout")]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            ParallelConfig(**kwargs)


def test_init_says_what_is_missing(monkeypatch) -> None:
    from dsv4rs import parallel

    cfg = V4Config.tiny()
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set; launch with torchrun"):
        parallel.init(cfg)
    for bad in (0, -1.0, float("nan"), "10", True):
        with pytest.raises(ValueError, match="timeout"):
            parallel.init(cfg, timeout=bad)


def test_tensor_parallel_needs_the_groups_to_split() -> None:
    m = pw.model()  # 4 output groups
    with pytest.raises(ValueError, match="o_groups"):
        shard(m, ParallelConfig.even(m.config, 3, 0, mode="tp"))
    with pytest.raises(ValueError, match="mode"):
        ParallelConfig.even(m.config, 2, 0, mode="pp")


def test_sharded_models_are_refused_without_their_config() -> None:
    cfg = V4Config.tiny()
    m = pw.model()
    pc = ParallelConfig.even(cfg, 2, 1)
    with pytest.raises(ValueError, match="model: holds experts range\\(0, 4\\), but rank 1 owns range\\(4, 8\\)"):
        attach(pw.model().__class__(cfg, experts=range(0, 4)), pc)
    shard(m, pc)
    assert m.experts == range(4, 8) and m.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    with pytest.raises(ValueError, match="parallel=ParallelConfig"):
        Engine(m, max_sequences=2, max_len=256)
    with pytest.raises(ValueError, match="cuda_graphs"):
        Engine(m, max_sequences=2, max_len=256, parallel=pc, cuda_graphs=True)
    with pytest.raises(ValueError, match="not all of them"):
        shard(m, pc)
    plain = Engine(pw.model(), max_sequences=2, max_len=256)
    with pytest.raises(ValueError, match="seq_ids: an empty step"):
        plain.step([], [])
