"""Run a function on N real processes with a real communicator, and collect each rank's return value.

    results = run_distributed(fn, world_size, *args, comm="torch" | "mpi", timeout=..., debug=...)

`fn(comm, *args)` must be a module-level function of an importable module (tests.parallel.test_x). Its
return value (anything torch.save can write) comes back as results[rank].

- comm="torch": gloo process groups through `torch.multiprocessing.start_processes` on a free port
  (OLMo-core's run_distributed_test shape). Processes come from a forkserver that has imported torch once,
  so each rank starts in well under a second; the group is destroyed in `finally`.
- comm="mpi": `.venv/bin/mpiexec -n N .venv/bin/python -m tests.parallel.dist_harness ...`, real MPICH.

A failure on any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import importlib
import os
import pickle
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(fn, args, kind, out_dir, comm_opts):
    from gpuforge.parallel.comm import init_comm

    comm = init_comm(kind, **comm_opts)
    try:
        torch.set_num_threads(1)
        result = fn(comm, *args)
        torch.save(result, Path(out_dir) / f"rank{comm.rank}.pt")
    finally:
        comm.destroy()


def _torch_worker(local_rank, fn, args, world_size, port, out_dir, comm_opts):
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _run_rank(fn, args, "torch", out_dir, comm_opts)


def _forkserver_context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "gpuforge.parallel"])
    return "forkserver"


def run_distributed(fn, world_size: int, *args, comm: str = "torch", timeout: float = 120.0,
                    comm_timeout: float = 60.0, debug: bool = False) -> list:
    comm_opts = dict(timeout=comm_timeout, debug=debug)
    with tempfile.TemporaryDirectory() as out_dir:
        if comm == "torch":
            mp.start_processes(_torch_worker, args=(fn, args, world_size, free_port(), out_dir, comm_opts),
                               nprocs=world_size, join=True, start_method=_forkserver_context())
        elif comm == "mpi":
            spec = Path(out_dir) / "spec.pkl"
            spec.write_bytes(pickle.dumps((fn.__module__, fn.__name__, args, comm_opts)))
            cmd = [str(VENV_BIN / "mpiexec"), "-n", str(world_size), sys.executable, "-m",
                   "tests.parallel.dist_harness", str(spec), out_dir]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}"
                       f"{os.environ.get('PYTHONPATH', '')}")
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"mpiexec -n {world_size} failed (exit {proc.returncode}):\n"
                                   f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        else:
            raise ValueError(f"comm must be 'torch' or 'mpi', got {comm!r}")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _mpi_main(spec_path: str, out_dir: str) -> None:
    module, name, args, comm_opts = pickle.loads(Path(spec_path).read_bytes())
    fn = getattr(importlib.import_module(module), name)
    _run_rank(fn, args, "mpi", out_dir, comm_opts)


if __name__ == "__main__":
    _mpi_main(sys.argv[1], sys.argv[2])


# ------------------------------------------------------------------------ a tiny model for parity tests
class TiedMLP(torch.nn.Module):
    """Input embedding tied (transposed) to the output layer, one frozen layer, optionally an unused one."""

    def __init__(self, d: int = 6, h: int = 8, *, unused: bool = False, dtype=torch.float64):
        super().__init__()
        self.inp = torch.nn.Linear(d, h, dtype=dtype)
        self.hidden = torch.nn.Linear(h, h, dtype=dtype)
        self.frozen = torch.nn.Linear(h, h, dtype=dtype).requires_grad_(False)
        self.unused = torch.nn.Linear(3, 3, dtype=dtype) if unused else None

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = self.frozen(torch.tanh(self.hidden(h)))
        return torch.nn.functional.linear(h, self.inp.weight.t())


def make_batches(steps: int, world: int, per_rank: int, d: int = 6, seed: int = 0, dtype=torch.float64):
    """steps × (x, y) of world·per_rank rows; rank r trains on rows [r·per_rank, (r+1)·per_rank)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(world * per_rank, d, generator=g, dtype=dtype),
             torch.randn(world * per_rank, d, generator=g, dtype=dtype)) for _ in range(steps)]


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]
