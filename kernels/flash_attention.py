"""gf.flash_attention and gf.flash_attention_varlen: softmax(Q·Kᵀ·scale + mask)·V, FlashAttention-2 style.

q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D) with Hq % Hkv == 0 (GQA; MQA when Hkv == 1); varlen packs sequences
as (total, H, D) with int32 cu_seqlens, as FlashAttention-2's varlen API. Query i sees key j when
i + (Sk − Sq) − left <= j <= i + (Sk − Sq) + right: causal aligns the last query with the last key (bottom-right,
as FlashAttention-2 and SDPA with an explicit mask) and is the window's right side set to 0; window=(left, right)
with -1 for unbounded. A query that sees no key gets a zero output and LSE −inf.

The custom ops return (out, lse); lse (float32, natural log) is what the backward needs besides q, k, v and out,
so nothing S×S is stored. The LSE is differentiable too (its gradient folds into the backward's row term).
Head dims 1..256 are accepted (32, 64, 96, 128, 256 are the tested ones; the Triton kernels pad D to a power of
two in registers with masked loads); D > 256 is rejected. The backward (dQ) is bit-reproducible with
deterministic=True: dQ then has its own kernel instead of atomics.

Backends: torch (the math reference, S×S scores), triton (FlashAttention-2: forward, backward, varlen) and
cuda (dense layout only: csrc/flash_attention.cu, a tensor-core FlashAttention-2 forward for fp16/bf16 with
D 64 or 128 on sm_80+ and a row-per-warp baseline forward otherwise; csrc/flash_attention_bwd.cu, a row-per-warp
backward that recomputes P from the LSE, without atomics, so it is always deterministic).
`auto` on a GPU is triton.
"""

from __future__ import annotations

import math

import torch

from gpuforge.kernels._selfcheck import CheckCase, outputs_and_grads
from gpuforge.kernels._tensors import compute_dtype
from gpuforge.kernels._validate import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from gpuforge.kernels.attention_problem import Problem
from gpuforge.kernels.cuda import flash_attention as cuda_flash_attention
from gpuforge.kernels.dispatch import Implementation, OpBackends

# Every backend: forward(q, k, v, problem) -> (out, lse) and
# backward(dout, dlse, q, k, v, out, lse, problem, deterministic) -> (dq, dk, dv); `problem` describes the call
# (kernels/attention_problem.py).
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------- reference


def visibility_mask(sq: int, sk: int, window_left: int, window_right: int, device) -> torch.Tensor:
    """(Sq, Sk) bool, True where query i may attend to key j (bottom-right aligned window; -1 unbounded)."""
    rows = torch.arange(sq, device=device)[:, None] + (sk - sq)
    cols = torch.arange(sk, device=device)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible &= cols >= rows - window_left
    if window_right >= 0:
        visible &= cols <= rows + window_right
    return visible


