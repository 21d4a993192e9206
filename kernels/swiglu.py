"""gf.swiglu: y = silu(gate) · up = gate · sigmoid(gate) · up, the gated activation of Llama's feed-forward
(down(swiglu(gate_proj(x), up_proj(x)))), fused into one elementwise kernel each way.

Every backend computes in fp32 (float64 for float64 inputs) and rounds once; the backward recomputes the
sigmoid from the saved inputs: d gate = dy · up · σ · (1 + gate · (1 − σ)), d up = dy · silu(gate).
"""

from __future__ import annotations

import torch

from gpuforge.kernels._selfcheck import CheckCase, outputs_and_grads
from gpuforge.kernels._tensors import compute_dtype
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_same_shape, check_tensor
from gpuforge.kernels.dispatch import Implementation, OpBackends

# Every backend: forward(gate, up) -> y and backward(dy, gate, up) -> (d gate, d up), any shape (same for all),
# outputs contiguous.


def reference_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    acc = compute_dtype(gate.dtype)
    return (torch.nn.functional.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype).contiguous()


def reference_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = compute_dtype(gate.dtype)
    dy, g, u = dy.to(acc), gate.to(acc), up.to(acc)
    sig = torch.sigmoid(g)
    dgate = dy * u * sig * (1 + g * (1 - sig))
    return dgate.to(gate.dtype).contiguous(), (dy * g * sig).to(up.dtype).contiguous()


def _triton():
    from gpuforge.kernels.triton import swiglu

    return swiglu


REFERENCE = Implementation(forward=reference_forward, backward=reference_backward)
BACKENDS = OpBackends(op="swiglu", loaders={"torch": lambda: REFERENCE, "triton": _triton},
                      auto_order=("triton",))


@torch.library.custom_op("gpuforge::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    return BACKENDS.impl(backend).forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("gpuforge::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return BACKENDS.impl(backend).backward(dy, gate, up)


@_swiglu_backward_op.register_fake
def _(dy, gate, up, backend):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_backward_op(grad, gate, up, ctx.backend)
    return dgate, dup, None


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) · up elementwise. gate and up: same shape, dtype (float32/float16/bfloat16) and device, any
    strides; the result is contiguous, of that shape and dtype. Autograd for gate and up."""
    check_tensor(gate, "gate")
    check_tensor(up, "up")
    check_same_device(gate=gate, up=up)
    check_same_dtype(gate=gate, up=up)
    check_same_shape(gate=gate, up=up)
    chosen = BACKENDS.select(backend, gate.device, dtype=gate.dtype, shape=(gate.numel(),),
                             run=lambda b: swiglu(gate, up, backend=b))
    return _swiglu_op(gate, up, chosen)


def swiglu_float64(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The oracle of tests and the self-check."""
    return torch.nn.functional.silu(gate.double()) * up.double()


SELFCHECK_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    for dtype, tol in SELFCHECK_TOL.items():
        for shape in ((1,), (3, 97), (2, 5, 130)):
            generator = torch.Generator().manual_seed(shape[-1])
            gate, up, dy = (3 * torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
                            for _ in range(3))
            cases.append(CheckCase(
                "swiglu", f"{str(dtype).removeprefix('torch.')} {shape} fwd+bwd",
                run=lambda backend, g=gate, u=up, dy=dy: outputs_and_grads(
                    lambda a, b: swiglu(a, b, backend=backend), (g, u), dy),
                reference=lambda g=gate, u=up, dy=dy: outputs_and_grads(
                    swiglu_float64, (g.double(), u.double()), dy.double()),
                tol=tol, dtype=dtype))
    return cases
