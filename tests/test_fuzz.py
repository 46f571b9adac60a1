"""A seeded fuzz test of the API's error handling: malformed calls of every public op
(dsv4rs.ops), of FlashMLA's and DeepGEMM's entry points (dsv4rs.compat: their errors must also
start with an argument's name, and a refused call must not set up FlashMLA's scheduling handle),
the cache manager and cache geometry (dsv4rs.cache) and the checkpoint loader (wrong
dtypes, shapes, devices including meta tensors, negative and huge ints, NaN, non-contiguous and
stride-0 tensors, aliasing, corrupted checkpoints) must each succeed or raise one of the
exceptions the API documents (``TypeError``, ``ValueError``, ``IndexError``, ``RuntimeError``,
``dsv4rs.CudaError``, ``dsv4rs.OutOfPagesError``, ``dsv4rs.CacheStateError``, ``CheckpointError``;
not an internal-error ``RuntimeError`` from a Rust panic, nor an allocation failure the caller
did not ask for), and the process running them must never die by a signal, hang, or grow past
a memory bound (``RLIMIT_AS``).

The calls run in child processes (tests/_fuzz_child.py), a batch each; a batch whose child
crashes or hangs is resumed after the case that did it, which is reported with its description
(rerun one case with ``python tests/_fuzz_child.py SEED BATCH 0 1 DIR --only INDEX``). The
whole test is bounded to about a minute (:data:`BUDGET_S`).

A defect class found by this test and not yet fixed goes in tests/_fuzz_known.py:
``KNOWN_OUTCOMES`` (a call that raises the wrong exception type or returns where it cannot have
done its job) or ``KNOWN_CRASHES`` (a call that kills or hangs the process; such cases are not run
in the random batches), with a strict xfail reproducer here; when the fix lands the xfail fails,
the class comes off the lists and its reproducer stays as a regression test. Both lists are
empty now: the classes this test found (below, one reproducer each) are fixed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _fuzz_known import KNOWN_CRASHES, KNOWN_OUTCOMES

CHILD = Path(__file__).resolve().parent / "_fuzz_child.py"
SEED = 20260101
BATCHES = 4
CASES = 250
"""Cases per batch."""
BUDGET_S = 40.0
"""Wall time the random batches may take together; a batch stops early when it runs out."""
BATCH_TIMEOUT_S = 60.0
"""A child that runs this long is hung."""
MAX_RSS = 3 << 30
"""The most resident memory a child may reach (its address space is capped, too)."""


def run_child(workdir: Path, batch: int, start: int, count: int, *extra: str,
              timeout: float = BATCH_TIMEOUT_S) -> tuple[int | None, str, str]:
    """``(returncode or None on a hang, stdout, stderr)`` of one child."""
    proc = subprocess.Popen([sys.executable, str(CHILD), str(SEED), str(batch), str(start), str(count), str(workdir),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", RAYON_NUM_THREADS="2"))
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out, err


def outcomes(out: str) -> tuple[dict[int, str], dict[int, str], int | None]:
    """``(starts: index -> description, results: index -> result line, last started index
    without a result)``."""
    starts, results = {}, {}
    for line in out.splitlines():
        m = re.match(r"(START|OK|RAISED|DEFECT|KNOWN) (\d+) ?(.*)", line)
        if not m:
            continue
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "START":
            starts[i] = rest
        else:
            results[i] = f"{kind} {rest}"
    open_ = [i for i in starts if i not in results]
    return starts, results, (max(open_) if open_ else None)


def _run_batch(workdir: Path, batch: int, deadline: float) -> tuple[list[str], dict[str, int]]:
    """Runs one batch to its end (resuming after crashes); returns the failures and counts."""
    failures, counts = [], {"ok": 0, "raised": 0, "known": 0, "crashes": 0}
    start, end = 0, CASES
    while start < end and time.monotonic() < deadline:
        left = deadline - time.monotonic()
        rc, out, err = run_child(workdir, batch, start, end - start, "--seconds", f"{left:.1f}")
        starts, results, culprit = outcomes(out)
        for i, r in sorted(results.items()):
            if r.startswith("OK"):
                counts["ok"] += 1
            elif r.startswith("RAISED"):
                counts["raised"] += 1
            elif r.startswith("KNOWN"):
                counts["known"] += 1
            else:
                cls = r.split()[1].rstrip(":")
                if cls in KNOWN_OUTCOMES:
                    counts["known"] += 1
                else:
                    failures.append(f"batch {batch} case {i}: {starts.get(i, '?')}\n    -> {r}")
        if "GENERATOR" in out:
            failures.append(f"batch {batch}: the case generator failed: {out[out.index('GENERATOR'):][:300]}\n"
                            f"{err[-2000:]}")
            break
        if rc == 0:
            mem = re.search(r"MAXRSS (\d+)", out)
            if not mem or int(mem.group(1)) > MAX_RSS:
                failures.append(f"batch {batch}: the child grew to {mem.group(1) if mem else '?'} bytes")
            counts["not run (time)"] = counts.get("not run (time)", 0) + out.count("\nBUDGET ")
            break
        what = ("hung" if rc is None else f"died by signal {signal.Signals(-rc).name}" if rc < 0
                else f"exited with status {rc}")
        if culprit is None:
            failures.append(f"batch {batch}: the child {what} outside a case:\n{err[-2000:]}")
            break
        counts["crashes"] += 1
        failures.append(f"batch {batch} case {culprit}: the process {what}: {starts[culprit]}\n{err[-600:]}")
        start = culprit + 1
    return failures, counts


def test_every_public_op_is_fuzzed() -> None:
    """Each function of ``dsv4rs.ops.__all__`` has a baseline case in the child's generator, so a
    new op cannot skip the fuzz test."""
    import _fuzz_child
    from dsv4rs import ops

    public = {n for n in ops.__all__ if callable(getattr(ops, n))} - {"RopeTable", "IndexKeyFormat", "Quant"}  # types
    fuzzed = {name for name, _, _ in _fuzz_child.op_cases(_fuzz_child.Gen("coverage"))}
    assert public - fuzzed == set()


def test_every_compat_entry_point_is_fuzzed() -> None:
    """Likewise each function of the drop-in modules (``dsv4rs.compat.flash_mla`` and
    ``deep_gemm``), in their engines' layouts."""
    import _fuzz_child
    from dsv4rs.compat import deep_gemm, flash_mla

    public = {n for m in (flash_mla, deep_gemm) for n in m.__all__ if not isinstance(getattr(m, n), type)}
    fuzzed = {name for name, _, _ in _fuzz_child.compat_cases(_fuzz_child.Gen("coverage"))}
    assert public == fuzzed