def _probabilities(q, k, scale, window_left, window_right):
    """Softmax probabilities and LSE on (B, H, S, D) tensors in the compute dtype; K already per query head.

    P is torch.softmax of the scores (exp(S − max) / Σ), not exp(S − LSE): with logits of size ~90 in float32
    the rounding of the LSE alone (~3e-6 absolute) would put a relative error of 3e-6 on every probability,
    5-14x SDPA's gradient error. The backward recomputes P the same way. A row that sees no key has P = 0 and
    LSE −inf; a NaN input stays NaN."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = visibility_mask(q.shape[-2], k.shape[-2], window_left, window_right, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.where((lse == float("-inf"))[..., None], 0.0, torch.softmax(scores, dim=-1))
    return p, lse


def attention_math(q, k, v, scale, window_left, window_right):
    """softmax(q·kᵀ·scale + mask)·v on (B, H, S, D) tensors with the full score matrix, GQA by repeating K/V;
    returns (out, lse). Differentiable by autograd, float64-capable: the oracle of every test."""
    ct = compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = q.to(ct), k.to(ct).repeat_interleave(group, 1), v.to(ct).repeat_interleave(group, 1)
    p, lse = _probabilities(qc, kc, scale, window_left, window_right)
    return torch.matmul(p, vc).to(q.dtype), lse


def attention_math_backward(dout, dlse, q, k, v, out, lse, scale, window_left, window_right, upcast=True):
    """The gradients of attention_math for (dout, dlse); `lse` is part of every backend's contract but not read
    here: P is recomputed by softmax (see _probabilities). upcast=False computes in the inputs' own dtype, every
    matmul rounded to it: the same-precision PyTorch computation that the tests' error budget is measured by."""
    ct = compute_dtype(q.dtype) if upcast else q.dtype
    batch, heads_kv, sk, d = k.shape
    group = q.shape[1] // heads_kv
    qc, do, oc = q.to(ct), dout.to(ct), out.to(ct)
    kc, vc = k.to(ct).repeat_interleave(group, 1), v.to(ct).repeat_interleave(group, 1)
    p, _ = _probabilities(qc, kc, scale, window_left, window_right)
    delta = (do * oc).sum(-1) - dlse.to(ct)
    ds = p * (torch.matmul(do, vc.transpose(-1, -2)) - delta[..., None])
    dq = torch.matmul(ds, kc) * scale
    dk = (torch.matmul(ds.transpose(-1, -2), qc) * scale).view(batch, heads_kv, group, sk, d).sum(2)
    dv = torch.matmul(p.transpose(-1, -2), do).view(batch, heads_kv, group, sk, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _sequences(p):
    """(query rows, key rows) of each packed sequence."""
    cu_q, cu_k = p.cu_q.tolist(), p.cu_k.tolist()
    for i in range(p.batch):
        yield slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])


def _as_dense(t: torch.Tensor, rows: slice) -> torch.Tensor:
    return t[rows].transpose(0, 1).unsqueeze(0)


