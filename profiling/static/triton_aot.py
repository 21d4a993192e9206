"""Compiling the Triton kernels ahead of time for GPUs that are not here, as the JIT would at a launch.

Each Variant (kernels/triton/_variants.py) becomes an ASTSource with triton's AOT specialisation: an argument
hinted ":1" is the constant 1, one hinted ":16" carries tt.divisibility 16, and the rest stay generic. It is
compiled for GPUTarget("cuda", cc, 32) with the variant's num_warps and num_stages; the cubin's resources and
SASS are read back with the wheel's cuobjdump. Results are cached per (source, variant, target, triton version)
under ~/.cache/gpuforge/inspect, so a second run compiles only what changed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from pathlib import Path

from gpuforge.profiling.static import sass
from gpuforge.profiling.static.occupancy import ARCHS, occupancy

TRITON_MODULES = ("vector_add", "softmax", "rms_norm", "matmul", "matmul_tma", "int4_matmul", "paged_attention",
                  "flash_attention", "flash_attention_tma", "layer_norm", "rope", "swiglu",
                  "fused_linear_cross_entropy")
CACHE = Path(os.environ.get("GPUFORGE_INSPECT_CACHE", Path.home() / ".cache" / "gpuforge" / "inspect"))


def module_variants(module: str) -> list:
    """The Variants of one kernels/triton/<module>.py."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("inspect compiles for real GPUs: run it with TRITON_INTERPRET unset (or 0)")
    return importlib.import_module(f"gpuforge.kernels.triton.{module}").compile_variants()


def variants(ops=None) -> list:
    """Every Variant of the project's Triton kernels (of `ops` when given). Needs TRITON_INTERPRET off: the
    kernels must be JITFunctions, not interpreted ones."""
    return [v for name in TRITON_MODULES if not ops or name in ops for v in module_variants(name)]


def _key(variant, cc: int) -> str:
    import triton

    text = json.dumps([variant.kernel.cache_key, variant.signature, {k: str(v) for k, v in variant.constexprs.items()},
                       variant.num_warps, variant.num_stages, cc, triton.__version__, sass.FAMILIES], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _source(variant):
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, dict(variant.constexprs), {}
    for name, spec in variant.signature.items():
        kind, _, hint = spec.partition(":")
        if hint == "1":
            constexprs[name] = 1
        else:
            signature[name] = kind
            if hint == "16":
                attrs[(variant.kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    signature |= {name: "constexpr" for name in constexprs}
    ordered = {name: signature[name] for name in variant.kernel.arg_names}
    return ASTSource(variant.kernel, ordered, constexprs, attrs)


def _compile(variant, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", cc, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    compiled = triton.compile(_source(variant), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        (res,) = sass.resources(cubin).values()
        (mix,) = sass.instruction_mix(cubin).values()
    threads = 32 * variant.num_warps
    shared = compiled.metadata.shared + res["static_shared"]
    return {**res, "shared": shared, "threads": threads, "mix": mix,
            "occupancy": occupancy(ARCHS[cc], res["regs"], shared, threads)}


def inspect_variant(variant, cc: int, *, use_cache: bool = True) -> dict:
    """One variant on one target: a record with its resources, occupancy and instruction mix, or its compile
    error (`error`)."""
    record = {"source": "triton", "op": variant.op, "kernel": variant.name, "label": variant.label,
              "arch": ARCHS[cc].name, "num_warps": variant.num_warps, "num_stages": variant.num_stages,
              "tensor_cores": variant.tensor_cores, "async_copies": variant.async_copies,
              "tolerated_spill_bytes": variant.tolerated_spill_bytes, "tma": variant.tma,
              "tile": {k: v for k, v in variant.constexprs.items() if k.startswith("BLOCK_")}}
    path = CACHE / f"{_key(variant, cc)}.json"
    if use_cache and path.exists():
        return record | json.loads(path.read_text())
    try:
        result = _compile(variant, cc)
    except Exception as err:  # noqa: BLE001 - a compile failure is a finding, reported with its message
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return record | result
