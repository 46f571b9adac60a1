"""mHC around a sublayer (docs/model.md section 6), CPU and GPU: its weights, the collapse of the
streams into the sublayer's input and the combine of its output into the streams, one kernel each."""

from __future__ import annotations

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream
from dsv4rs.ops._checks import ndim, positive

@torch.library.custom_op("dsv4rs::mhc_weights", mutates_args=())
def _mhc_weights(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = _mhc_streams(mix.shape[-1])
    pre = torch.empty((mix.shape[0], n), dtype=torch.float32, device=mix.device)
    post = torch.empty_like(pre)
    comb = torch.empty((mix.shape[0], n, n), dtype=torch.float32, device=mix.device)
    _core.mhc_weights(spec("mix", mix), spec("scale", scale), spec("base", base), spec("pre", pre), spec("post", post),
                      spec("comb", comb), iters, eps, stream(mix))
    return pre, post, comb


@_mhc_weights.register_fake
def _(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = _mhc_streams(mix.shape[-1])
    return mix.new_empty((mix.shape[0], n)), mix.new_empty((mix.shape[0], n)), mix.new_empty((mix.shape[0], n, n))


def _mhc_streams(width: int) -> int:
    for n in range(1, 9):
        if (2 + n) * n == width:
            return n
    raise ValueError(f"mix: expected (2 + n) n columns for n streams in 1..8, got {width}")


def mhc_weights(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int = 20, eps: float = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC weights of a sublayer (docs/model.md section 6) from ``mix = r * (Phi vec X)``.

    Args:
        mix: ``float32 [T, (2 + n) n]``, the projected, RMS-scaled streams of each token.
        scale: ``float32 [3]`` (``hc_scale``); base: ``float32 [(2 + n) n]`` (``hc_base``).
        iters: Sinkhorn iterations (``hc_sinkhorn_iters``), 1 to 1000 (V4 runs 20).
        eps: ``hc_eps``.

    Returns:
        ``pre float32 [T, n]`` (``sigmoid(s0 mu + b) + eps``), ``post [T, n]``
        (``2 sigmoid(s1 mu + b)``) and ``comb [T, n, n]``: the rows of ``s2 mu + b`` softmaxed plus
        ``eps``, columns then ``iters - 1`` times rows and columns divided by their sums plus
        ``eps``. One kernel instead of some 130 small tensor ops; float32 in transformers' order.
    """
    iters = positive("iters", iters, _core.MAX_SINKHORN_ITERS)
    mix = as_tensor("mix", mix)
    ndim("mix", mix, 2)
    return _mhc_weights(mix, as_tensor("scale", scale), as_tensor("base", base), iters, float(eps))


@torch.library.custom_op("dsv4rs::mhc_collapse", mutates_args=())
def _mhc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    y = torch.empty((x.shape[0], x.shape[2]), dtype=x.dtype, device=x.device)
    _core.mhc_collapse(spec("x", x), spec("pre", pre), spec("y", y), stream(x))
    return y


@_mhc_collapse.register_fake
def _(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[2]))


def mhc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The input of a sublayer from its streams: ``y[t] = sum_j pre[t, j] x[t, j]``.

    Args:
        x: ``float32``/``bfloat16 [T, n, d]``, the residual streams (``n`` in 1..8).
        pre: ``float32 [T, n]``, the collapse weights (:func:`mhc_weights`).

    Returns:
        ``[T, d]`` in the dtype of ``x``: float32 products added in stream order (as torch's
        ``(pre[..., None] * x).sum(-2)``), rounded once. Non-finite values raise on the CPU and
        propagate on the GPU.
    """
    x, pre = as_tensor("x", x), as_tensor("pre", pre)
    ndim("x", x, 3)
    return _mhc_collapse(x, pre)


@torch.library.custom_op("dsv4rs::mhc_combine", mutates_args=())
def _mhc_combine(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                 f2: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _core.mhc_combine(spec("x", x), spec("f", f), None if f2 is None else spec("f2", f2), spec("post", post),
                      spec("comb", comb), spec("y", y), stream(x))
    return y


@_mhc_combine.register_fake
def _(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
      f2: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape)


def mhc_combine(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                f2: torch.Tensor | None = None) -> torch.Tensor:
    """The streams after a sublayer: ``y[t, k] = post[t, k] f[t] + sum_j comb[t, j, k] x[t, j]``.

    Args:
        x: ``float32``/``bfloat16 [T, n, d]``, the streams the sublayer read (``n`` in 1..8).
        f: ``float32``/``bfloat16 [T, d]``, the sublayer's output.
        post: ``float32 [T, n]`` and comb: ``float32 [T, n, n]``, from :func:`mhc_weights`.
        f2: optional ``[T, d]`` in the dtype of ``f``: the sublayer's output is then ``f + f2``,
            added in float32 and rounded to that dtype first (the bits of ``f + f2`` in torch);
            on a GPU one kernel where the add took one of its own.

    Returns:
        ``[T, n, d]`` in the dtype of ``x``, computed in float32 with the weights as given and
        rounded once (torch's ``post * f + comb^T @ x`` in bfloat16 rounds the weights, the two
        terms and their sum). Non-finite values raise on the CPU and propagate on the GPU.
    """
    x = as_tensor("x", x)
    ndim("x", x, 3)
    args = (x, as_tensor("f", f), as_tensor("post", post), as_tensor("comb", comb))
    return _mhc_combine(*args) if f2 is None else _mhc_combine(*args, as_tensor("f2", f2))


@torch.library.custom_op("dsv4rs::mhc_pre", mutates_args=())
def _mhc_pre(x: torch.Tensor, proj: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float,
             norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, n, d = x.shape
    post = torch.empty((t, n), dtype=torch.float32, device=x.device)
    comb = torch.empty((t, n, n), dtype=torch.float32, device=x.device)
    y = torch.empty((t, d), dtype=x.dtype, device=x.device)
    workspace = None
    if x.is_cuda:
        workspace = torch.empty(_core.mhc_pre_workspace_len(t, n, d), dtype=torch.float32, device=x.device)
    _core.mhc_pre(spec("x", x), spec("proj", proj), spec("scale", scale), spec("base", base),
                  None if workspace is None else spec("workspace", workspace), spec("post", post), spec("comb", comb),
                  spec("y", y), iters, eps, norm_eps, stream(x))
    return post, comb, y


@_mhc_pre.register_fake
def _(x: torch.Tensor, proj: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float,
      norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, n, d = x.shape
    return (x.new_empty((t, n), dtype=torch.float32), x.new_empty((t, n, n), dtype=torch.float32),
            x.new_empty((t, d)))


def mhc_pre(x: torch.Tensor, proj: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int = 20,
            eps: float = 1e-6, norm_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC input of a sublayer in one call (docs/model.md section 6): the mix
    ``mu = rsqrt(mean(x^2) + norm_eps) (proj vec x)``, the weights (:func:`mhc_weights`) and the
    collapse (:func:`mhc_collapse`).

    Args:
        x: ``float32``/``bfloat16 [T, n, d]``, the streams (``n`` in 1..8).
        proj: ``float32 [(2 + n) n, n d]`` (``hc_fn``); scale: ``float32 [3]``; base:
            ``float32 [(2 + n) n]``.
        iters, eps: as :func:`mhc_weights`; norm_eps: the RMS norm's (``rms_norm_eps``), > 0.

    Returns:
        ``(post float32 [T, n], comb float32 [T, n, n], y [T, d])``, ``y`` in the dtype of ``x``:
        what ``mhc_weights`` and ``mhc_collapse`` return for the same mix. On a GPU two kernels
        (the projection's partial sums over 1,024-value slices, then per token their sum, the
        weights and the collapse) instead of five; the projection is summed in float32 there and
        in float64 on the CPU. Built for a few tokens a call (a decode step): every token reads
        the whole projection. Non-finite values raise on the CPU and propagate on the GPU.
    """
    iters = positive("iters", iters, _core.MAX_SINKHORN_ITERS)
    x = as_tensor("x", x)
    ndim("x", x, 3)
    return _mhc_pre(x, as_tensor("proj", proj), as_tensor("scale", scale), as_tensor("base", base), iters,
                    float(eps), float(norm_eps))


@torch.library.custom_op("dsv4rs::mhc_mix", mutates_args=())
def _mhc_mix(x: torch.Tensor, proj: torch.Tensor, norm_eps: float) -> torch.Tensor:
    t, n, d = x.shape
    mix = torch.empty((t, proj.shape[0]), dtype=torch.float32, device=x.device)
    workspace = None
    if x.is_cuda:
        workspace = torch.empty(_core.mhc_mix_workspace_len(t, proj.shape[0], n * d), dtype=torch.float32,
                                device=x.device)
    _core.mhc_mix(spec("x", x), spec("proj", proj), None if workspace is None else spec("workspace", workspace),
                  spec("mix", mix), norm_eps, stream(x))
    return mix


@_mhc_mix.register_fake
def _(x: torch.Tensor, proj: torch.Tensor, norm_eps: float) -> torch.Tensor:
    return x.new_empty((x.shape[0], proj.shape[0]), dtype=torch.float32)


def mhc_mix(x: torch.Tensor, proj: torch.Tensor, norm_eps: float = 1e-6) -> torch.Tensor:
    """The projected, RMS-scaled streams (docs/model.md section 6):
    ``mix = rsqrt(mean(x^2) + norm_eps) (proj vec x)`` for each token, what :func:`mhc_weights`
    takes (and, with ``hc_head_fn``, what the final collapse's weights come from).

    Args:
        x: ``float32``/``bfloat16 [T, n, d]``, the streams (``n`` in 1..8).
        proj: ``float32 [m, n d]``, ``m`` in 1..80 (``hc_fn``: ``(2 + n) n`` rows; ``hc_head_fn``:
            ``n``).
        norm_eps: the RMS norm's (``rms_norm_eps``), > 0.

    Returns:
        ``float32 [T, m]``. On a GPU two kernels that read the streams once, where the norm and
        the projection in torch write them normed in float32 first (256 MB for a 4,096-token
        prefill at V4-Flash width): a block holds a chunk of the projection in shared memory for
        128 or 256 tokens, summing in float32 over the chunk, then the chunks in order; on the
        CPU the sums are float64. Built for many tokens (a prefill: 0.16 against 0.32 ms at
        4,096 tokens on an H100); for a few, cuBLAS's GEMV is quicker and :func:`mhc_pre`
        computes the mix inside the whole sublayer input. Non-finite values raise on the CPU and
        propagate on the GPU.
    """
    x, proj = as_tensor("x", x), as_tensor("proj", proj)
    ndim("x", x, 3)
    ndim("proj", proj, 2)
    return _mhc_mix(x, proj, float(norm_eps))
