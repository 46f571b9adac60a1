"""``python -m dsv4rs.bench.profile step``: one decode (or prefill) step's kernels, on the CPU (the
demo model)."""

import pytest
import torch

from dsv4rs.bench.profile import main, step_table


def test_step_table_lists_the_steps_operators_with_a_total() -> None:
    lines = step_table("demo", layers=2, batch=2, context=256, device="cpu", steps=2, top=6)
    assert lines[0].startswith("demo x 2 layers, bf16 weights, batch 2, context 256: self CPU time")
    assert lines[1].split() == ["kernel", "a", "step", "us", "a", "step", "share"]
    body, rest, total = lines[2:-2], lines[-2], lines[-1]
    assert len(body) == 6 and rest.startswith("(") and total.startswith("total")
    times = [float(line.split()[-2]) for line in body]
    assert times == sorted(times, reverse=True) and times[-1] > 0
    shares = [float(line.split()[-1].rstrip("%")) for line in body + [rest]]
    assert 99.0 <= sum(shares) <= 101.0  # every operator counted once, in a row or the rest
    assert any(line.startswith("dsv4rs::") for line in lines)  # the ops run in the step
    assert float(total.split()[1]) >= sum(float(line.split()[-3]) for line in body)


def test_prefill_table_lists_a_prefill_steps_operators(capsys: pytest.CaptureFixture) -> None:
    lines = step_table("demo", layers=2, batch=2, device="cpu", steps=2, top=8, prefill=96)
    assert lines[0].startswith("demo x 2 layers, bf16 weights, prefill of 96 tokens x 2: self CPU time")
    body = lines[2:-2]
    shares = [float(line.split()[-1].rstrip("%")) for line in body + [lines[-2]]]
    assert len(body) == 8 and 99.0 <= sum(shares) <= 101.0
    ops = {line.split()[0] for line in body}
    assert any(op.startswith("dsv4rs::") for op in ops) and "aten::mm" in ops  # the projections' matmuls
    assert main(["step", "--device", "cpu", "--layers", "1", "--prefill", "32", "--steps", "1", "--top", "3"]) == 0
    assert "prefill of 32 tokens x 1" in capsys.readouterr().out


def _timeline_rows(lines: list[str]) -> tuple[int, list[list[str]]]:
    at = next(i for i, line in enumerate(lines) if line.startswith("timeline of the last step: "))
    count = int(lines[at].split()[5])
    assert lines[at + 1].split()[:5] == ["#", "start", "us", "us", "gap"]
    rows = [line.split(maxsplit=5) for line in lines[at + 2:]]
    return count, rows


def test_timeline_lists_the_last_steps_operators_in_start_order(capsys: pytest.CaptureFixture) -> None:
    lines = step_table("demo", layers=2, batch=2, context=256, device="cpu", steps=2, top=4, timeline=True)
    assert lines[-1] != "timeline: no events"
    count, rows = _timeline_rows(lines)
    assert count == len(rows) > 50
    assert [int(r[0]) for r in rows] == list(range(count))
    starts = [float(r[1]) for r in rows]
    assert starts[0] == 0.0 and starts == sorted(starts)
    assert all(float(r[2]) >= 0 for r in rows) and sum(float(r[2]) for r in rows) > 0
    assert any(r[5].startswith("dsv4rs::") for r in rows)
    assert main(["step", "--device", "cpu", "--layers", "1", "--steps", "1", "--top", "2", "--timeline"]) == 0
    assert "timeline of the last step" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs,name", [({"device": "tpu"}, "device"), ({"batch": 0}, "batch"),
                                         ({"steps": 0}, "steps"), ({"weights": "fp4"}, "weights"),
                                         ({"prefill": -1}, "prefill")])
def test_step_table_refuses_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}:"):
        step_table(**kwargs)


def test_profile_cli_refuses_unknown_modes() -> None:
    with pytest.raises(SystemExit, match="usage"):
        main(["steps"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_step_table_ends_with_the_steps_span() -> None:
    """On a GPU the table of the replayed step's kernels ends with the step's span (first kernel's
    start to last kernel's end), beside the kernels' summed time, which overlapping launches make
    the larger; both are positive."""
    lines = step_table("demo", layers=2, batch=2, context=256, device="cuda", steps=3, top=6)
    assert lines[0].startswith("demo x 2 layers, bf16 weights, batch 2, context 256: GPU time of the replayed step")
    total, span = lines[-2], lines[-1]
    assert total.startswith("total") and span.startswith("span ")
    assert float(span.split()[1]) > 0 and f"sum to {float(total.split()[-1]):.1f}" in span


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_timeline_lists_one_replayed_steps_kernels() -> None:
    """On a GPU the timeline holds one replay's kernels (the table's launches a step), in start
    order, each on a stream, the side stream's among them."""
    lines = step_table("demo", layers=2, batch=2, context=256, device="cuda", steps=3, top=100, timeline=True)
    count, rows = _timeline_rows(lines)
    table = lines[2:lines.index(next(line for line in lines if line.startswith("total")))]
    assert count == len(rows) == round(sum(float(line.split()[-3]) for line in table))
    starts = [float(r[1]) for r in rows]
    assert starts[0] == 0.0 and starts == sorted(starts)
    assert len({r[4] for r in rows}) >= 2  # the layers' side chains run on a second stream
