"""A decode step's candidate rows in one kernel, CPU and GPU: the sliding window's rows in each
sequence's ring and the HCA layers' compressed rows, from the step's integers (docs/runtime.md,
"One step"), where the torch form ran 25 tensor ops a step."""

from __future__ import annotations

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream
from dsv4rs.ops._checks import ndim, positive
from dsv4rs.ops.formats import PAGE_ROWS


@torch.library.custom_op("dsv4rs::step_rows", mutates_args=())
def _step_rows(positions: torch.Tensor, token_seq: torch.Tensor, origins: torch.Tensor,
               window_table: torch.Tensor | None, window: int, hca_table: torch.Tensor | None, hca_ratio: int,
               hca_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    t, dev = positions.shape[0], positions.device
    rows = torch.empty(t, window if window_table is not None else 0, dtype=torch.int64, device=dev)
    hca = torch.empty(t, hca_width if hca_table is not None else 0, dtype=torch.int64, device=dev)
    w = (spec("window_table", window_table), spec("window_rows", rows)) if window_table is not None else (None, None)
    h = (spec("hca_table", hca_table), spec("hca_rows", hca)) if hca_table is not None else (None, None)
    _core.step_rows(spec("positions", positions), spec("token_seq", token_seq), spec("origins", origins), *w, *h,
                    hca_ratio, stream(positions))
    return rows, hca


@_step_rows.register_fake
def _(positions: torch.Tensor, token_seq: torch.Tensor, origins: torch.Tensor, window_table: torch.Tensor | None,
      window: int, hca_table: torch.Tensor | None, hca_ratio: int, hca_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = positions.shape[0]
    return (positions.new_empty(t, window if window_table is not None else 0),
            positions.new_empty(t, hca_width if hca_table is not None else 0))


def step_rows(positions: torch.Tensor, token_seq: torch.Tensor, origins: torch.Tensor,
              window_table: torch.Tensor | None = None, window: int = 0, hca_table: torch.Tensor | None = None,
              hca_ratio: int = 1, hca_width: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The cache rows each token of a step attends, as physical rows (``page * 64 + offset``,
    ``-1``: none). For token ``t`` of batch row ``b = token_seq[t]`` at position
    ``p = positions[t]``:

    - window ``j`` in ``[0, window)``: position ``q = p - window + 1 + j``; ``-1`` where
      ``q < origins[b]``, else ring row ``r = max(q, 0) % window`` at
      ``window_table[b, r // 64] * 64 + r % 64``;
    - HCA ``k`` in ``[0, hca_width)``: ``-1`` where ``k >= (p + 1) // hca_ratio`` (the entries
      the token sees), else ``hca_table[b, k // 64] * 64 + k % 64``.

    A token whose ``b`` is outside ``[0, B)`` gets ``-1`` throughout (no synchronization to raise
    on a GPU); int64 sums wrap as torch's do.

    Args:
        positions, token_seq: ``int64 [T]``.
        origins: ``int64 [B]``: the first position each sequence holds in its ring.
        window_table: ``int32 [B, P]`` ring page tables, ``64 P >= window``; with
        window: ``>= 1`` rows. Leave both out for no window rows.
        hca_table: ``int32 [B, P' >= 1]`` HCA page tables; with
        hca_ratio: ``>= 1`` tokens an entry, and
        hca_width: ``0 <= hca_width <= 64 P'`` candidates a token. Leave the table out for no HCA rows.

    Returns:
        ``(window_rows int64 [T, window] or None, hca_rows int64 [T, hca_width] or None)`` on the
        inputs' device: one kernel on a GPU (capturable in a CUDA graph).
    """
    positions, token_seq, origins = (as_tensor(n, t) for n, t in
                                     (("positions", positions), ("token_seq", token_seq), ("origins", origins)))
    ndim("positions", positions, 1)
    # The outputs' widths are checked against their tables before the outputs are allocated.
    window_table = None if window_table is None else as_tensor("window_table", window_table)
    if window_table is None:
        window = 0
    else:
        ndim("window_table", window_table, 2)
        window = positive("window", window)
        if PAGE_ROWS * window_table.shape[1] < window:
            raise ValueError(f"window_table: {window_table.shape[1]} pages a sequence hold fewer than the "
                             f"window's {window} rows")
    if hca_table is None:
        hca_ratio, hca_width = 1, 0
    else:
        hca_table = as_tensor("hca_table", hca_table)
        ndim("hca_table", hca_table, 2)
        if hca_table.shape[1] == 0:
            raise ValueError("hca_table: expected at least one page a sequence, got 0")
        hca_ratio = positive("hca_ratio", hca_ratio)
        most = PAGE_ROWS * hca_table.shape[1]
        if isinstance(hca_width, bool) or not isinstance(hca_width, int) or not 0 <= hca_width <= most:
            raise ValueError(f"hca_width: expected an int in [0, {most}] (the rows of hca_table's "
                             f"{hca_table.shape[1]} pages), got {hca_width!r}")
    rows, hca = _step_rows(positions, token_seq, origins, window_table, window, hca_table, hca_ratio, hca_width)
    return (None if window_table is None else rows), (None if hca_table is None else hca)
