"""gf.vector_add: elementwise a + b on every backend (the project's smallest complete op, and its template).

One op, one module: the functional API with input checks, the torch.library custom op (with a fake for
torch.compile and autograd), the torch reference, and the CUDA C++ / cupy host glue."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc, cuda_ext, cupy_module
from gpuforge.kernels._dispatch import OpBackends
from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_same_shape, check_tensor

BACKENDS = OpBackends(
    op="vector_add",
    impls={
        "torch": "gpuforge.kernels.vector_add:vector_add_reference",
        "triton": "gpuforge.kernels.triton.vector_add:vector_add",
        "cuda": "gpuforge.kernels.vector_add:vector_add_cuda",
        "cupy": "gpuforge.kernels.vector_add:vector_add_cupy",
        "numba": "gpuforge.kernels.numba.vector_add:vector_add",
    },
    auto_order=("cuda", "triton", "cupy", "numba"),
    unsupported_dtypes={"numba": (torch.bfloat16,)},
)


def vector_add_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def vector_add_cuda(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    out = _alloc.empty_like(a)
    cuda_ext.extension().vector_add(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(),
                                    cuda_ext.dtype_code(a), cuda_ext.stream_handle(a))
    return out


CUPY_THREADS = 256


def vector_add_cupy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The kernels of csrc/vector_add.cu through NVRTC, with the AOT launcher's choice of kernel and grid."""
    import numpy as np

    a, b = a.contiguous(), b.contiguous()
    out = _alloc.empty_like(a)
    n = a.numel()
    if n == 0:
        return out
    ctype = cupy_module.CPP_TYPES[a.dtype]
    names = (f"gpuforge::vector_add_vec16_kernel<{ctype}>", f"gpuforge::vector_add_scalar_kernel<{ctype}>")
    vectorized = all(t.data_ptr() % 16 == 0 for t in (a, b, out))
    per_thread = 16 // a.element_size() if vectorized else 1
    work = -(-n // per_thread)
    blocks = min(-(-work // CUPY_THREADS), 1 << 30)
    kern = cupy_module.kernel("vector_add.cu", names, names[0] if vectorized else names[1])
    args = tuple(cupy_module.as_cupy(t) for t in (a, b, out)) + (np.int64(n),)
    cupy_module.launch(kern, (blocks,), (CUPY_THREADS,), args, a.device)
    return out


@torch.library.custom_op("gpuforge::vector_add", mutates_args=())
def _vector_add_op(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    return BACKENDS.impl(backend)(a, b)


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
    return _vector_add_op(a, b, BACKENDS.select(backend, a.device))


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
