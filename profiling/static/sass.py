"""Reading compiled GPU code back with the tools the triton wheel ships (cuobjdump, nvdisasm): each kernel's
resources (registers, stack and local memory, static shared memory) and its instruction mix.

Spills live in the stack frame as well as in LOCAL, so a spill is STACK + LOCAL bytes and shows in the SASS as
STL/LDL instructions; both are reported. The instruction families counted say how a kernel works: HGMMA and QGMMA
(Hopper's warpgroup MMA, wgmma, on 16-bit and fp8 operands), HMMA (mma.sync), UTCHMMA/UTCQMMA/UTCOMMA (Blackwell's
tcgen05 MMA), LDGSTS (cp.async), UTMALDG/UTMASTG (TMA), LDSM/STSM (ldmatrix/stmatrix), SHFL (warp shuffles), BAR
(barriers), SYNCS (mbarriers), STL/LDL (local memory: spills), WARPGROUP (wgmma fences).
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections import Counter
from pathlib import Path

FAMILIES = ("HGMMA", "QGMMA", "HMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA", "LDGSTS", "UTMALDG", "UTMASTG", "LDSM",
            "STSM", "SHFL", "BAR", "SYNCS", "WARPGROUP", "STL", "LDL")
WGMMA_FAMILIES = ("HGMMA", "QGMMA")  # Hopper's warpgroup MMA on 16-bit and on 8-bit (fp8) operands
TENSOR_CORE_FAMILIES = ("HGMMA", "QGMMA", "HMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA")
ASYNC_COPY_FAMILIES = ("LDGSTS", "UTMALDG")

_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
_ARCH = re.compile(r"^arch = (sm_\w+)")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)")


@functools.cache
def tool(name: str) -> Path:
    """cuobjdump / nvdisasm from the triton wheel (no CUDA toolkit or GPU needed)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name}: not in the triton wheel at {path}")
    return path


def _run(*args) -> str:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=True).stdout


def resources(binary: Path) -> dict[tuple[str, str], dict[str, int]]:
    """{(arch, mangled function name): {"regs", "stack", "static_shared", "local"}} of a cubin or a fatbinary
    host library (every ELF it embeds)."""
    out, arch = {}, "?"
    current = None
    for line in _run(tool("cuobjdump"), "-res-usage", binary).splitlines():
        if m := _ARCH.match(line.strip()):
            arch = m.group(1)
        elif m := _FUNCTION.match(line):
            current = m.group(1)
        elif current is not None and (m := _RESOURCES.search(line)):
            regs, stack, shared, local = (int(g) for g in m.groups())
            out[(arch, current)] = {"regs": regs, "stack": stack, "static_shared": shared, "local": local}
            current = None
    return out


def instruction_mix(binary: Path) -> dict[tuple[str, str], dict[str, int]]:
    """{(arch, mangled function name): {family: count}} for the FAMILIES, from the SASS of every function."""
    counts: dict[tuple[str, str], Counter] = {}
    arch, current = "?", None
    for line in _run(tool("cuobjdump"), "-sass", binary).splitlines():
        if m := _ARCH.match(line.strip()):
            arch = m.group(1)
        elif m := _SASS_FUNCTION.match(line):
            current = counts.setdefault((arch, m.group(1)), Counter())
        elif current is not None and (m := _INSTRUCTION.match(line)):
            opcode = m.group(1)
            current[next((f for f in FAMILIES if opcode.startswith(f)), opcode)] += 1
    return {key: {f: c[f] for f in FAMILIES} | {"total": sum(c.values())} for key, c in counts.items()}


@functools.cache
def demangle(name: str) -> str:
    try:
        return _run("c++filt", name).strip()
    except (OSError, subprocess.CalledProcessError):
        return name
