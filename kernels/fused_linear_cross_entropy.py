"""gf.fused_linear_cross_entropy: the language-model loss from the last hidden states, lm_head included,
without the (tokens × vocab) logits ever existing at once.

loss = reduce(CE(hidden @ weight.T + bias)), the logits optionally softcapped (z = cap·tanh(u/cap), Gemma 2) and
the cross-entropy that of F.cross_entropy with ignore_index and label_smoothing ε, plus z_loss·lse² per token
(lse = logsumexp(z), PaLM's z-loss):
    loss_i = lse_i − (1 − ε)·z_i,t − (ε/V)·Σ_j z_i,j + z_loss·lse_i²      (0 for a token with t = ignore_index)
reduced as F.cross_entropy reduces: "mean" over the tokens that are not ignored (NaN when there are none, as
torch), "sum", or "none" (N,).

Forward, in chunks of `chunk_size` tokens: a chunk's logits (chunk_size × V, in hidden's dtype, as lm_head would
give) are formed by one GEMM into a reused buffer, and a backend's row kernel turns them into each token's loss
and logsumexp. Only the per-token lse (N floats) is kept for the backward.

Backward, in blocks of vocabulary columns holding as many logits as a forward chunk (chunk_size·V / N columns):
a block's logits for every token are recomputed by one GEMM, the backend turns them in place into their gradient
dz (elementwise, given lse), and
    dweight[block] = dzᵀ @ hidden      (one GEMM over all tokens: rounded once, as torch's own),
    dbias[block] = Σ_tokens dz,         dhidden += dz @ weight[block]   (fp32, N × H: the only accumulator).
So nothing V × H is allocated but dweight itself, and nothing N × V at all. Recomputing the logits costs one
GEMM more than forming the gradients during the forward (Liger-Kernel's way); in exchange the gradients are
formed only when a backward runs, only for the inputs that need them, with the true incoming gradient
(reduction="none" and a scaled loss need no extra V × H product), and dweight of an fp16/bf16 weight needs no
fp32 V × H accumulator.

This module holds the functional API and its checks, the chunked driver (GEMMs in torch, the rows on the chosen
backend), the torch.library ops (forward and backward, each with a fake) and autograd, the torch reference
rows and the backend table.
"""

from __future__ import annotations

import math

import torch

from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._tensors import compute_dtype
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_tensor
from gpuforge.kernels.dispatch import Implementation, OpBackends

REDUCTIONS = ("mean", "sum", "none")

# Every backend works on logits (rows, width) with a contiguous last dim, target int64 (rows,):
#   forward(logits, target, ignore_index, label_smoothing, z_loss, softcap) -> (loss fp32 (rows,), lse fp32 (rows,))
#       on whole rows (width = V);
#   backward(logits, target, lse, grad, col_start, vocab, ignore_index, label_smoothing, z_loss, softcap) -> dz
#       on the vocabulary columns col_start .. col_start + width, in the logits' dtype (it may overwrite
#       `logits`); grad fp32 (rows,) is each token's incoming gradient.


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    z = logits.to(compute_dtype(logits.dtype))
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def reference_forward(logits, target, ignore_index, label_smoothing, z_loss, softcap):
    """The torch rows (float64-capable): per-token loss and logsumexp of the capped logits."""
    z = _capped(logits, softcap)
    lse = torch.logsumexp(z, -1)
    valid = target != ignore_index
    z_t = z.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    loss = lse - (1 - label_smoothing) * z_t - label_smoothing * z.mean(-1) + z_loss * lse.square()
    return torch.where(valid, loss, 0.0).to(lse.dtype), lse


def reference_backward(logits, target, lse, grad, col_start, vocab, ignore_index, label_smoothing, z_loss, softcap):
    z = _capped(logits, softcap)
    dz = torch.exp(z - lse[:, None]).mul_((1 + 2 * z_loss * lse)[:, None]).sub_(label_smoothing / vocab)
    valid = target != ignore_index
    hit = valid & (target >= col_start) & (target < col_start + z.shape[-1])
    rows = torch.arange(len(target), device=target.device)[hit]
    dz[rows, target[hit] - col_start] -= 1 - label_smoothing
    dz.mul_(torch.where(valid, grad.to(dz.dtype), 0.0)[:, None])
    if softcap is not None:
        dz.mul_(1 - (z / softcap).square())
    return dz.to(logits.dtype)


