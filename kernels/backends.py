"""Backend registry: which of torch / triton / cuda / cupy / numba can run here, and which one an op call uses.

`available()` probes each backend without initialising anything at import time. `select()` turns a
`backend=` argument (or the GPUFORGE_BACKEND environment variable, a preference) into the backend that runs:
`auto` takes, on a CUDA tensor, the backend measured fastest for that op, dtype, shape bucket and device
(auto_table.py: the user's tune cache, then a shipped table), else the first available backend of the op's
documented order (a rule, not a measurement); on a CPU tensor, the torch reference. Named backends are
strict: if they cannot run here the call raises and says why. Every environment variable is read when a call
needs it, never at import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Sequence

import torch

from gpuforge.kernels import auto_table

BACKENDS = ("torch", "triton", "cuda", "cupy", "numba")
# Backends whose kernels take CUDA memory; triton and numba also run on CPU tensors under their simulators.
_GPU_ONLY = ("cuda", "cupy")


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def numba_simulator_on() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def _cuda_device_present() -> bool:
    return torch.cuda.is_available()


def _probe_torch() -> tuple[bool, str]:
    return True, f"torch {torch.__version__} (reference implementations)"


def _probe_triton() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    version = importlib.import_module("triton").__version__
    if _cuda_device_present():
        return True, f"triton {version} on CUDA"
    if triton_interpreter_on():
        return True, f"triton {version} interpreter on CPU tensors (TRITON_INTERPRET=1)"
    return False, f"triton {version} installed but no CUDA device; set TRITON_INTERPRET=1 to interpret on CPU"


def _probe_numba() -> tuple[bool, str]:
    if importlib.util.find_spec("numba") is None:
        return False, "numba is not installed (pip install numba numba-cuda)"
    if numba_simulator_on():
        return True, "numba.cuda simulator on CPU tensors (NUMBA_ENABLE_CUDASIM=1)"
    if not _cuda_device_present():
        return False, "no CUDA device; set NUMBA_ENABLE_CUDASIM=1 to simulate on CPU"
    from numba import cuda

    if not cuda.is_available():
        return False, "numba cannot reach the CUDA driver (is numba-cuda installed?)"
    return True, "numba.cuda on CUDA"


def _probe_cuda() -> tuple[bool, str]:
    try:
        extension = importlib.import_module("gpuforge._C")
    except ImportError as err:
        return False, (
            f"the CUDA extension gpuforge._C is not built ({err}); it is built by `pip install -e .` when nvcc "
            "is on PATH and GPUFORGE_BUILD_CUDA is not 0"
        )
    if not _cuda_device_present():
        return False, "gpuforge._C is built, but torch sees no CUDA device"
    try:
        extension.device_count()
    except RuntimeError as err:
        return False, f"gpuforge._C is built, but the CUDA runtime fails: {err}"
    return True, "gpuforge._C (CUDA C++ compiled ahead of time for sm_80 and sm_90a)"


def _probe_cupy() -> tuple[bool, str]:
    if importlib.util.find_spec("cupy") is None:
        return False, "cupy is not installed (pip install cupy-cuda13x)"
    if not _cuda_device_present():
        return False, "cupy is installed, but torch sees no CUDA device"
    return True, "cupy RawModule (csrc/*.cu compiled at run time by NVRTC)"


_PROBES = {"torch": _probe_torch, "triton": _probe_triton, "cuda": _probe_cuda, "cupy": _probe_cupy,
           "numba": _probe_numba}


@functools.cache
def _probe(name: str, interpreter_on: bool, simulator_on: bool) -> tuple[bool, str]:
    # Cached per simulator setting: a probe imports modules and may touch the driver, once.
    return _PROBES[name]()


def is_available(name: str) -> tuple[bool, str]:
    return _probe(name, triton_interpreter_on(), numba_simulator_on())


def available() -> dict[str, tuple[bool, str]]:
    """{backend: (usable here, why / how)} for every backend."""
    return {name: is_available(name) for name in BACKENDS}


def preferred() -> str:
    """GPUFORGE_BACKEND: the backend `auto` runs wherever it can ('auto' when unset)."""
    name = os.environ.get("GPUFORGE_BACKEND", "auto")
    _check_name(name, "GPUFORGE_BACKEND")
    return name


def _check_name(name: str, what: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{what}: expected 'auto' or one of {BACKENDS}, got {name!r}")


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether `backend` can take tensors on `device` here (simulators take CPU tensors)."""
    if backend == "torch":
        return True
    if device.type == "cuda":
        return True
    if device.type != "cpu" or backend in _GPU_ONLY:
        return False
    return triton_interpreter_on() if backend == "triton" else numba_simulator_on()


def constant_under_compile(fn):
    """`torch.compiler.assume_constant_result(fn)`: torch.compile calls `fn` once while tracing and bakes its
    result into the graph. That function only sets the attribute below, but importing it imports torch._dynamo
    and with it triton.language, whose own @jit helpers (tl.sum, tl.max) are then built before TRITON_INTERPRET
    can be set. Setting the attribute here keeps `import gpuforge` free of both; tests/kernels/test_backends.py
    checks that torch's decorator sets exactly this attribute."""
    fn._dynamo_marked_constant = True
    return fn


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@constant_under_compile
def device_name(device: torch.device) -> str | None:
    """The CUDA device's name, as the measured tables key it; None where CUDA is not available (a "cuda"
    device is then only a description: no tensor lives on it)."""
    if not torch.cuda.is_available():
        return None
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


# Under torch.compile the choice is made once, at trace time, and baked into the graph as a constant.
@constant_under_compile
def select(op: str, backend: str, device: torch.device, implemented: Sequence[str],
           auto_order: Sequence[str], dtype: torch.dtype | None = None, shape: tuple[int, ...] = ()) -> str:
    """The backend that runs `op` on `device`, given the caller's `backend=` argument. `auto`: GPUFORGE_BACKEND
    when set and usable; torch on CPU tensors; on CUDA tensors the measured entry for (op, dtype, bucket of
    `shape`, device) in the tune cache or the shipped table (auto_table.py), else the first of `auto_order`
    installed."""
    _check_name(backend, "backend")
    if backend == "auto":
        preferred_name = preferred()
        if preferred_name != "auto" and preferred_name in implemented and runs_on(preferred_name, device):
            if is_available(preferred_name)[0]:
                return preferred_name
        if device.type != "cuda":
            return "torch"
        name = device_name(device)
        measured = None if name is None else auto_table.TABLE.lookup(auto_table.key(op, dtype, shape, name), name)
        if measured is not None and measured[0] in implemented and is_available(measured[0])[0]:
            return measured[0]
        for candidate in auto_order:
            if candidate in implemented and is_available(candidate)[0]:
                return candidate
        return "torch"
    if backend not in implemented:
        raise ValueError(f"backend={backend!r}: {op} has no {backend} implementation (it has {tuple(implemented)})")
    ok, reason = is_available(backend)
    if not ok:
        raise RuntimeError(f"backend={backend!r} is unavailable for {op}: {reason}")
    if not runs_on(backend, device):
        raise ValueError(f"backend={backend!r} cannot run {op} on {device.type} tensors here; it needs CUDA tensors"
                         + ("" if backend in _GPU_ONLY else " (or its CPU simulator switched on)"))
    return backend
