"""Builds a C driver of tests/csrc/simt/ (csrc/ kernels + the SIMT emulator) into a shared library with g++.

The kernels' own source is compiled, as C++20 with __CUDACC_RTC__ defined (which hides the host launchers and
their <<<...>>> syntax, as for NVRTC), __CUDA_ARCH__ = 800 (the sm_80 tensor-core paths compile) and
-fno-strict-aliasing (CUDA code reads a uint4 through a T*, as nvcc allows). Every inline PTX statement is
rewritten, in a copy of the files that hold one, into the call of its emulation (simt.h's lop3, ptx.h's
mma.sync / ldmatrix / cp.async, hopper.h's mbarrier / tensor-map copies / wgmma, with __CUDA_ARCH_FEAT_SM90_ALL
defined so that the sm_90a kernels compile); an instruction without one fails the build, so nothing is emulated
silently."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SIMT_DIR = ROOT / "tests" / "csrc" / "simt"
CSRC_DIR = ROOT / "csrc"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/dtype.h

ASM = re.compile(r"\basm\s*(?:volatile\s*)?\(")
STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
OPERAND = re.compile(r'^\s*"([=+]?)(\w)"\s*\((.*)\)\s*$', re.S)
SMEM_ADDRESS = re.compile(r"^smem_address\((.*)\)$", re.S)


def _balanced(text: str, start: int) -> int:
    """The index just past the parenthesis that closes the one opened before `start`."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError("unbalanced parentheses in an asm statement")


