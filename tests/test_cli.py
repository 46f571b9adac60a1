"""`dsv4rs info` runs on any machine and says what the build carries."""

from __future__ import annotations

import subprocess
import sys

import dsv4rs
from dsv4rs import _core, cli


def test_info_lists_kernels_and_never_fails(capsys) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"dsv4rs {dsv4rs.__version__}" in out
    build = _core.build_info()
    assert build["kernel_modules"], "the default build embeds CUDA kernels"
    assert "sm_90" in build["gpu_targets"]
    assert "CUDA kernels embedded" in out and "CUDA driver" in out


def test_import_does_not_touch_cuda() -> None:
    code = "import dsv4rs, dsv4rs.ops, torch; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_console_script_entry() -> None:
    out = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "info"], capture_output=True, text=True, check=True)
    assert "GPU targets" in out.stdout or "CPU-only" in out.stdout


def test_bench_runs_on_the_cpu_and_prints_the_roofline_table(capsys, monkeypatch) -> None:
    from dsv4rs.bench import harness

    # One small case per suite keeps this a smoke test of the harness, not a benchmark.
    monkeypatch.setattr(harness.Bench, "pick", lambda self, gpu, quick, cpu: cpu[:1])
    assert cli.main(["bench", "--device", "cpu", "--quick", "--only", "formats", "indexer", "cache", "mhc"]) == 0
    out = capsys.readouterr().out
    assert "ceilings on cpu" in out and "roofline" in out
    assert "kv_write n=4096" in out and "indexer flash ctx=32K b=1" in out and "rope T=64" in out
    assert "append decode, 1000 seqs in one call" in out and "M forks/s" in out
    assert "mhc_mix T=64 4x4096" in out and "mhc_pre T=1 4x4096" in out


def test_bench_per_call_runs_every_call_in_order_each_run() -> None:
    """Bench.per_call_ms runs fn(0) .. fn(calls - 1) in order on each run (warm-up included)."""
    from dsv4rs.bench import harness

    seen: list[int] = []
    bench = harness.Bench("cpu", quick=True)
    per_call = bench.per_call_ms(seen.append, 5, iters=4)
    assert seen == list(range(5)) * (3 + 4)  # 3 warm-up runs, then 4 timed
    assert per_call > 0


def test_other_commands_start_without_torch() -> None:
    code = "import sys, dsv4rs.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