def test_fuzz_malformed_calls(tmp_path) -> None:
    deadline = time.monotonic() + BUDGET_S
    failures, total = [], {}
    for batch in range(BATCHES):
        f, counts = _run_batch(tmp_path, batch, deadline)
        failures += f
        total = {k: total.get(k, 0) + v for k, v in counts.items()}
    print(f"fuzz: {total}")
    assert total.get("ok", 0) + total.get("raised", 0) >= 100, f"too few cases ran in the budget: {total}"
    assert not failures, "\n".join(failures)


PREAMBLE = """
import resource, torch
from dsv4rs import ops
from dsv4rs.cache import CacheConfig, KVCacheManager
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), used + (2 << 30)))
def outcome(name, fn, ok=lambda r: False):
    try:
        r = fn()
    except (TypeError, ValueError, IndexError) as e:
        print(name, "RAISED", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
    except BaseException as e:
        print(name, "WRONG", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
    else:
        print(name, "FINE" if ok(r) else "SILENT", flush=True)
def manager():
    return KVCacheManager(CacheConfig([0, 4, 128, 0]), dict(window=8, csa=8, hca=8, state=4))
"""

REPRODUCERS = {
    "binding-conversion": """
outcome("binding-conversion", lambda: manager().release(-1))
outcome("binding-conversion", lambda: CacheConfig([0, 4, 128, 0]).footprint(2**64 + 1))
""",
    "meta-mixed-silent": """
outcome("meta-mixed-silent", lambda: ops.kv_write(ops.new_kv_cache(1), torch.arange(2),
                                                  torch.randn(2, 512, device="meta")))
""",
    "alias-silent": """
cache = ops.new_kv_cache(1)
entries = cache.view(-1)[: 2 * 2048].view(torch.float32).view(2, 512)
entries.copy_(torch.randn(2, 512))
outcome("alias-silent", lambda: ops.kv_write(cache, torch.tensor([1, 0]), entries))
""",
    "derotate-half-silent": """
c = ops.quantize_entries(torch.randn(4, 512))
outcome("derotate-half-silent", lambda: ops.sparse_attention(torch.randn(1, 2, 512), c, torch.tensor([[0, 1]]),
                                                             torch.zeros(2), derotate=(torch.arange(1), None)))
""",
    "corrupt-cache-rows": """
c = ops.quantize_entries(torch.randn(4, 512))
c[0, 448 + 12], c[0, 448 + 13] = 0xC0, 0x7F  # a BF16 NaN at RoPE dim 6 of row 0
outcome("corrupt-cache-rows", lambda: ops.kv_read(c, torch.tensor([0])), ok=lambda r: bool(r[0, 448 + 6].isnan()))
""",
    "fp8-nan-code": """
c = ops.quantize_entries(torch.randn(4, 512))
c[0, 3] = 0x7F  # the FP8 e4m3 NaN code at dim 3 of row 0
outcome("fp8-nan-code", lambda: ops.kv_read(c, torch.tensor([0])), ok=lambda r: bool(r[0, 3].isnan()))
""",
    "cache-arithmetic-wrap": """
import dataclasses
cfg = CacheConfig([0, 4, 128, 0])
outcome("cache-arithmetic-wrap", lambda: (cfg.footprint(2**63), cfg.footprint(2**62)),
        ok=lambda r: all(a >= b for a, b in zip(dataclasses.astuple(r[0]), dataclasses.astuple(r[1]))))
""",
    "moe-scale-range": """
def moe(scale_code, x_scale=1.0):
    gu_s = torch.full((2, 64, 2), 120, dtype=torch.uint8)
    gu_s[1, 3, 0] = scale_code
    return ops.moe_experts(torch.randn(2, 64) * x_scale, torch.tensor([[0, 1], [1, 0]]), torch.ones(2, 2),
                           torch.randint(0, 256, (2, 64, 32), dtype=torch.uint8), gu_s,
                           torch.randint(0, 256, (2, 64, 16), dtype=torch.uint8),
                           torch.full((2, 64, 1), 120, dtype=torch.uint8), 1e30)
for code in (255, 253):  # NaN; weights past float32's range
    outcome("moe-scale-range", lambda: moe(code))
outcome("moe-scale-range", lambda: moe(252, 1e30))  # in range, but the sums overflow
outcome("moe-scale-range", lambda: ops.quant_linear(torch.randn(2, 128), torch.ones(4, 128).to(torch.float8_e4m3fn),
                                                    torch.full((1, 1), 1e37)))
""",
    "allocation:indexer_topk": """
keys = ops.quantize_index_keys(torch.randn(64, 128))
outcome("allocation:indexer_topk", lambda: ops.indexer_topk(
    torch.randn(2, 4, 128), torch.randn(2, 4), keys, torch.tensor([[0]], dtype=torch.int32),
    torch.zeros(2, dtype=torch.int64), torch.full((2,), 64), 2**32 + 5))
""",
    "compat-error-names-no-argument": """
from dsv4rs.compat import deep_gemm, flash_mla
def named(arg, fn):  # a ValueError naming ``arg`` passes as RAISED; any other outcome is WRONG
    try:
        fn()
    except ValueError as e:
        if not str(e).startswith(arg + ": "):
            raise AssertionError(f"not named {arg}: {e}") from None
        raise
two = torch.ones(2)
for arg in ("return_scores", "physical"):  # flags without a truth value
    outcome("compat-error-names-no-argument", lambda: named(arg, lambda: deep_gemm.paged_indexer_topk(
        None, None, None, None, None, 4, **{arg: two})))
outcome("compat-error-names-no-argument", lambda: named("clean_logits", lambda: deep_gemm.fp8_paged_mqa_logits(
    None, None, None, None, None, None, 4, clean_logits=two)))
for arg in ("causal", "is_fp8_kvcache"):
    outcome("compat-error-names-no-argument", lambda: named(arg, lambda: flash_mla.flash_mla_with_kvcache(
        None, None, None, None, 512, flash_mla.get_mla_metadata()[0], **{arg: torch.ones(1, device="meta")})))
outcome("compat-error-names-no-argument", lambda: named("block_kv", lambda: deep_gemm.get_paged_mqa_logits_metadata(
    torch.ones(2, 2, dtype=torch.int32), torch.tensor(64, device="meta"), 1)))  # an int that cannot be read
# ints given as tensors of several values (compared with 512, they made a tensor without a truth value)
q, ids = torch.randn(1, 1, 1, 512).bfloat16(), torch.zeros(1, 1, 1, dtype=torch.int32)
outcome("compat-error-names-no-argument", lambda: named("d_v", lambda: flash_mla.flash_mla_sparse_fwd(
    q[0], torch.randn(4, 1, 512).bfloat16(), ids, 0.04, d_v=torch.ones(3, 1))))
pages = ops.quantize_entries(torch.randn(ops.PAGE_ROWS, 512)).view(1, ops.PAGE_ROWS, 1, -1)
outcome("compat-error-names-no-argument", lambda: named("head_dim_v", lambda: flash_mla.flash_mla_with_kvcache(
    q, pages, None, None, torch.full((2,), 512), flash_mla.get_mla_metadata()[0], is_fp8_kvcache=True, indices=ids)))
""",
    "indexer-overflow": """
from dsv4rs.compat import deep_gemm
keys = ops.quantize_index_keys(torch.randn(128, 128) * 1e37, "fp8")  # finite keys whose dot products overflow
q, w = torch.randn(1, 4, 128) * 10, torch.tensor([[1.0, -1.0, 1.0, -1.0]])
table = torch.tensor([[0, 1]], dtype=torch.int32)
args = (q, w, keys, table, torch.zeros(1, dtype=torch.int64), torch.full((1,), 128))
outcome("indexer-overflow", lambda: ops.indexer_scores(*args))
outcome("indexer-overflow", lambda: ops.indexer_topk(*args, 4))
outcome("indexer-overflow", lambda: deep_gemm.fp8_paged_mqa_logits(
    q.view(1, 1, 4, 128).to(torch.float8_e4m3fn), keys.view(2, ops.PAGE_ROWS, 1, -1), w,
    torch.tensor([128], dtype=torch.int32), table, torch.zeros(133, 2, dtype=torch.int32), 128))
""",
}
"""One reproducer of each known defect class that raises or returns (run together, one process)."""

