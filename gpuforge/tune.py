"""`python -m gpuforge tune`: time every backend of each op, PyTorch's own included, at representative shapes on
this CUDA device, and write the fastest per (op, dtype, shape bucket, device) to the tune cache that
`backend="auto"` reads first (gpuforge/kernels/auto_table.py). Needs a CUDA device: on a CPU the backends run
in simulators, whose times say nothing about a GPU."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import gpuforge as gf
from gpuforge.kernels import auto_table, backends

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cases(dtype: torch.dtype, device: str) -> list[Callable[[str], object]]:
    """run(backend) of one op at sizes that matter in training: square GEMMs, wide rows, attention at head dims 64
    and 128."""
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    cases = []
    for n in (1024, 4096, 8192):
        a, b = rand(n, n), rand(n, n)
        cases.append(lambda name, a=a, b=b: gf.matmul(a, b, backend=name))
    for rows, width in ((4096, 4096), (1024, 32768), (256, 131072)):
        x, w = rand(rows, width), rand(width)
        cases.append(lambda name, x=x: gf.softmax(x, backend=name))
        cases.append(lambda name, x=x, w=w: gf.rms_norm(x, w, backend=name))
        cases.append(lambda name, x=x, w=w: gf.layer_norm(x, w, w, backend=name))
    for seq, head_dim in ((1024, 64), (4096, 64), (1024, 128), (4096, 128)):
        q, k, v = rand(4, 16, seq, head_dim), rand(4, 16, seq, head_dim), rand(4, 16, seq, head_dim)
        cases.append(lambda name, q=q, k=k, v=v: gf.flash_attention(q, k, v, causal=True, backend=name))
    return cases


def tune(device_index: int, dtypes=DTYPES) -> list[str]:
    """Run every case with `auto` measuring anew (one entry per case, overwriting the cache's); the lines say
    what was chosen and each backend's time."""
    device = f"cuda:{device_index}"
    lines = []
    for dtype in dtypes:
        for run in _cases(dtype, device):
            with auto_table.forced() as recorded:
                run("auto")
            for entry_key in recorded:
                times = auto_table.TABLE.user_entries()[entry_key]["times_ms"]
                chosen = auto_table.TABLE.user_entries()[entry_key]["backend"]
                shown = ", ".join(f"{b} {t:.3f} ms" for b, t in sorted(times.items(), key=lambda item: item[1]))
                lines.append(f"{entry_key}: {chosen}  ({shown})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuforge tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), action="append",
                        help="only these dtypes (repeatable; default all three)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpuforge tune: needs a CUDA device (none here); on a CPU `auto` runs the torch backend",
              file=sys.stderr)
        return 2
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else DTYPES
    for line in tune(args.device, dtypes):
        print(line)
    print(f"written to {auto_table.cache_path()} ({backends.device_name(torch.device('cuda', args.device))})")
    return 0
