"""The twins of :func:`dsv4rs.ops.mhc_mix`, :func:`~dsv4rs.ops.mhc_weights`,
:func:`~dsv4rs.ops.mhc_collapse` and :func:`~dsv4rs.ops.mhc_combine` in float64 (docs/model.md
section 6)."""

from __future__ import annotations

import torch


def mhc_mix(x: torch.Tensor, proj: torch.Tensor, norm_eps: float = 1e-6) -> torch.Tensor:
    """The twin of :func:`dsv4rs.ops.mhc_mix`: ``rsqrt(mean(x^2) + norm_eps) (proj vec x)`` over
    each token's streams ``x [T, n, d]``, ``[T, m]``."""
    v = x.double().flatten(-2)
    return v * torch.rsqrt(v.square().mean(-1, keepdim=True) + norm_eps) @ proj.double().T


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The mHC projection of ``comb [..., n, n]`` (softmaxed rows, plus ``eps``) towards doubly
    stochastic: columns normalized, then ``iters - 1`` times rows and columns."""
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def mhc_weights(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int = 20, eps: float = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pre [..., n], post [..., n], comb [..., n, n])`` in float64 from ``mix [..., (2 + n) n]``
    (``mu = r * (Phi vec X)``), ``scale [3]`` and ``base [(2 + n) n]``:
    ``pre = sigmoid(s0 mu + b) + eps``, ``post = 2 sigmoid(s1 mu + b)``, ``comb`` the rows of
    ``s2 mu + b`` softmaxed plus ``eps``, then :func:`sinkhorn`."""
    mix, scale, base = mix.double(), scale.double(), base.double()
    width = mix.shape[-1]
    n = next((k for k in range(1, 9) if (2 + k) * k == width), None)
    if n is None:
        raise ValueError(f"mix: expected (2 + n) n columns for n streams in 1..8, got {width}")
    pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * scale[2] + comb_b.view(n, n), dim=-1) + eps
    return pre, post, sinkhorn(comb, iters, eps)


def mhc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_j pre[t, j] x[t, j]`` in float64 (``x [T, n, d]``, ``pre [T, n]``)."""
    return (pre.double().unsqueeze(-1) * x.double()).sum(-2)


def mhc_combine(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``y[t, k] = post[t, k] f[t] + sum_j comb[t, j, k] x[t, j]`` in float64 (``x [T, n, d]``,
    ``f [T, d]``, ``post [T, n]``, ``comb [T, n, n]``)."""
    x = x.double()
    return post.double().unsqueeze(-1) * f.double().unsqueeze(-2) + comb.double().transpose(-1, -2) @ x
