"""Per-op backend table: which backends implement an op, the `auto` order on GPUs, lazy kernel imports."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpuforge import backends


@dataclass(frozen=True)
class OpBackends:
    """`impls` maps a backend name to "module:function" of its host wrapper, imported on first use so that
    the Triton/Numba simulator switches are read when the kernel is first needed, not at `import gpuforge`."""

    op: str
    impls: dict[str, str]
    auto_order: tuple[str, ...]  # on CUDA tensors, fastest measured first
    # dtypes a backend rejects by design (numba has no bfloat16); the self-check skips those pairs
    unsupported_dtypes: dict[str, tuple[torch.dtype, ...]] = field(default_factory=dict)

    def supports(self, backend: str, dtype: torch.dtype | None) -> bool:
        return dtype not in self.unsupported_dtypes.get(backend, ())

    def select(self, backend: str, device: torch.device) -> str:
        return backends.select(self.op, backend, device, tuple(self.impls), self.auto_order)

    def impl(self, backend: str) -> Callable:
        module_name, function_name = self.impls[backend].split(":")
        return getattr(importlib.import_module(module_name), function_name)
