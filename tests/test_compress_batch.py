"""ops.compress_batch (docs/model.md section 3): the compressor for B sequences in one call equals
one ops.compress call per sequence, bit for bit, with each entry at the row of the token that
completes it; padding rows (slot -1) and slots outside the batch are left alone. CPU tests run
everywhere; the `gpu` ones check the CUDA kernels against the GPU per-sequence loop, the CPU op
and CUDA-graph replay."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import pytest
import torch

from dsv4rs import ops
from dsv4rs import reference as ref

INV_FREQ = ref.rope_inv_freq(64, 160000.0, yarn_factor=16.0)
# (ratio, D, quant): CSA main rows and indexer keys (ratio 4), HCA (ratio 128), with and without
# the round trips.
CONFIGS = [(4, 512, "fp8"), (4, 512, "none"), (4, 128, "fp4"), (4, 128, "none"),
           (128, 512, "fp8"), (128, 512, "none"), (128, 128, "fp4"), (128, 128, "none")]
LENGTHS = [0, 1, 3, 4, 5, 127, 128, 300]
KINDS = ["mixed", "decode", "prefill", "padding"]


def inv_freq(dim: int) -> torch.Tensor:
    return ref.rope_inv_freq(min(64, dim), 160000.0, yarn_factor=16.0)


@dataclass
class Batch:
    kv: torch.Tensor
    score: torch.Tensor
    ape: torch.Tensor
    norm: torch.Tensor
    inv_freq: torch.Tensor
    state: torch.Tensor
    slots: torch.Tensor
    starts: torch.Tensor
    cu: torch.Tensor
    ratio: int
    quant: str

    @property
    def args(self) -> tuple:
        return (self.kv, self.score, self.ape, self.norm, self.inv_freq, self.state, self.slots, self.starts, self.cu)

    def to(self, device: str) -> Batch:
        moved = (t.to(device) for t in self.args)
        return Batch(*moved, self.ratio, self.quant)


def coff_of(ratio: int) -> int:
    return 2 if ratio == 4 else 1


def random_start(rng: random.Random, ratio: int) -> int:
    """A start at a block boundary, just before one, or anywhere inside a block."""
    block = rng.randrange(4) * ratio
    return block + rng.choice([0, ratio - 1, rng.randrange(ratio)])


def layout(rng: random.Random, kind: str, ratio: int) -> tuple[list[int], list[int], list[bool]]:
    """Chunk lengths, starts and liveness of a random batch of 1 to 9 sequences."""
    b = rng.randint(1, 9)
    if kind == "decode":
        lens = [1] * b
        # about half of them complete an entry
        starts = [rng.randrange(4) * ratio + rng.choice([ratio - 1, rng.randrange(ratio)]) for _ in range(b)]
    elif kind == "prefill":
        lens = [rng.choice([127, 128, 300]) for _ in range(b)]
        starts = [rng.choice([0, random_start(rng, ratio)]) for _ in range(b)]
    else:
        lens = [rng.choice(LENGTHS) for _ in range(b)]
        starts = [random_start(rng, ratio) for _ in range(b)]
    live = [True] * b
    if kind == "padding":
        live = [rng.random() < 0.6 for _ in range(b)]
        live[rng.randrange(b)] = False
    return lens, starts, live


def random_state(gen: torch.Generator, slots: int, ratio: int, dim: int) -> torch.Tensor:
    """A pool of states: random contents (scores with some -inf) or fresh ones."""
    coff = coff_of(ratio)
    state = torch.randn(slots, 2, coff * ratio, coff * dim, generator=gen)
    state[:, 1] *= 2
    state[:, 1][torch.rand(slots, coff * ratio, coff * dim, generator=gen) < 0.05] = float("-inf")
    for s in range(0, slots, 3):
        state[s, 0], state[s, 1] = ops.compressor_state(ratio, dim)
    return state


def make_batch(gen: torch.Generator, ratio: int, dim: int, quant: str, lens: list[int], starts: list[int],
               live: list[bool], extra_slots: int = 3, index_dtype: torch.dtype = torch.int64) -> Batch:
    coff, b = coff_of(ratio), len(lens)
    t = sum(lens)
    n_slots = b + extra_slots
    perm = torch.randperm(n_slots, generator=gen)[:b]
    slots = torch.where(torch.tensor(live, dtype=torch.bool), perm, -1).to(index_dtype)
    cu = torch.tensor([0] + lens).cumsum(0).to(index_dtype)
    score = 2 * torch.randn(t, coff * dim, generator=gen)
    if coff == 2:
        # Tokens without a vote on the next entry ("b" half); the completing token's own ("a")
        # logit stays finite, so no channel is left without a finite candidate.
        score[:, :dim][torch.rand(t, dim, generator=gen) < 0.02] = float("-inf")
    return Batch(
        kv=torch.randn(t, coff * dim, generator=gen),
        score=score,
        ape=torch.randn(ratio, coff * dim, generator=gen),
        norm=0.5 + torch.rand(dim, generator=gen),
        inv_freq=inv_freq(dim),
        state=random_state(gen, n_slots, ratio, dim),
        slots=slots,
        starts=torch.tensor(starts, dtype=torch.int64),
        cu=cu,
        ratio=ratio,
        quant=quant,
    )


def random_batch(gen: torch.Generator, seed: str, kind: str, ratio: int, dim: int, quant: str) -> Batch:
    rng = random.Random(zlib.crc32(seed.encode()))
    return make_batch(gen, ratio, dim, quant, *layout(rng, kind, ratio))


def run_batch(x: Batch, rope_table: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """The op on a copy of the state: (out, state after)."""
    state = x.state.clone()
    out = ops.compress_batch(x.kv, x.score, x.ape, x.norm, x.inv_freq, state, x.slots, x.starts, x.cu, x.ratio,
                             quant=x.quant, rope_table=rope_table)
    return out, state


def run_loop(x: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One ops.compress call per live sequence on a copy of the state, entries placed at the
    rows of the tokens that complete them: what compress_batch must give."""
    state = x.state.clone()
    out = torch.zeros(x.kv.shape[0], x.norm.shape[0], device=x.kv.device)
    r = x.ratio
    cu, slots, starts = x.cu.tolist(), x.slots.tolist(), x.starts.tolist()
    for b, slot in enumerate(slots):
        if slot < 0:
            continue
        lo, hi, start = cu[b], cu[b + 1], starts[b]
        entries = ops.compress(x.kv[lo:hi], x.score[lo:hi], x.ape, x.norm, x.inv_freq, state[slot, 0], state[slot, 1],
                               start, r, quant=x.quant)
        first = lo + r - 1 - start % r
        out[first : first + r * entries.shape[0] : r] = entries
    return out, state


