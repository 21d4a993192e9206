"""fused_linear_cross_entropy benchmark: forward + backward of every backend beside lm_head followed by
F.cross_entropy (eager) and torch.compile of that pair, and the peak memory of each.

Time: the FLOPs counted are the unfused computation's, 6·N·H·V (the logits GEMM and the two gradient GEMMs); the
fused op recomputes the logits in its backward (8·N·H·V), so its TFLOP/s column is useful work. Bytes: hidden and
weight read, their gradients written. On a GPU the harness records each row's peak memory above the inputs.

Memory (the target: at vocab 128K, hidden 2048 and 8K tokens, the peak of forward + backward at most 1/4 of
lm_head + F.cross_entropy), measured by

    python -m gpuforge.profiling.bench_fused_linear_cross_entropy --memory [--dtype bfloat16] [--device cpu]

which runs each variant in a fresh subprocess of its own: inputs are made in place (no temporaries), the variant
runs once on tiny inputs (libraries loaded, thread pools and allocator caches set up), then the peak is reset
and forward + backward run once. On a CPU the peak is the kernel's resident-set high-water mark (VmHWM in
/proc/self/status, reset through /proc/self/clear_refs just before the run): every tensor the run allocates is
written, so allocated memory is resident; blocks above glibc's mmap threshold go back to the system when freed,
while smaller freed blocks may stay resident, which can only overstate a peak; on a machine without swap (as the
one measured) nothing is paged out and understated. On a GPU it is torch.cuda.max_memory_allocated after
reset_peak_memory_stats. The target is judged on the peak above the memory held before the run (inputs,
libraries, the same for both variants): what forward + backward themselves need; the whole-process peak is
reported beside it.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from gpuforge.kernels.fused_linear_cross_entropy import (
    BACKENDS,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_float64,
)
from gpuforge.profiling.harness import BenchCase

MEMORY_TARGET = 0.25  # fused peak / unfused peak, at vocab 128K, hidden 2048, 8K tokens


def unfused_loss(hidden, weight, target):
    """lm_head followed by F.cross_entropy: the baseline, with the (N, V) logits in memory."""
    return F.cross_entropy(F.linear(hidden, weight), target)


@functools.cache
def _compiled_unfused():
    return torch.compile(unfused_loss)


def _with_backward(loss_fn):
    """fn(hidden, weight, target) -> (d hidden, d weight): the loss, then its backward."""
    def run(hidden, weight, target):
        return torch.autograd.grad(loss_fn(hidden, weight, target), (hidden, weight))
    return run


def _reference(hidden, weight, target):
    return torch.autograd.grad(fused_linear_cross_entropy_float64(hidden, weight, target), (hidden, weight))


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(tokens, hidden, vocab)"""
    if device.type == "cuda":
        return [(8192, 2048, 131072)] if quick else [(8192, 2048, 131072), (16384, 4096, 128256)]
    return [(64, 32, 500)] if quick else [(64, 32, 500), (256, 64, 2000)]


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    runnable = [b for b in BACKENDS.runnable(device) if b != "torch"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fns = {"torch": _with_backward(unfused_loss)}
    if device.type == "cuda":
        fns["torch.compile"] = _with_backward(lambda *a: _compiled_unfused()(*a))
    fns |= {b: _with_backward(functools.partial(fused_linear_cross_entropy, backend=b)) for b in runnable}
    cases = []
    for n, h, v in _shapes(device, quick):
        def make_inputs(n=n, h=h, v=v):
            hidden = torch.randn(n, h, device=device, dtype=dtype).requires_grad_()
            weight = (torch.randn(v, h, device=device) / h ** 0.5).to(dtype).requires_grad_()
            return hidden, weight, torch.randint(0, v, (n,), device=device)

        element = torch.finfo(dtype).bits // 8
        cases.append(BenchCase(
            op="fused_linear_cross_entropy", shape=f"N={n} H={h} V={v} fwd+bwd", dtype=dtype, size=n * v,
            make_inputs=make_inputs, fns=fns, baseline="torch",
            secondary_baseline="torch.compile" if device.type == "cuda" else None,
            bytes=2 * (n * h + v * h) * element, flops=6 * n * h * v, reference=_reference))
    return cases


# --- peak memory, one fresh process per variant ---------------------------------------------------------------

VARIANTS = ("unfused", "fused")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


class _PeakMeter:
    """Peak memory of what runs between start() and stop(), in bytes above the memory held at start()."""

    def __init__(self, device: torch.device):
        self.device = device

    def held(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024

    def start(self) -> int:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        return self.held()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") * 1024


def _loss_fn(variant: str, backend: str):
    if variant == "unfused":
        return unfused_loss
    return functools.partial(fused_linear_cross_entropy, backend=backend)


def _inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Made in place: no temporary larger than an input, so nothing before the run exceeds what it holds."""
    generator = torch.Generator(device).manual_seed(seed)
    h = torch.empty(tokens, hidden, dtype=dtype, device=device).normal_(generator=generator)
    w = torch.empty(vocab, hidden, dtype=dtype, device=device).normal_(std=hidden ** -0.5, generator=generator)
    t = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    return h.requires_grad_(), w.requires_grad_(), t


def measure_in_this_process(variant: str, tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                            device: torch.device, backend: str) -> dict:
    """Forward + backward of one variant once, after a tiny warm-up; its peak memory and time."""
    loss_fn = _loss_fn(variant, backend)
    loss_fn(*_inputs(8, 16, 64, dtype, device)).backward()  # warm-up
    h, w, t = _inputs(tokens, hidden, vocab, dtype, device)
    meter = _PeakMeter(device)
    before = meter.start()
    started = time.perf_counter()
    loss = loss_fn(h, w, t)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = meter.peak()
    inputs = sum(x.numel() * x.element_size() for x in (h, w, t))
    return {"variant": variant, "backend": backend if variant == "fused" else "torch", "tokens": tokens,
            "hidden": hidden, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."), "device": device.type,
            "loss": loss.item(), "seconds": seconds, "inputs_mib": inputs / 2**20,
            "held_before_mib": before / 2**20, "peak_mib": peak / 2**20,
            "peak_above_start_mib": (peak - before) / 2**20}


def measure(tokens: int, hidden: int, vocab: int, dtype: str, device: str, backend: str) -> list[dict]:
    """Each variant in a fresh subprocess of this module; returns their result rows."""
    rows = []
    for variant in VARIANTS:
        command = [sys.executable, "-m", "gpuforge.profiling.bench_fused_linear_cross_entropy", "--run", variant,
                   "--tokens", str(tokens), "--hidden", str(hidden), "--vocab", str(vocab), "--dtype", dtype,
                   "--device", device, "--backend", backend]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{variant} run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def report(rows: list[dict]) -> str:
    unfused, fused = rows
    lines = [f"N={unfused['tokens']} H={unfused['hidden']} V={unfused['vocab']} {unfused['dtype']} on "
             f"{unfused['device']}; inputs {unfused['inputs_mib']:.0f} MiB",
             f"{'variant':<28}{'held at start':>15}{'peak above start':>18}{'peak total':>12}{'time':>9}"
             f"{'loss':>10}"]
    for r in rows:
        name = r["variant"] + (f" (backend={r['backend']})" if r["variant"] == "fused" else " (torch)")
        lines.append(f"{name:<28}{r['held_before_mib']:>11.0f} MiB{r['peak_above_start_mib']:>14.0f} MiB"
                     f"{r['peak_mib']:>8.0f} MiB{r['seconds']:>8.1f}s{r['loss']:>10.4f}")
    above = fused["peak_above_start_mib"] / unfused["peak_above_start_mib"]
    total = fused["peak_mib"] / unfused["peak_mib"]
    verdict = "met" if above <= MEMORY_TARGET else "missed"
    lines.append(f"fused / unfused peak of forward + backward (above start): {above:.3f} (target <= "
                 f"{MEMORY_TARGET}: {verdict}); whole process, inputs and libraries included: {total:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuforge.profiling.bench_fused_linear_cross_entropy",
                                     description="Peak memory of forward + backward: fused vs lm_head + "
                                                 "F.cross_entropy, each in a fresh subprocess.")
    parser.add_argument("--memory", action="store_true", help="measure both variants and compare")
    parser.add_argument("--run", choices=VARIANTS, help="(internal) measure one variant in this process")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.run:
        row = measure_in_this_process(args.run, args.tokens, args.hidden, args.vocab, getattr(torch, args.dtype),
                                      torch.device(args.device), args.backend)
        print(json.dumps(row))
        return 0
    if not args.memory:
        parser.error("give --memory (timing cases run through `python -m gpuforge bench fused_linear_cross_entropy`)")
    rows = measure(args.tokens, args.hidden, args.vocab, args.dtype, args.device, args.backend)
    print(report(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
