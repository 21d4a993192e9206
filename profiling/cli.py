"""`python -m gpuforge bench <op>|all [--quick] [--report DIR] [--dtype D] [--backend B] [--causal|--no-causal]
[--time-budget S]`: benchmark tables, a Markdown report with the speed targets (met / missed / not measured),
JSON and plots (per op, roofline, bandwidth); `bench compare OLD.json NEW.json` flags regressions.

Each op's cases come from `gpuforge.profiling.bench_<op>`. Filters keep the cases of the given dtypes, the
causal (or non-causal) attention cases, and the rows of the given backends beside every baseline. The quick
sweep (the speed targets' shapes) runs first; with a time budget (450 s by default on a GPU), no new case starts
once the budget is spent, and the cases left out are listed in the report. On a machine without a GPU the
kernels run in the Triton interpreter / numba simulator: the numbers are CPU timings of simulators, printed
under a banner."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import gpuforge.profiling as profiling_pkg
from gpuforge.profiling import report, roofline
from gpuforge.profiling.harness import BenchCase, run_case
from gpuforge.profiling.peaks import peaks

# A fresh GPU spends most of a sweep compiling (Triton autotuning, torch.compile): `bench all` without --quick
# (~170 cases) may not fit a 10-minute command, so by default no case starts after 7.5 minutes.
GPU_TIME_BUDGET_S = 450.0
CPU_BANNER = ("NOTE: no CUDA GPU here. Kernels run in the Triton interpreter / numba.cuda simulator on the CPU;\n"
              "these timings are CPU timings of simulators, NOT GPU timings. Error columns are meaningful.")


def bench_ops() -> list[str]:
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules(profiling_pkg.__path__)
                  if m.name.startswith("bench_"))


@dataclasses.dataclass(frozen=True)
class Filters:
    dtypes: tuple[str, ...] = ()  # empty: every dtype
    backends: tuple[str, ...] = ()  # empty: every implementation
    causal: bool | None = None  # None: masked and unmasked

    def apply(self, case: BenchCase) -> BenchCase | None:
        """The case with only the wanted rows (baselines always kept), or None when nothing of it is wanted."""
        if self.dtypes and str(case.dtype).removeprefix("torch.") not in self.dtypes:
            return None
        if self.causal is not None and case.causal is not self.causal:
            return None
        if not self.backends:
            return case
        baselines = case.baseline_labels()
        fns = {label: fn for label, fn in case.fns.items() if label in baselines or label in self.backends}
        return dataclasses.replace(case, fns=fns) if set(fns) - baselines else None


def _cases(ops: list[str], device: torch.device, quick: bool) -> list[BenchCase]:
    return [case for op in ops for case in importlib.import_module(f"gpuforge.profiling.bench_{op}")
            .bench_cases(device, quick)]


def select_cases(ops: list[str], device: torch.device, quick: bool, filters: Filters) -> list[BenchCase]:
    """The quick sweep (every op's target shapes) first; without --quick, the rest of the full sweep after it,
    so a run cut short by its time budget still has every target's rows."""
    cases = _cases(ops, device, quick=True)
    if not quick:
        first = {case_tag(c) for c in cases}
        cases += [c for c in _cases(ops, device, quick=False) if case_tag(c) not in first]
    return [kept for case in cases if (kept := filters.apply(case)) is not None]


def case_tag(case: BenchCase) -> str:
    return f"{case.op} {case.shape} {str(case.dtype).removeprefix('torch.')}"


def run(ops: list[str], device: torch.device, quick: bool, out_dir: Path | None, command: str,
        filters: Filters = Filters(), time_budget_s: float | None = None):
    device_peaks = peaks(device)
    cases = select_cases(ops, device, quick, filters)
    sampler = None
    if device.type == "cuda":
        from gpuforge.profiling.nvml import TelemetrySampler

        sampler = TelemetrySampler(device.index or 0).start()
    records, skipped, failed, started, out_of_time = [], [], [], time.monotonic(), False
    for case in tqdm(cases, desc="bench", unit="case", file=sys.stderr, disable=len(cases) < 2):
        if out_of_time:
            skipped.append(case_tag(case))
            continue
        if sampler is not None:
            sampler.mark(case_tag(case))
        case_records, failures = run_case(case, device, device_peaks, quick)
        failed += [f"{case_tag(case)} {label}: {message}" for label, message in failures.items()]
        if sampler is not None:
            reasons = sampler.summary_for(case_tag(case)).get("throttle_reasons", [])
            for r in case_records:
                r.throttle = "+".join(reasons) or "none"
        records.extend(case_records)
        out_of_time = time_budget_s is not None and time.monotonic() - started > time_budget_s
    telemetry = sampler.stop() if sampler else None
    env = report.environment(device, device_peaks, command)
    env["skipped_cases"], env["failed_rows"] = skipped, failed
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


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


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
    parser.add_argument("--dtype", type=_names, default=(), help="comma-separated dtypes, e.g. bfloat16,float16")
    parser.add_argument("--backend", type=_names, default=(),
                        help="comma-separated implementations to time beside the baselines, e.g. triton,cuda")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                        help="only the causal (--causal) or unmasked (--no-causal) attention cases")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds; the rest are listed as skipped "
                             f"(default on a GPU: {GPU_TIME_BUDGET_S:.0f}, so `bench all` fits a 10-minute command; "
                             "'inf' for none)")
    args = parser.parse_args(argv)
    ops = bench_ops() if args.ops == ["all"] else args.ops
    unknown = sorted(set(ops) - set(bench_ops()))
    if unknown:
        parser.error(f"unknown op(s) {unknown}; known: {bench_ops()}")
    known_dtypes = {"float32", "float16", "bfloat16"}
    if set(args.dtype) - known_dtypes:
        parser.error(f"unknown dtype(s) {sorted(set(args.dtype) - known_dtypes)}; known: {sorted(known_dtypes)}")
    device = torch.device(args.device)
    if device.type != "cuda":
        print(CPU_BANNER)
    filters = Filters(args.dtype, args.backend, args.causal)
    budget = args.time_budget
    if budget is None and device.type == "cuda":
        budget = GPU_TIME_BUDGET_S
    env, records, telemetry = run(ops, device, args.quick, args.out, "python -m gpuforge bench " + " ".join(argv or []),
                                  filters, budget)
    if not records:
        print("no benchmark case matches the filters", file=sys.stderr)
        return 2
    print(f"device: {env['device']}  date: {env['date']}  peaks: copy {env['peaks']['copy_gbps']:.1f} GB/s, "
          f"matmul {env['peaks']['matmul_tflops']:.2f} TFLOP/s ({env['peaks']['matmul_dtype']})")
    print(report.table(records))
    if telemetry:
        print(f"telemetry: {telemetry}")
    if env["skipped_cases"]:
        print(f"time budget spent: {len(env['skipped_cases'])} case(s) not run (listed in the report)")
    for line in env["failed_rows"]:
        print(f"FAILED {line}", file=sys.stderr)
    print(f"wrote {args.out}/report.md, results.json and plots")
    return 1 if env["failed_rows"] else 0
