"""The runtime's pieces beyond the engine's step: the grouped MoE path, the planner's decode
metadata, out-of-pages atomicity."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.model.layers.moe import Experts


def _experts(gen: torch.Generator, e: int = 8, d: int = 64, inner: int = 32) -> Experts:
    ex = Experts(V4Config.tiny(n_routed_experts=e, hidden_size=d, moe_intermediate_size=inner))
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=gen) * 0.1)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=gen) * 0.1)
    return ex


@pytest.mark.parametrize("case", ["random", "one expert", "ties", "one token"])
@torch.no_grad()
def test_grouped_experts_equal_the_per_expert_loop(gen: torch.Generator, case: str) -> None:
    """bfloat16 weights take the grouped-GEMM path; against the float64 sum over each token's
    choices it errs by bfloat16 rounding only (the activations, the SwiGLU output and the
    products are bfloat16; a wrong permutation would err by O(1)), with experts that get no
    token, all tokens on one expert, and a token choosing one expert twice."""
    ex = _experts(gen).to(torch.bfloat16)
    t, k = (1, 2) if case == "one token" else (37, 2)
    x = torch.randn(t, 64, generator=gen).to(torch.bfloat16)
    idx = torch.randint(0, 3, (t, k), generator=gen)  # experts 3..7 get nothing
    if case == "one expert":
        idx[:] = 5
    if case == "ties":
        idx[:, 1] = idx[:, 0]
    w = torch.rand(t, k, generator=gen)
    got = ex(x, idx, w)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    ref = torch.zeros(t, 64, dtype=torch.float64)
    for i in range(t):
        for j in range(k):
            e = int(idx[i, j])
            h = ex._swiglu(x[i].double() @ ex.gate_up_proj[e].double().T)
            ref[i] += float(w[i, j]) * (h @ ex.down_proj[e].double().T)
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert float(err) < 2e-2, float(err)


def _quantized_experts(gen: torch.Generator) -> Experts:
    ex = Experts(V4Config.tiny(n_routed_experts=8, hidden_size=64, moe_intermediate_size=32), quantized=True)
    for name in ("gate_up", "down"):
        getattr(ex, name).copy_(torch.randint(0, 256, getattr(ex, name).shape, dtype=torch.uint8, generator=gen))
    for name in ("gate_up_scale", "down_scale"):
        getattr(ex, name).copy_(torch.randint(118, 124, getattr(ex, name).shape, dtype=torch.uint8, generator=gen))
    return ex


@pytest.mark.parametrize("form", ["float32", "bfloat16", "mxfp4"])
@torch.no_grad()
def test_every_experts_form_skips_pairs_of_id_minus_one(gen: torch.Generator, form: str) -> None:
    """An id of -1 is no expert in every form of the routed experts (the per-expert loop, the
    grouped GEMMs, the fused MXFP4 op), as an exchange's empty slots and another rank's pairs
    need: the pair adds nothing, a token whose pairs are all -1 gets exactly zero, and the other
    pairs sum as they would with that pair's weight zero (a pair of -1 sorted into an expert's
    rows would move them by O(1))."""
    ex = _quantized_experts(gen) if form == "mxfp4" else _experts(gen)
    if form == "bfloat16":
        ex = ex.to(torch.bfloat16)
    t, k = 23, 3
    x = torch.randn(t, 64, generator=gen).to(torch.bfloat16 if form == "bfloat16" else torch.float32)
    idx = torch.randint(0, 8, (t, k), generator=gen)
    drop = torch.rand(t, k, generator=gen) < 0.4
    drop[0] = True  # a token with no expert at all
    drop[1] = False
    w = torch.rand(t, k, generator=gen)
    got = ex(x, torch.where(drop, -1, idx), w)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    want = ex(x, idx, torch.where(drop, 0.0, w))
    tol = 1e-2 if form == "bfloat16" else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    assert float((ex(x, idx, w) - want).abs().max()) > 10 * tol * float(want.abs().max())  # the drops matter


def test_bf16_model_prefill_runs_the_grouped_path(gen: torch.Generator) -> None:
    from dsv4rs.runtime import Engine

    model = init_random(DeepseekV4(V4Config.tiny()), seed=3)
    bf16 = init_random(DeepseekV4(V4Config.tiny()), seed=3)
    for layer in [*bf16.model.layers, *bf16.mtp]:
        layer.mlp.experts.to(torch.bfloat16)
    ids = torch.randint(0, 512, (200,), generator=gen)
    outs = []
    for m in (model, bf16):
        eng = Engine(m, max_sequences=1, max_len=200)
        s, _ = eng.add_sequence()
        outs.append(eng.step([s], [ids], all_logits=True)[0])
    err = (outs[0] - outs[1]).abs().amax(-1)
    assert float(err.median()) < 2e-2 and bool(torch.isfinite(outs[1]).all())


TOL = 1e-5


def _engine(model: DeepseekV4, **kw):
    from dsv4rs.runtime import Engine

    return Engine(model, **{"max_sequences": 3, "max_len": 700, **kw})


def test_chunked_prefill_mixed_with_decode_equals_separate_runs(gen: torch.Generator) -> None:
    """A long prompt arriving while two requests decode is fed in budget-sized chunks beside their
    decode tokens; every request's tokens and logits equal those of running it alone (whole
    prefill, then decode)."""
    from dsv4rs.runtime.scheduler import Scheduler

    model = init_random(DeepseekV4(V4Config.tiny()), seed=11)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (40, 70, 530)]
    sampling = [dict(), dict(temperature=0.8, top_k=20, seed=5), dict(temperature=1.0, top_p=0.9, seed=9)]
    mixed = Scheduler(_engine(model), token_budget=64, keep_logits=True)
    ids = [mixed.add(prompts[0], 12, **sampling[0]), mixed.add(prompts[1], 12, **sampling[1])]
    for _ in range(3):
        mixed.step()
    ids.append(mixed.add(prompts[2], 6, **sampling[2]))
    steps = 0
    while mixed.waiting or mixed.running:
        fed = [(len(mixed.requests[r].prompt), mixed.requests[r].fed) for r in mixed.running]
        mixed.step()
        steps += 1
        if steps == 2:  # the long prompt is being chunked while the others decode
            assert any(f < p for p, f in fed) and any(f == p for p, f in fed)
    for rid, prompt, kw in zip(ids, prompts, sampling):
        alone = Scheduler(_engine(model), token_budget=4096, keep_logits=True)
        aid = alone.add(prompt, mixed.requests[rid].max_new_tokens, **kw)
        alone.run()
        assert mixed.requests[rid].output == alone.requests[aid].output
        torch.testing.assert_close(torch.stack(mixed.requests[rid].logits), torch.stack(alone.requests[aid].logits),
                                   atol=TOL, rtol=0)


def _overlap_run(model: DeepseekV4, overlap: bool, prompts: list[list[int]], stop: int | None):
    """Seven requests through 3 sequences (so some wait), one joining mid-run, one aborted at its
    6th token, greedy and sampled, top-p (the sorted sampler), penalties, log-probabilities,
    one token only, a stop id; every sampled token's logits kept."""
    from dsv4rs.runtime.scheduler import Scheduler

    sched = Scheduler(_engine(model, max_sequences=3, max_len=400), token_budget=96, keep_logits=True,
                      overlap=overlap)
    kws = [dict(temperature=0.0), dict(temperature=0.8, seed=5), dict(temperature=1.0, top_p=0.9, seed=6),
           dict(temperature=0.7, seed=7, repetition_penalty=1.3, presence_penalty=0.5),
           dict(temperature=1.0, seed=8, logprobs=3), dict(temperature=0.0), dict(temperature=0.9, seed=9)]
    lengths = [30, 25, 1, 20, 24, 12, 18]
    rids = [sched.add(p, n, **kw, stop_ids=frozenset({stop}) if stop is not None and i == 1 else frozenset())
            for i, (p, n, kw) in enumerate(zip(prompts[:6], lengths, kws))]
    steps = 0
    while sched.waiting or sched.running:
        sched.step()
        steps += 1
        if steps == 8:  # joins while the others decode
            rids.append(sched.add(prompts[6], lengths[6], **kws[6]))
        r = sched.requests[rids[4]]
        if not r.done and len(r.output) >= 6:
            sched.abort(rids[4])
    sched.run()
    sched.engine.manager.check()
    assert sched.engine.manager.sequence_ids() == []
    return [sched.requests[rid] for rid in rids], sched.steps_ahead


