"""`python -m gpuforge bench compare OLD.json NEW.json [--threshold 0.1]`: rows matched by (op, implementation,
shape, dtype); a row whose median time grew by more than the threshold is a regression (exit code 1).
The default threshold, 10%, sits above the p20-p80 spread of repeated GPU runs of the same build."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _rows(path: Path) -> dict[tuple, dict]:
    payload = json.loads(path.read_text())
    return {(r["op"], r["label"], r["shape"], r["dtype"]): r for r in payload["records"]}


def compare(old: Path, new: Path, threshold: float) -> tuple[list[str], int]:
    before, after = _rows(old), _rows(new)
    lines, regressions = [], 0
    for key in sorted(before.keys() & after.keys()):
        ratio = after[key]["median_ms"] / before[key]["median_ms"]
        regressed = ratio > 1 + threshold
        regressions += regressed
        lines.append(f"{'REGRESSION' if regressed else 'ok':<10} {'/'.join(key):<60} "
                     f"{before[key]['median_ms']:.4g} -> {after[key]['median_ms']:.4g} ms ({ratio:.2f}x time)")
    for key in sorted(before.keys() - after.keys()):
        lines.append(f"{'missing':<10} {'/'.join(key)} (in {old.name} only)")
    return lines, regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuforge bench compare", description=__doc__)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--threshold", type=float, default=0.10, help="allowed relative growth of the median time")
    args = parser.parse_args(argv)
    lines, regressions = compare(args.old, args.new, args.threshold)
    print("\n".join(lines))
    print(f"{regressions} regression(s) beyond {args.threshold:.0%}")
    return 1 if regressions else 0
