"""The format constants the Rust core exports, and the ops rope (CPU and GPU), copy_rows and
index_key_round_trip against the CPU op and the float64 reference. GPU tests carry the `gpu`
marker."""

from __future__ import annotations

import pytest
import torch

from dsv4rs import _core, ops
from dsv4rs import reference as ref

gpu = pytest.mark.gpu


# ---------------------------------------------------------------------------------------------
# Format constants


def test_format_constants_come_from_the_core() -> None:
    want = {"PAGE_ROWS": 64, "ENTRY_DIM": 512, "NOPE_DIM": 448, "ROPE_DIM": 64, "INDEX_DIM": 128,
            "MAIN_ENTRY_BYTES": 584, "MAIN_DATA_BYTES": 576, "FP8_BLOCK": 64, "FP4_BLOCK": 32}
    for name, value in want.items():
        assert getattr(_core, name) == value and getattr(ops, name) == value, name
        assert type(getattr(ops, name)) is int, name
    assert _core.INDEX_KEY_BYTES == ops.INDEX_KEY_BYTES == {"fp4": 68, "fp8": 132}
    for name in ("PAGE_ROWS", "ENTRY_DIM", "NOPE_DIM", "INDEX_DIM", "FP8_BLOCK", "FP4_BLOCK"):
        assert getattr(ref, name) == getattr(ops, name), name
    assert ops.NOPE_DIM + ops.ROPE_DIM == ops.ENTRY_DIM
    assert ops.MAIN_DATA_BYTES == ops.NOPE_DIM + 2 * ops.ROPE_DIM
    assert ops.new_kv_cache(2).shape == (2, ops.PAGE_ROWS * ops.MAIN_ENTRY_BYTES)
    for fmt, row in ops.INDEX_KEY_BYTES.items():
        assert ops.new_index_key_cache(1, fmt).shape == (1, ops.PAGE_ROWS * row)
