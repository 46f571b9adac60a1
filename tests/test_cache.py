"""The paged KV-cache allocator: docs/model.md section 5 numbers, invariants under random
interleavings of add/append/fork/release, row ids that address what a plain per-sequence list
would, exhaustion and misuse that raise with the pool intact, and thread safety."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import dsv4rs
from dsv4rs.cache import FAMILIES, CacheConfig, KVCacheManager

ROWS = ("window", "csa", "hca")
TINY = CacheConfig((4, 128, 0), window=8)
"""CSA, HCA and SWA-only layers with an 8-token window: prefix reuse re-runs 7 * 2 + 7 tokens."""
DOCUMENT = [random.Random(0).randrange(3) for _ in range(2048)]
"""Prompts are prefixes of one document, so that prefix hits happen."""


@pytest.mark.parametrize(
    ("config", "fp4", "fp8", "bf16", "total"),
    [
        # docs/model.md section 5: 5,031 and 3,514 B/token, 5.28 GB and 3.68 GB at 2^20 tokens.
        (CacheConfig.v4_pro, 5031.4375, 30 * 179 + 31 * 4.5625, 30 * 210 + 31 * 4.5625, 5_275_844_608),
        (CacheConfig.v4_flash, 3514.25, 21 * 179 + 20 * 4.5625, 21 * 210 + 20 * 4.5625, 3_684_958_208),
    ],
)
def test_bytes_per_token_reproduce_spec_section_5(config, fp4, fp8, bf16, total) -> None:
    assert config().bytes_per_token(1 << 20) == fp4
    assert config(index_format="fp8").bytes_per_token(1 << 20) == fp8
    assert config(index_format="bf16").bytes_per_token(1 << 20) == bf16
    assert config().footprint(1 << 20).compressed == total == fp4 * 2**20


def test_presets_have_the_layer_counts_of_spec_section_1() -> None:
    pro, flash = CacheConfig.v4_pro(), CacheConfig.v4_flash()
    assert (pro.num_layers, pro.csa_layers, pro.hca_layers) == (62, 30, 31)
    assert (flash.num_layers, flash.csa_layers, flash.hca_layers) == (44, 21, 20)
    assert pro.compress_ratios[:3] == (128, 128, 4) and pro.compress_ratios[-1] == 0
    assert flash.compress_ratios[:3] == (0, 0, 4) and flash.compress_ratios[-1] == 0
    # Window and compressor state are per sequence, reported apart.
    f = pro.footprint(1 << 20)
    assert f.window == 62 * 128 * 584
    assert f.state == 30 * (64 + 16) * 1024 + 31 * 512 * 1024


@pytest.mark.parametrize("seq_len", [1, 3, 4, 127, 128, 1000, 70_000])
def test_reserved_pages_match_the_planned_footprint(seq_len: int) -> None:
    config = CacheConfig.v4_flash()
    m = KVCacheManager.from_budget(config, 4 << 30, 70_000)
    s, _ = m.add_sequence()
    m.append([s], [[1] * seq_len])
    assert m.sequence_footprint(s) == m.used_footprint() == config.footprint(seq_len)


def test_capacity_planning_matches_the_allocator() -> None:
    config, seq_len, budget = CacheConfig.v4_flash(), 10_000, 2 << 30
    m = KVCacheManager.from_budget(config, budget, seq_len)
    assert m.pool_footprint().total <= budget
    n = config.sequences_that_fit(seq_len, budget)
    for _ in range(n):
        s, _ = m.add_sequence()
        m.append([s], [[0] * seq_len])
    s, _ = m.add_sequence()
    with pytest.raises(dsv4rs.OutOfPagesError):
        m.append([s], [[0] * seq_len])
    longest = config.longest_context(budget)
    assert longest is not None
    assert config.sequences_that_fit(longest, budget) == 1
    assert config.sequences_that_fit(longest + 1, budget) == 0
    assert CacheConfig((0, 0)).longest_context(1 << 30) is None


class Device:
    """The caller's side: one int64 value per physical row of each family, and per sequence
    the prefix hashes its rows' values derive from (content depends on tokens only)."""

    def __init__(self, m: KVCacheManager) -> None:
        self.rows = {f: torch.full((n * 64,), -1, dtype=torch.int64) for f, n in m.num_pages().items()}
        self.hashes: dict[int, list[int]] = {}

    @staticmethod
    def value(hashes: list[int], family: str, i: int) -> int:
        last = {"window": i, "csa": 4 * i + 3, "hca": 128 * i + 127}[family]
        return hash((hashes[last], family, i))

    def extend(self, seq: int, tokens: list[int]) -> None:
        h = self.hashes.setdefault(seq, [])
        for t in tokens:
            h.append(hash((h[-1] if h else 0, t)))

    def apply(self, m: KVCacheManager, seq_ids: list[int], tokens: list[list[int]], by_count: bool = False) -> None:
        """Appends through the manager (``by_count``: their count only, the ids unresolved, as
        for tokens sampled on the device), then performs its copies and writes."""
        r = m.append_unresolved(seq_ids, [len(t) for t in tokens]) if by_count else m.append(seq_ids, tokens)
        for f in ROWS:
            pages = self.rows[f].view(-1, 64)
            src, dst = r.copies[f].unbind(1)
            pages[dst] = pages[src]
        values: dict[str, list[int]] = {f: [] for f in ROWS}
        for seq, toks in zip(seq_ids, tokens):
            old = len(self.hashes.setdefault(seq, []))
            self.extend(seq, toks)
            new = len(self.hashes[seq])
            h = self.hashes[seq]
            values["window"] += [self.value(h, "window", p) for p in range(old, new)]
            for f, ratio in (("csa", 4), ("hca", 128)):
                values[f] += [self.value(h, f, i) for i in range(old // ratio, new // ratio)]
        for f in ROWS:
            slots, vals = r.slots[f], torch.tensor(values[f], dtype=torch.int64)
            assert slots.shape == vals.shape
            self.rows[f][slots[slots >= 0]] = vals[slots >= 0]

    def verify(self, m: KVCacheManager, seq: int) -> None:
        """Every visible row of `seq` reads back what its own tokens put there."""
        h = self.hashes.get(seq, [])
        n = len(h)
        logical = {"window": range(max(0, n - 8), n), "csa": range(n // 4), "hca": range(n // 128)}
        for f, idx in logical.items():
            rows = m.physical_rows([seq], f, torch.tensor([list(idx)], dtype=torch.int64))[0]
            assert (rows >= 0).all(), f
            assert self.rows[f][rows].tolist() == [self.value(h, f, i) for i in idx], f


def pool_state(m: KVCacheManager) -> tuple:
    return (
        [m.refcounts(f).tolist() for f in FAMILIES],
        m.free_pages(),
        {s: m.length(s) for s in m.sequence_ids()},
        m.cached_units(),
    )


class Interleavings(RuleBasedStateMachine):
    """Random adds (prompts with prefix hits), batched appends (of ids, or by count with the ids
    resolved later), forks and releases on small pools; after every step the invariants hold and
    every row reads back its own value."""

    def __init__(self) -> None:
        super().__init__()
        self.m = KVCacheManager(TINY, {"window": 9, "csa": 30, "hca": 6, "state": 9})
        self.dev = Device(self.m)
        self.later: dict[int, list[int]] = {}  # ids appended by count, not resolved yet

    def resolve(self, seq: int, n: int | None = None) -> None:
        ids = self.later.pop(seq, [])
        n = len(ids) if n is None else n
        self.m.resolve(seq, ids[:n])
        if ids[n:]:
            self.later[seq] = ids[n:]

    @rule(prompt_len=st.integers(0, 1400))
    def add(self, prompt_len: int) -> None:
        prompt = DOCUMENT[:prompt_len]
        seq, hit = self.m.add_sequence(prompt)
        self.dev.extend(seq, prompt[: hit.recompute_from])
        before = pool_state(self.m)
        try:
            self.dev.apply(self.m, [seq], [prompt[hit.recompute_from :]])
        except dsv4rs.OutOfPagesError:
            assert pool_state(self.m) == before
            self.m.release(seq)

    @precondition(lambda self: self.m.sequence_ids())
    @rule(data=st.data())
    def append(self, data: st.DataObject) -> None:
        live = self.m.sequence_ids()
        seqs = data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True))
        tokens = [data.draw(st.lists(st.integers(0, 2), max_size=300)) for _ in seqs]
        before = pool_state(self.m)
        if any(s in self.later for s in seqs):  # ids cannot follow unresolved tokens
            with pytest.raises(ValueError, match="not resolved yet"):
                self.m.append(seqs, tokens)
            assert pool_state(self.m) == before
            for s in seqs:
                self.resolve(s)
            before = pool_state(self.m)
        try:
            self.dev.apply(self.m, seqs, tokens)
        except dsv4rs.OutOfPagesError:
            assert pool_state(self.m) == before

    @precondition(lambda self: self.m.sequence_ids())
    @rule(data=st.data())
    def append_by_count(self, data: st.DataObject) -> None:
        live = self.m.sequence_ids()
        seqs = data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True))
        tokens = [data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=3)) for _ in seqs]
        before = pool_state(self.m)
        try:
            self.dev.apply(self.m, seqs, tokens, by_count=True)
        except dsv4rs.OutOfPagesError:
            assert pool_state(self.m) == before
            return
        for s, t in zip(seqs, tokens):
            self.later.setdefault(s, []).extend(t)

    @precondition(lambda self: self.later)
    @rule(data=st.data())
    def resolve_some(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.later)))
        self.resolve(seq, data.draw(st.integers(0, len(self.later[seq]))))

    @precondition(lambda self: self.m.sequence_ids())
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self.m.sequence_ids()))
        child = self.m.fork(parent)
        self.dev.hashes[child] = list(self.dev.hashes.get(parent, []))
        if parent in self.later:  # the fork shares the unresolved tokens
            self.later[child] = list(self.later[parent])

    @precondition(lambda self: self.m.sequence_ids())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.m.sequence_ids()))
        self.m.release(seq)
        self.later.pop(seq, None)
        with pytest.raises(dsv4rs.CacheStateError, match="was released"):
            self.m.release(seq)

    @invariant()
    def pages_are_accounted_for(self) -> None:
        m, live = self.m, self.m.sequence_ids()
        for f in FAMILIES:
            tables = m.page_tables(live, f)
            holders = torch.bincount(tables[tables > 0], minlength=m.num_pages()[f])
            refs = m.refcounts(f)
            assert torch.equal(refs, holders.to(torch.int32)), f
            assert refs[0] == 0
            assert m.free_pages()[f] + m.used_pages()[f] == m.num_pages()[f] - 1
            assert m.used_pages()[f] == int((refs > 0).sum())
        used = m.used_footprint()
        assert used.total == sum(m.used_pages()[f] * TINY.page_bytes(f) for f in FAMILIES)
        m.check()

    @invariant()
    def rows_read_back(self) -> None:
        for seq in self.m.sequence_ids():
            assert self.m.length(seq) == len(self.dev.hashes.get(seq, []))
            assert self.m.unresolved(seq) == len(self.later.get(seq, []))
            self.dev.verify(self.m, seq)


