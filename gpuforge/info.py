"""`python -m gpuforge info`: the device (NVML: name, driver, memory, clocks, power), the torch build, and the
backends table with the reason each unavailable backend cannot run, and where `auto` takes its choice from
(measured tables or the documented rule)."""

from __future__ import annotations

import platform

import torch

from gpuforge.kernels import auto_table, backends


def lines() -> list[str]:
    out = [f"gpuforge on Python {platform.python_version()}, torch {torch.__version__}"]
    if torch.cuda.is_available():
        from gpuforge.profiling.nvml import device_snapshot

        for index in range(torch.cuda.device_count()):
            snap = device_snapshot(index)
            out.append(f"GPU {index}: {snap['name']}, driver {snap['driver']}, "
                       f"{snap['memory_used_gib']:.1f}/{snap['memory_total_gib']:.1f} GiB, "
                       f"SM {snap['sm_clock_mhz']}/{snap['sm_clock_max_mhz']} MHz, mem {snap['mem_clock_mhz']} MHz, "
                       f"{snap['power_w']:.0f}/{snap['power_limit_w']:.0f} W, {snap['temperature_c']} C")
    else:
        out.append("GPU: none (torch.cuda.is_available() is False); kernels can run in the simulators")
    name = backends.device_name(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    out.append(auto_table.describe(name))
    out.append("backends:")
    for name, (ok, reason) in backends.available().items():
        out.append(f"  {name:<7} {'yes' if ok else 'no ':<4} {reason}")
    return out


def main(argv: list[str] | None = None) -> int:
    print("\n".join(lines()))
    return 0