CRASHERS = {
    "page-tables-width": """
m = manager()
s, _ = m.add_sequence()
outcome("page-tables-width", lambda: m.page_tables([s], "csa", width=2**32 + 5))
""",
    "manager-huge-pages": """
outcome("manager-huge-pages", lambda: KVCacheManager(CacheConfig([0, 4, 128, 0]),
                                                     dict(window=8, csa=8, hca=8, state=2**31)))
""",
    "mhc-iters-hang": """
outcome("mhc-iters-hang", lambda: ops.mhc_weights(torch.randn(2, 24), torch.randn(3), torch.randn(24), iters=2**62))
""",
}
"""One reproducer of each known class that kills or hangs the process (a process each)."""


def run_snippet(code: str, tmp_path: Path, timeout: float = 60) -> str:
    """The stdout of ``PREAMBLE + code`` in a fresh interpreter (address space capped), plus a
    line saying how it ended when it did not exit normally."""
    try:
        out = subprocess.run([sys.executable, "-c", PREAMBLE + code], capture_output=True, text=True, timeout=timeout,
                             cwd=tmp_path)
    except subprocess.TimeoutExpired:
        return "HUNG"
    if out.returncode < 0:
        return out.stdout + f"\nDIED by {signal.Signals(-out.returncode).name}"
    return out.stdout + ("" if out.returncode == 0 else f"\nEXIT {out.returncode}: {out.stderr[-500:]}")


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> str:
    return run_snippet("".join(REPRODUCERS.values()), tmp_path_factory.mktemp("repro"))