TestInterleavings = Interleavings.TestCase
TestInterleavings.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_prefix_reuse_reads_the_released_rows_back() -> None:
    m = KVCacheManager(TINY, {"window": 8, "csa": 16, "hca": 4, "state": 8})
    dev = Device(m)
    a, hit = m.add_sequence(DOCUMENT[:600])
    assert hit.cached_tokens == 0
    dev.apply(m, [a], [DOCUMENT[:600]])
    m.release(a)
    b, hit = m.add_sequence(DOCUMENT[:900])
    assert (hit.cached_tokens, hit.recompute_from) == (512, 512 - TINY.rebuild_tokens)
    assert m.used_pages()["csa"] == 2
    dev.extend(b, DOCUMENT[: hit.recompute_from])
    dev.apply(m, [b], [DOCUMENT[hit.recompute_from : 900]])
    dev.verify(m, b)


def test_tokens_appended_by_count_take_their_ids_later() -> None:
    # The same pages and slots as appending the ids; the prefix unit they complete is
    # registered when the ids are resolved.
    a = KVCacheManager(TINY, {"window": 8, "csa": 16, "hca": 4, "state": 8})
    b = KVCacheManager(TINY, {"window": 8, "csa": 16, "hca": 4, "state": 8})
    for m in (a, b):
        m.add_sequence()
        m.append([0], [DOCUMENT[:250]])
    for t in range(250, 260):
        want = a.append([0], [[DOCUMENT[t]]])
        got = b.append_unresolved([0], [1])
        assert all(torch.equal(want.slots[f], got.slots[f]) for f in FAMILIES)
        assert all(torch.equal(want.copies[f], got.copies[f]) for f in FAMILIES)
    assert (b.length(0), b.unresolved(0), a.cached_units(), b.cached_units()) == (260, 10, 1, 0)
    assert b.lookup_prefix(DOCUMENT[:300]).cached_tokens == 0
    with pytest.raises(ValueError, match="not resolved yet"):
        b.append([0], [[1]])
    with pytest.raises(ValueError, match="10 unresolved tokens, got 11 ids"):
        b.resolve(0, DOCUMENT[250:261])
    with pytest.raises(ValueError, match="counts"):
        b.append_unresolved([0], [-1])
    with pytest.raises(ValueError, match="one count per sequence"):
        b.append_unresolved([0], [1, 1])
    assert (b.length(0), b.unresolved(0)) == (260, 10)
    b.resolve(0, DOCUMENT[250:256])
    assert (b.unresolved(0), b.cached_units()) == (4, 1)
    assert b.lookup_prefix(DOCUMENT[:300]) == a.lookup_prefix(DOCUMENT[:300])
    b.resolve(0, DOCUMENT[256:260])
    b.append([0], [[1]])
    b.check()