def attention_reference(q, k, v, p):
    """The torch backend: plain math with the full score matrix (the oracle; float64-capable)."""
    if not p.is_varlen:
        return attention_math(q, k, v, p.scale, p.window_left, p.window_right)
    out = torch.zeros_like(q)
    lse = torch.full((p.heads_q, q.shape[0]), float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
    for qs, ks in _sequences(p):
        o, l_ = attention_math(_as_dense(q, qs), _as_dense(k, ks), _as_dense(v, ks), p.scale,
                                 p.window_left, p.window_right)
        out[qs] = o[0].transpose(0, 1)
        lse[:, qs] = l_[0]
    return out, lse


def attention_reference_backward(dout, dlse, q, k, v, out, lse, p, deterministic):
    args = (p.scale, p.window_left, p.window_right)
    if not p.is_varlen:
        return attention_math_backward(dout, dlse, q, k, v, out, lse, *args)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qs, ks in _sequences(p):
        grads = attention_math_backward(_as_dense(dout, qs), dlse[:, qs][None], _as_dense(q, qs),
                                          _as_dense(k, ks), _as_dense(v, ks), _as_dense(out, qs),
                                          lse[:, qs][None], *args)
        for full, part, rows in zip((dq, dk, dv), grads, (qs, ks, ks), strict=True):
            full[rows] = part[0].transpose(0, 1)
    return dq, dk, dv


def _triton():
    """The Triton kernels; on sm_90+ with GPUFORGE_TRITON_TMA=1 the forward and backward run on tensor
    descriptors (kernels/triton/flash_attention_tma.py routes each call)."""
    from gpuforge.kernels.triton import flash_attention_tma

    return Implementation(forward=flash_attention_tma.routed_forward, backward=flash_attention_tma.routed_backward)


REFERENCE = Implementation(forward=attention_reference, backward=attention_reference_backward)
BACKENDS = OpBackends(op="flash_attention",
                      loaders={"torch": lambda: REFERENCE, "triton": _triton, "cuda": lambda: cuda_flash_attention},
                      auto_order=("triton",))


# ----------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gpuforge::flash_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window_left: int,
                  window_right: int, deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return BACKENDS.impl(backend).forward(q, k, v, Problem.dense(q, k, scale, window_left, window_right))


@_attention_op.register_fake
def _(q, k, v, scale, window_left, window_right, deterministic, backend):
    lse = q.new_empty(q.shape[:3], dtype=compute_dtype(q.dtype))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("gpuforge::flash_attention_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, window_left: int,
                           window_right: int, deterministic: bool, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = Problem.dense(q, k, scale, window_left, window_right)
    return BACKENDS.impl(backend).backward(dout, dlse, q, k, v, out, lse, p, deterministic)


@_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, scale, window_left, window_right, deterministic, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_dense(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.window_left, ctx.window_right, ctx.deterministic, ctx.backend = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward_dense(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(dout, _zeros_if_none(dlse, lse), q, k, v, out, lse, ctx.scale,
                                        ctx.window_left, ctx.window_right, ctx.deterministic, ctx.backend)
    return dq, dk, dv, None, None, None, None, None


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


_attention_op.register_autograd(_backward_dense, setup_context=_setup_dense)


@torch.library.custom_op("gpuforge::flash_attention_varlen", mutates_args=())
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
               window_right: int, deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    p = Problem.varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                       window_right)
    return BACKENDS.impl(backend).forward(q, k, v, p)


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
      deterministic, backend):
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=compute_dtype(q.dtype))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("gpuforge::flash_attention_varlen_backward", mutates_args=())
def _varlen_backward_op(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                        window_left: int, window_right: int, deterministic: bool, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = Problem.varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                       window_right)
    return BACKENDS.impl(backend).backward(dout, dlse, q, k, v, out, lse, p, deterministic)


@_varlen_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, deterministic, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale, ctx.window_left, ctx.window_right, \
        ctx.deterministic, ctx.backend = inputs
    ctx.save_for_backward(q, k, v, *output, cu_q, cu_k)


def _backward_varlen(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _varlen_backward_op(dout, _zeros_if_none(dlse, lse), q, k, v, out, lse, cu_q, cu_k, ctx.max_q,
                                     ctx.max_k, ctx.scale, ctx.window_left, ctx.window_right, ctx.deterministic,
                                     ctx.backend)
    return (dq, dk, dv) + (None,) * 9


_varlen_op.register_autograd(_backward_varlen, setup_context=_setup_varlen)


# ----------------------------------------------------------------------------------------- public API


CAUSAL_ALIGNMENTS = ("bottom_right", "top_left")


def _alignment(causal) -> str | None:
    """None (not causal), "bottom_right" (True: the last query sees the last key, FlashAttention-2's rule) or
    "top_left" (query i sees keys 0..i, SDPA's is_causal)."""
    if causal is False or causal is True:
        return "bottom_right" if causal else None
    if isinstance(causal, str) and causal in CAUSAL_ALIGNMENTS:
        return causal
    raise ValueError(f"causal: expected a bool or one of {CAUSAL_ALIGNMENTS}, got {causal!r}")


def _window(window, causal) -> tuple[int, int]:
    if window is None:
        left, right = -1, -1
    else:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
            raise ValueError(f"window: expected None or (left, right) ints >= -1 (-1: unbounded), got {window!r}")
        left, right = window
    return left, (0 if _alignment(causal) else right)


def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def _check_qkv(q, k, v, ndim: int, layout: str, dtypes=FLOAT_DTYPES) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, dtypes, ndim=ndim)
    check_same_device(q=q, k=k, v=v)
    check_same_dtype(q=q, k=k, v=v)
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    head_axis = 1
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k: expected head dim D={q.shape[-1]} (that of q), got {k.shape[-1]}; layout {layout}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim D={q.shape[-1]} unsupported; expected 1..{MAX_HEAD_DIM}")
    if k.shape[head_axis] == 0 or q.shape[head_axis] % k.shape[head_axis]:
        raise ValueError(f"k: the number of query heads Hq={q.shape[head_axis]} must be a multiple of the number "
                         f"of KV heads Hkv={k.shape[head_axis]}")


def _check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool | str = False,
                    scale: float | None = None, window: tuple[int, int] | None = None,
                    deterministic: bool = False, backend: str = "auto") -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v for q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D); autograd for q, k and v.

    scale defaults to 1/sqrt(D). causal=True (or "bottom_right") and window=(left, right) align the last
    query with the last key, as FlashAttention-2 does: with Sq < Sk, query i sees keys 0..i + Sk − Sq.
    causal="top_left" is SDPA's is_causal: query i sees keys 0..i whatever Sk is. The two agree when Sq == Sk;
    code ported from SDPA with Sq != Sk needs "top_left" (it takes no window)."""
    _check_qkv(q, k, v, 4, "(B, H, S, D)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} (that of q), got {k.shape[0]}")
    _check_flag(deterministic, "deterministic")
    if _alignment(causal) == "top_left" and q.shape[2] != k.shape[2]:
        if window is not None:
            raise ValueError("window: is measured from the bottom-right diagonal; use causal=True with it, not "
                             "causal='top_left'")
        return _top_left_causal(q, k, v, scale=scale, deterministic=deterministic, backend=backend)
    left, right = _window(window, causal)
    chosen = BACKENDS.select(backend, q.device, dtype=q.dtype, shape=(*q.shape, k.shape[1], k.shape[2]),
                             run=lambda b: flash_attention(q, k, v, causal=causal, scale=scale, window=window,
                                                           deterministic=deterministic, backend=b))
    out, _ = _attention_op(q, k, v, _scale(scale, q.shape[-1]), left, right, deterministic, chosen)
    return out


_WITH_FLOAT64 = (torch.float64, *FLOAT_DTYPES)


def flash_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                             scale: float | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of flash_attention, both differentiable: for callers that combine attention blocks by their
    LSEs (ring attention). lse (B, Hq, Sq) is in the compute dtype (float32 for 16-bit inputs, natural log);
    causal is bottom-right aligned. float64 runs on the torch backend (the parallel strategies' parity tests)."""
    _check_qkv(q, k, v, 4, "(B, H, S, D)", _WITH_FLOAT64)
    _check_flag(causal, "causal")
    return _attention_op(q.contiguous(), k.contiguous(), v.contiguous(), _scale(scale, q.shape[-1]), -1,
                         0 if causal else -1, False, BACKENDS.select(backend, q.device, dtype=q.dtype))


