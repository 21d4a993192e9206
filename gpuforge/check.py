"""`python -m gpuforge check`: every op on every backend that can run here vs its float64 reference."""

from __future__ import annotations

import argparse

import torch

from gpuforge.kernels._selfcheck import CheckResult, op_modules, run_case


def run_all(device: torch.device, ops: list[str] | None = None, log=print) -> list[CheckResult]:
    results = []
    for module in op_modules():
        table = module.BACKENDS
        if ops and table.op not in ops:
            continue
        runnable = table.runnable(device)
        for case in module.selfcheck_cases(device):
            reference = case.reference()
            for backend in runnable:
                if not table.supports(backend, case.dtype):
                    log(f"skip {case.op:<18} {backend:<7} {case.label:<34} {case.dtype} unsupported by design")
                    continue
                result = run_case(case, backend, reference)
                results.append(result)
                verdict = "ok  " if result.passed else "FAIL"
                log(f"{verdict} {result.op:<18} {result.backend:<7} {result.label:<34} "
                    f"err {result.error:9.2e} (tol {result.tol:.0e}) {result.message}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuforge check", description=__doc__)
    known = sorted(module.BACKENDS.op for module in op_modules())
    parser.add_argument("ops", nargs="*", help=f"ops to check (default: all): {', '.join(known)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.ops) - set(known))
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; expected among {', '.join(known)}")
    results = run_all(torch.device(args.device), args.ops)
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0
