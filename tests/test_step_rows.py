"""``ops.step_rows``: a decode step's window rows in the ring and HCA rows, against the torch form
(``reference.step_rows``) on random steps of many shapes and the edges (origins past the
position, padding rows, tokens outside the batch, narrow and wide tables), CPU and GPU; bad
arguments raise naming them."""

from __future__ import annotations

import pytest
import torch

from dsv4rs import ops, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def random_step(gen: torch.Generator, tokens: int, batch: int, window: int, hca_pages: int, span: int = 5000
                ) -> dict[str, torch.Tensor]:
    pos = torch.randint(0, span, (tokens,), generator=gen)
    seq = torch.randint(0, max(batch, 1), (tokens,), generator=gen) if batch else torch.zeros(tokens, dtype=torch.int64)
    origins = torch.randint(0, span // 2 + 1, (batch,), generator=gen)
    wpages = -(-window // 64) + int(torch.randint(0, 2, (1,), generator=gen))
    return {
        "positions": pos, "token_seq": seq, "origins": origins,
        "window_table": torch.randint(0, 1000, (batch, wpages), generator=gen, dtype=torch.int32),
        "hca_table": torch.randint(0, 1000, (batch, hca_pages), generator=gen, dtype=torch.int32),
    }


def run(step: dict[str, torch.Tensor], device: str, window: int, ratio: int, width: int):
    d = {k: v.to(device) for k, v in step.items()}
    got = ops.step_rows(d["positions"], d["token_seq"], d["origins"], d["window_table"], window, d["hca_table"],
                        ratio, width)
    want = reference.step_rows(step["positions"], step["token_seq"], step["origins"], step["window_table"], window,
                               step["hca_table"], ratio, width)
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,batch,window,ratio,width,hca_pages", [
    (1, 1, 128, 128, 32, 1), (7, 3, 128, 128, 64, 2), (64, 64, 128, 128, 160, 3), (33, 5, 4, 4, 300, 5),
    (5, 2, 65, 3, 1, 1), (200, 17, 128, 128, 0, 1), (3, 1, 1, 1, 70, 4),
])
def test_step_rows_equal_the_torch_form(gen: torch.Generator, device: str, tokens: int, batch: int, window: int,
                                        ratio: int, width: int, hca_pages: int) -> None:
    step = random_step(gen, tokens, batch, window, hca_pages)
    (rows, hca), (want_rows, want_hca) = run(step, device, window, ratio, width)
    assert rows.dtype == hca.dtype == torch.int64 and rows.device.type == device
    assert torch.equal(rows.cpu(), want_rows) and torch.equal(hca.cpu(), want_hca)
    # Not all -1: the cases see rows.
    assert bool((want_rows >= 0).any()) and (width == 0 or bool((want_hca >= 0).any()))


@pytest.mark.parametrize("device", DEVICES)
def test_step_rows_edges(gen: torch.Generator, device: str) -> None:
    """Origins past the position (nothing visible), positions 0 and -1, a padding row as the
    graphs write it (position 0, origin 1), tokens outside the batch, HCA lists as wide as the
    table."""
    window, ratio, width = 128, 128, 256
    step = {
        "positions": torch.tensor([0, 5, 127, 128, 4095, 100, 300, -1, 9000, 9000]),
        "token_seq": torch.tensor([0, 1, 2, 2, 2, 3, 0, 1, 4, -1]),
        "origins": torch.tensor([0, 0, 1, 10_000]),
        "window_table": torch.randint(0, 50, (4, 2), generator=gen, dtype=torch.int32),
        "hca_table": torch.randint(0, 50, (4, 4), generator=gen, dtype=torch.int32),
    }
    (rows, hca), (want_rows, want_hca) = run(step, device, window, ratio, width)
    assert torch.equal(rows.cpu(), want_rows) and torch.equal(hca.cpu(), want_hca)
    assert bool((want_rows[5] == -1).all()) and bool((want_rows[8:] == -1).all()) and bool((want_hca[8:] == -1).all())
    assert int((want_rows[0] >= 0).sum()) == 1 and int((want_rows[4] >= 0).sum()) == window
    assert int((want_hca[4] >= 0).sum()) == 32 and int((want_hca[6] >= 0).sum()) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_step_rows_either_part_alone_and_no_tokens(gen: torch.Generator, device: str) -> None:
    step = random_step(gen, 9, 3, 128, 2)
    d = {k: v.to(device) for k, v in step.items()}
    rows, hca = ops.step_rows(d["positions"], d["token_seq"], d["origins"], d["window_table"], 128)
    assert hca is None and torch.equal(rows.cpu(), reference.step_rows(**step, window=128)[0])
    rows, hca = ops.step_rows(d["positions"], d["token_seq"], d["origins"], hca_table=d["hca_table"], hca_ratio=4,
                              hca_width=70)
    assert rows is None and torch.equal(hca.cpu(), reference.step_rows(
        step["positions"], step["token_seq"], step["origins"], hca_table=step["hca_table"], hca_ratio=4, hca_width=70)[1])
    empty = torch.empty(0, dtype=torch.int64, device=device)
    rows, hca = ops.step_rows(empty, empty, d["origins"], d["window_table"], 128, d["hca_table"], 128, 16)
    assert rows.shape == (0, 128) and hca.shape == (0, 16)


def test_step_rows_refuses_bad_arguments() -> None:
    pos, seq, orig = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    table = torch.zeros(1, 2, dtype=torch.int32)
    cases = [
        ("positions", dict(positions=pos.int())),
        ("positions", dict(positions=torch.zeros(2, 1, dtype=torch.int64))),
        ("token_seq", dict(token_seq=torch.zeros(3, dtype=torch.int64))),
        ("origins", dict(origins=orig.float())),
        ("window_table", dict(window_table=table.long())),
        ("window_table", dict(window_table=torch.zeros(2, 2, dtype=torch.int32))),
        ("window_table", dict(window=129)),
        ("window", dict(window=0)),
        ("hca_table", dict(hca_table=torch.zeros(1, 0, dtype=torch.int32))),
        ("hca_table", dict(hca_table=torch.zeros(3, 1, dtype=torch.int32))),
        ("hca_ratio", dict(hca_ratio=0)),
        ("hca_width", dict(hca_width=-1)),
        ("hca_width", dict(hca_width=129)),  # past the table's 2 pages
        ("hca_width", dict(hca_width=2**40)),  # refused before its output is allocated
        ("window_table", dict(window=2**40)),
    ]
    for name, bad in cases:
        args = dict(positions=pos, token_seq=seq, origins=orig, window_table=table, window=128,
                    hca_table=table, hca_ratio=128, hca_width=4)
        args.update(bad)
        with pytest.raises((ValueError, TypeError), match=f"^{name}: "):
            ops.step_rows(**args)


@pytest.mark.gpu
def test_gpu_step_rows_refuses_tensors_on_two_devices() -> None:
    pos = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="cuda|cpu"):
        ops.step_rows(pos.cuda(), pos, torch.zeros(1, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int32), 128)