def flash_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, *, dlse: torch.Tensor | None = None,
                             causal: bool = False, scale: float | None = None,
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the call flash_attention_with_lse(q, k, v) that returned (out, lse), for the gradients
    dout of out and dlse of lse (None: 0). Every backend computes delta = rowsum(dout·out) − dlse."""
    _check_qkv(q, k, v, 4, "(B, H, S, D)", _WITH_FLOAT64)
    _check_flag(causal, "causal")
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"dout, out: expected shape {tuple(q.shape)}, lse {tuple(q.shape[:3])}; got "
                         f"{tuple(dout.shape)}, {tuple(out.shape)}, {tuple(lse.shape)}")
    dlse = torch.zeros_like(lse) if dlse is None else dlse.contiguous()
    with torch.no_grad():
        return _attention_backward_op(dout.contiguous(), dlse, q.contiguous(), k.contiguous(), v.contiguous(),
                                      out.contiguous(), lse.contiguous(), _scale(scale, q.shape[-1]), -1,
                                      0 if causal else -1, False, BACKENDS.select(backend, q.device, dtype=q.dtype))


def _top_left_causal(q, k, v, **options) -> torch.Tensor:
    """Top-left causal attention from bottom-right calls. Sq < Sk: keys Sq.. are never seen, so it is
    bottom-right causal on the first Sq keys. Sq > Sk: the first Sk queries see keys 0..i (the square case),
    the others see every key."""
    sq, sk = q.shape[2], k.shape[2]
    if sq < sk:
        return flash_attention(q, k[:, :, :sq], v[:, :, :sq], causal=True, **options)
    head = flash_attention(q[:, :, :sk], k, v, causal=True, **options)
    tail = flash_attention(q[:, :, sk:], k, v, causal=False, **options)
    return torch.cat((head, tail), dim=2)


def _check_cu_seqlens(cu, name: str, q: torch.Tensor) -> None:
    check_tensor(cu, name, dtypes=(torch.int32,), ndim=1)
    check_same_device(q=q, **{name: cu})
    if cu.shape[0] < 2:
        raise ValueError(f"{name}: expected (batch + 1,) offsets starting at 0, got shape {tuple(cu.shape)}")


def check_varlen_offsets(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, max_q: int,
                         max_k: int) -> None:
    """The kernels' memory safety and coverage: offsets start at 0, never decrease, end at the packed length
    (every row of q belongs to a sequence, so every output row is written), and no sequence is longer than
    its max_seqlen (the grid is sized by it). Computed on the offsets' device, read back with one host sync;
    skipped while torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    dq, dk = cu_q.diff(), cu_k.diff()
    first_q, first_k, min_q, min_k, long_q, long_k, last_q, last_k = torch.stack(
        [cu_q[0], cu_k[0], dq.min(), dk.min(), dq.max(), dk.max(), cu_q[-1], cu_k[-1]]).tolist()
    for name, first, shortest, longest, last, total, bound, bound_name in (
            ("cu_seqlens_q", first_q, min_q, long_q, last_q, total_q, max_q, "max_seqlen_q"),
            ("cu_seqlens_k", first_k, min_k, long_k, last_k, total_k, max_k, "max_seqlen_k")):
        if first != 0:
            raise ValueError(f"{name}: expected offsets starting at 0, got {name}[0] = {first}")
        if shortest < 0:
            raise ValueError(f"{name}: expected non-decreasing offsets, found a step of {shortest}")
        if last != total:
            raise ValueError(f"{name}: expected the last offset to be the packed length {total}, got {last}")
        if longest > bound:
            raise ValueError(f"{bound_name}: {bound} is less than the longest sequence, {longest} rows")


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           causal: bool | str = False, scale: float | None = None,
                           window: tuple[int, int] | None = None, deterministic: bool = False,
                           check_inputs: bool = True, backend: str = "auto") -> torch.Tensor:
    """Attention over sequences packed without padding: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence i
    holds rows cu_seqlens_q[i]:cu_seqlens_q[i+1] (int32, as FlashAttention-2, any stride); max_seqlen_* bound
    the lengths. causal aligns bottom-right in each sequence. check_inputs=True (the default) verifies the
    offsets with one host sync (`check_varlen_offsets`); False skips it and makes the caller responsible."""
    _check_qkv(q, k, v, 3, "(total, H, D)")
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q)
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q)
    if _alignment(causal) == "top_left":
        raise ValueError("causal: flash_attention_varlen aligns each sequence bottom-right (as FlashAttention-2); "
                         "'top_left' is for flash_attention")
    _check_flag(check_inputs, "check_inputs")
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k: expected shape {tuple(cu_seqlens_q.shape)} (that of cu_seqlens_q), "
                         f"got {tuple(cu_seqlens_k.shape)}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    _check_flag(deterministic, "deterministic")
    if check_inputs:
        check_varlen_offsets(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    left, right = _window(window, causal)
    out, _ = _varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        _scale(scale, q.shape[-1]), left, right, deterministic,
                        BACKENDS.select(backend, q.device, dtype=q.dtype))
    return out


