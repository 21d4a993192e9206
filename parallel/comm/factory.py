"""`init_comm`: the communicator of this process, on torch.distributed or on mpi4py.

The factory imports the chosen backend only when asked (torch.distributed and mpi4py are heavy, and mpi4py
initialises MPI on import); each backend imports the interface, never the factory, so nothing cycles.
Environment: GPUFORGE_COMM_TIMEOUT (seconds a collective may take before it raises, default 300) and
GPUFORGE_COMM_DEBUG (1: check that every rank calls the same collective), read at the call.
"""

from __future__ import annotations

import math
import os

from gpuforge.parallel.comm.communicator import Communicator

DEFAULT_TIMEOUT_S = 300.0


def _timeout_from_env() -> float:
    raw = os.environ.get("GPUFORGE_COMM_TIMEOUT")
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"GPUFORGE_COMM_TIMEOUT: expected a positive number of seconds, got {raw!r}")
    return value


def check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    return float(timeout)


def init_comm(kind: str = "torch", *, backend: str | None = None, timeout: float | None = None,
              debug: bool | None = None, flight_recorder_size: int = 32) -> Communicator:
    """The communicator for this process: torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) for kind="torch", MPI.COMM_WORLD for kind="mpi"."""
    timeout = _timeout_from_env() if timeout is None else check_timeout(timeout)
    debug = os.environ.get("GPUFORGE_COMM_DEBUG", "0") not in ("", "0") if debug is None else debug
    opts = dict(timeout=timeout, debug=debug, flight_recorder_size=flight_recorder_size)
    if kind == "torch":
        from gpuforge.parallel.comm.torch_backend import TorchComm

        return TorchComm.from_env(backend=backend, **opts)
    if kind == "mpi":
        from gpuforge.parallel.comm.mpi_backend import MPIComm

        return MPIComm(**opts)
    raise ValueError(f"kind: expected 'torch' or 'mpi', got {kind!r}")
