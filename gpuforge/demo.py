"""`python -m gpuforge demo` — the main job: the environment, the correctness check of every op on every
backend that runs here, a quick benchmark of every op with its plots, what an A100 and an H100 would run of a
few kernels (registers, spills, shared memory, tensor-core and TMA instructions), a tiny HuggingFace Llama patched by
apply_gpuforge trained beside the unpatched one, and a short 2-process training run of each parallel strategy
(and 4-process runs of a 4D mesh and of the TinyMoE pipelined with experts over ep) compared with single-process
training. Exits non-zero if any part fails."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def _section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_info() -> bool:
    from gpuforge import info

    print("\n".join(info.lines()))
    return True


def run_check() -> bool:
    from gpuforge.check import run_all

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = run_all(device)
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return bool(results) and not failed


def run_bench(out_dir: Path) -> bool:
    from gpuforge.profiling import cli

    return cli.main(["all", "--quick", "--out", str(out_dir)]) == 0


# One configuration per kind of kernel a Hopper would run: the pointer-load GEMM, the persistent TMA GEMM, the
# TMA attention forward and the int4 prefill GEMM (bf16).
INSPECTED = (r"_matmul_kernel bfloat16 128x128x64 w4 s4$|_matmul_tma_kernel bfloat16 128x128x64 w4"
             r"|_attn_fwd_tma_kernel bfloat16 D128 128x64|_int4_matmul_kernel bfloat16 prefill 128x128x64")


def run_inspect(out_dir: Path) -> bool:
    """What an A100 / H100 would run, read from real sm_80 / sm_90 builds on this machine (no GPU needed)."""
    from gpuforge.profiling.static import cli

    return cli.main(["--ops", "matmul", "matmul_tma", "flash_attention_tma", "int4_matmul", "--arch", "80,90",
                     "--match", INSPECTED, "--no-cuda", "--jobs", "1", "--report", str(out_dir / "static"),
                     "--fail-on-problems"]) == 0


def run_hf() -> bool:
    from gpuforge import hf_demo

    return hf_demo.run()


def training_strategies() -> list[str]:
    try:
        from gpuforge.parallel.training.cli import STRATEGIES
    except ImportError as err:
        print(f"parallel training is not available: {err}")
        return []
    return list(STRATEGIES)


# Beyond TinyLlama under every strategy (TinyMoE under ep): an image model, TinyCLIP's coupled loss in its
# gathered form, and on 4 processes a 4D mesh (pipeline stages with their sequence over cp) and the TinyMoE
# in a pipeline with its experts over ep: (strategy, model, extra arguments, processes; None: --nproc).
OTHER_MODEL_RUNS = (("zero2", "tiny_convnext", (), None), ("ddp", "tiny_clip", (), None),
                    ("3d", "tinyllama", ("--pp", "2", "--cp", "2", "--seq-len", "16"), 4),
                    ("pp", "tinymoe", ("--pp", "2", "--ep", "2"), 4))


def run_training(nproc: int, steps: int) -> bool:
    """One torchrun launch per strategy (and per other model run); each run compares itself with
    single-process training on rank 0."""
    ok = True
    runs = [(strategy, "tinymoe" if strategy == "ep" else "tinyllama", (), None) for strategy in training_strategies()]
    runs += OTHER_MODEL_RUNS if runs else []
    for strategy, model, extra, processes in runs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes or nproc}", "-m", "gpuforge", "train", "--strategy", strategy,
                   "--model", model, "--steps", str(steps), *extra]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        verdict = "ok  " if result.returncode == 0 else "FAIL"
        summary = result.stdout.strip().splitlines()
        label = " ".join((strategy, model, *extra[:4]))
        print(f"{verdict} {label:<34} {time.perf_counter() - start:5.1f}s  {summary[-1] if summary else ''}")
        if result.returncode != 0:
            print("\n".join((result.stdout + result.stderr).strip().splitlines()[-20:]))
            ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuforge demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for benchmark JSON and plots")
    parser.add_argument("--nproc", type=int, default=2, help="processes per training run")
    parser.add_argument("--steps", type=int, default=5, help="training steps per run")
    args = parser.parse_args(argv)
    parts = [("environment", run_info), ("correctness check", run_check),
             ("quick benchmark", lambda: run_bench(args.out)),
             ("what a GPU would run (gpuforge inspect, sm_80 and sm_90)", lambda: run_inspect(args.out)),
             ("HuggingFace Llama patched by apply_gpuforge vs unpatched", run_hf),
             (f"parallel training, {args.nproc} processes vs one", lambda: run_training(args.nproc, args.steps))]
    failed = []
    for title, part in parts:
        _section(title)
        if not part():
            failed.append(title)
    _section("summary")
    print("all parts passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0
