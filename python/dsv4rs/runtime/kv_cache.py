"""The device tensors of a model's paged KV cache (docs/model.md section 5), in the layout the
allocator's page ids address (see :mod:`dsv4rs.cache`): one tensor per family and kind of row,
``[layers of the family, pages, ...]``, each layer's slice in the layout of :mod:`dsv4rs.ops`."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from dsv4rs import ops
from dsv4rs.model.config import CSA, HCA, INDEX_DIM, SWA, V4Config
from dsv4rs.model.layers.attention import LayerCache


class KVCache:
    """Window rings, CSA rows and indexer keys, HCA rows and compressor states of every layer.

    Args:
        cfg: the model.
        pages: pages per allocator family (``"window"``, ``"csa"``, ``"hca"``, ``"state"``).
        device: where the tensors live.
        key_format: ``"fp4"``/``"fp8"``: 584-byte FP8 entries and quantized indexer keys (what
            production stores); ``None``: plain rows of ``row_dtype``.
        row_dtype: the dtype of plain rows (float32 on the CPU, bfloat16 on a GPU, whose kernels
            read those).
    """

    def __init__(self, cfg: V4Config, pages: Mapping[str, int], device: torch.device, key_format: str | None,
                 row_dtype: torch.dtype) -> None:
        self.device, self.key_format, self.row_dtype = device, key_format, row_dtype
        self.family_index: list[int] = []  # each layer's index among the layers of its type
        counts = {SWA: 0, CSA: 0, HCA: 0}
        for t in cfg.layer_types:
            self.family_index.append(counts[t])
            counts[t] += 1
        self.layer_types = cfg.layer_types
        n_csa, n_hca = counts[CSA], counts[HCA]
        self.window = self._rows(len(cfg.compress_ratios), pages["window"], cfg.head_dim)
        self.csa = self._rows(n_csa, pages["csa"], cfg.head_dim)
        self.csa_keys = self._rows(n_csa, pages["csa"], INDEX_DIM, keys=True)
        self.hca = self._rows(n_hca, pages["hca"], cfg.head_dim)
        r_csa, r_hca, d, slots = cfg.compress_rates[0], cfg.compress_rates[1], cfg.head_dim, pages["state"]
        f32 = torch.float32
        self.csa_state = torch.zeros(n_csa, slots, 2, 2 * r_csa, 2 * d, dtype=f32, device=device)
        self.index_state = torch.zeros(n_csa, slots, 2, 2 * r_csa, 2 * INDEX_DIM, dtype=f32, device=device)
        self.hca_state = torch.zeros(n_hca, slots, 2, r_hca, d, dtype=f32, device=device)
        self.layers = [self._layer(i) for i in range(len(cfg.compress_ratios))]

    def _rows(self, layers: int, pages: int, dim: int, keys: bool = False) -> torch.Tensor:
        """``[layers, pages, ...]``: quantized pages of 64 rows (KV entries, or with ``keys``
        indexer keys), or plain ``[.., 64, dim]`` rows."""
        if self.key_format is None:
            return torch.zeros(layers, pages, ops.PAGE_ROWS, dim, dtype=self.row_dtype, device=self.device)
        row_bytes = ops.INDEX_KEY_BYTES[self.key_format] if keys else ops.MAIN_ENTRY_BYTES
        return torch.zeros(layers, pages, ops.PAGE_ROWS * row_bytes, dtype=torch.uint8, device=self.device)

    def _layer(self, i: int) -> LayerCache:
        """Layer ``i``'s slice (layers past the model's, the MTP block's, have a window only)."""
        window = self.window[i]
        if i >= len(self.layer_types) or self.layer_types[i] == SWA:
            return LayerCache(window)
        j = self.family_index[i]
        if self.layer_types[i] == HCA:
            return LayerCache(window, self.hca[j], state=self.hca_state[j])
        return LayerCache(window, self.csa[j], self.csa_keys[j], self.csa_state[j], self.index_state[j],
                          self.key_format)

    def new_staging(self, rows: int) -> torch.Tensor:
        """A scratch cache of at least ``rows`` window rows, in the window ring's format."""
        pages = -(-rows // ops.PAGE_ROWS)
        return torch.zeros(pages, *self.window.shape[2:], dtype=self.window.dtype, device=self.device)

    def copy_pages(self, copies: Mapping[str, torch.Tensor]) -> None:
        """Copy-on-write: page ``src`` to ``dst`` in every layer of the family, for each
        ``(src, dst)`` pair of ``copies[family]`` (``int64 [k, 2]``)."""
        groups = {"window": (self.window,), "csa": (self.csa, self.csa_keys), "hca": (self.hca,),
                  "state": (self.csa_state, self.index_state, self.hca_state)}
        for family, pairs in copies.items():
            if pairs.numel():
                src, dst = (pairs[:, i].to(self.device, non_blocking=True) for i in (0, 1))
                for t in groups[family]:
                    t[:, dst] = t[:, src]

    def reset_state(self, slot: int) -> None:
        """A fresh compressor state in ``slot`` for every layer: kv zeros, scores ``-inf``."""
        for state in (self.csa_state, self.index_state, self.hca_state):
            state[:, slot, 0] = 0
            state[:, slot, 1] = -math.inf
