"""Shared test setup: the `gpu` marker skips when no CUDA GPU is usable, and a seeded generator."""

from __future__ import annotations

import zlib

import pytest
import torch


def gpu_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test's name: fresh inputs per test, reproducible runs."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny DeepSeek-V4 checkpoint with MTP, a BPE tokenizer and a chat template (tests/checkpoints.py)."""
    from checkpoints import write_checkpoint

    path = str(tmp_path_factory.mktemp("tiny-v4"))
    write_checkpoint(path)
    return path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes of every tensor the checkpoint loader reads, by checkpoint key (each key read at most
    once): whole tensors, row slices and column slices of the shards."""
    from dsv4rs.model.loader import _Shards

    seen: dict[str, int] = {}
    get, rows, cols = _Shards.get, _Shards.rows, _Shards.cols

    def record(key: str, t: torch.Tensor) -> torch.Tensor:
        assert key not in seen, f"{key} read twice"
        seen[key] = t.numel() * t.element_size()
        return t

    monkeypatch.setattr(_Shards, "get", lambda self, key: record(key, get(self, key)))
    monkeypatch.setattr(_Shards, "rows", lambda self, key, r: record(key, rows(self, key, r)))
    monkeypatch.setattr(_Shards, "cols", lambda self, key, r: record(key, cols(self, key, r)))
    return seen


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's CPU ops on one thread for the module. The text tests check behavior, not speed, and
    step a tiny model thousands of times: on a 2-core machine shared with other work, torch's
    spinning intra-op pool made each tiny step up to 10x slower than one thread does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