def test_exhaustion_and_misuse_raise_with_the_pool_intact() -> None:
    m = KVCacheManager(TINY, {"window": 4, "csa": 3, "hca": 4, "state": 4})
    s, _ = m.add_sequence()
    t, _ = m.add_sequence()
    m.append([s], [[0] * 300])
    before = pool_state(m)
    with pytest.raises(dsv4rs.OutOfPagesError, match="csa pool needs 2 free pages, has 0 of 2"):
        m.append([t, s], [[0] * 4, [0] * 256])
    with pytest.raises(ValueError, match="appears more than once"):
        m.append([t, t], [[0], [0]])
    with pytest.raises(dsv4rs.CacheStateError, match="does not exist"):
        m.append([99], [[0]])
    with pytest.raises(ValueError, match="one token list per sequence"):
        m.append([s, t], [[0]])
    with pytest.raises(ValueError, match="width"):
        m.page_tables([s], "csa", width=1)
    with pytest.raises(ValueError, match="family"):
        m.page_tables([s], "indexer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slots, not rows"):
        m.physical_rows([s], "state", torch.zeros((1, 1), dtype=torch.int64))
    with pytest.raises(TypeError, match="logical"):
        m.physical_rows([s], "csa", torch.zeros((1, 1), dtype=torch.int32))
    assert pool_state(m) == before
    m.release(t)
    for call in (lambda: m.release(t), lambda: m.append([t], [[1]]), lambda: m.fork(t), lambda: m.length(t)):
        with pytest.raises(dsv4rs.CacheStateError, match=f"sequence {t} was released"):
            call()
    m.check()
    with pytest.raises(ValueError, match="layer 1 has ratio 3"):
        CacheConfig((4, 3))
    with pytest.raises(ValueError, match="index_format"):
        CacheConfig((4,), index_format="fp2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pages"):
        KVCacheManager(TINY, {"window": 4})