def test_overlapped_scheduling_gives_the_same_requests(gen: torch.Generator) -> None:
    """Launching decode steps on tokens still on the device (overlap) changes nothing a request
    sees: the same tokens, finish reasons, log-probabilities and logits as planning every step
    from the host; and most decode steps do run ahead."""
    model = init_random(DeepseekV4(V4Config.tiny()), seed=9)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (40, 9, 130, 70, 25, 300, 50)]
    stop = None
    for _ in range(2):  # the second time with a stop id the first run produced at request 1's 5th token
        (sync, ahead0), (over, ahead) = (_overlap_run(model, o, prompts, stop) for o in (False, True))
        assert ahead0 == 0 and ahead > 10
        for a, b in zip(sync, over):
            assert (a.output, a.finish_reason) == (b.output, b.finish_reason)
            assert len(a.logits) == len(a.output)
            torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=TOL, rtol=0)
            assert len(a.token_logprobs) == len(b.token_logprobs)
            for (la, ta), (lb, tb) in zip(a.token_logprobs, b.token_logprobs):
                assert abs(la - lb) <= TOL and [t for t, _ in ta] == [t for t, _ in tb]
        assert [r.finish_reason for r in sync] == ["length", "stop" if stop is not None else "length", "length",
                                                  "length", "abort", "length", "length"]
        assert len(sync[2].output) == 1 and len(sync[4].output) == 6
        stop = sync[1].output[4]
        assert stop not in sync[1].output[:4]