def _split_top(text: str, sep: str) -> list[str]:
    """text split at `sep` outside parentheses, brackets and string literals."""
    parts, depth, quoted, current = [], 0, False, []
    for i, ch in enumerate(text):
        if ch == '"' and (i == 0 or text[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted:
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
            if ch == sep and depth == 0:
                parts.append("".join(current))
                current = []
                continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def _statements(template: str) -> list[str]:
    """The PTX statements of an asm template, a `{ .reg ...; ...; }` scope's braces and declarations dropped."""
    text = " ".join(template.replace("\\n", " ").split()).strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    return [st.strip() for st in text.split(";") if st.strip() and not st.strip().startswith(".reg")]


def _emulated_call(template: str, operands: list[tuple[str, str]]) -> str:
    """The simt:: call that does what the PTX `template` does, with operand i the C++ expression operands[i]."""
    op = lambda ref: operands[int(ref.strip().lstrip("%"))][1]  # noqa: E731
    address = lambda ref: SMEM_ADDRESS.sub(r"\1", op(ref.strip().strip("[]")))  # noqa: E731
    statements = _statements(template)
    if not statements:  # an empty statement that only orders the compiler's instructions (hopper.cuh)
        return "(void)0"
    if len(statements) == 2:
        return _scoped_call(statements, op, address)
    text = " ".join(statements)
    mnemonic, _, rest = text.partition(" ")
    args = [a.strip() for a in _split_top(rest, ",")] if rest else []
    hopper = _hopper_call(mnemonic, args, rest, op, address)
    if hopper is not None:
        return hopper
    if mnemonic == "lop3.b32":
        return f"{op(args[0])} = simt::lop3<{args[4]}>({op(args[1])}, {op(args[2])}, {op(args[3])})"
    if re.fullmatch(r"cp\.async\.c[ag]\.shared\.global", mnemonic):
        src_size = op(args[3]) if len(args) > 3 else args[2]
        return f"simt::cp_async({address(args[0])}, {op(args[1].strip('[]'))}, {args[2]}, {src_size})"
    if mnemonic == "cp.async.commit_group":
        return "simt::cp_async_commit()"
    if mnemonic == "cp.async.wait_group":
        return f"simt::cp_async_wait({op(args[0])})"
    if mnemonic == "cp.async.wait_all":
        return "simt::cp_async_commit(), simt::cp_async_wait(0)"
    ld = re.fullmatch(r"ldmatrix\.sync\.aligned\.m8n8\.x([124])(\.trans)?\.shared\.b16", mnemonic)
    if ld:
        regs = [op(r) for r in _split_top(rest[rest.index("{") + 1:rest.index("}")], ",")]
        target = address(rest[rest.index("[") + 1:rest.index("]")])
        trans = "true" if ld.group(2) else "false"
        return f"simt::ldmatrix<{ld.group(1)}, {trans}>({', '.join(regs)}, {target})"
    mma = re.fullmatch(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(bf16|f16)\.\1\.f32", mnemonic)
    if mma:
        groups = re.findall(r"\{([^}]*)\}", rest)
        d, a, b, c = ([op(r) for r in g.split(",")] for g in groups)
        kind = "simt::Bf16" if mma.group(1) == "bf16" else "simt::F16"
        return f"simt::mma_m16n8k16<{kind}>({', '.join(d + a + b + c)})"
    raise ValueError(f"the SIMT emulator has no emulation of the PTX instruction {text!r}")


NO_EFFECT = {"fence.proxy.async", "fence.proxy.async.shared::cta", "fence.mbarrier_init.release.cluster"}


def _hopper_call(mnemonic: str, args: list[str], rest: str, op, address) -> str | None:
    """hopper.h's call for a one-statement sm_90 instruction, None for any other."""
    if mnemonic in NO_EFFECT:
        return "(void)0"
    if mnemonic == "mbarrier.init.shared::cta.b64":
        return f"simt::mbarrier_init({address(args[0])}, {op(args[1])})"
    if mnemonic == "mbarrier.arrive.shared::cta.b64" and args[0] == "_":
        return f"simt::mbarrier_arrive({address(args[1])})"
    if mnemonic == "mbarrier.arrive.expect_tx.shared::cta.b64" and args[0] == "_":
        return f"simt::mbarrier_arrive_expect_tx({address(args[1])}, {op(args[2])})"
    tensor = re.fullmatch(r"cp\.async\.bulk\.tensor\.([234])d\.(shared::cluster\.global\.tile\.mbarrier::"
                          r"complete_tx::bytes|global\.shared::cta\.tile\.bulk_group)", mnemonic)
    if tensor:
        map_ref, coords = re.fullmatch(r"\[\s*(%\d+)\s*,\s*\{([^}]*)\}\s*\]", [a for a in _split_top(rest, ",")
                                                                          if "{" in a][0].strip()).groups()
        coords = [op(c) for c in coords.split(",")]
        if len(coords) != int(tensor.group(1)):
            raise ValueError(f"cp.async.bulk.tensor.{tensor.group(1)}d with {len(coords)} coordinates")
        plain = [a for a in _split_top(rest, ",") if "{" not in a]
        if tensor.group(2).startswith("shared"):
            return f"simt::tma_load({address(plain[0])}, {op(map_ref)}, {address(plain[1])}, {', '.join(coords)})"
        return f"simt::tma_store({op(map_ref)}, {address(plain[0])}, {', '.join(coords)})"
    if mnemonic == "cp.async.bulk.commit_group":
        return "simt::bulk_commit()"
    if mnemonic in ("cp.async.bulk.wait_group", "cp.async.bulk.wait_group.read"):
        return f"simt::bulk_wait({op(args[0])})"
    if mnemonic == "wgmma.fence.sync.aligned":
        return "simt::wgmma_fence()"
    if mnemonic == "wgmma.commit_group.sync.aligned":
        return "simt::wgmma_commit()"
    if mnemonic == "wgmma.wait_group.sync.aligned":
        return f"simt::wgmma_wait({op(args[0])})"
    if re.fullmatch(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32", mnemonic):
        return f"simt::setmaxnreg<{op(args[0])}>()"
    if mnemonic in ("bar.sync", "barrier.sync"):
        return f"simt::named_barrier({op(args[0])}, {op(args[1])})"
    return None


def _scoped_call(statements: list[str], op, address) -> str:
    """The call for a two-statement scope: a predicate set from a register, then used by the instruction."""
    first, second = (st.partition(" ") for st in statements)
    first_args = [a.strip() for a in _split_top(first[2], ",")]
    if first[0] == "mbarrier.try_wait.parity.shared::cta.b64" and second[0] == "selp.u32":
        pred, bar, parity = first_args
        out, one, zero, used = (a.strip() for a in _split_top(second[2], ","))
        if (one, zero, used) != ("1", "0", pred):
            raise ValueError(f"the SIMT emulator has no emulation of the PTX {statements!r}")
        return f"{op(out)} = simt::mbarrier_try_wait_parity({address(bar)}, {op(parity)})"
    mma = re.fullmatch(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.(bf16|f16)\.\2", second[0])
    if first[0] == "setp.ne.b32" and first_args[2] == "0" and mma:
        return _wgmma_call(mma.group(1), mma.group(2), second[2], first_args[0], op(first_args[1]), op)
    raise ValueError(f"the SIMT emulator has no emulation of the PTX {statements!r}")


def _wgmma_call(n: str, dtype: str, operands: str, pred: str, scale_d: str, op) -> str:
    """The call for `wgmma.mma_async ... {d}, a-desc | {a regs}, b-desc, p, 1, 1[, tA], tB` whose scale-d
    predicate `pred` was set from `scale_d`. A transpose flag is a literal 0/1 or an "n" operand."""
    groups = re.findall(r"\{([^}]*)\}", operands)
    d = [op(r) for r in groups[0].split(",")]
    rest = [a.strip() for a in _split_top(re.sub(r"\{[^}]*\}", "", operands).strip(" ,"), ",") if a.strip()]
    register_a = len(groups) == 2
    flag = lambda f: f"(({op(f)}) != 0)" if f.startswith("%") else {"0": "false", "1": "true"}.get(f)  # noqa: E731
    kind = "simt::Bf16" if dtype == "bf16" else "simt::F16"
    if register_a:
        desc_b, used, scale_a, scale_b, trans_b = rest
        flags = [flag(trans_b)]
    else:
        desc_a, desc_b, used, scale_a, scale_b, trans_a, trans_b = rest
        flags = [flag(trans_a), flag(trans_b)]
    if used != pred or (scale_a, scale_b) != ("1", "1") or None in flags:
        raise ValueError(f"the SIMT emulator has no emulation of the PTX wgmma operands {operands!r}")
    if register_a:
        a = [op(r) for r in groups[1].split(",")]
        return (f"simt::wgmma_rs<{n}, {kind}, {flags[0]}>({', '.join(a)}, {op(desc_b)}, {scale_d}, "
                f"{', '.join(d)})")
    return f"simt::wgmma<{n}, {kind}, {', '.join(flags)}>({op(desc_a)}, {op(desc_b)}, {scale_d}, {', '.join(d)})"


def translate_ptx(source: str) -> str:
    """Every `asm [volatile] ("TEMPLATE" : outputs : inputs);` statement -> the equivalent simt:: call
    (ptx.h), operands passed through; an instruction without an emulation raises ValueError."""
    out, pos = [], 0
    for match in ASM.finditer(source):
        if match.start() < pos:
            continue
        end = _balanced(source, match.end())
        sections = _split_top(source[match.end():end - 1], ":")
        template = "".join(STRING.findall(sections[0]))
        operands = []
        for section in sections[1:3]:
            for spec in _split_top(section, ","):
                if spec.strip():
                    kind = OPERAND.match(spec)
                    operands.append((kind.group(2), kind.group(3).strip()))
        out.append(source[pos:match.start()])
        out.append(_emulated_call(template, operands))
        pos = end
    out.append(source[pos:])
    return "".join(out)


def replacing(file: str, original: str, mutated: str) -> Callable[[str, str], str]:
    """A `mutate` for build() (the tests' mutation checks): `original` replaced by `mutated` in csrc/<file>, which
    must still contain it."""
    def mutate(name: str, text: str) -> str:
        if name != file:
            return text
        if original not in text:
            raise ValueError(f"{file} no longer contains the text the mutation replaces: {original!r}")
        return text.replace(original, mutated)
    return mutate


def gxx_available() -> bool:
    return shutil.which("g++") is not None


def build(driver: str, out_dir: Path, mutate: Callable[[str, str], str] | None = None) -> ctypes.CDLL:
    """Compiles tests/csrc/simt/<driver>.cpp into out_dir/lib<driver>_simt.so and loads it. `mutate(name, text)`
    may change a copied csrc/ source first (the tests' mutation checks: a kernel made wrong must fail)."""
    translated = out_dir / "csrc"
    translated.mkdir(parents=True, exist_ok=True)
    # every source is copied, translated where it holds inline PTX: a quoted #include resolves next to the
    # including file first, so csrc/ itself must not be on the search path
    for source in CSRC_DIR.iterdir():
        if source.suffix in (".cu", ".cuh", ".h"):
            text = source.read_text()
            text = mutate(source.name, text) if mutate is not None else text
            (translated / source.name).write_text(translate_ptx(text) if ASM.search(text) else text)
    driver_text = (SIMT_DIR / f"{driver}.cpp").read_text()
    driver_source = out_dir / f"{driver}.cpp"  # a driver may hold PTX of its own (probe kernels)
    driver_source.write_text(translate_ptx(driver_text) if ASM.search(driver_text) else driver_text)
    lib = out_dir / f"lib{driver}_simt.so"
    subprocess.run(["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-D__CUDACC_RTC__",
                    "-D__CUDA_ARCH__=800", "-D__CUDA_ARCH_FEAT_SM90_ALL", "-include", str(SIMT_DIR / "hopper.h"),
                    "-Wall", "-Werror", "-Wno-unknown-pragmas", f"-I{SIMT_DIR}", f"-I{translated}",
                    str(driver_source), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """The tensor's data pointer as a C argument (NULL for None)."""
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)
