"""The MoE sublayer (docs/model.md section 7): sqrt-softplus routing (learned top-k with a bias
correction, or a frozen token-id table on hash layers), clamped SwiGLU routed experts and the
always-on shared expert."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from dsv4rs import ops
from dsv4rs.model.config import V4Config
from dsv4rs.model.layers.norm import linear
from dsv4rs.model.layers import streams
from dsv4rs.model.layers.packed import project
from dsv4rs.model.layers.quant import FP4_BLOCK, retile_


class MLP(nn.Module):
    """Clamped SwiGLU (the shared expert): ``down(silu(min(gate x, l)) * clamp(up x, -l, l))``."""

    def __init__(self, cfg: V4Config, inner: int) -> None:
        super().__init__()
        self.limit = cfg.swiglu_limit
        self.gate_proj = linear(cfg.hidden_size, inner)
        self.up_proj = linear(cfg.hidden_size, inner)
        self.down_proj = linear(inner, cfg.hidden_size)

    def input_groups(self) -> list[tuple[nn.Module, ...]]:
        """``W_gate`` with ``W_up``: one GEMM where packed (:mod:`.packed`)."""
        return [(self.gate_proj, self.up_proj)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The clamps, SiLU and product in one op (:func:`dsv4rs.ops.swiglu`, float32 math); a
        float64 model in torch ops."""
        gate, up = project(x, self.input_groups()[0])
        if gate.dtype == torch.float64:
            h = F.silu(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)
        else:
            h = ops.swiglu(gate, up, self.limit)
        return self.down_proj(h)


def expert_range(cfg: V4Config, experts: range | None) -> range:
    """``experts`` checked against the config (contiguous, within ``[0, n_routed_experts)``), or
    all of them."""
    n = cfg.n_routed_experts
    if experts is None:
        return range(n)
    if not isinstance(experts, range) or experts.step != 1 or not 0 <= experts.start <= experts.stop <= n:
        raise ValueError(f"experts: expected a contiguous range within [0, {n}), got {experts!r}")
    return experts


