"""`python -m gpuforge bench <op>|all [--quick] [--report DIR]`: benchmark tables, a Markdown report, JSON and
plots (per op, roofline, bandwidth); `bench compare OLD.json NEW.json` flags regressions.

Each op's cases come from `gpuforge.profiling.bench_<op>`. On a machine without a GPU the kernels run in the
Triton interpreter / numba simulator: the numbers are CPU timings of simulators, printed under a banner."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import gpuforge.profiling as profiling_pkg
from gpuforge.profiling import report, roofline
from gpuforge.profiling.peaks import peaks

CPU_BANNER = ("NOTE: no CUDA GPU here. Kernels run in the Triton interpreter / numba.cuda simulator on the CPU;\n"
              "these timings are CPU timings of simulators, NOT GPU timings. Error columns are meaningful.")


def bench_ops() -> list[str]:
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules(profiling_pkg.__path__)
                  if m.name.startswith("bench_"))


def run(ops: list[str], device: torch.device, quick: bool, out_dir: Path | None, command: str):
    device_peaks = peaks(device)
    cases = [case for op in ops for case in importlib.import_module(f"gpuforge.profiling.bench_{op}")
             .bench_cases(device, quick)]
    sampler = None
    if device.type == "cuda":
        from gpuforge.profiling.nvml import TelemetrySampler

        sampler = TelemetrySampler(device.index or 0).start()
    from gpuforge.profiling.harness import run_case

    records = []
    for case in tqdm(cases, desc="bench", unit="case", file=sys.stderr, disable=len(cases) < 2):
        records.extend(run_case(case, device, device_peaks, quick))
    telemetry = sampler.stop() if sampler else None
    env = report.environment(device, device_peaks, command)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report.write_json(out_dir / "results.json", env, records, telemetry)
        for op in ops:
            op_records = [r for r in records if r.op == op]
            if op_records:
                report.plot(op_records, out_dir / f"{op}.png", f"{op} on {device_peaks.device_name}")
        roofline.plot_roofline(records, device_peaks, out_dir / "roofline.png")
        roofline.plot_bandwidth(records, device_peaks, out_dir / "bandwidth.png")
        report.write_markdown(out_dir / "report.md", env, records, telemetry, ops)
    return env, records, telemetry


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "compare":
        from gpuforge.profiling.compare import main as compare_main

        return compare_main(argv[1:])
    parser = argparse.ArgumentParser(prog="gpuforge bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ops", nargs="+", help=f"'all' or any of: {', '.join(bench_ops())}")
    parser.add_argument("--quick", action="store_true", help="few sizes, few repeats")
    parser.add_argument("--out", "--report", type=Path, default=Path("bench_out"),
                        help="folder for report.md, results.json and the plots")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    ops = bench_ops() if args.ops == ["all"] else args.ops
    unknown = sorted(set(ops) - set(bench_ops()))
    if unknown:
        parser.error(f"unknown op(s) {unknown}; known: {bench_ops()}")
    device = torch.device(args.device)
    if device.type != "cuda":
        print(CPU_BANNER)
    env, records, telemetry = run(ops, device, args.quick, args.out, "python -m gpuforge bench " + " ".join(argv or []))
    print(f"device: {env['device']}  date: {env['date']}  peaks: copy {env['peaks']['copy_gbps']:.1f} GB/s, "
          f"matmul {env['peaks']['matmul_tflops']:.2f} TFLOP/s ({env['peaks']['matmul_dtype']})")
    print(report.table(records))
    if telemetry:
        print(f"telemetry: {telemetry}")
    print(f"wrote {args.out}/report.md, results.json and plots")
    return 0
