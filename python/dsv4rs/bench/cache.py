"""The allocator suite of ``dsv4rs bench``: host bookkeeping of :class:`dsv4rs.cache.KVCacheManager`
with 10,000 live sequences of the V4-Flash cache geometry (decode appends batched and one call
per sequence, a prefill append, forks). No device memory is touched; each case's name carries its
throughput."""

from __future__ import annotations

from collections.abc import Iterator

from dsv4rs.bench.harness import Bench, Case, Row
from dsv4rs.cache import CacheConfig, KVCacheManager

PROMPT = 1_000
"""Tokens per sequence before the cases: 250 CSA entries (4 pages), 7 HCA entries."""


def _manager(seqs: int) -> tuple[KVCacheManager, list[int]]:
    # Room for every sequence to grow by a few thousand tokens and to be forked.
    pages = {f: n * 2 * seqs + 1 for f, n in {"window": 2, "csa": 12, "hca": 1, "state": 1}.items()}
    m = KVCacheManager(CacheConfig.v4_flash(), pages)
    ids = [m.add_sequence()[0] for _ in range(seqs)]
    m.append(ids, [[i % 50_000] * PROMPT for i in range(seqs)])
    return m, ids


def cache(b: Bench) -> Iterator[Case]:
    seqs = 1_000 if b.quick else 10_000
    state: dict[str, tuple[KVCacheManager, list[int]]] = {}

    def manager() -> tuple[KVCacheManager, list[int]]:
        if "m" not in state:
            state["m"] = _manager(seqs)
        return state["m"]

    def release_extra(m: KVCacheManager) -> None:
        for s in m.sequence_ids()[seqs:]:
            m.release(s)

    def decode_batched() -> Row:
        m, ids = manager()
        one = [[7]] * seqs
        ms = b.host_ms(lambda: m.append(ids, one))
        return Row(f"append decode, {seqs} seqs in one call ({seqs / ms / 1e3:.2f} M appends/s)", ms, 0, 0, None)

    def decode_each() -> Row:
        m, ids = manager()

        def step() -> None:
            for s in ids:
                m.append([s], [[7]])

        ms = b.host_ms(step, iters=3)
        return Row(f"append decode, one call a seq ({seqs / ms / 1e3:.2f} M appends/s)", ms, 0, 0, None)

    def prefill() -> Row:
        m, _ = manager()
        batch, tokens = 64, 2048
        prompts = [[3] * tokens] * batch
        fresh: list[int] = []

        def setup() -> None:
            release_extra(m)
            fresh[:] = [m.add_sequence()[0] for _ in range(batch)]

        ms = b.host_ms(lambda: m.append(fresh, prompts), setup=setup)
        release_extra(m)
        return Row(f"append prefill, {batch} x {tokens} tokens ({batch * tokens / ms / 1e3:.2f} M tokens/s)", ms, 0, 0,
                   None)

    def fork() -> Row:
        m, ids = manager()

        def call() -> None:
            for s in ids:
                m.fork(s)

        ms = b.host_ms(call, iters=3, setup=lambda: release_extra(m))
        release_extra(m)
        return Row(f"fork {seqs} seqs ({seqs / ms / 1e3:.2f} M forks/s)", ms, 0, 0, None)

    for name, run in (("decode batched", decode_batched), ("decode each", decode_each), ("prefill", prefill),
                      ("fork", fork)):
        yield Case("cache", name, run)
