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
