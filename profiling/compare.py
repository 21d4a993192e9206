"""`python -m gpuforge bench compare OLD.json NEW.json [--floor 0.05]`: rows matched by (op, implementation,
shape, dtype); a row whose median time grew by more than its noise threshold is a regression (exit code 1).

The threshold of each row comes from the noise both runs recorded: the relative p20-p80 spread of the old row
plus that of the new row, and never below the floor (a row timed with few repeats can show a spread of zero).
Rows only in one file are listed as new or missing; a comparison across different devices is flagged."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: Path) -> tuple[dict, dict[tuple, dict]]:
    payload = json.loads(path.read_text())
    rows = {(r["op"], r["label"], r["shape"], r["dtype"]): r for r in payload["records"]}
    return payload.get("environment", {}), rows


def relative_spread(row: dict) -> float:
    return (row["p80_ms"] - row["p20_ms"]) / row["median_ms"]


def threshold(old: dict, new: dict, floor: float) -> float:
    return max(floor, relative_spread(old) + relative_spread(new))


def compare(old: Path, new: Path, floor: float) -> tuple[list[str], int]:
    (old_env, before), (new_env, after) = _load(old), _load(new)
    lines, regressions = [], 0
    old_device, new_device = old_env.get("device"), new_env.get("device")
    if old_device != new_device:
        lines.append(f"WARNING: different devices ({old_device} vs {new_device}): times are not comparable")
    for key in sorted(before.keys() & after.keys()):
        ratio = after[key]["median_ms"] / before[key]["median_ms"]
        allowed = threshold(before[key], after[key], floor)
        regressed = ratio > 1 + allowed
        regressions += regressed
        lines.append(f"{'REGRESSION' if regressed else 'ok':<10} {'/'.join(key):<60} "
                     f"{before[key]['median_ms']:.4g} -> {after[key]['median_ms']:.4g} ms ({ratio:.2f}x time, "
                     f"noise threshold {allowed:.0%})")
    lines += [f"{'missing':<10} {'/'.join(key)} (in {old.name} only)" for key in sorted(before.keys() - after.keys())]
    lines += [f"{'new':<10} {'/'.join(key)} (in {new.name} only)" for key in sorted(after.keys() - before.keys())]
    return lines, regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuforge bench compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--floor", type=float, default=0.05,
                        help="smallest allowed relative growth of the median time, whatever the recorded noise")
    args = parser.parse_args(argv)
    lines, regressions = compare(args.old, args.new, args.floor)
    print("\n".join(lines))
    print(f"{regressions} regression(s) beyond the per-row noise thresholds (floor {args.floor:.0%})")
    return 1 if regressions else 0
