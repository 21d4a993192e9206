"""Per-op backend table: which backends implement an op, what each one rejects, and how `auto` picks on GPUs
(measured tables first, then the op's `auto_order`: auto_table.py).

Every backend of an op is one object with the same two functions, `forward(...)` and (when the op has a
backward kernel) `backward(...)`, with the signatures the op's face module documents: a module under
kernels/<backend>/<op>.py, or `Implementation` for the torch reference that lives in the face. The table holds
a zero-argument loader per backend. The Triton and Numba loaders import their module on first use, because
both libraries decide at import whether to interpret/simulate (TRITON_INTERPRET, NUMBA_ENABLE_CUDASIM) and
because they are optional installs; the CUDA and CuPy launchers import nothing heavy, so their loaders
return modules the face imported.

What a backend cannot take by design is data here (`Limits`), not an import between modules: `auto` passes
over a backend whose limits exclude the input, and a backend named in the call raises, naming the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from gpuforge.kernels import auto_table, backends


class Implementation(NamedTuple):
    """A backend as a pair of functions (the torch reference of an op, defined in its face module)."""

    forward: Callable[..., Any]
    backward: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Limits:
    """Inputs a backend rejects by design: dtypes it has no kernels for, and the widest last dim (row length)
    its kernels keep on chip. `why` completes the error message ("... because <why>")."""

    dtypes: tuple[torch.dtype, ...] = ()
    max_width: int | None = None
    why: str = ""

    def rejects(self, dtype: torch.dtype | None, width: int | None) -> str | None:
        """The reason this input is rejected, or None when it is accepted."""
        if dtype is not None and dtype in self.dtypes:
            return f"it has no {str(dtype).removeprefix('torch.')} kernels"
        if width is not None and self.max_width is not None and width > self.max_width:
            return f"its last dim must be <= {self.max_width}, got {width}" + (f" ({self.why})" if self.why else "")
        return None


@dataclass(frozen=True)
class OpBackends:
    op: str
    loaders: Mapping[str, Callable[[], Any]]  # backend name -> () -> object with forward (and backward)
    auto_order: tuple[str, ...]  # on CUDA tensors: the rule `auto` follows where nothing was measured
    limits: Mapping[str, Limits] = field(default_factory=dict)

    def rejects(self, backend: str, dtype: torch.dtype | None = None, width: int | None = None) -> str | None:
        limits = self.limits.get(backend)
        return None if limits is None else limits.rejects(dtype, width)

    def supports(self, backend: str, dtype: torch.dtype | None = None, width: int | None = None) -> bool:
        return self.rejects(backend, dtype, width) is None

    def select(self, backend: str, device: torch.device, *, dtype: torch.dtype | None = None,
               width: int | None = None, shape: Sequence[int] = (), run: Callable[[str], Any] | None = None) -> str:
        """The backend that runs this op on `device` for inputs of `dtype` and last dim `width`. For CUDA tensors
        `auto` reads the measured tables at (op, dtype, bucket of `shape`, device) first (auto_table.py); with
        GPUFORGE_AUTOTUNE=1 and no entry yet, it times `run(backend)` for every candidate and records the
        fastest (eager calls only: under torch.compile the tables are read, never written)."""
        candidates = tuple(b for b in self.loaders if self.supports(b, dtype, width))
        order = tuple(b for b in self.auto_order if b in candidates)
        shape = tuple(int(d) for d in shape)
        if (backend == "auto" and device.type == "cuda" and run is not None and not torch.compiler.is_compiling()
                and auto_table.autotune_on() and backends.preferred() == "auto"):
            name = backends.device_name(device)
            entry_key = None if name is None else auto_table.key(self.op, dtype, shape, name)
            if entry_key is not None and (auto_table.measuring_anew()
                                          or auto_table.TABLE.lookup(entry_key, name) is None):
                auto_table.measure(entry_key, [b for b in candidates if backends.is_available(b)[0]], run)
        chosen = backends.select(self.op, backend, device, candidates if backend == "auto" else tuple(self.loaders),
                                 order, dtype, shape)
        reason = self.rejects(chosen, dtype, width)
        if reason is not None:
            error = TypeError if self.rejects(chosen, dtype) else ValueError
            raise error(f"backend={chosen!r} cannot run {self.op} on this input: {reason}; the backends that "
                        f"can are {candidates}")
        return chosen

    def runnable(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        """The backends of this op that can run on `device` here (installed, simulator on for CPU tensors)
        and that take `dtype`."""
        return [b for b in self.loaders if backends.is_available(b)[0] and backends.runs_on(b, device)
                and self.supports(b, dtype)]

    def impl(self, backend: str):
        """The backend's forward/backward object (its module imported on first use)."""
        return self.loaders[backend]()
