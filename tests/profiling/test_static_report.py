"""CI gate on what a GPU would run: `gpuforge inspect` compiles a representative subset of the Triton kernels for
sm_80 and sm_90 (fresh cache, TRITON_INTERPRET unset, in a subprocess as a user would run it) and every record
must pass every check (no spill, shared memory fits, tensor cores and asynchronous copies where expected).
The subset is the configurations that used to fail: the rms_norm backward of a 64K row, the softmax backward of
a 32K row, the attention backward at head dim 128, the int4 GEMM with fp32 activations and the fp32 matmul."""

import json
import os
import re
import subprocess
import sys

import pytest

from gpuforge.profiling.static.checks import problems

SUBSET = {
    ("_rms_norm_row_dot_kernel", "float32 BLOCK_SIZE=4096"),
    ("_rms_norm_columns_bwd_kernel", "float32 BLOCK_SIZE=4096 HAS_DH=False ATOMIC=False"),
    ("_softmax_online_bwd_kernel", "float32 BLOCK_SIZE=4096"),
    ("_attn_bwd_dkdv_kernel", "float16 D128 32x64 w8 s2 ATOMIC_DQ=False"),
    ("_attn_bwd_dq_kernel", "float16 D128 64x64 w4 s2"),
    ("_int4_matmul_kernel", "float32 prefill 128x128x64 g128 split1"),
    ("_matmul_kernel", "float32 128x128x32 w8 s4"),
}
OPS = ("rms_norm", "softmax", "flash_attention", "int4_matmul", "matmul")


def _cuobjdump_present() -> bool:
    from gpuforge.profiling.static import sass

    try:
        sass.tool("cuobjdump")
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _cuobjdump_present(), reason="the triton wheel ships no cuobjdump here")
def test_representative_configurations_pass_every_check(tmp_path):
    match = "^(" + "|".join(re.escape(f"{kernel} {label}") for kernel, label in sorted(SUBSET)) + ")$"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GPUFORGE_INSPECT_CACHE"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "gpuforge", "inspect", "--ops", *OPS, "--arch", "80,90", "--no-cuda",
               "--match", match, "--jobs", "2", "--quiet", "--report", str(tmp_path), "--fail-on-problems"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {(r["kernel"], r["label"], r["arch"]) for r in records} == {
        (kernel, label, arch) for kernel, label in SUBSET for arch in ("sm_80", "sm_90")}
    failing = {(r["kernel"], r["label"], r["arch"]): problems(r) for r in records if problems(r)}
    assert not failing, failing
    assert all(r["stack"] + r["local"] == 0 and r["mix"]["STL"] + r["mix"]["LDL"] == 0 for r in records)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
