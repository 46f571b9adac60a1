"""The ranks of tests/test_parallel.py: each process joins a gloo group (an NCCL one, one GPU a
rank, for the "cuda:" modes), builds the same seeded tiny model, keeps its share of the experts
and runs its sequences of a fixed schedule; what it computed (or the error it met) goes to a file
the test reads."""

from __future__ import annotations

import datetime
import os
import time
import traceback

import torch

PROMPT_LENS = {0: 40, 1: 150, 2: 9, 3: 300}
"""Sequence -> prompt length: one short, one fed in two chunks (100 + 50), a tiny one, and one
past an HCA block of 128 (every layer type compresses)."""
FIRST_CHUNK = {1: 100}
STEPS = 6
OWNERS = {1: {0: 0, 1: 0, 2: 0, 3: 0}, 2: {0: 0, 1: 0, 2: 0, 3: 1}, 4: {0: 0, 1: 0, 2: 1, 3: 3}}
"""World size -> sequence -> rank: uneven (and with 4 ranks, rank 2 runs none of them)."""


class EagerGraphs:
    """:class:`dsv4rs.runtime.graphs.DecodeGraphs` as a CPU engine can hold it (made by
    :func:`eager_graphs`): a capture runs the step twice (the warm-up, then the "capture"), a
    replay runs it again on the bucket's buffer and writes its outputs over the captured ones, as
    a replayed graph overwrites its outputs. What the engine decides about graphs (buckets,
    padding, an idle rank's replay, the exchanges' form) then runs over gloo."""

    def __init__(self, step, view, out) -> None:
        self.step, self.view, self.out = step, view, out

    def replay(self) -> None:
        _overwrite(self.out, self.step(self.view))


def _overwrite(old, new) -> None:
    import dataclasses

    if isinstance(old, torch.Tensor):
        old.copy_(new)
    elif isinstance(old, (tuple, list)):
        for a, b in zip(old, new, strict=True):
            _overwrite(a, b)
    elif isinstance(old, dict):
        for key in old:
            _overwrite(old[key], new[key])
    elif dataclasses.is_dataclass(old):
        for f in dataclasses.fields(old):
            _overwrite(getattr(old, f.name), getattr(new, f.name))


def eager_graphs(engine, buckets=(1, 2, 4, 8)):
    """Decode "graphs" of ``engine`` (a CPU one) that replay eagerly (:class:`EagerGraphs`)."""
    from dsv4rs.runtime.graphs import DecodeGraphs

    class Graphs(DecodeGraphs):
        def _capture(self, view):
            self.step(view)
            out = self.step(view)
            return EagerGraphs(self.step, view, out), out

    tp = engine.parallel is not None and engine.parallel.mode == "tp"
    return Graphs(engine._graph_step, buckets, engine.table_widths, engine.device,
                  before_capture=engine._same_bucket if tp else None)


def model():
    from dsv4rs.model import DeepseekV4, V4Config, init_random

    return init_random(DeepseekV4(V4Config.tiny(num_attention_heads=8, o_groups=4)), seed=5)


def tokens(seq: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + seq)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def chunks_of(seq: int, vocab: int) -> list[list[int]]:
    """Sequence ``seq``'s chunk at each step: its prompt at step 0 (sequence 1 its first 100
    tokens, the other 50 at step 1), then a decode token a step."""
    prompt = tokens(seq, PROMPT_LENS[seq], vocab)
    first = FIRST_CHUNK.get(seq, PROMPT_LENS[seq])
    out = [prompt[:first]] + ([prompt[first:]] if first < PROMPT_LENS[seq] else [])
    return out + [[(7 * seq + 3 * step) % vocab] for step in range(len(out), STEPS + 1)]


def run_schedule(engine, mine: list[int]) -> dict[tuple, torch.Tensor]:
    """Steps every sequence of ``mine`` through its chunks, drafting with the MTP block after
    each step (the token after each chunk is the next chunk's first); returns the last token's
    logits per ``(sequence, step)`` and the draft's per ``(sequence, step, "draft")``."""
    vocab = engine.cfg.vocab_size
    chunks = {s: chunks_of(s, vocab) for s in mine}
    ids = {s: engine.add_sequence()[0] for s in mine}
    out = {}
    for step in range(STEPS):
        logits = engine.step([ids[s] for s in mine], [chunks[s][step] for s in mine])
        drafts = engine.draft([chunks[s][step + 1][0] for s in mine])
        for i, s in enumerate(mine):
            out[(s, step)] = logits[i].detach().cpu().clone()
            out[(s, step, "draft")] = drafts[i].detach().cpu().clone()
    return out