# ----------------------------------------------------------------------------------------- self-check


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    settings = ((torch.float32, 2e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2))
    shapes = ((1, 2, 2, 17, 17, 64, True), (2, 4, 1, 33, 20, 32, False))  # (B, Hq, Hkv, Sq, Sk, D, causal)
    for dtype, tol in settings:
        for b, hq, hkv, sq, sk, d, causal in shapes:
            g = torch.Generator().manual_seed(sq * d)
            q, k, v, dout = (torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
                             for h, s in ((hq, sq), (hkv, sk), (hkv, sk), (hq, sq)))

            def run(backend, q=q, k=k, v=v, dout=dout, causal=causal):
                return outputs_and_grads(lambda *t: flash_attention(*t, causal=causal, backend=backend),
                                         (q, k, v), dout)

            def reference(q=q, k=k, v=v, dout=dout, causal=causal):
                scale, right = 1.0 / math.sqrt(q.shape[-1]), 0 if causal else -1
                return outputs_and_grads(lambda *t: _attention_op(*t, scale, -1, right, False, "torch")[0],
                                         (q.double(), k.double(), v.double()), dout.double())

            cases.append(CheckCase("flash_attention", f"{str(dtype).removeprefix('torch.')} B{b} Hq{hq} Hkv{hkv} "
                                   f"Sq{sq} Sk{sk} D{d}{' causal' if causal else ''}",
                                   run=run, reference=reference, tol=tol, dtype=dtype))
    return cases
