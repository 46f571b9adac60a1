"""Allocator throughput with 10,000 live sequences of the V4-Flash cache geometry: decode
appends (one token to every sequence, batched and one call per sequence), prefill appends, and
forks. Host bookkeeping only; no device memory is touched.

Run: ``pytest benches/bench_cache.py --benchmark-enable``. Each test's ``extra_info`` holds its
throughput (operations per second from the mean round time).
"""

from __future__ import annotations

import pytest

from dsv4rs.cache import CacheConfig, KVCacheManager

SEQS = 10_000
PROMPT = 1_000
"""Tokens per sequence before the benchmarks: 250 CSA entries (4 pages), 7 HCA entries."""
ROUNDS = 20


def report(benchmark, ops: int, name: str) -> None:
    benchmark.extra_info[name] = round(ops / benchmark.stats.stats.mean)


@pytest.fixture(scope="module")
def manager() -> tuple[KVCacheManager, list[int]]:
    config = CacheConfig.v4_flash()
    # Room for every sequence to grow by a few thousand tokens and to be forked.
    pages = {f: n * 2 * SEQS + 1 for f, n in {"window": 2, "csa": 12, "hca": 1, "state": 1}.items()}
    m = KVCacheManager(config, pages)
    seqs = [m.add_sequence()[0] for _ in range(SEQS)]
    m.append(seqs, [[i % 50_000] * PROMPT for i in range(SEQS)])
    return m, seqs


def test_decode_append_batched(benchmark, manager) -> None:
    m, seqs = manager
    one = [[7]] * SEQS
    benchmark.pedantic(m.append, args=(seqs, one), rounds=ROUNDS, iterations=1)
    report(benchmark, SEQS, "appends_per_s")


def test_decode_append_one_call_each(benchmark, manager) -> None:
    m, seqs = manager

    def step() -> None:
        for s in seqs:
            m.append([s], [[7]])

    benchmark.pedantic(step, rounds=ROUNDS // 4, iterations=1)
    report(benchmark, SEQS, "appends_per_s")


def test_prefill_append_batched(benchmark, manager) -> None:
    m, _ = manager
    batch = 64
    prompts = [[3] * 2048] * batch

    def fresh() -> tuple[tuple[list[int], list[list[int]]], dict]:
        for s in m.sequence_ids()[SEQS:]:
            m.release(s)
        return ([m.add_sequence()[0] for _ in range(batch)], prompts), {}

    benchmark.pedantic(m.append, setup=fresh, rounds=ROUNDS, iterations=1)
    report(benchmark, batch * 2048, "tokens_per_s")


def test_fork(benchmark, manager) -> None:
    m, seqs = manager

    def release_forks() -> None:
        for s in m.sequence_ids()[SEQS:]:
            m.release(s)

    def fork_all() -> None:
        for s in seqs:
            m.fork(s)

    benchmark.pedantic(fork_all, setup=release_forks, rounds=ROUNDS // 4, iterations=1)
    report(benchmark, SEQS, "forks_per_s")
    release_forks()