def _sampled_run(eng, device_fed: bool, gen: torch.Generator) -> tuple[list[torch.Tensor], list[list[int]], object]:
    """A decode loop that samples on the engine's device: ``device_fed`` feeds the
    :class:`SampledTokens` themselves, otherwise their ids read on the host. A sequence skips a
    step, the batch comes in another order, one sequence forks and one leaves while tokens are
    unresolved, one takes a host chunk between sampled steps, and the loop crosses the 256-token
    prefix unit. Returns every step's logits (on the host), every live sequence's tokens, and
    the prefix hit of a new sequence whose prompt repeats sequence 0."""
    prompts = torch.randint(0, eng.cfg.vocab_size, (3, 250), generator=gen)
    seqs = [eng.add_sequence()[0] for _ in range(3)]
    hist = {s: prompts[i].tolist() for i, s in enumerate(seqs)}
    logits = eng.step(seqs, list(prompts))
    out = [logits.cpu()]
    first = eng.sample(seqs, logits, temperature=[1.0, 0.0, 0.7], top_k=[0, 0, 5], seed=[1, 2, 3])
    src = dict.fromkeys(seqs, first)  # the sampled tokens holding each sequence's next token
    for t in range(24):
        batch = [s for s in seqs if not (t == 5 and s == seqs[1])]  # sequence 1 skips a step
        if t == 9:
            batch = batch[::-1]  # another order than the sampled tokens'
        if t == 12:  # a fork while its parent's last token is unresolved
            child = eng.fork(seqs[0])
            hist[child] = list(hist[seqs[0]])
        if t == 16:  # sequence 2 takes a host chunk between sampled steps
            chunk = torch.randint(0, eng.cfg.vocab_size, (3,), generator=gen).tolist()
            eng.step([seqs[2]], [chunk])
            hist[seqs[2]] += chunk
        # After the skip, sequence 1's token sits in older sampled tokens: a step of its own.
        for tokens in dict.fromkeys(src[s] for s in batch):
            group = [s for s in batch if src[s] is tokens]
            ids = dict(zip(tokens.seq_ids, tokens.tolist()))
            for s in group:
                hist[s].append(ids[s])
            logits = eng.step(group, tokens if device_fed else [[ids[s]] for s in group])
            out.append(logits.cpu())
            nxt = eng.sample(group, logits, temperature=1.0, seed=7)
            src.update(dict.fromkeys(group, nxt))
        if t == 20:  # a sequence leaves with a token unresolved
            eng.release(seqs[1])
            seqs.remove(seqs[1])
    live = set(eng.manager.sequence_ids())
    _, hit = eng.add_sequence(hist[seqs[0]])
    eng.manager.check()
    return out, [hist[s] for s in sorted(hist) if s in live], hit


def test_sampled_tokens_fed_on_the_device_equal_host_fed_ones(gen: torch.Generator) -> None:
    """Feeding :class:`SampledTokens` (appended by count, resolved later) gives the same logits,
    tokens and prefix cache as feeding their ids from the host."""
    model = init_random(DeepseekV4(V4Config.tiny()), seed=8)
    state = gen.get_state()
    runs = []
    for device_fed in (False, True):
        gen.set_state(state)
        runs.append(_sampled_run(_engine(model, max_sequences=5), device_fed, gen))
    (la, ta, ha), (lb, tb, hb) = runs
    assert ta == tb and ha == hb and ha.cached_tokens == 256
    for step, (x, y) in enumerate(zip(la, lb)):
        assert torch.equal(x, y), step


def test_draft_takes_sampled_tokens_as_their_ids() -> None:
    """``draft(sampled)`` (ids still on the device) gives the logits of ``draft(ids)``, any
    order of the sampled rows; tokens missing a sequence of the step raise."""
    model = init_random(DeepseekV4(V4Config.tiny()), seed=8)
    outs = []
    for device_fed in (False, True):
        eng = _engine(model)
        a, b = eng.add_sequence()[0], eng.add_sequence()[0]
        logits = eng.step([a, b], [list(range(1, 40)), list(range(50, 70))])
        for _ in range(3):
            tokens = eng.sample([b, a], logits.flip(0), temperature=1.0, seed=[4, 5])  # rows in another order
            if device_fed:
                with pytest.raises(ValueError, match="next_ids: the sampled tokens hold no token"):
                    eng.draft(eng.sample([a], logits[:1]))
            ids = dict(zip(tokens.seq_ids, tokens.tolist()))
            outs.append(eng.draft(tokens if device_fed else [ids[a], ids[b]]))
            logits = eng.step([a, b], tokens)
    for x, y in zip(outs[:3], outs[3:]):
        assert torch.equal(x, y)


