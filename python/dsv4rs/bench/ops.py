"""Op suites of ``dsv4rs bench``: the KV-entry formats, RMSNorm, the mHC collapse and combine, the
compressor, the Lightning Indexer and sparse attention at V4-Flash/Pro shapes (scaled down on the CPU), each beside a torch eager twin
of the same computation."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dsv4rs import ops, reference
from dsv4rs.bench.harness import Bench, Case, Row


def eager_kv_write(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """The 584-byte quantization in torch ops (what a user without dsv4rs would write)."""
    n = x.shape[0]
    nope = x[:, :448].float().view(n, 7, 64)
    e = torch.ceil(torch.log2(nope.abs().amax(-1).clamp_min(1e-4) / 448))
    q = (nope * torch.exp2(-e).unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    rope = x[:, 448:].to(torch.bfloat16).contiguous().view(torch.uint8).view(n, 128)
    pages = cache.view(-1, 37376)
    page, off = slots // 64, slots % 64
    pages[:, : 64 * 576].view(-1, 64, 576)[page, off] = torch.cat([q.view(n, 448), rope], 1)
    pages[:, 64 * 576 :].view(-1, 64, 8)[page, off, :7] = (e + 127).to(torch.uint8)


def formats(b: Bench) -> Iterator[Case]:
    hadamard = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(128)] for i in range(128)],
                            dtype=torch.float32, device=b.device) * 128**-0.5
    for n in b.pick([4096, 65536, 262144], [4096, 65536], [4096, 65536]):

        def kv_write(n: int = n) -> Row:
            xs = [b.randn(n, 512) for _ in range(4)]
            slots = torch.randperm(n, device=b.device)
            cache = ops.new_kv_cache(n // 64, b.device)
            ms = b.median_ms(lambda i: ops.kv_write(cache, slots, xs[i]), 4)
            eager = b.median_ms(lambda i: eager_kv_write(cache, slots, xs[i]), 4)
            return Row(f"kv_write n={n}", ms, n * (512 * 4 + 8 + 584), 0.0, eager)

        def kv_read(n: int = n) -> Row:
            cache = ops.quantize_entries(b.randn(n, 512))
            ids = torch.randperm(n, device=b.device)
            return Row(f"kv_read n={n}", b.median_ms(lambda i: ops.kv_read(cache, ids), 1), n * (584 + 8 + 2048), 0.0, None)

        def hadamard128(n: int = n) -> Row:
            keys = [b.randn(n, 128) for _ in range(4)]
            ms = b.median_ms(lambda i: ops.hadamard128(keys[i]), 4)
            eager = b.median_ms(lambda i: keys[i] @ hadamard, 4)
            return Row(f"hadamard128 n={n}", ms, n * 128 * 8, n * 128 * 7.0, eager)

        def index_key_write(n: int = n, fmt: str = "fp4") -> Row:
            """The indexer's keys (128 values, FP4: 68 bytes a row) to shuffled slots."""
            xs = [b.randn(n, 128) for _ in range(4)]
            slots = torch.randperm(n, device=b.device)
            cache = ops.new_index_key_cache(n // 64, fmt, b.device)
            ms = b.median_ms(lambda i: ops.index_key_write(cache, slots, xs[i], fmt), 4)
            return Row(f"index_key_write {fmt} n={n}", ms, n * (128 * 4 + 8 + 68), 0.0, None)

        yield Case("formats", f"kv_write n={n}", kv_write)
        yield Case("formats", f"index_key_write n={n}", index_key_write)
        yield Case("formats", f"kv_read n={n}", kv_read)
        yield Case("formats", f"hadamard128 n={n}", hadamard128)
    inv_freq = torch.rand(32, device=b.device)
    for t in b.pick([64, 4096], [64], [64, 512]):

        def rope(t: int = t) -> Row:
            """The queries of ``t`` tokens (64 heads of 512), rotated on their last 64 dims."""
            xs = [b.randn(t, 64, 512) for _ in range(2)]
            pos = torch.arange(t, device=b.device) * 997
            ms = b.median_ms(lambda i: ops.rope(xs[i], pos, inv_freq), 2)
            eager = b.median_ms(lambda i: eager_rope(xs[i], pos, inv_freq), 2)
            return Row(f"rope T={t} x 64 heads", ms, t * 64 * 512 * 8, t * 64 * 64 * 3.0, eager)

        yield Case("formats", f"rope T={t}", rope)
    for batch, ctx in b.pick([(1, 4096), (64, 4096), (64, 131072)], [(1, 4096), (64, 131072)], [(1, 4096), (8, 16384)]):

        def step_rows(batch: int = batch, ctx: int = ctx) -> Row:
            """A decode step's candidate rows (window 128 in a ring, HCA ratio 128) for ``batch``
            sequences at ``ctx`` tokens: ``ops.step_rows`` beside the torch form it replaced."""
            window, ratio, width, pages = 128, 128, ctx // 128 + 1, -(-ctx // 128 // 64) + 1
            gen = torch.Generator().manual_seed(batch)
            pos = torch.randint(ctx // 2, ctx, (batch,), generator=gen).to(b.device)
            seq, origins = torch.arange(batch, device=b.device), torch.zeros(batch, dtype=torch.int64, device=b.device)
            wt = torch.randint(0, 1 << 20, (batch, 2), generator=gen, dtype=torch.int32).to(b.device)
            ht = torch.randint(0, 1 << 20, (batch, pages), generator=gen, dtype=torch.int32).to(b.device)
            args = (pos, seq, origins, wt, window, ht, ratio, width)
            ms = b.median_ms(lambda i: ops.step_rows(*args), 1)
            eager = b.median_ms(lambda i: reference.step_rows(*args), 1)
            moved = batch * (window + width) * 8 + (wt.numel() + ht.numel()) * 4 + batch * 24
            name = f"step_rows b={batch} ctx={ctx // 1024}K"
            return Row(name, ms, moved, 0.0, eager, note=f"  {name}: beside: the torch form (25 tensor ops)")

        yield Case("formats", f"step_rows b={batch} ctx={ctx // 1024}K", step_rows)


def _inputs(t: int, make) -> list:
    """Inputs for :func:`_per_call_ms`: 16 for a few tokens, else 4."""
    return [make() for _ in range(16 if t <= 64 else 4)]


def _per_call_ms(b: Bench, xs: list, fn) -> float:
    """Time of ``fn(x)``: with 16 inputs, per call of 16 calls back to back in one graph (as a
    decode step runs them; one call alone measures the replay's own launch), else the median of
    single calls cycling through the inputs."""
    if len(xs) == 16:
        return b.per_call_ms(lambda j: fn(xs[j]), len(xs))
    return b.median_ms(lambda i: fn(xs[i]), len(xs))


def norm(b: Bench) -> Iterator[Case]:
    """RMSNorm of bfloat16 rows with a float32 weight into bfloat16, as the model's norms: the
    hidden state (4096), the queries per head (64 x 512) and the mHC input (4 x 4096 into float32)."""
    for t in b.pick([1, 64, 4096], [1, 4096], [1, 64]):
        for heads, dim, out in ((1, 4096, torch.bfloat16), (64, 512, torch.bfloat16), (1, 16384, torch.float32)):

            def rms(t: int = t, heads: int = heads, dim: int = dim, out: torch.dtype = out) -> Row:
                w = None if out == torch.float32 else torch.rand(dim, device=b.device) + 0.5
                xs = _inputs(t, lambda: b.randn(t, heads, dim).bfloat16())
                ms = _per_call_ms(b, xs, lambda x: ops.rms_norm(x, w, 1e-6, out))
                eager = _per_call_ms(b, xs, lambda x: torch.nn.functional.rms_norm(x.float(), (dim,), w, 1e-6).to(out))
                values = t * heads * dim
                return Row(f"rms_norm T={t} {heads}x{dim} -> {str(out).removeprefix('torch.')}", ms,
                           values * (2 + out.itemsize) + (0 if w is None else dim * 4), values * 4.0, eager)

            yield Case("norm", f"rms_norm T={t} {heads}x{dim}", rms)


def mhc(b: Bench) -> Iterator[Case]:
    """The mHC collapse and combine of 4 bfloat16 streams of 4096 (V4-Flash) around a sublayer, the
    fused input of a sublayer (``mhc_pre``) at decode sizes, and the mix of many tokens
    (``mhc_mix``)."""
    n, d = 4, 4096
    for t in b.pick([1, 64, 4096], [1, 4096], [1, 64]):

        def collapse(t: int = t) -> Row:
            pre = torch.rand(t, n, device=b.device)
            xs = _inputs(t, lambda: b.randn(t, n, d).bfloat16())
            ms = _per_call_ms(b, xs, lambda x: ops.mhc_collapse(x, pre))
            eager = _per_call_ms(b, xs, lambda x: (pre.unsqueeze(-1) * x).sum(-2).bfloat16())
            return Row(f"mhc_collapse T={t} {n}x{d}", ms, t * (n + 1) * d * 2 + t * n * 4, t * n * d * 2.0, eager)

        def combine(t: int = t) -> Row:
            f = b.randn(t, d).bfloat16()
            post, comb = torch.rand(t, n, device=b.device), torch.rand(t, n, n, device=b.device)
            xs = _inputs(t, lambda: b.randn(t, n, d).bfloat16())
            ms = _per_call_ms(b, xs, lambda x: ops.mhc_combine(x, f, post, comb))
            bf = torch.bfloat16
            eager = _per_call_ms(
                b, xs, lambda x: post.to(bf).unsqueeze(-1) * f.unsqueeze(-2) + comb.to(bf).transpose(-1, -2) @ x)
            return Row(f"mhc_combine T={t} {n}x{d}", ms, t * (2 * n + 1) * d * 2 + t * (n + n * n) * 4,
                       t * n * d * (2 * n + 2.0), eager)

        def pre(t: int = t) -> Row:
            """The mHC input (norm, projection, weights, collapse) beside the same four steps as
            separate calls (the dsv4rs ops and cuBLAS's float32 projection)."""
            m = (2 + n) * n
            proj = torch.randn(m, n * d, device=b.device) * 0.02
            scale, base = torch.rand(3, device=b.device) + 0.5, torch.randn(m, device=b.device)
            xs = _inputs(t, lambda: b.randn(t, n, d).bfloat16())
            ms = _per_call_ms(b, xs, lambda x: ops.mhc_pre(x, proj, scale, base))

            def apart(x: torch.Tensor):
                mix = torch.nn.functional.linear(ops.rms_norm(x.flatten(-2), None, 1e-6, torch.float32), proj)
                pre_w, post, comb = ops.mhc_weights(mix, scale, base)
                return post, comb, ops.mhc_collapse(x, pre_w)

            eager = _per_call_ms(b, xs, apart)
            return Row(f"mhc_pre T={t} {n}x{d} (eager: the four ops apart)", ms, m * n * d * 4 + t * (n + 1) * d * 2,
                       t * m * n * d * 2.0, eager)

        yield Case("mhc", f"mhc_collapse T={t}", collapse)
        yield Case("mhc", f"mhc_combine T={t}", combine)
        if t <= 64:
            yield Case("mhc", f"mhc_pre T={t}", pre)
    for t in b.pick([64, 512, 4096], [512, 4096], [64]):

        def mix(t: int = t) -> Row:
            """The normed projection of a sublayer's input (``mhc_mix``) beside the form the model
            takes below :data:`~dsv4rs.model.layers.mhc.MIX_MIN_TOKENS` tokens: the norm into
            float32, then cuBLAS's float32 GEMM."""
            m = (2 + n) * n
            proj = torch.randn(m, n * d, device=b.device) * 0.02
            xs = _inputs(t, lambda: b.randn(t, n, d).bfloat16())
            ms = _per_call_ms(b, xs, lambda x: ops.mhc_mix(x, proj))

            def unfused(x: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.linear(ops.rms_norm(x.flatten(-2), None, 1e-6, torch.float32), proj)

            eager = _per_call_ms(b, xs, unfused)
            return Row(f"mhc_mix T={t} {n}x{d} (eager: norm + float32 GEMM)", ms,
                       t * n * d * 2 + m * n * d * 4 + t * m * 4, t * m * n * d * 2.0, eager)

        yield Case("mhc", f"mhc_mix T={t}", mix)


def eager_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE in torch ops: float64 angles, float32 rotation of the last interleaved pairs."""
    angle = pos.double()[:, None] * inv_freq.double()
    cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]
    r = 2 * inv_freq.shape[0]
    pairs = x[..., -r:].unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., :-r], rotated), dim=-1)


def eager_compress(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int) -> torch.Tensor:
    """Torch eager pooling of the non-overlapping (HCA) compressor."""
    s, w = kv.shape
    e = s // ratio
    weights = (score[: e * ratio].view(e, ratio, w) + ape).softmax(1)
    return (weights * kv[: e * ratio].view(e, ratio, w)).sum(1)


def compress(b: Bench) -> Iterator[Case]:
    inv_freq = torch.rand(32, device=b.device)
    for ratio, dim, quant in [(4, 512, "fp8"), (128, 512, "fp8"), (4, 128, "fp4")]:
        for s in b.pick([8192, 65536], [8192], [2048, 8192]):

            def run(ratio: int = ratio, dim: int = dim, quant: str = quant, s: int = s) -> Row:
                coff = 2 if ratio == 4 else 1
                kvs = [b.randn(s, coff * dim) for _ in range(2)]
                score, ape, norm = b.randn(s, coff * dim), b.randn(ratio, coff * dim), b.randn(dim).abs()
                # What a call from position 0 computes depends on nothing in the state it is given
                # (it only writes it), so every call gives the same entries from the same state
                # tensors; making them is not part of the call (two fills, about 3 us a replay).
                states = [ops.compressor_state(ratio, dim, b.device) for _ in range(2)]

                def call(i: int) -> torch.Tensor:
                    return ops.compress(kvs[i], score, ape, norm, inv_freq, *states[i], 0, ratio, quant=quant)

                eager = b.median_ms(lambda i: eager_compress(kvs[i], score, ape, ratio), 2) if ratio != 4 else None
                moved = 2 * s * coff * dim * 4 + (s // ratio) * dim * 4
                return Row(f"compress r={ratio} D={dim} {quant} S={s}", b.median_ms(call, 2), moved, 0.0, eager)

            yield Case("compress", f"r={ratio} D={dim} S={s}", run)

    def decode() -> Row:
        """One decode token of a CSA compressor (D = 512) whose call completes an entry."""
        ratio, dim = 4, 512
        kvs = [b.randn(1, 2 * dim) for _ in range(2)]
        score, ape, norm = b.randn(1, 2 * dim), b.randn(ratio, 2 * dim), b.randn(dim).abs()
        kv_state, score_state = ops.compressor_state(ratio, dim, b.device)
        ms = b.median_ms(lambda i: ops.compress(kvs[i], score, ape, norm, inv_freq, kv_state, score_state, 3, ratio,
                                                quant="fp8"), 2)
        state = [b.randn(2 * ratio, 2 * dim) for _ in range(2)]
        eager = b.median_ms(lambda i: eager_compress(torch.cat((state[i][:ratio, :dim], state[i][ratio:, dim:])),
                                                     state[i][:, :dim], ape[:, :dim].repeat(2, 1), 2 * ratio), 2)
        return Row("compress decode r=4 D=512 fp8 (1 token, 1 entry)", ms, 2 * 2 * ratio * 2 * dim * 4, 0.0, eager)

    yield Case("compress", "decode r=4", decode)

    for batch in b.pick([1, 32, 128], [1, 128], [1, 8]):

        def decode_batch(batch: int = batch) -> Row:
            """One decode step of ``batch`` sequences (a token each, each completing an entry) of a
            CSA compressor (D = 512, FP8) in one ``compress_batch`` call, beside the model's
            path until now: one ``compress`` call per sequence."""
            ratio, dim = 4, 512
            kvs = [b.randn(batch, 2 * dim) for _ in range(2)]
            score, ape, norm = b.randn(batch, 2 * dim), b.randn(ratio, 2 * dim), b.randn(dim).abs()
            state = b.randn(batch + 3, 2, 2 * ratio, 2 * dim)
            slots = torch.randperm(batch + 3, device=b.device)[:batch]
            starts = torch.full((batch,), 4 * 1000 + 3, dtype=torch.int64, device=b.device)
            cu = torch.arange(batch + 1, dtype=torch.int32, device=b.device)
            ms = b.median_ms(lambda i: ops.compress_batch(kvs[i], score, ape, norm, inv_freq, state, slots, starts, cu,
                                                          ratio, quant="fp8"), 2)
            slot_list = slots.tolist()

            def loop(i: int) -> list[torch.Tensor]:
                return [ops.compress(kvs[i][s : s + 1], score[s : s + 1], ape, norm, inv_freq, state[slot, 0],
                                     state[slot, 1], 4 * 1000 + 3, ratio, quant="fp8")
                        for s, slot in enumerate(slot_list)]

            eager = b.median_ms(loop, 2)
            # Per sequence: its state (kv and scores), its token's kv and score, its entry's row.
            moved = batch * (2 * 2 * ratio * 2 * dim * 4 + 2 * 2 * dim * 4 + dim * 4)
            return Row(f"compress_batch decode r=4 D=512 fp8 B={batch} (eager: a call each)", ms, moved, 0.0, eager)

        yield Case("compress", f"decode batch B={batch}", decode_batch)


def eager_indexer(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Torch eager Lightning Indexer: q [B, H, 128], w [B, H], keys [B, N, 128]."""
    logits = torch.einsum("bhd,bnd->bhn", q, keys).float().relu_()
    return torch.einsum("bhn,bh->bn", logits, w).topk(min(k, keys.shape[1]), dim=-1).indices


def indexer(b: Bench) -> Iterator[Case]:
    contexts = b.pick([8192, 131072, 1048576], [131072, 1048576], [32768, 131072])
    batches = b.pick([1, 8, 32, 64], [1, 32], [1, 4])
    for model, heads, k in [("flash", 64, 512), ("pro", 64, 1024)]:
        for ctx in contexts:
            for batch in batches:

                def run(model: str = model, heads: int = heads, k: int = k, ctx: int = ctx, batch: int = batch) -> Row:
                    n = ctx // 4
                    table = torch.arange(batch * n // 64, device=b.device, dtype=torch.int32).view(batch, n // 64)
                    keys = b.randn(batch * n, 128, dtype=torch.bfloat16)
                    cache = ops.quantize_index_keys(keys, "fp4")
                    qs = [b.randn(batch, heads, 128, dtype=torch.bfloat16) for _ in range(2)]
                    w = torch.rand(batch, heads, device=b.device)
                    seq, vis = torch.arange(batch, device=b.device), torch.full((batch,), n, device=b.device)
                    ms = b.median_ms(lambda i: ops.indexer_topk(qs[i], w, cache, table, seq, vis, k), 2)
                    eager = None
                    if batch * heads * n * 6 < (40e9 if b.gpu else 2e9):
                        kb = keys.view(batch, n, 128)
                        eager = b.median_ms(lambda i: eager_indexer(qs[i], w, kb, k), 2, iters=5, warmup=1)
                    moved = batch * n * 68 + batch * heads * (256 + 4) + batch * k * 8
                    return Row(f"indexer {model} ctx={ctx // 1024}K b={batch}", ms, moved, 2.0 * batch * heads * 128 * n, eager)

                yield Case("indexer", f"{model} ctx={ctx // 1024}K b={batch}", run)


def eager_attention(q: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """Torch eager sparse attention with sink: gather, einsum, softmax over [logits | sink]."""
    kv = rows[idx.clamp_min(0)]
    logits = torch.einsum("thd,tkd->thk", q, kv).float() * scale
    logits = logits.masked_fill((idx < 0).unsqueeze(1), float("-inf"))
    full = torch.cat([logits, sink.view(1, -1, 1).expand(q.shape[0], -1, 1)], -1)
    return torch.einsum("thk,tkd->thd", full.softmax(-1)[..., :-1].to(kv.dtype), kv)


def attention(b: Bench) -> Iterator[Case]:
    cases = [("flash csa", 64, 512 + 128), ("pro csa", 128, 1024 + 128), ("flash hca 128K", 64, 1024 + 128),
             ("flash hca 1M", 64, 8192 + 128)]
    batches = b.pick([1, 8, 32, 64, 128], [1, 32, 128], [1, 8])
    dtype = torch.bfloat16 if b.gpu else torch.float32
    for name, heads, cand in cases:
        for batch in batches:

            def run(name: str = name, heads: int = heads, cand: int = cand, batch: int = batch) -> Row:
                n_rows = max(batch * cand, 4096)
                cache = ops.quantize_entries(b.randn(n_rows, 512))
                idx = torch.randint(0, n_rows, (batch, cand), device=b.device)
                qs = [b.randn(batch, heads, 512, dtype=dtype) for _ in range(2)]
                sink = b.randn(heads)
                ms = b.median_ms(lambda i: ops.sparse_attention(qs[i], cache, idx, sink), 2)
                rows = ops.kv_read(cache, torch.arange(n_rows, device=b.device)).to(dtype)
                eager = b.median_ms(lambda i: eager_attention(qs[i], rows, idx, sink, 512**-0.5), 2, iters=5, warmup=1)
                moved = batch * cand * 584 + batch * heads * 512 * (2 + 4)
                return Row(f"attention {name} b={batch}", ms, moved, 4.0 * batch * heads * 512 * cand, eager)

            yield Case("attention", f"{name} b={batch}", run)
    for t in b.pick([8192, 32768], [8192], []):

        def prefill(t: int = t) -> Row:
            heads, cand = 64, 640
            cache = ops.quantize_entries(b.randn(t, 512))
            idx = torch.randint(0, t, (t, cand), device=b.device)
            q, sink = b.randn(t, heads, 512, dtype=dtype), b.randn(heads)
            ms = b.median_ms(lambda i: ops.sparse_attention(q, cache, idx, sink), 1, iters=5, warmup=1)
            return Row(f"attention prefill T={t} flash", ms, t * cand * 584 + t * heads * 512 * 6,
                       4.0 * t * heads * 512 * cand, None)

        yield Case("attention", f"prefill T={t}", prefill)