def live_slots(x: Batch) -> list[int]:
    return [s for s in x.slots.tolist() if s >= 0]


def as_bf16(x: Batch) -> tuple[Batch, Batch]:
    """The batch with its projections rounded to bfloat16, and its float32 twin holding the
    same values."""
    kv, score = x.kv.bfloat16(), x.score.bfloat16()
    twin = Batch(kv.float(), score.float(), *[getattr(x, f) for f in ("ape", "norm", "inv_freq", "state", "slots",
                                                                      "starts", "cu")], x.ratio, x.quant)
    return Batch(kv, score, *[getattr(x, f) for f in ("ape", "norm", "inv_freq", "state", "slots", "starts", "cu")],
                 x.ratio, x.quant), twin


# ----------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("ratio,dim,quant", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_per_sequence_calls(gen: torch.Generator, ratio: int, dim: int, quant: str, kind: str) -> None:
    for trial in range(2):
        x = random_batch(gen, f"{ratio}-{dim}-{quant}-{kind}-{trial}", kind, ratio, dim, quant)
        out, state = run_batch(x)
        want, want_state = run_loop(x)
        assert out.shape == (x.kv.shape[0], dim) and out.dtype == torch.float32
        assert torch.equal(out, want)
        assert torch.equal(state, want_state)
        untouched = [s for s in range(x.state.shape[0]) if s not in live_slots(x)]
        assert torch.equal(state[untouched], x.state[untouched])