def test_sampled_tokens_misuse_raises(gen: torch.Generator) -> None:
    model = init_random(DeepseekV4(V4Config.tiny()), seed=8)
    eng, other = _engine(model), _engine(model)
    a, b = eng.add_sequence()[0], eng.add_sequence()[0]
    logits = eng.step([a, b], [[1, 2], [3]])
    with pytest.raises(ValueError, match=r"logits: expected \[1, 512\]"):
        eng.sample([a], logits)
    with pytest.raises(ValueError, match="unknown sequence 9"):
        eng.sample([a, 9], logits)
    for kw, name in (({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                     ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"min_p": 2.0}, "min_p"),
                     ({"seed": -1}, "seed"), ({"top_k": [1, 2, 3]}, "top_k"), ({"temperature": True}, "temperature")):
        with pytest.raises(ValueError, match=name):
            eng.sample([a, b], logits, **kw)
    tokens = eng.sample([a], logits[:1])
    with pytest.raises(ValueError, match="no token for sequence"):
        eng.step([a, b], tokens)
    o = other.add_sequence()[0]
    with pytest.raises(ValueError, match="another engine"):
        other.step([o], tokens)
    assert eng.manager.length(a) == 2 and eng.manager.unresolved(a) == 0  # nothing was appended
    with pytest.raises(ValueError, match="max_len"):
        eng.step([a], [[0] * 699])
    eng.step([a], tokens)
    assert eng.manager.length(a) == 3 and 0 <= tokens.tolist()[0] < 512 and tokens.ready()


def test_scheduler_stops_and_frees_pages(gen: torch.Generator) -> None:
    from dsv4rs.runtime.scheduler import Scheduler

    model = init_random(DeepseekV4(V4Config.tiny()), seed=11)
    engine = _engine(model)
    s = Scheduler(engine, token_budget=32)
    first = s.add(torch.randint(0, 512, (20,), generator=gen).tolist(), 8)
    s.run()
    out = s.requests[first].output
    assert len(out) == 8
    # The same greedy request stopped at its third token's id ends there, the token kept.
    again = s.add(s.requests[first].prompt, 8, stop_ids=frozenset({out[2]}))
    s.run()
    assert s.requests[again].output == out[: out.index(out[2]) + 1]
    assert engine.manager.sequence_ids() == [] and sum(engine.manager.used_pages().values()) == 0
    with pytest.raises(ValueError, match="max_len"):
        s.add([1] * 690, 20)
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.add([1], 0)
    # Sampling settings are checked when a request is added, not where a step samples (there an
    # error would fail every running request); a top_k past the vocabulary keeps every token.
    for kw, error, name in [({"top_k": -1}, ValueError, "top_k"), ({"temperature": math.nan}, ValueError, "temperature"),
                            ({"seed": 2**63}, ValueError, "seed"), ({"repetition_penalty": 0.0}, ValueError,
                                                                     "repetition_penalty"),
                            ({"presence_penalty": math.inf}, ValueError, "presence_penalty"),
                            ({"logprobs": -1}, ValueError, "logprobs"), ({"colour": 1}, TypeError, "sampling")]:
        with pytest.raises(error, match=f"^{name}: "):
            s.add([1, 2], 2, **kw)
    assert not s.waiting
    huge = s.add(s.requests[first].prompt, 8, top_k=2**64)
    s.run()
    assert s.requests[huge].output == out  # greedy either way; the huge top_k is 0, not overflowed
    prompt = s.requests[first].prompt
    sampled = [s.add(prompt, 4, temperature=1.0, seed=5, top_k=k) for k in (0, 2**64)]
    s.run()
    assert s.requests[sampled[0]].output == s.requests[sampled[1]].output