def test_no_known_defects_left() -> None:
    """The lists of known, unfixed defect classes name only classes with a reproducer here."""
    assert set(KNOWN_OUTCOMES) <= set(REPRODUCERS) and set(KNOWN_CRASHES) <= set(CRASHERS)


@pytest.mark.parametrize("cls", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_OUTCOMES[c]))
                                 if c in KNOWN_OUTCOMES else c for c in REPRODUCERS])
def test_defect_class(cls: str, reproduced: str) -> None:
    """Each class's reproducer raises a documented exception (kv_read of corrupt bytes gives
    what the bytes hold: NaN), as every call must."""
    lines = [line for line in reproduced.splitlines() if line.startswith(cls + " ")]
    assert lines, reproduced
    assert all(line.split()[1] in ("RAISED", "FINE") for line in lines), lines


@pytest.mark.parametrize("cls", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_CRASHES[c][1]))
                                 if c in KNOWN_CRASHES else c for c in CRASHERS])
def test_crash_class(cls: str, tmp_path: Path) -> None:
    """Each reproducer of a call that once killed or hung the process raises instead. (The hang
    ran 2^62 Sinkhorn iterations: any timeout catches it. 30 s rather than 60 keeps a
    regression's run short; 10 s, which includes importing torch, ran out on a busy machine.)"""
    out = run_snippet(CRASHERS[cls], tmp_path, timeout=30 if cls == "mhc-iters-hang" else 60)
    assert out.startswith(f"{cls} RAISED") and "DIED" not in out and "HUNG" not in out, out