LLM_PROMPTS = ["Hello, world! How are you", "The quick brown fox", "Café 東京 🙂"]
"""The prompts of the parallel LLM test: two on rank 0 and one on rank 1 under "dp"."""


def llm_requests():
    """``(prompts, params)``: greedy and seeded sampling (whatever rank runs a prompt, its seed
    gives the same draws)."""
    from dsv4rs.llm import SamplingParams

    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    return LLM_PROMPTS, [greedy, seeded, greedy]


def llm_run(rank: int, world: int, mode: str, result: dict) -> None:
    """``mode`` ``llm:{dp|tp}:{0|1}:CHECKPOINT``: an LLM over the ranks (MTP speculation when
    the flag is 1) generates :func:`llm_requests`, then streams the first prompt with the second
    params, and the second prompt stopped after its first delta; the results go to ``result``."""
    from dsv4rs import LLM, parallel
    from dsv4rs.model import V4Config

    _, how, spec, ckpt = mode.split(":", 3)
    cfg = V4Config.from_pretrained(ckpt)
    pc = parallel.ParallelConfig.even(cfg, world, rank, mode=how, timeout=60.0)
    llm = LLM(ckpt, parallel=pc, max_sequences=4, max_len=256, speculative=spec == "1")
    prompts, params = llm_requests()
    outs = llm.generate(prompts, params)
    result["outs"] = [(o.token_ids, o.text, o.finish_reason) for o in outs]
    result["steps"], result["drafts"] = llm.engine.steps, llm.engine.drafts
    deltas = list(llm.stream(prompts[0], params[1]))  # rank 0 runs it under "dp"
    result["stream"] = ("".join(d.text for d in deltas), deltas[-1].completion.token_ids, deltas[-1].finish_reason)
    for d in llm.stream(prompts[1], params[0]):  # stopped after its first delta on every rank
        result["first"] = d.token_ids
        break
    result["unfinished"], result["left"] = llm.has_unfinished(), llm.engine.manager.sequence_ids()
    result["held"] = llm.engine.model.model.layers[0].mlp.experts.held


def serve_run(rank: int, world: int, mode: str, result: dict, timeout: float) -> None:
    """``mode`` ``serve:{dp|tp}:CHECKPOINT``: rank 0 drives a :class:`dsv4rs.serve.parallel.Leader`
    as the server's engine thread would (idle past the group's timeout first, then the
    :func:`llm_requests` and a long one aborted after its first step); the others follow."""
    from dsv4rs import LLM, parallel
    from dsv4rs.llm import SamplingParams
    from dsv4rs.model import V4Config
    from dsv4rs.serve.parallel import Leader, follow

    _, how, ckpt = mode.split(":", 2)
    cfg = V4Config.from_pretrained(ckpt)
    pc = parallel.ParallelConfig.even(cfg, world, rank, mode=how, timeout=timeout)
    llm = LLM(ckpt, parallel=pc, max_sequences=4, max_len=256, speculative=False)
    if rank:
        result["added"] = follow(llm).added
        result["left"] = llm.engine.manager.sequence_ids()
        return
    leader = Leader(llm)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.5 * timeout:  # idle: the heartbeats keep the followers waiting
        assert not leader.has_unfinished()
        time.sleep(0.05)
    prompts, params = llm_requests()
    keys = [leader.add_request(llm.encode(p), sp) for p, sp in zip(prompts, params)]
    long = leader.add_request(llm.encode("Hello"), SamplingParams(max_tokens=200, ignore_eos=True))
    deltas: dict[int, list] = {}
    steps = 0
    while leader.has_unfinished():
        for d in leader.step():
            deltas.setdefault(d.request_id, []).append(d)
        steps += 1
        if steps == 1:
            leader.abort(long)
    result["outs"] = [(leader.completion(k).token_ids, "".join(d.text for d in deltas[k]), deltas[k][-1].finish_reason)
                      for k in keys]
    result["aborted"] = deltas[long][-1].finish_reason
    result["left"] = llm.engine.manager.sequence_ids()
    result["added"] = leader.ranks.added
    leader.close()