def test_out_of_pages_names_the_sequence_and_changes_nothing(gen: torch.Generator) -> None:
    import dsv4rs

    model = init_random(DeepseekV4(V4Config.tiny()), seed=2)
    eng = _engine(model, quant=True)  # pools for 3 sequences of 700 tokens
    a, b, c, d = (eng.add_sequence()[0] for _ in range(4))
    ids = torch.randint(0, 512, (4, 700), generator=gen)
    eng.step([a, b, c], [ids[0, :300], ids[1, :300], ids[2, :300]])
    caches = {n: t.clone() for n, t in vars(eng.cache).items() if isinstance(t, torch.Tensor)}
    lengths = [eng.manager.length(s) for s in (a, b, c, d)]
    with pytest.raises(dsv4rs.OutOfPagesError, match=f"sequence {d} "):  # a fourth window ring does not fit
        eng.step([a, b, c, d], [ids[0, 300:301], ids[1, 300:301], ids[2, 300:301], ids[3, :400]])
    assert [eng.manager.length(s) for s in (a, b, c, d)] == lengths
    for n, t in vars(eng.cache).items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, caches[n]), n
    eng.manager.check()
    # The sequences go on as if the failed step never happened.
    got = eng.step([a, b, c], [ids[0, 300:301], ids[1, 300:301], ids[2, 300:301]])
    fresh = _engine(model, quant=True)
    x, y, z = (fresh.add_sequence()[0] for _ in range(3))
    fresh.step([x, y, z], [ids[0, :300], ids[1, :300], ids[2, :300]])
    want = fresh.step([x, y, z], [ids[0, 300:301], ids[1, 300:301], ids[2, 300:301]])
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_out_of_pages_in_a_sampled_step_changes_nothing(gen: torch.Generator) -> None:
    """A step fed with sampled tokens that runs out of pages raises naming the sequence, appends
    nothing (no unresolved token either) and writes nothing; the same tokens then feed the
    sequences that fit, as their ids would."""
    import dsv4rs

    model = init_random(DeepseekV4(V4Config.tiny()), seed=2)
    eng = _engine(model, quant=True)  # pools for 3 sequences of 700 tokens
    a, b, c, d = (eng.add_sequence()[0] for _ in range(4))
    ids = torch.randint(0, 512, (3, 300), generator=gen)
    logits = eng.step([a, b, c], list(ids))
    tokens = eng.sample([a, b, c, d], torch.cat([logits, logits[:1]]), temperature=1.0, seed=3)
    caches = {n: t.clone() for n, t in vars(eng.cache).items() if isinstance(t, torch.Tensor)}
    with pytest.raises(dsv4rs.OutOfPagesError, match=f"sequence {d} "):  # a fourth window ring does not fit
        eng.step([a, b, c, d], tokens)
    assert [(eng.manager.length(s), eng.manager.unresolved(s)) for s in (a, b, c, d)] == [(300, 0)] * 3 + [(0, 0)]
    for n, t in vars(eng.cache).items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, caches[n]), n
    eng.manager.check()
    got = eng.step([a, b, c], tokens)
    fresh = _engine(model, quant=True)
    x, y, z = (fresh.add_sequence()[0] for _ in range(3))
    fresh.step([x, y, z], list(ids))
    want = fresh.step([x, y, z], [[t] for t in tokens.tolist()[:3]])
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_weight_bytes_match_the_published_sizes() -> None:
    from dsv4rs.runtime.memory import weight_bytes

    flash, pro = V4Config.v4_flash(), V4Config.v4_pro()
    # "about 160 GB" and "about 865 GB" as shipped (FP8 + MXFP4); 284B and 1.6T parameters.
    assert weight_bytes(flash, "shipped") == pytest.approx(160e9, rel=0.02)
    assert weight_bytes(pro, "shipped") == pytest.approx(865e9, rel=0.02)
    assert weight_bytes(flash, "bf16") == pytest.approx(2 * 291e9, rel=0.02)
    # Expert parallelism splits only the routed experts.
    one, eight = weight_bytes(flash, "shipped"), weight_bytes(flash, "shipped", expert_shards=8)
    assert one / 8 < eight < one / 5
    with pytest.raises(ValueError, match="weights"):
        weight_bytes(flash, "int4")


def test_memory_plan_fills_the_budget_and_names_what_does_not_fit() -> None:
    from dsv4rs.cache import CacheConfig
    from dsv4rs.runtime.memory import plan_memory

    cfg = V4Config.v4_flash()
    cache = CacheConfig(cfg.compress_ratios)
    gib = 1 << 30
    plan = plan_memory(cfg, 141 * gib, cache, 80 * gib, max_len=131072, graph_batch=256)
    used = plan.weight_bytes + plan.workspace_bytes + plan.graph_bytes + plan.cache_bytes
    assert used <= 141 * gib and plan.max_sequences > 50
    with pytest.raises(ValueError, match="max_len, max_sequences"):
        plan_memory(cfg, 141 * gib, cache, 80 * gib, max_len=131072, max_sequences=plan.max_sequences + 1,
                    graph_batch=256)
    longest = plan_memory(cfg, 141 * gib, cache, 80 * gib, max_sequences=4)
    assert longest.max_len >= 1 and longest.max_sequences == 4
    with pytest.raises(ValueError, match="memory"):
        plan_memory(cfg, 10 * gib, cache, 80 * gib, max_len=4096)


