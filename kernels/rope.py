"""Rotary position embedding (RoPE): the angle tables, the rotation the reference models use, and the op
gf.rope that rotates q and k together in one kernel.

A pair of dims of a head vector is rotated by pos · theta^(−2i/D), so relative positions enter q·k only
through their difference. Two layouts name the pairs:
- interleaved: pair i is (2i, 2i+1) (Meta's Llama and the reference models here: `rope_angles` gives the
  (S, D/2) angles, `rotate_interleaved` applies them);
- rotate-half: pair i is (i, i + R/2) (HF transformers' `apply_rotary_pos_emb`, the default of gf.rope).

gf.rope takes cos/sin tables laid out as HF's rotary modules return them: (S, R) or (B, S, R), one entry per
rotated dim (both entries of a pair hold the pair's angle), so out = x·cos + rot(x)·sin over the first R dims,
rot(x) swapping each pair's entries with a sign (rotate_half: (−x₂, x₁)); dims R..D pass through (partial
rotary). The backward applies the transposed map, a rotation by −angle. Every backend computes in fp32 (float64
for float64 inputs) and rounds once.
"""

from __future__ import annotations

import torch

from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._tensors import compute_dtype
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_tensor
from gpuforge.kernels.dispatch import Implementation, OpBackends


def rope_angles(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (max_seq_len, head_dim // 2) float64: the rotation of pair i at position pos."""
    if head_dim % 2:
        raise ValueError(f"head_dim: RoPE needs an even head dim, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., S, D) with pairs (x[2i], x[2i+1]) rotated by the angles of cos/sin (S, D/2), in x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def full_tables(cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, D/2) angle tables (one per pair, as `rope_angles` gives) widened to gf.rope's (S, D) layout: each
    angle repeated for both entries of its pair."""
    if interleaved:
        return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)


# --- the op ------------------------------------------------------------------------------------------------
# Every backend: forward(q, k, cos, sin, interleaved) -> (q_out, k_out) and backward(dq, dk, cos, sin,
# interleaved) -> (dq_in, dk_in); q/k (B, H, S, D) with any strides, cos/sin (S, R), (1, S, R) or (B, S, R);
# outputs contiguous (B, H, S, D).


def _pair_views(x: torch.Tensor, rot_dim: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second entries of each pair among the first rot_dim dims."""
    if interleaved:
        return x[..., 0:rot_dim:2], x[..., 1:rot_dim:2]
    return x[..., :rot_dim // 2], x[..., rot_dim // 2:rot_dim]


def _join_pairs(first: torch.Tensor, second: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return torch.stack((first, second), -1).flatten(-2) if interleaved else torch.cat((first, second), -1)


def _heads_view(table: torch.Tensor) -> torch.Tensor:
    """(S, R) or (B, S, R) as (B or 1, 1, S, R): broadcast over heads."""
    return table.reshape(table.shape[0] if table.dim() == 3 else 1, 1, *table.shape[-2:])


def _rotate_reference(x, cos, sin, interleaved: bool, inverse: bool) -> torch.Tensor:
    acc = compute_dtype(x.dtype)
    rot_dim = cos.shape[-1]
    xf = x.to(acc)
    x1, x2 = _pair_views(xf, rot_dim, interleaved)
    c1, c2 = _pair_views(_heads_view(cos).to(acc), rot_dim, interleaved)
    s1, s2 = _pair_views(_heads_view(sin).to(acc), rot_dim, interleaved)
    if inverse:
        o1, o2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        o1, o2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    return torch.cat((_join_pairs(o1, o2, interleaved), xf[..., rot_dim:]), -1).to(x.dtype).contiguous()


def reference_forward(q, k, cos, sin, interleaved):
    return (_rotate_reference(q, cos, sin, interleaved, False), _rotate_reference(k, cos, sin, interleaved, False))


def reference_backward(dq, dk, cos, sin, interleaved):
    return (_rotate_reference(dq, cos, sin, interleaved, True), _rotate_reference(dk, cos, sin, interleaved, True))


def _triton():
    from gpuforge.kernels.triton import rope

    return rope


REFERENCE = Implementation(forward=reference_forward, backward=reference_backward)
BACKENDS = OpBackends(op="rope", loaders={"torch": lambda: REFERENCE, "triton": _triton}, auto_order=("triton",))


@torch.library.custom_op("gpuforge::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return BACKENDS.impl(backend).forward(q, k, cos, sin, interleaved)


@_rope_op.register_fake
def _(q, k, cos, sin, interleaved, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


@torch.library.custom_op("gpuforge::rope_backward", mutates_args=())
def _rope_backward_op(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of q and k: the transposed rotation of the incoming gradients."""
    return BACKENDS.impl(backend).backward(dq, dk, cos, sin, interleaved)


@_rope_backward_op.register_fake
def _(dq, dk, cos, sin, interleaved, backend):
    return (torch.empty_like(dq, memory_format=torch.contiguous_format),
            torch.empty_like(dk, memory_format=torch.contiguous_format))


def _table_grads(grads, inputs, cos, sin, interleaved):
    """d cos, d sin (rarely wanted: HF's tables carry no gradient) in torch: out₁ = x₁c₁ − x₂s₁ and
    out₂ = x₂c₂ + x₁s₂, summed over heads, and over the batch where one table serves it."""
    acc = compute_dtype(cos.dtype)
    rot_dim = cos.shape[-1]
    dcos = dsin = 0
    for g, x in zip(grads, inputs, strict=True):
        if g is None:
            continue
        g1, g2 = _pair_views(g.to(acc), rot_dim, interleaved)
        x1, x2 = _pair_views(x.to(acc), rot_dim, interleaved)
        dcos = dcos + _join_pairs(g1 * x1, g2 * x2, interleaved).sum(1)
        dsin = dsin + _join_pairs(-g1 * x2, g2 * x1, interleaved).sum(1)
    if cos.dim() == 2 or cos.shape[0] == 1:
        dcos, dsin = dcos.sum(0), dsin.sum(0)
    return dcos.reshape(cos.shape).to(cos.dtype), dsin.reshape(sin.shape).to(sin.dtype)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, interleaved, backend = inputs
    ctx.interleaved, ctx.backend = interleaved, backend
    ctx.table_grads = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.table_grads else ()))


def _backward(ctx, grad_q, grad_k):
    cos, sin, *inputs = ctx.saved_tensors
    dq, dk = _rope_backward_op(grad_q, grad_k, cos, sin, ctx.interleaved, ctx.backend)
    dcos, dsin = _table_grads((grad_q, grad_k), inputs, cos, sin, ctx.interleaved) if ctx.table_grads \
        else (None, None)
    return dq, dk, dcos, dsin, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, cos, sin, interleaved) -> None:
    check_tensor(q, "q", ndim=4)
    check_tensor(k, "k", ndim=4)
    check_same_device(q=q, k=k)
    check_same_dtype(q=q, k=k)
    batch, _, seq, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"k: expected shape ({batch}, Hkv, {seq}, {head_dim}) (q's batch, sequence and head "
                         f"dims; q has shape {tuple(q.shape)}), got {tuple(k.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(table, name)
        check_same_device(q=q, **{name: table})
        if table.dim() not in (2, 3) or table.shape[-2] != seq or (table.dim() == 3 and table.shape[0] not in
                                                                    (1, batch)):
            raise ValueError(f"{name}: expected shape ({seq}, R), (1, {seq}, R) or ({batch}, {seq}, R) for q of "
                             f"shape {tuple(q.shape)}, got {tuple(table.shape)}")
    check_same_dtype(cos=cos, sin=sin)
    if sin.shape != cos.shape:
        raise ValueError(f"sin: expected shape {tuple(cos.shape)} (that of cos), got {tuple(sin.shape)}")
    rot_dim = cos.shape[-1]
    if rot_dim % 2 or not 0 < rot_dim <= head_dim:
        raise ValueError(f"cos: expected an even number of rotated dims R in 2..{head_dim} (the head dim) as its "
                         f"last dim, got {rot_dim}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved: expected a bool, got {type(interleaved).__name__}")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False,
         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) with RoPE applied, both in one kernel: q (B, Hq, S, D), k (B, Hkv, S, D), any strides, one float
    dtype; cos, sin (S, R), (1, S, R) or (B, S, R), R even and ≤ D, any float dtype (HF's rotary modules'
    output, used as is). The first R dims of each head are rotated (out = x·cos + rot(x)·sin, fp32 math) and
    the rest pass through. `interleaved=False`: rotate-half pairs (i, i + R/2), HF Llama's
    apply_rotary_pos_emb; True: pairs (2i, 2i+1). Returns contiguous tensors of q's and k's shapes. Autograd
    for q and k (a rotation by −angle), and for cos/sin when they require it."""
    _check_inputs(q, k, cos, sin, interleaved)
    chosen = BACKENDS.select(backend, q.device, dtype=q.dtype, shape=(*q.shape, k.shape[1]),
                             run=lambda b: rope(q, k, cos, sin, interleaved=interleaved, backend=b))
    return _rope_op(q, k, cos, sin, interleaved, chosen)


def rope_float64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The oracle of tests and the self-check, written as HF writes it: x·cos + rot(x)·sin on the first R dims
    (rot = rotate_half, or its interleaved form), in float64."""
    x64 = x.double()
    rot_dim = cos.shape[-1]
    rotated, passed = x64[..., :rot_dim], x64[..., rot_dim:]
    x1, x2 = _pair_views(rotated, rot_dim, interleaved)
    swapped = _join_pairs(-x2, x1, interleaved)
    out = rotated * _heads_view(cos).double() + swapped * _heads_view(sin).double()
    return torch.cat((out, passed), -1)


SELFCHECK_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _run_case(backend, q, k, cos, sin, dq, dk, interleaved):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
    out_q, out_k = rope(*leaves, cos, sin, interleaved=interleaved, backend=backend)
    grads = torch.autograd.grad((out_q, out_k), leaves, (dq, dk))
    return out_q.detach(), out_k.detach(), *grads


def _reference_case(q, k, cos, sin, dq, dk, interleaved):
    leaves = [t.detach().double().requires_grad_() for t in (q, k)]
    out_q, out_k = (rope_float64(t, cos, sin, interleaved) for t in leaves)
    grads = torch.autograd.grad((out_q, out_k), leaves, (dq.double(), dk.double()))
    return out_q.detach(), out_k.detach(), *grads


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    for dtype, tol in SELFCHECK_TOL.items():
        for (batch, hq, hkv, seq, head_dim, rot_dim, per_batch), interleaved in (
                ((1, 2, 1, 5, 8, 8, False), False), ((2, 4, 2, 7, 16, 10, True), False),
                ((2, 3, 3, 9, 12, 12, False), True)):
            generator = torch.Generator().manual_seed(seq * 100 + head_dim)
            q = torch.randn(batch, hq, seq, head_dim, generator=generator).to(device=device, dtype=dtype)
            k = torch.randn(batch, hkv, seq, head_dim, generator=generator).to(device=device, dtype=dtype)
            dq, dk = (torch.randn(t.shape, generator=generator).to(device=device, dtype=dtype) for t in (q, k))
            angles = 3 * torch.rand((batch,) * per_batch + (seq, rot_dim // 2), generator=generator)
            cos, sin = (t.to(device=device, dtype=dtype) for t in
                        full_tables(angles.cos(), angles.sin(), interleaved=interleaved))
            label = (f"{str(dtype).removeprefix('torch.')} q{tuple(q.shape)} kv{hkv} R={rot_dim}"
                     f"{' interleaved' if interleaved else ''}")
            args = (q, k, cos, sin, dq, dk, interleaved)
            cases.append(CheckCase("rope", label, run=lambda backend, args=args: _run_case(backend, *args),
                                   reference=lambda args=args: _reference_case(*args), tol=tol, dtype=dtype))
    return cases
