"""`python -m gpuforge inspect`: what a GPU would run, on a machine without one.

    python -m gpuforge inspect                          # every Triton variant x sm_80/90/100 + the CUDA C++ builds
    python -m gpuforge inspect --ops matmul --arch 90   # a subset
    python -m gpuforge inspect --report profiling/results/static --fail-on-problems

Every Triton kernel configuration (kernels/triton/*.py compile_variants) is compiled ahead of time in worker
processes started fresh with the Triton interpreter off (even when this process has it on), results cached in
~/.cache/gpuforge/inspect; the CUDA C++ kernels are read from gpuforge._C and compiled by NVRTC. Prints a table,
writes results.json and report.md with --report, and exits 1 with --fail-on-problems when any record fails a
check (checks.py).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import re
import sys
from pathlib import Path

CHUNK = 16  # variants per worker task


def _selected(module: str, match: str) -> list:
    from gpuforge.profiling.static.triton_aot import module_variants

    pattern = re.compile(match)
    return [v for v in module_variants(module) if pattern.search(f"{v.name} {v.label}")]


def _count(task) -> int:
    return len(_selected(*task))


def _inspect(task) -> list[dict]:
    module, match, start, stop, archs, use_cache = task
    from gpuforge.profiling.static.triton_aot import inspect_variant

    return [inspect_variant(v, cc, use_cache=use_cache) for v in _selected(module, match)[start:stop]
            for cc in archs if not v.archs or cc in v.archs]


def triton_records(ops, archs, jobs: int, use_cache: bool = True, match: str = "", log=print) -> list[dict]:
    """Inspection records of every Triton variant of `ops` (all when empty) whose "kernel label" matches the
    regular expression `match`, on `archs`, in worker processes."""
    from gpuforge.profiling.static.triton_aot import TRITON_MODULES

    os.environ["TRITON_INTERPRET"] = "0"  # the workers compile for real targets
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's current default, said aloud
    modules = [m for m in TRITON_MODULES if not ops or m in ops]
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs) as pool:
        counts = pool.map(_count, [(m, match) for m in modules])
        tasks = [(m, match, i, min(i + CHUNK, n), archs, use_cache) for m, n in zip(modules, counts, strict=True)
                 for i in range(0, n, CHUNK)]
        records = []
        for done, chunk in enumerate(pool.imap(_inspect, tasks), 1):
            records += chunk
            log(f"inspect: {done}/{len(tasks)} tasks, {len(records)} records", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuforge inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="*", default=[], help="Triton kernel modules (default: all)")
    parser.add_argument("--arch", default="80,90,100", help="compute capabilities for Triton, comma-separated")
    parser.add_argument("--match", default="", help="only Triton variants whose 'kernel label' matches this regex")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels")
    parser.add_argument("--no-cache", action="store_true", help="compile everything again")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling worker processes")
    parser.add_argument("--report", type=Path, default=None, help="write results.json and report.md here")
    parser.add_argument("--fail-on-problems", action="store_true", help="exit 1 when a record fails a check")
    parser.add_argument("--quiet", action="store_true", help="print the failures and the summary only")
    args = parser.parse_args(argv)
    from gpuforge.profiling.static import cuda_aot, report
    from gpuforge.profiling.static.checks import problems

    archs = [int(a) for a in args.arch.split(",") if a]
    records = triton_records(args.ops, archs, args.jobs, not args.no_cache, args.match,
                             log=print if not args.quiet else (lambda *a, **k: None))
    if not args.no_cuda:
        records += cuda_aot.extension_records() + cuda_aot.nvrtc_records()
    failing = [r for r in records if problems(r)]
    print(report.table(failing if args.quiet else records))
    for key, counts in sorted(report.summary(records).items()):
        print(f"{key}: {counts}")
    print(f"{len(records)} records, {len(failing)} failing a check, {len(report.tolerated(records))} with a tolerated "
          "spill")
    if args.report is not None:
        import triton

        env = {"command": "python -m gpuforge inspect " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "triton": triton.__version__,
               "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU"}
        report.write(args.report, records, env)
        print(f"wrote {args.report}/results.json and report.md")
    return 1 if args.fail_on_problems and failing else 0