def test_engine_sizes_its_cache_from_free_memory() -> None:
    from dsv4rs.runtime import Engine

    model = init_random(DeepseekV4(V4Config.tiny()), seed=1)
    eng = Engine(model, max_len=1024, memory_fraction=0.05)
    assert eng.max_len == 1024 and eng.max_sequences >= 1
    assert eng.manager.pool_footprint().total <= Engine._free_bytes(eng, 0.05)
    with pytest.raises(ValueError, match="memory_fraction"):
        Engine(model, max_len=1024, memory_fraction=2.0)


def test_step_integers_pack_into_one_buffer() -> None:
    """:func:`~dsv4rs.runtime.planner.packed` and ``unpacked`` (a step's integers in one transfer on
    a GPU) give back every tensor: int64 and int32, empty, 2-D, a non-contiguous view, 16-byte
    aligned offsets."""
    from dsv4rs.runtime.planner import packed, to_device, unpacked

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randint(-9, 9, (5,), generator=gen), torch.empty(0, dtype=torch.int64),
               torch.randint(0, 99, (3, 7), dtype=torch.int32, generator=gen), torch.arange(12).view(3, 4).t(),
               torch.full((1,), -1, dtype=torch.int64)]
    buf, spans = packed(tensors)
    assert buf.dtype == torch.uint8 and all(off % 16 == 0 for off, _ in spans)
    assert [n for _, n in spans] == [t.numel() * t.element_size() for t in tensors]
    for got, want in zip(unpacked(buf.clone(), tensors, spans), tensors):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(to_device(tensors, torch.device("cpu")), tensors))


def test_decode_plans_equal_the_general_computation() -> None:
    """The planner's decode shortcut (one token a sequence, computed from Python ints) gives the
    integers of its general form, across compressed-entry boundaries and after a fork."""
    from dataclasses import fields

    from dsv4rs.runtime import Engine
    from dsv4rs.runtime.planner import StepInputs

    model = init_random(DeepseekV4(V4Config.tiny()), seed=1)
    engines = [Engine(model, max_sequences=4, max_len=1024) for _ in range(2)]
    engines[1].planner.shortcut = False
    seqs = [[e.add_sequence()[0] for _ in range(3)] for e in engines]
    gen = torch.Generator().manual_seed(0)
    ratios = set(engines[0].planner.ratios.values())
    completed = {r: 0 for r in ratios}
    for step in range(40):
        if step == 1:  # a fork shares pages: the next writes into them are copies
            for e, s in zip(engines, seqs):
                s.append(e.fork(s[0]))
        lens = [130, 3, 125] if step == 0 else [1] * len(seqs[0])
        ids = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lens]
        plans = [e.planner.append(s, ids, [0] * len(s)) for e, s in zip(engines, seqs)]
        (a, copies_a), (b, copies_b) = plans
        for f in fields(StepInputs):
            x, y = getattr(a, f.name), getattr(b, f.name)
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        assert copies_a.keys() == copies_b.keys() and all(torch.equal(copies_a[k], copies_b[k]) for k in copies_a)
        for r in ratios:
            completed[r] += int(((a.positions + 1) % r == 0).sum()) if step else 0
    assert all(n > 0 for n in completed.values())  # the decode steps completed entries of every family


def test_graph_inputs_pack_into_one_buffer_with_padding() -> None:
    """A decode step's integers as the graphs load them: one byte buffer whose views hold the
    step's rows, then padding rows (no state, nothing written), and page tables padded with the
    null page; fields do not overlap."""
    from dsv4rs.runtime import Engine
    from dsv4rs.runtime.graphs import _Layout, _padding, fill

    model = init_random(DeepseekV4(V4Config.tiny()), seed=1)
    eng = Engine(model, max_sequences=4, max_len=1024)
    seqs = [eng.add_sequence()[0] for _ in range(3)]
    gen = torch.Generator().manual_seed(0)
    eng.planner.append(seqs, [torch.randint(0, 100, (n,), generator=gen) for n in (300, 5, 140)], [0, 0, 0])
    inputs, _ = eng.planner.append(seqs, [torch.tensor([7]), torch.tensor([8]), torch.tensor([9])], [0, 0, 0])
    widths = {"window": 3, "csa": 9, "hca": 2}
    bucket = 4
    lay = _Layout(bucket, widths)
    buf = torch.full((lay.nbytes,), 0xAB, dtype=torch.uint8)
    view = lay.views(buf)
    fill(view, inputs, bucket)
    pad = _padding(bucket)
    for name in ("ids", "positions", "starts", "origins", "state_slots", "window_slots", "csa_slots", "hca_slots"):
        got = getattr(view, name)
        assert got.dtype == torch.int64 and got.shape == (bucket,)
        assert torch.equal(got[:3], getattr(inputs, name)) and torch.equal(got[3:], pad[name][3:]), name
    assert torch.equal(view.cu_tokens, torch.arange(bucket + 1)) and torch.equal(view.token_seq, torch.arange(bucket))
    for f, w in widths.items():
        table, src = getattr(view, f"{f}_table"), getattr(inputs, f"{f}_table")
        assert table.dtype == torch.int32 and table.shape == (bucket, w)
        assert torch.equal(table[:3, : src.shape[1]], src) and not table[:3, src.shape[1] :].any() and not table[3:].any()
    spans = sorted((at, at + math.prod(shape) * dtype.itemsize) for _, at, dtype, shape in lay.parts)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= lay.nbytes
    fill(view, None, bucket)  # padding only: what a capture reads
    assert torch.equal(view.state_slots, pad["state_slots"]) and not view.csa_table.any()


