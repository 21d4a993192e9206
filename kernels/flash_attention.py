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
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_tensor
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


def _probabilities(q, k, scale, window_left, window_right, lse=None):
    """Softmax probabilities (and LSE) on (B, H, S, D) tensors in the compute dtype; K already per query head.
    With `lse` given, recompute P = exp(S − lse) as the backward kernels do."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = visibility_mask(q.shape[-2], k.shape[-2], window_left, window_right, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows that see no key: P = 0
    return torch.exp(scores - safe[..., None]), lse


def attention_math(q, k, v, scale, window_left, window_right):
    """softmax(q·kᵀ·scale + mask)·v on (B, H, S, D) tensors with the full score matrix, GQA by repeating K/V;
    returns (out, lse). Differentiable by autograd, float64-capable: the oracle of every test."""
    ct = compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = q.to(ct), k.to(ct).repeat_interleave(group, 1), v.to(ct).repeat_interleave(group, 1)
    p, lse = _probabilities(qc, kc, scale, window_left, window_right)
    return torch.matmul(p, vc).to(q.dtype), lse


def attention_math_backward(dout, dlse, q, k, v, out, lse, scale, window_left, window_right):
    ct = compute_dtype(q.dtype)
    batch, heads_kv, sk, d = k.shape
    group = q.shape[1] // heads_kv
    qc, do, oc = q.to(ct), dout.to(ct), out.to(ct)
    kc, vc = k.to(ct).repeat_interleave(group, 1), v.to(ct).repeat_interleave(group, 1)
    p, _ = _probabilities(qc, kc, scale, window_left, window_right, lse=lse.to(ct))
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
    from gpuforge.kernels.triton import flash_attention

    return flash_attention


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


def _window(window, causal: bool) -> tuple[int, int]:
    if window is None:
        left, right = -1, -1
    else:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
            raise ValueError(f"window: expected None or (left, right) ints >= -1 (-1: unbounded), got {window!r}")
        left, right = window
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    return left, (0 if causal else right)


def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def _check_qkv(q, k, v, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=ndim)
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


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, window: tuple[int, int] | None = None,
                    deterministic: bool = False, backend: str = "auto") -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v for q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D); autograd for q, k and v.

    scale defaults to 1/sqrt(D); causal and window=(left, right) align the last query with the last key."""
    _check_qkv(q, k, v, 4, "(B, H, S, D)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} (that of q), got {k.shape[0]}")
    _check_flag(deterministic, "deterministic")
    left, right = _window(window, causal)
    out, _ = _attention_op(q, k, v, _scale(scale, q.shape[-1]), left, right, deterministic,
                           BACKENDS.select(backend, q.device, dtype=q.dtype))
    return out


def _check_cu_seqlens(cu, name: str, q: torch.Tensor) -> None:
    check_tensor(cu, name, dtypes=(torch.int32,), ndim=1)
    check_same_device(q=q, **{name: cu})
    if cu.shape[0] < 2:
        raise ValueError(f"{name}: expected (batch + 1,) offsets starting at 0, got shape {tuple(cu.shape)}")


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           causal: bool = False, scale: float | None = None, window: tuple[int, int] | None = None,
                           deterministic: bool = False, backend: str = "auto") -> torch.Tensor:
    """Attention over sequences packed without padding: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence i
    holds rows cu_seqlens_q[i]:cu_seqlens_q[i+1] (int32, as FlashAttention-2); max_seqlen_* bound the lengths."""
    _check_qkv(q, k, v, 3, "(total, H, D)")
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q)
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k: expected shape {tuple(cu_seqlens_q.shape)} (that of cu_seqlens_q), "
                         f"got {tuple(cu_seqlens_k.shape)}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    _check_flag(deterministic, "deterministic")
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