def worker(rank: int, world: int, store: str, out: str, mode: str, timeout: float) -> None:
    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    t0 = time.monotonic()
    try:
        import torch.distributed as dist

        from dsv4rs import parallel
        from dsv4rs.runtime import Engine

        cuda = mode.startswith("cuda:")  # "cuda:ok" / "cuda:tp": one GPU a rank, over NCCL
        if cuda:
            torch.cuda.set_device(rank)
            mode = mode.removeprefix("cuda:")
        replaying = mode.startswith("graphs:")  # "graphs:ok" ...: decode steps "replayed" on the CPU
        mode = mode.removeprefix("graphs:")
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        if mode.startswith(("llm:", "serve:")):
            (llm_run(rank, world, mode, result) if mode.startswith("llm:") else
             serve_run(rank, world, mode, result, timeout))
            dist.destroy_process_group()
            raise SystemExit(0)
        m = model().to(f"cuda:{rank}") if cuda else model()
        if mode == "subgroup":  # a group of ranks 0 and 1 whose backend reads as NCCL's: its gloo twin made first
            sub = dist.new_group([0, 1])
            backend = dist.get_backend
            dist.get_backend = lambda g=None: "nccl" if g is sub else backend(g)
            twin = parallel.control_group(sub)
            result["twin"] = rank == 2 or (twin is not sub and parallel.control_group(sub) is twin)  # kept
            if rank < 2:
                pc = parallel.ParallelConfig.even(m.config, 2, rank, group=sub)
                result["agreed"] = parallel.ExpertExchange(pc, torch.device("cpu")).agree(rank + 1, True).tokens
            dist.destroy_process_group()
            raise SystemExit(0)
        tp = mode == "tp" or mode.startswith("tpload:")
        pc = parallel.ParallelConfig.even(m.config, world, rank, timeout=timeout, mode="tp" if tp else "dp")
        if mode == "lopsided":  # rank 0 holds every expert, the others none
            e = m.config.n_routed_experts
            pc = parallel.ParallelConfig(world, rank, (range(e),) + (range(e, e),) * (world - 1), timeout=timeout)
        if mode.startswith(("load:", "tpload:")):  # this rank's experts (under "tp", and heads) only, from the checkpoint
            from dsv4rs.model import load_checkpoint

            m = parallel.attach(load_checkpoint(mode.split(":", 1)[1], experts=pc.experts, progress=False,
                                                tp=(rank, world) if tp else None), pc)
        else:
            parallel.shard(m, pc)
        engine = Engine(m, max_sequences=8, max_len=512, parallel=pc, cuda_graphs=True if cuda else None)
        if replaying:
            engine.graphs = eager_graphs(engine)
        mine = sorted(PROMPT_LENS) if tp else [s for s, r in OWNERS[world].items() if r == rank]
        if mode == "idle":  # rank 0 runs every sequence, the others step empty batches
            mine = sorted(PROMPT_LENS) if rank == 0 else []
        if mode == "buckets":  # ranks that would replay different graph buckets
            exchange = m.model.layers[0].mlp.experts.exchange
            result["same"] = exchange.agree(1, True, (1, 2, 4)).tokens
            try:
                exchange.agree(1, True, (1, 2, 4) if rank == 0 else (1, 2))
            except ValueError as e:
                result["differ"] = str(e)
            result["decode"] = exchange.agree(3 * rank, True)
            result["prefill"] = exchange.agree(2 + 5 * rank, rank == 0)
            result["none"] = exchange.agree(0, True)
            result["many"] = exchange.agree(300 if rank else 1, True)
            result["at_most"] = exchange.agree(256 if rank else 1, False)
            dist.destroy_process_group()
            raise SystemExit(0)
        if mode == "die" and rank == 1:
            os._exit(3)
        if mode == "stall" and rank == 1:
            time.sleep(3 * timeout)
            os._exit(0)
        exchange = engine.model.model.layers[0].mlp.experts.exchange
        forms = result["forms"] = {"fixed": 0, "variable": 0}
        for form in forms if not tp else ():  # which form of the exchange each call took
            def counted(*a, _run=getattr(exchange, f"_{form}"), _form=form):
                forms[_form] += 1
                return _run(*a)
            setattr(exchange, f"_{form}", counted)
        t0 = time.monotonic()
        result["logits"] = run_schedule(engine, mine)
        result["received"] = list(engine.model.model.layers[0].mlp.experts.exchange.received)
        result["graphs"] = None if engine.graphs is None else sorted(engine.graphs.graphs)  # the buckets captured
        layer = engine.model.model.layers[0]
        result["held"] = (pc.experts.start, pc.experts.stop, (layer.mlp.experts.held,))
        result["heads"] = (layer.self_attn.heads, tuple(layer.self_attn.q_b_proj.weight.shape))
        dist.destroy_process_group()
    except SystemExit:
        pass
    except BaseException as e:  # noqa: BLE001 - the test reads what happened
        result["error"] = f"{type(e).__name__}: {e}"
        result["trace"] = traceback.format_exc()
    result["elapsed"] = time.monotonic() - t0
    torch.save(result, out)
    os._exit(0)