class Experts(nn.Module):
    """Routed experts, stacked: ``gate_up_proj [E, 2 I, d]`` (gate rows first), ``down_proj [E, d, I]``.

    With ``quantized=True`` the experts are held as DeepSeek ships them, MXFP4 (two e2m1 codes a
    byte, low nibble first, one UE8M0 scale code per 32 values), in ``uint8`` buffers instead:
    ``gate_up [E, 2 I, d / 2]`` (gate rows, DeepSeek's ``w1``, then up rows, ``w3``),
    ``gate_up_scale [E, 2 I, d / 32]``, ``down [E, d, I / 2]`` (``w2``) and
    ``down_scale [E, d, I / 32]``, run by the fused :func:`dsv4rs.ops.moe_experts` with the
    activations rounded as ``act`` says (:data:`~dsv4rs.model.layers.quant.ACT_MODES`).

    With ``experts`` (a contiguous range of expert ids) the module holds only those, ``E`` being
    their count and ``first`` the id of the first (expert parallelism: the other ranks hold the
    rest, see :mod:`dsv4rs.parallel`)."""

    QUANTIZED = ("gate_up", "gate_up_scale", "down", "down_scale")
    """The buffers of quantized experts."""

    def __init__(self, cfg: V4Config, experts: range | None = None, quantized: bool = False) -> None:
        super().__init__()
        held = expert_range(cfg, experts)
        e, i, d = len(held), cfg.moe_intermediate_size, cfg.hidden_size
        self.first, self.total = held.start, cfg.n_routed_experts
        self.limit = cfg.swiglu_limit
        self.quantized, self.act = quantized, "fp8"
        self.layout = "rows"  # how gate_up and down hold their bytes (tile(): "tiles")
        self._register_state_dict_hook(_rows_in_state_dict)
        self._register_load_state_dict_pre_hook(_tiles_from_state_dict, with_module=True)
        if quantized:
            for name, k in (("hidden_size", d), ("moe_intermediate_size", i)):
                if k % FP4_BLOCK:
                    raise ValueError(f"{name}: MXFP4 experts need a multiple of {FP4_BLOCK}, got {k}")
            u8 = torch.uint8
            self.register_buffer("gate_up", torch.zeros(e, 2 * i, d // 2, dtype=u8))
            self.register_buffer("gate_up_scale", torch.zeros(e, 2 * i, d // FP4_BLOCK, dtype=u8))
            self.register_buffer("down", torch.zeros(e, d, i // 2, dtype=u8))
            self.register_buffer("down_scale", torch.zeros(e, d, i // FP4_BLOCK, dtype=u8))
        else:
            self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, d))
            self.down_proj = nn.Parameter(torch.zeros(e, d, i))
        self.exchange = None  # the all-to-all with the other ranks' experts (dsv4rs.parallel.attach)

    @property
    def held(self) -> int:
        """How many experts this module holds."""
        return (self.gate_up if self.quantized else self.gate_up_proj).shape[0]

    @property
    def storage(self) -> str:
        """How the weights are held: ``"mxfp4"`` or the dtype's name."""
        return "mxfp4" if self.quantized else str(self.gate_up_proj.dtype).removeprefix("torch.")

    def keep(self, experts: range) -> None:
        """Keeps experts ``experts`` (ids counted from 0 of the held ones' first, i.e. global ids
        when the module holds every expert) only: copies of their rows, so the whole tensors can
        be freed."""
        names = self.QUANTIZED if self.quantized else ("gate_up_proj", "down_proj")
        for name in names:
            part = getattr(self, name).detach()[experts.start : experts.stop].clone()
            setattr(self, name, part if self.quantized else nn.Parameter(part, requires_grad=False))
        self.first += experts.start

    def tile(self) -> bool:
        """Holds the MXFP4 experts in :func:`dsv4rs.ops.weight_tiles`'s layout, which the GPU's fused
        MoE reads in whole kilobytes (in place, a few MB at a time). The
        state dict still gives DeepSeek's rows. Returns whether the experts are in tiles now (not
        for bf16 experts, or widths that are no whole tiles: rows a multiple of 64, K of 128)."""
        if not self.quantized:
            return False
        if self.layout == "tiles":
            return True
        if any(w.shape[-2] % 64 or w.shape[-1] % 64 for w in (self.gate_up, self.down)):
            return False
        retile_(self.gate_up, False, True)
        retile_(self.down, False, True)
        self.layout = "tiles"
        return True

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] expert_{idx[t, k]}(x_t)``. Quantized experts run in the fused
        op, which waits for nothing on the host; with bfloat16 weights every expert runs in one
        grouped GEMM per projection and nothing waits for the host either (on a GPU the step can
        be captured in a CUDA graph); otherwise one matmul per expert hit. Under expert
        parallelism the pairs go to the ranks that hold their experts and back."""
        if self.exchange is not None:
            return self.exchange(self, x, idx, weights)
        if self.held != self.total:
            raise RuntimeError(f"Experts: this module holds experts [{self.first}, {self.first + self.held}) "
                               f"of {self.total}; attach the other ranks with dsv4rs.parallel.attach")
        return self._run(x, idx, weights)

    def holds(self, idx: torch.Tensor) -> torch.Tensor:
        """Whether each global expert id of ``idx`` is one this module holds (a bool tensor)."""
        return (idx >= self.first) & (idx < self.first + self.held)

    def held_sum(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] expert_{idx[t, k]}(x_t)`` in float32 ``[T, d]`` over the pairs whose
        experts this module holds (``idx``: global ids); the other pairs add nothing (tensor
        parallelism: every rank has every token; expert parallelism: the rows an exchange brings,
        each with all its choices). Every pair goes to one call, the other ranks' pairs as id -1
        (no expert), so nothing waits for the host. No tokens (an idle rank's step) or no experts
        held: zeros."""
        tokens, k = idx.shape
        if self.held == 0 or tokens == 0:
            return torch.zeros(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        return self._run(x.float(), torch.where(self.holds(idx), idx - self.first, -1), weights)

    def _run(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every form: ``idx`` counted from :attr:`first`, -1 a pair that adds nothing."""
        if self.quantized:
            return ops.moe_experts(x, idx, weights.float(), self.gate_up, self.gate_up_scale, self.down,
                                   self.down_scale, self.limit, self.act, layout=self.layout)
        if self.gate_up_proj.dtype == torch.bfloat16:
            return self._grouped(x, idx, weights)
        if x.is_cuda and self.gathers(idx.numel()):
            return self._gathered(x, idx, weights)
        return self._per_expert(x, idx, weights)

    GATHER_BYTES = 64 << 20
    """Most bytes of expert weights :meth:`_gathered` copies (one copy per (token, choice))."""

    def gathers(self, pairs: int) -> bool:
        """Whether ``pairs`` (token, choice) pairs take the gathered path (float32 experts on a
        GPU, copies small enough): it reads no counts on the host, so it can be captured."""
        (_, a, b), (_, c, d) = self.gate_up_proj.shape, self.down_proj.shape
        per_pair = (a * b + c * d) * self.gate_up_proj.element_size()
        return pairs * per_pair <= self.GATHER_BYTES

    def capturable(self, tokens: int, k: int) -> bool:
        """Whether a step of ``tokens`` tokens (``k`` choices each) runs without host reads."""
        return self.quantized or self.gate_up_proj.dtype == torch.bfloat16 or self.gathers(tokens * k)

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)

    def _grouped(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The (token, choice) pairs sorted by expert, two grouped GEMMs over the experts' row
        ranges, then each token's choices summed in float32 in their routing order
        (deterministic: no atomics). Pairs of id -1 sort last, past every expert's range, and
        add nothing (the GEMMs leave those rows unwritten: they are masked, not multiplied)."""
        tokens, k = idx.shape
        experts = self.gate_up_proj.shape[0]
        key = idx.flatten().remainder(experts + 1)  # -1 becomes ``experts``: past every expert's rows
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(experts + 1, dtype=torch.int32, device=x.device).scatter_add_(
            0, key, torch.ones_like(key, dtype=torch.int32))
        ends = counts[:experts].cumsum(0, dtype=torch.int32)
        rows = x.to(torch.bfloat16)[order // k]
        h = self._swiglu(F.grouped_mm(rows, self.gate_up_proj.transpose(-2, -1), offs=ends))
        y = F.grouped_mm(h, self.down_proj.transpose(-2, -1), offs=ends)
        y = torch.where(key[order, None] < experts, y, 0)
        unsorted = torch.empty_like(y).index_copy_(0, order, y).view(tokens, k, -1)
        return (unsorted.float() * weights[..., None].float()).sum(1).to(x.dtype)

    def _gathered(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each (token, choice) pair's expert weights gathered, one batched matmul per
        projection, the choices summed in routing order (a pair of id -1 gathers expert 0 and is
        masked)."""
        flat = idx.flatten()
        valid = flat >= 0
        flat = flat.clamp(min=0)
        rows = x.repeat_interleave(idx.shape[1], dim=0)[:, :, None]
        h = self._swiglu(torch.bmm(self.gate_up_proj[flat].to(x.dtype), rows)[..., 0])
        y = torch.bmm(self.down_proj[flat].to(x.dtype), h[:, :, None])[..., 0]
        y = torch.where(valid[:, None], y, 0).view(*idx.shape, -1)
        return (y * weights[..., None].to(x.dtype)).sum(1)

    def _per_expert(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        experts = self.gate_up_proj.shape[0]
        flat = torch.where(idx.flatten() >= 0, idx.flatten(), experts)  # -1: past the last expert, skipped
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=experts + 1).tolist()[:experts]
        tokens = order // idx.shape[1]
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start : start + n]
            t = tokens[start : start + n]
            start += n
            h = self._swiglu(F.linear(x[t], self.gate_up_proj[expert].to(x.dtype)))
            y = F.linear(h, self.down_proj[expert].to(x.dtype)) * weights.flatten()[sel, None].to(x.dtype)
            out.index_add_(0, t, y)
        return out


def _router_gemv() -> bool:
    """Whether the router's logits may run on :func:`dsv4rs.ops.linear_rows`:
    ``DSV4RS_ROUTER_GEMV`` is ``on`` (or unset) or ``off``; any other value is an error, not a
    silent default."""
    value = os.environ.get("DSV4RS_ROUTER_GEMV", "")
    if value in ("", "on"):
        return True
    if value == "off":
        return False
    raise ValueError(f"DSV4RS_ROUTER_GEMV must be on or off, got {value!r}")


class Router(nn.Module):
    """Expert choice and weights: affinity ``sqrt(softplus(x W_g^T))``; hash layers take the
    experts from ``tid2eid[token]``, the others the top-k of affinity plus
    ``e_score_correction_bias``; weights are the chosen affinities, normalized, times the routed
    scaling factor."""

    def __init__(self, cfg: V4Config, hashed: bool) -> None:
        super().__init__()
        self.hashed, self.k, self.scale, self.norm = hashed, cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.k, dtype=torch.int64))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx int64 [T, k], w [T, k])``: the logits in the activations' dtype, the rest in one
        op (:func:`dsv4rs.ops.moe_route`, float32 weights); a float64 model routes in float64 with
        torch ops."""
        logits = self._logits(x)
        if logits.dtype == torch.float64:
            return self._in_torch(logits, ids)
        if self.hashed:
            return ops.moe_route(logits, self.k, self.scale, table=self.tid2eid, ids=ids, norm=self.norm)
        return ops.moe_route(logits, self.k, self.scale, bias=self.e_score_correction_bias, norm=self.norm)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x W_g^T`` in the activations' dtype: for a decode step's few rows on a GPU (float32
        or bfloat16) :func:`dsv4rs.ops.linear_rows` (one kernel, float32 sums in its fixed order,
        where cuBLAS runs a split-K GEMV and a reduce), else ``F.linear``;
        ``DSV4RS_ROUTER_GEMV=off`` keeps ``F.linear`` (``on``, or unset, the default)."""
        w = self.weight.to(x.dtype)
        if (_router_gemv() and x.is_cuda and x.dim() == 2
                and 0 < x.shape[0] <= ops.MAX_LINEAR_ROWS and x.dtype in (torch.float32, torch.bfloat16) and x.shape[1] % 8 == 0 and x.is_contiguous()
                and w.is_contiguous() and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0):
            return ops.linear_rows(x, w)
        return F.linear(x, w)

    def _in_torch(self, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softplus(logits).sqrt()
        if self.hashed:
            idx = self.tid2eid[ids].long()
        else:
            idx = torch.topk(scores + self.e_score_correction_bias.to(scores.dtype), self.k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.scale


class MoE(nn.Module):
    def __init__(self, cfg: V4Config, hashed: bool, experts: range | None = None) -> None:
        super().__init__()
        self.gate = Router(cfg, hashed)
        self.experts = Experts(cfg, experts)
        self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts plus the shared expert. On a GPU (one process) the shared expert
        runs on a second stream beside the router and the routed experts (:mod:`.streams`):
        neither reads what the other writes, and at decode neither fills the GPU alone."""
        routed, shared = self.parts(x, ids)
        return routed + shared

    def parts(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(routed, shared)``, the two outputs :meth:`forward` adds, for a caller that adds them
        itself (the mHC combine's kernel takes both)."""
        side = streams.fork(x) if self.experts.exchange is None else None
        with streams.on(side):
            shared = self.shared_experts(x)
        idx, w = self.gate(x, ids)
        routed = self.experts(x, idx, w)
        streams.join(side)
        return routed, shared


def _rows_in_state_dict(module: Experts, state: dict, prefix: str, local_metadata: dict) -> None:
    """Experts held in tiles still save DeepSeek's rows."""
    if getattr(module, "layout", "rows") == "tiles":
        for name in ("gate_up", "down"):
            state[prefix + name] = ops.weight_rows(state[prefix + name])


def _tiles_from_state_dict(module: Experts, state: dict, prefix: str, *args) -> None:
    """A state dict holds DeepSeek's rows; experts held in tiles load them as tiles."""
    if getattr(module, "layout", "rows") == "tiles":
        for name in ("gate_up", "down"):
            if prefix + name in state:
                state[prefix + name] = ops.weight_tiles(state[prefix + name])
