"""The ``dsv4rs`` command against a closed pipe, a full disk, bad paths, huge numbers and missing
optional packages: one line on stderr and exit status 1 (or 2 for bad arguments), never a
traceback; ``--help``, ``--version`` and ``help(dsv4rs)``."""

from __future__ import annotations

import os
import pydoc
import subprocess
import sys

import pytest

import dsv4rs
from dsv4rs import cli


def dsv4rs_cmd(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4rs.cli", *args], capture_output=True, text=True, timeout=120,
                          **kw)


def one_line_error(err: str) -> str:
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_help_describes_the_commands_and_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "cost", "demo", "bench", "plan"):
        assert f"\n  {command} " in out, command
    assert "--version" in out and "exit with\nstatus 2" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"dsv4rs {dsv4rs.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--no-check" in capsys.readouterr().out


def test_package_help_names_the_modules() -> None:
    text = pydoc.render_doc(dsv4rs, renderer=pydoc.plaintext)
    for module in ("dsv4rs.ops", "dsv4rs.cache", "dsv4rs.model", "dsv4rs.runtime", "dsv4rs.reference", "dsv4rs.cost"):
        assert module in text, module


def test_closed_pipe_ends_quietly() -> None:
    """``dsv4rs cost | head -1``: the reader is gone before the command writes."""
    for args in (["cost"], ["cost", "--json"], ["info"]):
        proc = subprocess.Popen([sys.executable, "-m", "dsv4rs.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # python starts slower than this
        err = proc.stderr.read()
        proc.stderr.close()
        assert proc.wait(timeout=120) == 1, err
        assert err == "", err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk() -> None:
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "cost"], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    assert out.returncode == 1
    assert one_line_error(out.stderr) == "dsv4rs: No space left on device (writing the output)"
    out = dsv4rs_cmd("cost", "--plot", "/dev/full")
    assert out.returncode == 1 and "v4-pro" in out.stdout  # the table, then the error
    assert one_line_error(out.stderr) == "dsv4rs: --plot: cannot write /dev/full (No space left on device)"


def test_plot_paths(tmp_path, capsys) -> None:
    for path, message in [
        ("/nonexistent/dir/x.png", "--plot: the folder /nonexistent/dir does not exist"),
        (str(tmp_path), f"--plot: {tmp_path} is a directory"),
        (str(tmp_path / "x.nosuchformat"), "names no image format matplotlib writes"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(["cost", "--plot", path])
        assert e.value.code == 2
        out, err = capsys.readouterr()
        assert out == "" and message in one_line_error(err), err  # checked before the table prints
    path = tmp_path / "cost.svg"
    assert cli.main(["cost", "--json", "--plot", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("[") and f"wrote the plot to {path}" in err
    assert path.read_bytes().lstrip().startswith(b"<?xml")


def test_plot_without_matplotlib(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit) as e:
        cli.main(["cost", "--plot", "cost.png"])
    assert e.value.code == 2
    err = one_line_error(capsys.readouterr().err)
    assert "--plot needs matplotlib, which is not installed: pip install 'dsv4rs[plot]'" in err
    from dsv4rs import cost

    with pytest.raises(ImportError, match=r"dsv4rs\[plot\]"):
        cost.plot("cost.png")


def test_context_takes_k_and_m(capsys) -> None:
    assert cli.main(["cost", "--context", "128K", "--context", "1m", "--context", "5000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[2:5]] == ["128K", "1M", "5000"]
    for bad, message in [("12Q", "expected a number of tokens such as 4096, 128K or 1M, got '12Q'"),
                         ("K", "got 'K'"), (str(10**30), "expected at most 1,099,511,627,776 tokens")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["cost", "--context", bad])
        assert e.value.code == 2
        assert message in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(("args", "message"), [
    (["demo", "--prompt-len", str(10**12)], "argument --prompt-len: expected an int in [1, 65,536], got 1,000,000,000,000"),
    (["demo", "--new-tokens", "0"], "argument --new-tokens: expected an int in [1, 4,096], got 0"),
    (["demo", "--seed", str(2**70)], "argument --seed: expected an int in [0, 4,294,967,295]"),
    (["demo", "--seed", "-1"], "argument --seed: expected an int in [0, 4,294,967,295], got -1"),
    (["bench", "--batch", "1,0"], "argument --batch: expected an int in [1, 4,096], got 0"),
    (["bench", "--context", str(10**9)], "argument --context: expected an int in [1, 1,048,576]"),
    (["bench", "--layers", str(10**9)], "argument --layers: expected an int in [1, 1,024]"),
    (["plan", "--gpus", "0"], "argument --gpus: expected an int in [1, 65,536], got 0"),
    (["plan", "--max-len", "10T"], "argument --max-len: expected a number of tokens"),
    (["plan", "--max-sequences", str(10**12)], "argument --max-sequences: expected an int in [1, 16,777,216]"),
    (["plan", "--device-memory", "1e40"], "argument --device-memory: expected a size of at most 1 EiB"),
    (["plan", "--token-budget", "-5"], "argument --token-budget: expected an int in [1, 16,777,216], got -5"),
])
def test_out_of_range_numbers_are_argument_errors(capsys, args: list[str], message: str) -> None:
    """Refused by the parser (status 2) before anything is built or allocated."""
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_console_errors_in_a_subprocess_have_no_traceback() -> None:
    for args in (["demo", "--seed", str(2**70)], ["cost", "--plot", "/nonexistent/x.png"], ["nosuchcommand"], []):
        out = dsv4rs_cmd(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert one_line_error(out.stderr).startswith("dsv4rs"), out.stderr


def test_demo_without_the_check() -> None:
    out = dsv4rs_cmd("demo", "--device", "cpu", "--prompt-len", "16", "--new-tokens", "2", "--no-check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tokens/s" in out.stdout and "checking" not in out.stdout
    assert "not checked against the float64 reference (--no-check)" in out.stdout


def test_demo_check_reports_progress_and_time() -> None:
    out = dsv4rs_cmd("demo", "--device", "cpu", "--prompt-len", "16", "--new-tokens", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "  [1/7] the unquantized engine run: " in out.stdout and "  [7/7] float64 reference, sequence 1" in out.stdout
    assert "the check took " in out.stdout and out.stdout.strip().endswith("OK")


def test_bench_roofline_names_the_ceilings_spread() -> None:
    from dsv4rs.bench.harness import Ceilings, Row, format_table

    c = Ceilings(copy_gbs=10.0, matmul_tflops=1.0, copy_slowest_gbs=4.0, matmul_slowest_tflops=0.5, runs=(10, 5))
    rows = [Row("in cache", ms=0.5, bytes=1e7, flops=0.0, eager_ms=None), Row("slow", ms=10.0, bytes=1e7, flops=0.0,
                                                                               eager_ms=2.0)]
    table = format_table(rows, c, "cpu")
    assert table.splitlines()[0] == ("ceilings on cpu: copy 10 GB/s, matmul 1.00 TFLOP/s (the fastest of 10 and 5 "
                                     "runs; the slowest: 4 GB/s, 0.50 TFLOP/s)")
    assert "200%" in table and "10%" in table
    assert table.splitlines()[-1].startswith("roofline above 100% (in cache): ")
