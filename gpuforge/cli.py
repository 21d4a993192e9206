"""`python -m gpuforge {info,check,bench,tune,inspect,train,demo}`: each subcommand lives in its own module and is
imported only when asked for, so `gpuforge info` never pays for Triton or torch.distributed set-up."""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "info": ("gpuforge.info", "device, driver, clocks and power (NVML) and the backends table"),
    "check": ("gpuforge.check", "correctness of every op on every backend that can run here"),
    "bench": ("gpuforge.profiling.cli", "microbenchmarks vs the PyTorch baselines (tables, JSON, plots)"),
    "tune": ("gpuforge.tune", "time every backend at representative shapes; `auto` then picks the fastest"),
    "inspect": ("gpuforge.profiling.static.cli", "what a GPU would run: registers, spills, shared memory, SASS"),
    "train": ("gpuforge.parallel.training.cli", "parallel training vs one process (torchrun / mpiexec)"),
    "demo": ("gpuforge.demo", "the main job: info, check, a quick benchmark, parallel training runs"),
}


# Commands that run kernels: on a machine without a GPU they use the Triton interpreter and the numba.cuda
# simulator. Both libraries read their switch when they are imported (Triton builds tl.sum and friends then),
# and `import gpuforge` imports neither, so setting the switches here, before any kernel runs, is enough.
_SIMULATE_WITHOUT_GPU = ("info", "check", "bench", "demo")


def enable_simulators_without_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    if "triton.language" in sys.modules and os.environ["TRITON_INTERPRET"] == "1":
        raise RuntimeError("triton was imported before the CLI could switch its interpreter on; run "
                           "`TRITON_INTERPRET=1 python -m gpuforge ...`")


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
        enable_simulators_without_gpu()
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest) or 0
