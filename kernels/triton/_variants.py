"""What a GPU would compile: each Triton kernel with each configuration its host wrapper or autotuner can choose.

Every module of kernels/triton/ lists its `compile_variants()`: the kernel, the argument types as the JIT would
specialise them at a typical launch on a GPU, the constexprs, num_warps and num_stages, and what the variant is
meant to use (tensor cores, asynchronous copies). `gpuforge inspect` (profiling/static_inspect.py) compiles them
ahead of time for real targets and reads registers, spills, shared memory and SASS back.

The JIT specialises every integer equal to 1 into a constant and marks pointers and integers divisible by 16
(`tt.divisibility`); without that Triton neither vectorises nor pipelines the loads, so a report that skipped it
would describe kernels that never run. Signatures here use triton's own AOT notation: "*bf16:16" (a 16-byte
aligned pointer), "i32:16" (an int divisible by 16), "i32:1" (an int equal to 1: a constant), "i32" (any int),
"fp32" (a float).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64",
                "uint8": "u8", "float8_e4m3fn": "fp8e4nv"}


@dataclass(frozen=True)
class Variant:
    op: str
    kernel: object  # a triton JITFunction (its undecorated function is kernel.fn)
    signature: dict[str, str]  # every argument that is not a constexpr, in triton's AOT notation
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    label: str  # what distinguishes this variant: dtype, tile, flags
    tensor_cores: bool = False  # the point of the kernel is tensor-core math
    async_copies: bool = False  # a pipelined GEMM/attention loop: its loads should be asynchronous
    tolerated_spill_bytes: int = 0  # a spill the kernel's docstring accepts, with its measurement
    tma: bool = False  # tensor descriptors: its loads should be bulk tensor copies (UTMALDG) on sm_90+
    archs: tuple[int, ...] = ()  # the compute capabilities whose launches can pick it (empty: every one)
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


def signature(kernel, constexprs: dict, pointers: dict[str, str], *, ones: Iterable[str] = (),
              generic: Iterable[str] = (), floats: Iterable[str] = ()) -> dict[str, str]:
    """The AOT signature of `kernel`'s runtime arguments: pointers (name -> torch dtype name) 16-byte aligned,
    `ones` equal to 1, `generic` ints with no divisibility, `floats` fp32 scalars, every other int divisible by
    16 (sizes and strides of the typical large, contiguous launch)."""
    ones, generic, floats = set(ones), set(generic), set(floats)
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name in pointers:
            out[name] = f"*{TRITON_TYPES[pointers[name]]}:16"
        elif name in floats:
            out[name] = "fp32"
        elif name in ones:
            out[name] = "i32:1"
        elif name in generic:
            out[name] = "i32"
        else:
            out[name] = "i32:16"
    return out


def dtype_names(dtypes) -> list[str]:
    return [str(d).removeprefix("torch.") for d in dtypes]