# -- GPU: CUDA graphs of the decode step ------------------------------------------------------------


def _bf16_model(seed: int) -> DeepseekV4:
    """The tiny model on the GPU as ``load_checkpoint(dtype=torch.bfloat16, quantized=False)``
    leaves one: bfloat16 matrices (so the experts take the capturable grouped path), float32 mHC,
    norms and sinks."""
    from dsv4rs.model.model import set_dtype

    return set_dtype(init_random(DeepseekV4(V4Config.tiny()), seed=seed), torch.bfloat16).cuda()


def _schedule(eng, gen: torch.Generator) -> list[torch.Tensor]:
    """64 decode steps with sequences joining (prefill), leaving, a fork and a prefix hit; the
    logits of every decode step."""
    ids = torch.randint(0, 512, (6, 900), generator=gen)
    seqs = {0: eng.add_sequence()[0], 1: eng.add_sequence()[0]}
    eng.step([seqs[0], seqs[1]], [ids[0, :300], ids[1, :140]])
    pos = {0: 300, 1: 140}
    out = []
    for step in range(64):
        if step == 10:  # a third sequence joins
            seqs[2] = eng.add_sequence()[0]
            eng.step([seqs[2]], [ids[2, :260]])
            pos[2] = 260
        if step == 20:  # a fork of sequence 0 goes its own way
            seqs[3] = eng.fork(seqs[0])
            pos[3] = pos[0]
            ids[3, : pos[0]] = ids[0, : pos[0]]
        if step == 30:  # sequence 1 leaves
            eng.release(seqs.pop(1))
            pos.pop(1)
        if step == 40:  # a prompt sharing sequence 2's first 256 tokens reuses its compressed rows
            prompt = torch.cat([ids[2, :256], ids[4, 256:400]])
            seqs[4], hit = eng.add_sequence(prompt)
            assert hit.cached_tokens == 256
            eng.step([seqs[4]], [prompt[hit.recompute_from :]])
            ids[4, :400], pos[4] = prompt, 400
        keys = sorted(seqs)
        # Kept on the device: each step's logits must be its own tensor, not a view of a graph's
        # output that the next replay overwrites.
        out.append(eng.step([seqs[k] for k in keys], [ids[k, pos[k] : pos[k] + 1] for k in keys]))
        for k in keys:
            pos[k] += 1
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [False, True])
def test_gpu_graph_decode_equals_eager(gen: torch.Generator, quant: bool) -> None:
    from dsv4rs.runtime import Engine

    model = _bf16_model(4)
    state = gen.get_state()
    runs = {}
    for graphs in (True, False):
        gen.set_state(state)
        eng = Engine(model, max_sequences=5, max_len=1024, quant=quant, cuda_graphs=graphs)
        assert (eng.graphs is not None) == graphs
        runs[graphs] = _schedule(eng, gen)
        eng.manager.check()
    for step, (g, e) in enumerate(zip(runs[True], runs[False])):
        g, e = g.float().cpu(), e.float().cpu()
        # The same kernels on the same rows; the padded batch may change how a kernel splits its
        # work (the order of float32 sums), not what it computes.
        torch.testing.assert_close(g, e, atol=2e-3, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.gpu
def test_gpu_graph_padding_writes_nothing_live(gen: torch.Generator) -> None:
    """A batch of 3 in the bucket of 4: the step changes only the rows and state slots of the 3
    sequences (and the null page 0, where padding writes land)."""
    from dsv4rs.runtime import Engine

    eng = Engine(_bf16_model(5), max_sequences=6, max_len=600, quant=True, cuda_graphs=True, graph_buckets=(4,))
    seqs = [eng.add_sequence()[0] for _ in range(5)]
    ids = torch.randint(0, 512, (5, 300), generator=gen)
    eng.step(seqs, [ids[i, :255] for i in range(5)])  # the next token completes a CSA entry
    live = seqs[:3]
    before = {n: t.clone() for n, t in vars(eng.cache).items() if isinstance(t, torch.Tensor)}
    eng.step(live, [ids[i, 255:256] for i in range(3)])
    assert 4 in eng.graphs.graphs
    for family, names in (("window", ("window",)), ("csa", ("csa", "csa_keys")), ("hca", ("hca",))):
        allowed = {0} | set(eng.manager.page_tables(live, family).flatten().tolist())
        for n in names:
            changed = (eng.cache.__dict__[n] != before[n]).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
            assert set(changed) <= allowed, (n, set(changed) - allowed)
    slots = set(eng.manager.page_tables(live, "state").flatten().tolist())
    for n in ("csa_state", "index_state", "hca_state"):
        changed = (eng.cache.__dict__[n] != before[n]).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
        assert set(changed) <= slots, (n, changed)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_gpu_decode_step_does_not_synchronize(gen: torch.Generator, graphs: bool) -> None:
    from dsv4rs.runtime import Engine

    eng = Engine(_bf16_model(6), max_sequences=4, max_len=600, quant=True, cuda_graphs=graphs)
    seqs = [eng.add_sequence()[0] for _ in range(3)]
    ids = torch.randint(0, 512, (3, 300), generator=gen)
    eng.step(seqs, [ids[i, :200] for i in range(3)])
    eng.draft(ids[:, 200].tolist())  # the MTP window follows every step
    eng.step(seqs, [ids[i, 200:201] for i in range(3)])  # captures the bucket (graphs)
    eng.draft(ids[:, 201].tolist())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(201, 205):
            logits = eng.step(seqs, [ids[i, t : t + 1] for i in range(3)])
            eng.draft(ids[:, t + 1].tolist())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(logits).all())


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_gpu_sampled_tokens_fed_on_the_device_equal_host_fed_ones(gen: torch.Generator, graphs: bool) -> None:
    from dsv4rs.runtime import Engine

    model = _bf16_model(7)
    state = gen.get_state()
    runs = []
    for device_fed in (False, True):
        gen.set_state(state)
        eng = Engine(model, max_sequences=5, max_len=700, quant=True, cuda_graphs=graphs)
        runs.append(_sampled_run(eng, device_fed, gen))
    (la, ta, ha), (lb, tb, hb) = runs
    assert ta == tb and ha == hb and ha.cached_tokens == 256
    for step, (x, y) in enumerate(zip(la, lb)):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_gpu_sampled_decode_loop_does_not_synchronize(gen: torch.Generator, graphs: bool) -> None:
    """Sample, step on the sampled tokens, sample, ...: nothing waits for the GPU; the ids are
    resolved in the allocator once they reach the host."""
    from dsv4rs.runtime import Engine

    eng = Engine(_bf16_model(6), max_sequences=4, max_len=600, quant=True, cuda_graphs=graphs)
    seqs = [eng.add_sequence()[0] for _ in range(3)]
    logits = eng.step(seqs, list(torch.randint(0, 512, (3, 200), generator=gen)))
    kw = {"temperature": [1.0, 0.0, 0.5], "top_k": [0, 0, 3], "seed": [4, 5, 6]}
    tokens = eng.sample(seqs, logits, **kw)
    logits = eng.step(seqs, tokens)  # captures the bucket (graphs)
    fed = [tokens, eng.sample(seqs, logits)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            logits = eng.step(seqs, fed[-1])
            fed.append(eng.sample(seqs, logits, **kw))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(0 <= t < 512 for f in fed for t in f.tolist())
    assert all(eng.manager.length(s) == 207 for s in seqs)
    eng.step(seqs, [[1]] * 3)  # ids after sampled tokens: every sampled id is resolved first
    assert all(eng.manager.unresolved(s) == 0 for s in seqs)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_gathered_float32_experts_equal_the_loop(gen: torch.Generator) -> None:
    """float32 experts on a GPU take the gathered path while the copies are small (so a float32
    model's decode step can be captured too); it computes what the per-expert loop does."""
    ex = _experts(gen).cuda()
    x = torch.randn(9, 64, generator=gen).cuda()
    idx = torch.randint(0, 8, (9, 2), generator=gen).cuda()
    idx[0, 1] = idx[0, 0]
    idx[1, 0] = idx[2, :] = -1  # no expert: adds nothing
    w = torch.rand(9, 2, generator=gen).cuda()
    assert ex.gathers(idx.numel()) and ex.capturable(9, 2)
    got = ex(x, idx, w)
    torch.testing.assert_close(got, ex._per_expert(x, idx, w), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    assert not ex.gathers(10**9)