def test_batch_of_every_length_and_start(gen: torch.Generator) -> None:
    """Every chunk length of LENGTHS at every start phase of a ratio-4 block, and at and off HCA
    block boundaries, in one batch each."""
    for ratio, dim, quant in [(4, 128, "fp4"), (128, 128, "none")]:
        phases = range(4) if ratio == 4 else [0, 1, 127, 128, 200]
        combos = [(n, 3 * ratio + p if ratio == 4 else p) for n in LENGTHS for p in phases]
        lens, starts = [c[0] for c in combos], [c[1] for c in combos]
        x = make_batch(gen, ratio, dim, quant, lens, starts, [True] * len(lens))
        out, state = run_batch(x)
        want, want_state = run_loop(x)
        assert torch.equal(out, want) and torch.equal(state, want_state)
        assert (out.abs().sum(1) > 0).sum() == sum((s + n) // ratio - s // ratio for n, s in combos)


def test_index_dtypes_agree(gen: torch.Generator) -> None:
    rng = random.Random(7)
    lens, starts, live = layout(rng, "padding", 4)
    x = make_batch(gen, 4, 128, "none", lens, starts, live)
    x32 = Batch(*x.args[:6], x.slots.int(), x.starts.int(), x.cu.int(), x.ratio, x.quant)
    a, sa = run_batch(x)
    b, sb = run_batch(x32)
    assert torch.equal(a, b) and torch.equal(sa, sb)


def test_padding_rows_change_nothing(gen: torch.Generator) -> None:
    lens, starts = [5, 300, 0, 9, 128, 1], [3, 0, 7, 130, 1, 127]
    x = make_batch(gen, 128, 128, "none", lens, starts, [True, False, True, False, True, True])
    out, state = run_batch(x)
    cu = x.cu.tolist()
    for b in (1, 3):
        assert (out[cu[b] : cu[b + 1]] == 0).all()
    # The same batch without its padding rows gives the same rows and states.
    keep = [0, 2, 4, 5]
    rows = torch.cat([torch.arange(cu[b], cu[b + 1]) for b in keep])
    lens_kept = [lens[b] for b in keep]
    y = Batch(x.kv[rows], x.score[rows], x.ape, x.norm, x.inv_freq, x.state, x.slots[keep], x.starts[keep],
              torch.tensor([0] + lens_kept).cumsum(0), x.ratio, x.quant)
    out_y, state_y = run_batch(y)
    assert torch.equal(out[rows], out_y) and torch.equal(state, state_y)
    untouched = [s for s in range(x.state.shape[0]) if s not in live_slots(x)]
    assert torch.equal(state[untouched], x.state[untouched])


def test_zero_tokens_and_empty_batches(gen: torch.Generator) -> None:
    x = make_batch(gen, 4, 128, "fp4", [0, 0, 0], [0, 5, 8], [True, True, False])
    out, state = run_batch(x)
    assert out.shape == (0, 128) and torch.equal(state, x.state)
    empty = make_batch(gen, 128, 128, "none", [], [], [])
    out, state = run_batch(empty)
    assert out.shape == (0, 128) and torch.equal(state, empty.state)


def test_decode_steps_equal_one_call_per_sequence(gen: torch.Generator) -> None:
    """A prefill step (chunks of any length, one sequence split over two steps), then decode
    steps of one token each (sequences joining and leaving, as an engine's batches do), advance
    the same slots to what one long call per sequence gives."""
    for ratio, dim, quant in [(4, 512, "fp8"), (128, 128, "fp4")]:
        coff = coff_of(ratio)
        totals = [3, 260, 1, 131, 9]
        seqs = [(torch.randn(n, coff * dim, generator=gen), 2 * torch.randn(n, coff * dim, generator=gen))
                for n in totals]
        ape, norm, freqs = torch.randn(ratio, coff * dim, generator=gen), 0.5 + torch.rand(dim, generator=gen), inv_freq(dim)
        slots = [6, 0, 3, 2, 5]
        state = torch.empty(8, 2, coff * ratio, coff * dim)
        for s in range(8):
            state[s, 0], state[s, 1] = ops.compressor_state(ratio, dim)
        pos, got = [0] * len(totals), [[] for _ in totals]

        def step(take: list[int]) -> None:
            rows_kv, rows_sc, lens, batch_slots, starts = [], [], [], [], []
            for b, n in enumerate(take):
                if n < 0:  # not in this step's batch: a padding row with a token
                    rows_kv.append(torch.randn(1, coff * dim, generator=gen))
                    rows_sc.append(torch.randn(1, coff * dim, generator=gen))
                    lens.append(1)
                    batch_slots.append(-1)
                    starts.append(0)
                    continue
                kv, sc = seqs[b]
                rows_kv.append(kv[pos[b] : pos[b] + n])
                rows_sc.append(sc[pos[b] : pos[b] + n])
                lens.append(n)
                batch_slots.append(slots[b])
                starts.append(pos[b])
            cu = torch.tensor([0] + lens).cumsum(0)
            out = ops.compress_batch(torch.cat(rows_kv), torch.cat(rows_sc), ape, norm, freqs, state,
                                     torch.tensor(batch_slots), torch.tensor(starts), cu, ratio, quant=quant)
            cu = cu.tolist()
            for b, n in enumerate(take):
                if n < 0:
                    assert (out[cu[b] : cu[b + 1]] == 0).all()
                    continue
                p = torch.arange(pos[b], pos[b] + n)
                done = (p + 1) % ratio == 0
                got[b].append(out[cu[b] : cu[b + 1]][done])
                assert (out[cu[b] : cu[b + 1]][~done] == 0).all()
                pos[b] += n

        step([3, 200, 1, 128, 0])
        step([0, 60, -1, 2, 5])
        while any(p < n for p, n in zip(pos, totals)):
            step([1 if p < n else -1 for p, n in zip(pos, totals)])
        for b, (kv, sc) in enumerate(seqs):
            kv_state, score_state = ops.compressor_state(ratio, dim)
            want = ops.compress(kv, sc, ape, norm, freqs, kv_state, score_state, 0, ratio, quant=quant)
            assert torch.equal(torch.cat(got[b]), want)
            assert torch.equal(state[slots[b], 0], kv_state) and torch.equal(state[slots[b], 1], score_state)
        for s in (1, 4, 7):
            assert torch.equal(state[s, 0], torch.zeros_like(state[s, 0]))


@pytest.mark.parametrize("table", ops.ROPE_TABLES)
def test_matches_float64_reference(gen: torch.Generator, table: str) -> None:
    for ratio, dim in [(4, 128), (128, 64)]:
        lens = [9, 0, 300, 4]
        x = make_batch(gen, ratio, dim, "none", lens, [0] * 4, [True] * 4)
        for s in live_slots(x):
            x.state[s, 0], x.state[s, 1] = ops.compressor_state(ratio, dim)
        out, _ = run_batch(x, table)
        cu = x.cu.tolist()
        for b, n in enumerate(lens):
            want = ref.compressor_prefill(x.kv[cu[b] : cu[b + 1]], x.score[cu[b] : cu[b + 1]], x.ape, x.norm, ratio,
                                          x.inv_freq, table=table)
            got = out[cu[b] + ratio - 1 : cu[b + 1] : ratio]
            assert got.shape == want.shape == (n // ratio, dim)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio,dim,quant", CONFIGS)
@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_bfloat16_inputs_give_their_float32_bits(gen: torch.Generator, ratio: int, dim: int, quant: str,
                                                 kind: str) -> None:
    """bfloat16 projections are widened exactly: the entries and states of their float32 copies,
    bit for bit, batched and one call a sequence; kv and score must share a dtype."""
    x, twin = as_bf16(random_batch(gen, f"{ratio}-{dim}-{quant}-{kind}-bf16", kind, ratio, dim, quant))
    out, state = run_batch(x)
    want, want_state = run_batch(twin)
    assert torch.equal(out, want) and torch.equal(state, want_state)
    loop, loop_state = run_loop(x)
    assert torch.equal(loop, want) and torch.equal(loop_state, want_state)
    with pytest.raises(TypeError, match="score"):
        ops.compress_batch(x.kv, twin.score, x.ape, x.norm, x.inv_freq, x.state.clone(), x.slots, x.starts, x.cu,
                           x.ratio, quant=x.quant)


def test_rejects_bad_inputs(gen: torch.Generator) -> None:
    x = make_batch(gen, 4, 64, "none", [5, 3, 0], [2, 8, 0], [True, True, True])
    x.inv_freq = INV_FREQ
    kv, score, ape, norm, freqs, state, slots, starts, cu = x.args
    before = state.clone()

    def call(**over) -> None:
        a = dict(kv=kv, score=score, ape=ape, norm_weight=norm, inv_freq=freqs, state=state, state_slots=slots,
                 starts=starts, cu_tokens=cu, ratio=4)
        a.update(over)
        ops.compress_batch(**a)

    cases = [
        (TypeError, "kv", dict(kv=kv.double())),
        (ValueError, "kv", dict(kv=kv[:, :-1])),
        (ValueError, "kv", dict(kv=kv.flatten())),
        (ValueError, "score", dict(score=score[:-1])),
        (TypeError, "score", dict(score=score.half())),
        (ValueError, "ape", dict(ape=ape[:3])),
        (TypeError, "ape", dict(ape=ape.double())),
        (ValueError, "norm_weight", dict(norm_weight=norm[None])),
        (ValueError, "norm_weight", dict(norm_weight=norm[:0])),
        (TypeError, "norm_weight", dict(norm_weight=norm.double())),
        (ValueError, "inv_freq", dict(inv_freq=torch.ones(33, dtype=torch.float64))),
        (TypeError, "inv_freq", dict(inv_freq=freqs.half())),
        (ValueError, "state", dict(state=state[:, :1].contiguous())),
        (ValueError, "state", dict(state=state[0])),
        (TypeError, "state", dict(state=state.double())),
        (ValueError, "state", dict(state=state.transpose(2, 3))),
        (TypeError, "state_slots", dict(state_slots=slots.float())),
        (ValueError, "state_slots", dict(state_slots=slots[:2])),
        (IndexError, "state_slots", dict(state_slots=torch.tensor([0, 6, 1]))),
        (IndexError, "state_slots", dict(state_slots=torch.tensor([0, -2, 1]))),
        (ValueError, "state_slots", dict(state_slots=torch.tensor([4, 1, 4]))),
        (ValueError, "starts", dict(starts=starts[:2])),
        (ValueError, "starts", dict(starts=torch.tensor([2, -1, 0]))),
        (TypeError, "starts", dict(starts=starts.double())),
        (ValueError, "cu_tokens", dict(cu_tokens=cu[:3])),
        (ValueError, "cu_tokens", dict(cu_tokens=torch.tensor([1, 5, 8, 8]))),
        (ValueError, "cu_tokens", dict(cu_tokens=torch.tensor([0, 6, 5, 8]))),
        (ValueError, "cu_tokens", dict(cu_tokens=torch.tensor([0, 5, 8, 7]))),
        (TypeError, "cu_tokens", dict(cu_tokens=cu.float())),
        (ValueError, "ratio", dict(ratio=0)),
        (TypeError, "ratio", dict(ratio=4.0)),
        (ValueError, "eps", dict(eps=-1.0)),
        (ValueError, "quant", dict(quant="fp8")),  # D = 64
        (ValueError, "quant", dict(quant="int8")),
        (ValueError, "rope_table", dict(rope_table="fp32")),
        (TypeError, "kv", dict(kv=[[0.0]])),
    ]
    for exc, name, over in cases:
        with pytest.raises(exc, match=name):
            call(**over)
    # Non-finite inputs raise before any state changes, naming the argument and the sequence.
    bad = kv.clone()
    bad[1, 64 + 3] = float("nan")  # sequence 0's position 3, "a" half: pooled into its entry 0
    with pytest.raises(ValueError, match="kv: sequence 0: .*entry 0"):
        call(kv=bad)
    bad = kv.clone()
    bad[6, 3] = float("nan")  # sequence 1's position 9: no entry, but replayed into its state
    with pytest.raises(ValueError, match="kv: sequence 1"):
        call(kv=bad)
    bad_score = score.clone()
    bad_score[7, 0] = float("inf")  # sequence 1's last token, replayed into its state
    with pytest.raises(ValueError, match="score: sequence 1"):
        call(score=bad_score)
    bad_ape = ape.clone()
    bad_ape[0, 0] = float("nan")
    with pytest.raises(ValueError, match="ape"):
        call(ape=bad_ape)
    with pytest.raises(ValueError, match="norm_weight"):
        call(norm_weight=torch.full_like(norm, float("inf")))
    assert torch.equal(state, before)
    # Every tensor on one device.
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cu_tokens"):
            call(cu_tokens=cu.cuda())


def test_opcheck(gen: torch.Generator) -> None:
    x = make_batch(gen, 4, 64, "none", [5, 0, 9], [3, 0, 4], [True, False, True])
    torch.library.opcheck(torch.ops.dsv4rs.compress_batch.default, (*x.args[:4], INV_FREQ, *x.args[5:], 4, 1e-6, "none",
                                                                  "official"))
    y = make_batch(gen, 128, 128, "fp4", [1, 1], [127, 5], [True, True])
    torch.library.opcheck(torch.ops.dsv4rs.compress_batch.default, (*y.args, 128, 1e-6, "fp4", "exact"))


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("ratio,dim,quant", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_batch_equals_gpu_per_sequence_calls(gen: torch.Generator, ratio: int, dim: int, quant: str,
                                                 kind: str) -> None:
    """The batched kernels run the per-sequence kernels' device functions: the same bits."""
    for trial in range(2):
        x = random_batch(gen, f"{ratio}-{dim}-{quant}-{kind}-{trial}", kind, ratio, dim, quant).to("cuda")
        out, state = run_batch(x)
        want, want_state = run_loop(x)
        assert torch.equal(out, want)
        assert torch.equal(state, want_state)


@pytest.mark.gpu
@pytest.mark.parametrize("ratio,dim,quant", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_batch_matches_cpu(gen: torch.Generator, ratio: int, dim: int, quant: str, kind: str) -> None:
    x = random_batch(gen, f"{ratio}-{dim}-{quant}-{kind}-cpu", kind, ratio, dim, quant)
    cpu, cpu_state = run_batch(x)
    dev, dev_state = (t.cpu() for t in run_batch(x.to("cuda")))
    # The state holds copies and sums of the inputs: identical. Entries differ by exp/rsqrt
    # rounding, and a quantized entry may land one FP8/FP4 step apart near a rounding boundary.
    assert torch.equal(dev_state, cpu_state)
    rows = cpu.abs().sum(1) > 0
    assert torch.equal(dev.abs().sum(1) > 0, rows)
    assert (dev[~rows] == 0).all()
    if rows.any():
        rel = ((dev[rows].double() - cpu[rows].double()).norm() / cpu[rows].double().norm()).item()
        assert rel < {"none": 1e-6, "fp8": 3e-2, "fp4": 2e-1}[quant]


@pytest.mark.gpu
@pytest.mark.parametrize("dim,quant", [(512, "fp8"), (128, "fp4"), (512, "none")])
def test_gpu_long_batches_pool_in_the_finish_kernel(gen: torch.Generator, dim: int, quant: str) -> None:
    """A batch of 16,384 rows or more (ratio 4) pools each entry in the finish kernel, a warp a
    row; its per-sequence calls (fewer than 4,096 entries each) take the pool kernel: the same
    bits, and the CPU's entries and states."""
    lens, starts, live = [10001, 3, 6700, 40, 1], [0, 7, 1030, 5, 3], [True, True, True, False, True]
    x = make_batch(gen, 4, dim, quant, lens, starts, live)
    dev, dev_state = run_batch(x.to("cuda"))
    want, want_state = run_loop(x.to("cuda"))
    assert torch.equal(dev, want) and torch.equal(dev_state, want_state)
    cpu, cpu_state = run_batch(x)
    assert torch.equal(dev_state.cpu(), cpu_state)
    rows = cpu.abs().sum(1) > 0
    assert torch.equal(dev.cpu().abs().sum(1) > 0, rows) and (dev.cpu()[~rows] == 0).all()
    rel = ((dev.cpu()[rows].double() - cpu[rows].double()).norm() / cpu[rows].double().norm()).item()
    assert rel < {"none": 1e-6, "fp8": 3e-2, "fp4": 2e-1}[quant]


def assert_gpu_twin_bits(x: Batch, twin: Batch) -> None:
    """On the GPU the bfloat16 batch ``x`` gives its float32 ``twin``'s entries and states bit for
    bit, batched and one call a sequence."""
    x, twin = x.to("cuda"), twin.to("cuda")
    out, state = run_batch(x)
    want, want_state = run_batch(twin)
    assert torch.equal(out, want) and torch.equal(state, want_state)
    loop, loop_state = run_loop(x)
    want, want_state = run_loop(twin)
    assert torch.equal(loop, want) and torch.equal(loop_state, want_state)


@pytest.mark.gpu
@pytest.mark.parametrize("ratio,dim,quant", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_bfloat16_inputs_give_their_float32_bits(gen: torch.Generator, ratio: int, dim: int, quant: str,
                                                     kind: str) -> None:
    """The bfloat16 kernels (cuda/compress_bf16.cu) give the float32 kernels' bits for the same
    values: batched, and one call a sequence (the single-sequence kernels)."""
    x, twin = as_bf16(random_batch(gen, f"{ratio}-{dim}-{quant}-{kind}-gpu-bf16", kind, ratio, dim, quant))
    assert_gpu_twin_bits(x, twin)


@pytest.mark.gpu
@pytest.mark.parametrize("ratio,dim,quant", [(4, 512, "fp8"), (4, 128, "fp4"), (128, 512, "fp8")])
def test_gpu_bfloat16_inputs_of_long_calls(gen: torch.Generator, ratio: int, dim: int, quant: str) -> None:
    """Long calls take the other kernels (ratio 4: pooling in the finish kernel; ratio 128: an
    entry a block): bfloat16 inputs give their float32 copies' bits there too, batched and
    one call a sequence."""
    lens, starts, live = [40000, 3, 6700, 1], [0, 7, 1030, 3], [True, True, True, True]
    x, twin = as_bf16(make_batch(gen, ratio, dim, quant, lens, starts, live))
    assert_gpu_twin_bits(x, twin)


@pytest.mark.gpu
def test_gpu_padding_rows_and_garbage_offsets_stay_inside(gen: torch.Generator) -> None:
    """Padding rows and slots outside the pool change nothing; garbage cu_tokens and starts never
    make the kernels write outside `state` and `out` (sentinels around the state stay intact)."""
    ratio, dim = 4, 128
    x = make_batch(gen, ratio, dim, "fp4", [5, 300, 0, 9, 1], [3, 0, 7, 130, 127], [True, False, True, False, True])
    x = x.to("cuda")
    out, state = run_batch(x)
    cu = x.cu.tolist()
    assert (out[cu[1] : cu[2]] == 0).all() and (out[cu[3] : cu[4]] == 0).all()
    untouched = [s for s in range(x.state.shape[0]) if s not in live_slots(x)]
    assert torch.equal(state[untouched], x.state[untouched])
    # A slot >= S is a padding row on the GPU.
    beyond = x.slots.clone()
    beyond[1] = x.state.shape[0] + 5
    y = Batch(*x.args[:6], beyond, x.starts, x.cu, ratio, "fp4")
    out_y, state_y = run_batch(y)
    assert torch.equal(out_y, out) and torch.equal(state_y, state)
    # Garbage offsets: clamped, no access leaves its tensor.
    n = x.state.numel()
    buf = torch.full((3 * n,), 123.0, device="cuda")
    pooled = buf[n : 2 * n].view_as(x.state)
    pooled.copy_(x.state)
    for cu_bad, starts_bad in [([0, 10**9, -5, 7, 3, 2**40], [-(2**40), 5, 2**62, -1, 3]),
                               ([-7, 2, 1, 3000, 3001, 40], [0, 1, 2, 3, 4])]:
        o = ops.compress_batch(*x.args[:5], pooled, x.slots, torch.tensor(starts_bad, device="cuda"),
                               torch.tensor(cu_bad, device="cuda"), ratio, quant="fp4")
        torch.cuda.synchronize()
        assert o.shape == out.shape
        assert (buf[:n] == 123).all() and (buf[2 * n :] == 123).all()
        assert torch.equal(pooled[untouched], x.state[untouched])


@pytest.mark.gpu
def test_gpu_batch_captures_in_a_cuda_graph(gen: torch.Generator) -> None:
    """One capture of a padded decode bucket serves new batches: inputs copied into the
    captured tensors, replayed, equal to eager calls."""
    ops.warm_up("cuda")
    ratio, dim, quant = 4, 512, "fp8"
    rng = random.Random(3)
    bucket = 8

    def decode_batch(live: int) -> Batch:
        starts = [rng.randrange(4) * ratio + rng.randrange(ratio) for _ in range(bucket)]
        return make_batch(gen, ratio, dim, quant, [1] * bucket, starts, [b < live for b in range(bucket)],
                          extra_slots=4).to("cuda")

    first = decode_batch(bucket)
    static = Batch(*(t.clone() for t in first.args), ratio, quant)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = ops.compress_batch(*static.args, ratio, quant=quant)
    torch.cuda.current_stream().wait_stream(stream)
    for live in (bucket, 5, 1, 0):
        x = decode_batch(live)
        for dst, src in zip(static.args, x.args):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want, want_state = run_batch(x)
        assert torch.equal(out, want) and torch.equal(static.state, want_state)