def test_metadata_tensors() -> None:
    m = KVCacheManager(TINY, {"window": 8, "csa": 8, "hca": 8, "state": 8})
    s, _ = m.add_sequence()
    t, _ = m.add_sequence()
    r = m.append([s, t], [list(range(70)), [1, 2, 3]])
    assert r.slots["window"].dtype == torch.int64 and r.slots["window"].shape == (73,)
    assert r.slots["csa"].tolist() == [64 + i for i in range(17)]
    assert r.slots["state"].tolist() == [1, 2]
    tables = m.page_tables([s, t], "csa", width=4)
    assert tables.dtype == torch.int32 and tables.tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]
    rows = m.physical_rows([s, s, t], "window", torch.tensor([[69, 61], [62, 70], [2, -1]]))
    assert rows.tolist() == [[64 + 5, -1], [64 + 6, -1], [128 + 2, -1]]


def test_threads_share_one_manager() -> None:
    m = KVCacheManager(TINY, {"window": 64, "csa": 256, "hca": 64, "state": 64})
    seqs = [m.add_sequence()[0] for _ in range(8)]

    def work(seq: int) -> None:
        for _ in range(200):
            child = m.fork(seq)
            m.append([seq], [[seq] * 5])
            m.release(child)

    threads = [threading.Thread(target=work, args=(s,)) for s in seqs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [m.length(s) for s in seqs] == [1000] * 8
    m.check()