def _triton():
    from gpuforge.kernels.triton import fused_linear_cross_entropy

    return fused_linear_cross_entropy


REFERENCE = Implementation(forward=reference_forward, backward=reference_backward)
# The Triton rows stream the vocabulary in chunks: no width limit.
BACKENDS = OpBackends(op="fused_linear_cross_entropy", loaders={"torch": lambda: REFERENCE, "triton": _triton},
                      auto_order=("triton",))


def default_chunk_size(n_tokens: int, vocab: int, hidden_size: int) -> int:
    """Tokens per chunk: a chunk's logits about as large as the hidden states (chunk·V ≈ N·H), a power of two."""
    return max(1, min(n_tokens, 2 ** math.ceil(math.log2(max(1.0, n_tokens * hidden_size / vocab)))))


# --- the chunked driver ------------------------------------------------------------------------------------

def _logits_into(buffer: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """rows @ weight.T (+ bias), (len(rows), len(weight)), written into the front of the flat reused buffer."""
    out = buffer[:rows.shape[0] * weight.shape[0]].view(rows.shape[0], weight.shape[0])
    if bias is None:
        return torch.mm(rows, weight.T, out=out)
    return torch.addmm(bias, rows, weight.T, out=out)


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc fp32 (or float64) and a, b possibly fp16/bf16: the products accumulate in fp32."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _forward_sweep(impl, hidden, weight, target, bias, options, chunk_size):
    n = hidden.shape[0]
    loss = hidden.new_empty((n,), dtype=compute_dtype(hidden.dtype))
    lse = torch.empty_like(loss)
    buffer = hidden.new_empty(min(chunk_size, n) * weight.shape[0])
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        logits = _logits_into(buffer, hidden[start:end], weight, bias)
        loss[start:end], lse[start:end] = impl.forward(logits, target[start:end], *options)
    return loss, lse


def block_columns(n_tokens: int, vocab: int, chunk_size: int) -> int:
    """Vocabulary columns per backward block: as many logits as a forward chunk of chunk_size tokens."""
    return vocab if n_tokens <= chunk_size else max(1, chunk_size * vocab // n_tokens)


def _backward_sweep(impl, grad, hidden, weight, target, bias, lse, options, chunk_size, needs):
    """(dhidden, dweight, dbias), each an empty tensor where `needs` says it is not wanted."""
    need_dh, need_dw, need_db = needs
    n, vocab = hidden.shape[0], weight.shape[0]
    accum = compute_dtype(hidden.dtype)
    dh = torch.zeros(hidden.shape if need_dh else (0,), dtype=accum, device=hidden.device)
    dw = weight.new_empty(weight.shape if need_dw else (0,))
    db = weight.new_empty((vocab,) if need_db else (0,))
    width = block_columns(n, vocab, chunk_size)
    buffer = hidden.new_empty(n * min(width, vocab))
    for start in range(0, vocab if any(needs) else 0, width):
        end = min(start + width, vocab)
        block = weight[start:end]
        logits = _logits_into(buffer, hidden, block, bias[start:end] if bias is not None else None)
        dz = impl.backward(logits, target, lse, grad, start, vocab, *options)
        if need_dw:
            torch.mm(dz.T, hidden, out=dw[start:end])
        if need_db:
            db[start:end] = dz.sum(0, dtype=accum)
        if need_dh:
            _add_matmul(dh, dz, block)
    return dh.to(hidden.dtype), dw, db


# --- torch.library ops -------------------------------------------------------------------------------------

@torch.library.custom_op("gpuforge::fused_linear_cross_entropy", mutates_args=())
def _flce_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
             ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None, chunk_size: int,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token logsumexp), both in the compute dtype (fp32; float64 for float64)."""
    return _forward_sweep(BACKENDS.impl(backend), hidden.contiguous(), weight.contiguous(), target.contiguous(),
                          bias, (ignore_index, label_smoothing, z_loss, softcap), chunk_size)


@_flce_op.register_fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size, backend):
    loss = hidden.new_empty(hidden.shape[:1], dtype=compute_dtype(hidden.dtype))
    return loss, torch.empty_like(loss)


@torch.library.custom_op("gpuforge::fused_linear_cross_entropy_backward", mutates_args=())
def _flce_backward_op(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                      bias: torch.Tensor | None, lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                      z_loss: float, softcap: float | None, chunk_size: int, need_hidden: bool, need_weight: bool,
                      need_bias: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias) for the per-token incoming gradient `grad`; a gradient not needed is (0,)."""
    return _backward_sweep(BACKENDS.impl(backend), grad.to(lse.dtype).contiguous(), hidden.contiguous(),
                           weight.contiguous(), target.contiguous(), bias, lse,
                           (ignore_index, label_smoothing, z_loss, softcap), chunk_size,
                           (need_hidden, need_weight, need_bias))


@_flce_backward_op.register_fake
def _(grad, hidden, weight, target, bias, lse, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
      need_hidden, need_weight, need_bias, backend):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty(weight.shape[:1] if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, *options, chunk_size, backend = inputs
    ctx.save_for_backward(hidden, weight, target, bias, output[1])
    ctx.options, ctx.chunk_size, ctx.backend = options, chunk_size, backend


def _backward(ctx, grad_loss, grad_lse):
    hidden, weight, target, bias, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]
    dh, dw, db = _flce_backward_op(grad_loss, hidden, weight, target, bias, lse, *ctx.options, ctx.chunk_size,
                                   *needs, ctx.backend)
    grads = [g if need else None for g, need in zip((dh, dw, db), needs, strict=True)]
    return grads[0], grads[1], None, grads[2], None, None, None, None, None, None


_flce_op.register_autograd(_backward, setup_context=_setup_context)


# --- public API --------------------------------------------------------------------------------------------

def _check_number(value, name: str, low: float, high: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name}: expected {what}, got {value!r}")


def _check_inputs(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, reduction,
                  chunk_size) -> None:
    check_tensor(hidden, "hidden", ndim=2)
    check_tensor(weight, "weight", ndim=2)
    check_tensor(target, "target", dtypes=(torch.int64,), ndim=1)
    check_same_device(hidden=hidden, weight=weight, target=target)
    check_same_dtype(hidden=hidden, weight=weight)
    n, h = hidden.shape
    if weight.shape[1] != h or weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape (V, {h}) with V >= 1 (lm_head's weight; hidden has shape "
                         f"{tuple(hidden.shape)}), got {tuple(weight.shape)}")
    if target.shape[0] != n:
        raise ValueError(f"target: expected shape ({n},) (one per row of hidden), got {tuple(target.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        check_same_device(hidden=hidden, bias=bias)
        check_same_dtype(hidden=hidden, bias=bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) (weight's rows), got {tuple(bias.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    _check_number(label_smoothing, "label_smoothing", 0.0, 1.0, "a float in [0, 1]")
    _check_number(z_loss, "z_loss", 0.0, float("inf"), "a finite float >= 0")
    if z_loss == float("inf"):
        raise ValueError(f"z_loss: expected a finite float >= 0, got {z_loss!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, int | float)
                                or not 0 < softcap < float("inf")):
        raise ValueError(f"softcap: expected None or a positive finite float, got {softcap!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")


def check_targets(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """The kernels' memory safety: every target is ignore_index or in 0 .. V − 1 (one host sync); skipped while
    torch.compile traces (there the caller's tensors are trusted)."""
    if torch.compiler.is_compiling() or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"target: expected class indices in 0..{vocab - 1} or ignore_index={ignore_index}, got "
                         f"{int(target[first])} at position {first}")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                               reduction: str = "mean", chunk_size: int | None = None,
                               backend: str = "auto") -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T + bias, target, ...) (+ z-loss, softcapping) without the logits.

    hidden (N, H) and weight (V, H) (lm_head's), float32/float16/bfloat16, one dtype; bias (V,) or None;
    target (N,) int64, each in 0..V−1 or ignore_index. softcap: logits become softcap·tanh(logits/softcap);
    z_loss adds z_loss·logsumexp(logits)² per token that is not ignored. reduction: "mean" (over tokens that
    are not ignored), "sum" or "none" ((N,), 0 for ignored tokens). The loss is float32 (float64 is not an
    input dtype). chunk_size: tokens per chunk (None: logits about as large as hidden). Autograd for hidden,
    weight and bias; the gradients are formed chunk by chunk in the backward."""
    _check_inputs(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, reduction,
                  chunk_size)
    check_targets(target, weight.shape[0], ignore_index)
    n = hidden.shape[0]
    chunk = chunk_size if chunk_size is not None else default_chunk_size(n, *weight.shape)
    options = {"ignore_index": ignore_index, "label_smoothing": label_smoothing, "z_loss": z_loss,
               "softcap": softcap, "reduction": reduction, "chunk_size": chunk_size}
    chosen = BACKENDS.select(backend, hidden.device, dtype=hidden.dtype, width=weight.shape[0],
                             shape=(n, *weight.shape),
                             run=lambda b: fused_linear_cross_entropy(hidden, weight, target, bias, **options,
                                                                      backend=b))
    loss, _ = _flce_op(hidden, weight, target, bias, ignore_index, float(label_smoothing), float(z_loss),
                       float(softcap) if softcap is not None else None, chunk, chosen)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()


def fused_linear_cross_entropy_float64(hidden, weight, target, bias=None, *, ignore_index=-100,
                                       label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean"):
    """The oracle of tests and the self-check, unfused: lm_head, softcap, then F.cross_entropy with the same
    options, plus z_loss·lse² reduced the same way, all in float64."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing, reduction=reduction)
    if z_loss:
        valid = target != ignore_index
        z_term = torch.where(valid, z_loss * torch.logsumexp(logits, -1).square(), 0.0)
        loss = loss + {"none": z_term, "sum": z_term.sum(), "mean": z_term.sum() / valid.sum()}[reduction]
    return loss


SELFCHECK_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _outputs(fn, hidden, weight, bias, target, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], target, leaves[2])
    wrt = [t for t in leaves if t is not None]
    return (loss.detach(), *torch.autograd.grad(loss, wrt, grad))


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    settings = (  # n, hidden size, vocab, options
        (5, 16, 33, dict(reduction="mean")),
        (13, 24, 130, dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3, chunk_size=4)),
        (9, 8, 97, dict(reduction="none", softcap=5.0, ignore_index=3, chunk_size=2)),
    )
    for dtype, tol in SELFCHECK_TOL.items():
        for n, h, v, options in settings:
            generator = torch.Generator().manual_seed(n * 100 + v)
            hidden = torch.randn(n, h, generator=generator).to(device=device, dtype=dtype)
            weight = (torch.randn(v, h, generator=generator) / h ** 0.5).to(device=device, dtype=dtype)
            bias = (0.1 * torch.randn(v, generator=generator)).to(device=device, dtype=dtype) \
                if options["reduction"] == "sum" else None
            target = torch.randint(0, v, (n,), generator=generator).to(device)
            target[::4] = options.get("ignore_index", -100)
            grad = (torch.randn(n, generator=generator) if options["reduction"] == "none"
                    else torch.tensor(1.5)).to(device=device, dtype=compute_dtype(dtype))
            reference_options = {k: o for k, o in options.items() if k != "chunk_size"}
            label = f"{str(dtype).removeprefix('torch.')} N={n} H={h} V={v} " + \
                " ".join(f"{k}={o}" for k, o in options.items())
            cases.append(CheckCase(
                "fused_linear_cross_entropy", label,
                run=lambda backend, a=(hidden, weight, bias, target, grad), o=options: _outputs(
                    lambda *t: fused_linear_cross_entropy(*t, backend=backend, **o), *a),
                reference=lambda a=(hidden, weight, bias, target, grad), o=reference_options: _outputs(
                    lambda *t: fused_linear_cross_entropy_float64(*t, **o),
                    *(t.double() if t is not None else None for t in a[:3]), a[3], a[4].double()),
                tol=tol, dtype=dtype))
    return cases
