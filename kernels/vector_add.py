"""gf.vector_add: elementwise a + b on every backend (the project's smallest complete op, and its template).

One op, one module: the functional API with input checks, the torch.library custom op (with a fake for
torch.compile and autograd), the torch reference, and the backend table. Every backend is an object with
`forward(a, b) -> a + b` on contiguous tensors (kernels/<backend>/vector_add.py)."""

from __future__ import annotations

import torch

from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_same_shape, check_tensor
from gpuforge.kernels.cuda import vector_add as cuda_vector_add
from gpuforge.kernels.cupy import vector_add as cupy_vector_add
from gpuforge.kernels.dispatch import Implementation, Limits, OpBackends


def vector_add_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def _triton():
    from gpuforge.kernels.triton import vector_add

    return vector_add


def _numba():
    from gpuforge.kernels.numba import vector_add

    return vector_add


REFERENCE = Implementation(forward=vector_add_reference)
BACKENDS = OpBackends(
    op="vector_add",
    loaders={"torch": lambda: REFERENCE, "triton": _triton, "cuda": lambda: cuda_vector_add,
             "cupy": lambda: cupy_vector_add, "numba": _numba},
    auto_order=("cuda", "triton", "cupy", "numba"),
    limits={"numba": Limits(dtypes=(torch.bfloat16,))},
)


@torch.library.custom_op("gpuforge::vector_add", mutates_args=())
def _vector_add_op(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    return BACKENDS.impl(backend).forward(a, b)


@_vector_add_op.register_fake
def _(a, b, backend):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _backward(ctx, grad):
    return grad, grad, None


_vector_add_op.register_autograd(_backward)


def vector_add(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """a + b elementwise. a and b: same shape, dtype (float32/float16/bfloat16) and device; any strides."""
    check_tensor(a, "a")
    check_tensor(b, "b")
    check_same_device(a=a, b=b)
    check_same_dtype(a=a, b=b)
    check_same_shape(a=a, b=b)
    chosen = BACKENDS.select(backend, a.device, dtype=a.dtype, shape=(max(a.numel(), b.numel()),),
                             run=lambda name: vector_add(a, b, backend=name))
    return _vector_add_op(a, b, chosen)


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)):
        for n in (1, 97, 1000):
            generator = torch.Generator().manual_seed(n)
            a = torch.randn(n, generator=generator).to(device=device, dtype=dtype)
            b = torch.randn(n, generator=generator).to(device=device, dtype=dtype)
            cases.append(CheckCase(
                "vector_add", f"{str(dtype).removeprefix('torch.')} ({n},)",
                run=lambda backend, a=a, b=b: vector_add(a, b, backend=backend),
                reference=lambda a=a, b=b: a.double() + b.double(), tol=tol, dtype=dtype))
    return cases
