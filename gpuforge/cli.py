"""`python -m gpuforge {info,check,bench,train,demo}`: each subcommand lives in its own module and is
imported only when asked for, so `gpuforge info` never pays for Triton or torch.distributed set-up."""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "info": ("gpuforge.info", "device, driver, clocks and power (NVML) and the backends table"),
    "check": ("gpuforge.check", "correctness of every op on every backend that can run here"),
    "bench": ("gpuforge.profiling.cli", "microbenchmarks vs the PyTorch baselines (tables, JSON, plots)"),
    "train": ("gpuforge.parallel.train", "parallel training vs one process (torchrun / mpiexec)"),
    "demo": ("gpuforge.demo", "the main job: info, check, a quick benchmark, parallel training runs"),
}


# Commands that run kernels: on a machine without a GPU they use the Triton interpreter and the numba.cuda
# simulator. Both switches are read when the kernel modules are imported, so they are set before that.
_SIMULATE_WITHOUT_GPU = ("info", "check", "bench", "demo")


def enable_simulators_without_gpu(argv: list[str]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    interpreter_was_off = "TRITON_INTERPRET" not in os.environ
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    # `import gpuforge` imported torch, and torch imports triton: triton.language's own @jit helpers (tl.sum,
    # tl.max, ...) were then built for the GPU and fail inside interpreted kernels. Start again with the switch set.
    if interpreter_was_off and "triton.language" in sys.modules:
        os.execv(sys.executable, [sys.executable, "-m", "gpuforge", *argv])


def usage() -> str:
    lines = ["usage: python -m gpuforge <command> [options]", "", "commands:"]
    lines += [f"  {name:<6} {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"gpuforge: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name in _SIMULATE_WITHOUT_GPU:
        enable_simulators_without_gpu(argv)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest) or 0
