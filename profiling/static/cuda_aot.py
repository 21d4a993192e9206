"""The CUDA C++ kernels as a GPU would run them: the nvcc build in gpuforge._C (sm_80, sm_90a) and the NVRTC
builds of the cupy backend (sm_80, sm_90a, sm_100a), read back with cuobjdump.

Threads per block and dynamic shared memory are the launchers' (csrc/*.cu, launchers.h), written out in LAUNCHES
by kernel name; the rms_norm backward's dynamic shared memory grows with the row (n floats): it is counted at
the widest row the op's table lets the cuda backend take (kernels/rms_norm.py), its worst case.
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
from pathlib import Path

from gpuforge.kernels.cupy.instantiations import NAME_EXPRESSIONS
from gpuforge.profiling.static import nvrtc, sass
from gpuforge.profiling.static.occupancy import ARCHS, occupancy

_SIZES = {"float": 4, "__half": 2, "__nv_bfloat16": 2}
RMS_NORM_CUDA_MAX_WIDTH = 40960  # kernels/rms_norm.py's Limits(max_width=...) for cuda and cupy


def _fa_mma_shared(args: list[str]) -> int:
    """flash_attention_fwd_mma_kernel<T, D>: 2 stages x (K + V) x 64 keys x D elements (launch_mma)."""
    return 2 * 2 * 64 * int(args[1]) * _SIZES[args[0]]


def _fa_bwd_mma_shared(args: list[str]) -> int:
    """flash_attention_bwd_{dq,dkdv}_mma_kernel<T, D>: 2 owned tiles of 64 rows + 2 stages x 2 streamed tiles of
    32 rows, x D elements (bwd_mma_shared_bytes)."""
    return (2 * 64 + 2 * 2 * 32) * int(args[1]) * _SIZES[args[0]]


# kernel name -> (threads per block, dynamic shared memory bytes from the template arguments, tensor cores,
# asynchronous copies): what the launchers in csrc/ pass
LAUNCHES = {
    "vector_add_vec16_kernel": (256, None, False, False),
    "vector_add_scalar_kernel": (256, None, False, False),
    "softmax_fwd_warp_kernel": (128, None, False, False),
    "softmax_bwd_warp_kernel": (128, None, False, False),
    "softmax_fwd_block_kernel": (512, None, False, False),
    "softmax_bwd_block_kernel": (512, None, False, False),
    "rms_norm_forward_kernel": (512, None, False, False),
    "rms_norm_backward_kernel": (512, lambda args: 4 * RMS_NORM_CUDA_MAX_WIDTH, False, False),
    "rms_norm_sum_partials_kernel": (256, None, False, False),
    "matmul_tiled_kernel": (256, None, False, False),
    "matmul_mma_kernel": (256, None, True, True),
    "int4_matmul_tiled_kernel": (256, None, False, False),
    "int4_matmul_decode_kernel": (256, None, False, False),
    "int4_matmul_split_reduce_kernel": (256, None, False, False),
    "flash_attention_fwd_rowwise_kernel": (128, None, False, False),
    "flash_attention_fwd_mma_kernel": (128, _fa_mma_shared, True, True),
    "flash_attention_bwd_delta_kernel": (128, None, False, False),
    "flash_attention_bwd_dq_kernel": (128, None, False, False),
    "flash_attention_bwd_dkdv_kernel": (128, None, False, False),
    "flash_attention_bwd_dq_mma_kernel": (128, _fa_bwd_mma_shared, True, True),
    "flash_attention_bwd_dkdv_mma_kernel": (128, _fa_bwd_mma_shared, True, True),
    "matmul_wgmma_kernel": (384, lambda args: WGMMA_MATMUL_SHARED, True, True),
    "flash_attention_fwd_wgmma_kernel": (384, lambda args: WGMMA_ATTENTION_SHARED, True, True),
}
# csrc/matmul_wgmma.cu's kWgmmaSharedBytes: 1024 alignment + 4 stages x (A 16 KiB + B 16 KiB) + 2 x 16 KiB of output
# + 8 mbarriers
WGMMA_MATMUL_SHARED = 1024 + 4 * (16384 + 16384) + 2 * 16384 + 8 * 8
# csrc/flash_attention_wgmma.cu's kFa3SharedBytes: 1024 alignment + Q 32 KiB + 2 stages x (K 32 KiB + V 32 KiB)
# + 9 mbarriers
WGMMA_ATTENTION_SHARED = 1024 + 5 * 32768 + 9 * 8
# Kernels with sm_90a code only (a trap elsewhere): on sm_90 they must run wgmma (HGMMA) fed by TMA (UTMALDG);
# their other architectures' stubs are not tensor-core kernels.
SM90A_ONLY = {"matmul_wgmma_kernel", "flash_attention_fwd_wgmma_kernel"}
_NAME = re.compile(r"gpuforge::(\w+)<(.*)>\(")


def _records(binary: Path, source: str, archs: dict[str, int], arch: str | None = None) -> list[dict]:
    """Records of every kernel in `binary`; `arch` names the architecture of a single-architecture cubin, for
    which cuobjdump prints no "arch =" line (a fatbinary names each of its ELFs)."""
    mixes = sass.instruction_mix(binary)
    records = []
    for (found, mangled), res in sorted(sass.resources(binary).items()):
        mix, target = mixes.get((found, mangled), {}), arch or found
        demangled = sass.demangle(mangled)
        m = _NAME.search(demangled)
        name, args = (m.group(1), [a.strip() for a in m.group(2).split(",")]) if m else (demangled, [])
        threads, dynamic, tensor_cores, async_copies = LAUNCHES.get(name, (None, None, False, False))
        hopper = name in SM90A_ONLY and target.removesuffix("a") == "sm_90"
        if name in SM90A_ONLY and not hopper:
            tensor_cores = async_copies = False
        shared = res["static_shared"] + (dynamic(args) if dynamic else 0)
        record = {"source": source, "op": name.split("_kernel")[0], "kernel": name,
                  "label": "<" + ", ".join(args) + ">" if args else "", "arch": target, "num_warps": None,
                  "num_stages": None, "tensor_cores": tensor_cores, "async_copies": async_copies,
                  "wgmma": hopper, "tma": hopper,
                  "tolerated_spill_bytes": 0, **res, "shared": shared, "threads": threads,
                  "mix": mix}
        if threads is None:
            record["error"] = f"{name}: no launch configuration in profiling/static/cuda_aot.py LAUNCHES"
        else:
            record["num_warps"] = threads // 32
            cc = archs[target.removesuffix("a")]
            record["occupancy"] = occupancy(ARCHS[cc], res["regs"], shared, threads)
        records.append(record)
    return records


def extension_records() -> list[dict]:
    """The nvcc build gpuforge._C, or nothing when it is not built."""
    spec = importlib.util.find_spec("gpuforge._C")
    if spec is None or spec.origin is None:
        return []
    return _records(Path(spec.origin), "cuda (nvcc, gpuforge._C)", {"sm_80": 80, "sm_90": 90})


def nvrtc_records(archs=("sm_80", "sm_90a", "sm_100a")) -> list[dict]:
    """Every csrc/*.cu source compiled by NVRTC with the cupy backend's instantiations, per architecture."""
    if not nvrtc.available():
        return []
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted(nvrtc.CSRC.glob("*.cu")):
            for arch in archs:
                build = nvrtc.compile_source(source, NAME_EXPRESSIONS.get(source.name, []), arch)
                if build.status != 0:
                    records.append({"source": "cupy (NVRTC)", "op": source.stem, "kernel": source.name, "label": "",
                                    "arch": arch.removesuffix("a"), "error": build.log[-500:]})
                    continue
                cubin = Path(tmp) / f"{source.stem}.{arch}.cubin"
                cubin.write_bytes(build.cubin)
                records += _records(cubin, "cupy (NVRTC)", {"sm_80": 80, "sm_90": 90, "sm_100": 100},
                                    arch=arch.removesuffix("a"))
    return records
