"""Fault drills: a process kills itself abruptly at a named point, to test recovery (checkpoints, restarts).

    GPUFORGE_FAIL_AT=<point>[@<rank>]   e.g. "step-3@1": rank 1 dies at the start of training step 3;
                                        "ckpt-before-rename@0": rank 0 dies inside a checkpoint save
    GPUFORGE_FAIL_ONCE=<file>           die only if <file> does not exist, creating it first, so the job that
                                        torchrun restarts runs through

The process sends itself SIGKILL: no exception handler, `finally` or atexit runs and nothing is flushed, as
when a node crashes or the OOM killer strikes. Without GPUFORGE_FAIL_AT, `fail_point` is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def fail_point(point: str, rank: int) -> None:
    """Die here when GPUFORGE_FAIL_AT names this point (and this rank, or no rank)."""
    spec = os.environ.get("GPUFORGE_FAIL_AT")
    if not spec:
        return
    name, _, only_rank = spec.partition("@")
    if name != point or (only_rank and int(only_rank) != rank):
        return
    marker = os.environ.get("GPUFORGE_FAIL_ONCE")
    if marker:
        try:
            Path(marker).touch(exist_ok=False)
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
