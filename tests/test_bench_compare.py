"""benches/compare.py: the bench table's rows read from a log, two builds side by side."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "compare.py"

LOG = """ceilings on NVIDIA H200 (attention kernel: wgmma): copy 4026 GB/s, matmul 740.96 TFLOP/s
dsv4rs bench:  50%|#####     | 1/2 [00:01<00:01, linear]\rdsv4rs bench: 100%|##########| 2/2\r
                         case     ms  GB/s  TFLOP/s  roofline  eager ms  speedup
           fp8 linear q_a M=1  {qa}   622     1.24       15%     0.007     1.0x
decode v4-flash fp8/mxfp4 b=1 ctx=4K per layer   {dec}   579     0.00       14%     4.329    11.0x
             only in this log  0.500    10     0.00        1%         -        -
"""


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path)


def test_compare_prints_each_shared_case_with_medians_and_ratio(tmp_path: Path) -> None:
    logs = {}
    for name, qa, dec in [("a1", "0.008", "0.400"), ("a2", "0.010", "0.420"), ("b1", "0.004", "0.380"),
                          ("b2", "0.006", "0.390")]:
        text = LOG.format(qa=qa, dec=dec)
        if name != "a1":
            text = text.replace("only in this log", "other case")
        (tmp_path / f"{name}.log").write_text(text)
        logs[name] = str(tmp_path / f"{name}.log")
    out = run(tmp_path, f"main={logs['a1']},{logs['a2']}", f"next={logs['b1']},{logs['b2']}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["case", "main1", "main2", "next1", "next2", "main", "median", "next", "median",
                                "next/main"]
    qa = next(line for line in lines if "q_a M=1" in line).split()[-7:]
    assert qa == ["0.008", "0.010", "0.004", "0.006", "0.009", "0.005", "0.56"]
    dec = next(line for line in lines if "b=1 ctx=4K per layer" in line).split()[-3:]
    assert dec == ["0.410", "0.385", "0.94"]
    assert not any("only in this log" in line or "other case" in line for line in lines)


def test_compare_refuses_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text(LOG.format(qa="0.007", dec="0.4"))
    log = str(tmp_path / "a.log")
    missing = run(tmp_path, f"a={log}", "b=nope.log")
    assert missing.returncode != 0 and "b: no such log 'nope.log'" in missing.stderr
    assert "LABEL=LOG" in run(tmp_path, "a", f"b={log}").stderr
    assert "two builds" in run(tmp_path, f"a={log}").stderr
    (tmp_path / "empty.log").write_text("nothing here\n")
    empty = run(tmp_path, f"a={log}", f"b={tmp_path / 'empty.log'}")
    assert empty.returncode == 1 and "share no bench rows" in empty.stderr
