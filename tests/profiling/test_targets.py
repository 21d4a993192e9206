"""The speed targets judged on records: nothing is measured on a CPU; on GPU-like synthetic records a
target is met only when every matching shape reaches it, and rows it does not name never count."""

from gpuforge.profiling import targets


def row(op, label, shape, median_ms, dtype="bfloat16", fraction=0.5):
    return {"op": op, "label": label, "shape": shape, "dtype": dtype, "median_ms": median_ms,
            "fraction_of_peak": fraction}


def verdict(records, op, implementation, metric):
    target = next(t for t in targets.TARGETS if (t.op, t.implementation, t.metric) == (op, implementation, metric))
    return targets.evaluate(target, records, gpu_timings=True)


def test_cpu_run_measures_no_target():
    records = [row("matmul", "cuBLAS", "4096x4096x4096 fwd", 1.0), row("matmul", "triton", "4096x4096x4096 fwd", 1.0)]
    verdicts = targets.evaluate_all(records, gpu_timings=False)
    assert {v.status for v in verdicts} == {"not measured (CPU)"}
    assert "not measured (CPU)" in targets.markdown_table(verdicts)


def test_ratio_target_met_only_when_every_shape_reaches_it():
    records = [row("matmul", "cuBLAS", "4096x4096x4096 fwd", 1.0), row("matmul", "triton", "4096x4096x4096 fwd", 1.05),
               row("matmul", "cuBLAS", "8192x8192x8192 fwd", 8.0), row("matmul", "triton", "8192x8192x8192 fwd", 8.0),
               # neither the fwd+bwd rows, a 2048 row nor fp16 rows belong to the bf16 4096/8192 forward target
               row("matmul", "cuBLAS", "4096x4096x4096 fwd+bwd", 1.0),
               row("matmul", "triton", "4096x4096x4096 fwd+bwd", 9.0),
               row("matmul", "cuBLAS", "2048x2048x2048 fwd", 1.0), row("matmul", "triton", "2048x2048x2048 fwd", 9.0),
               row("matmul", "cuBLAS", "4096x4096x4096 fwd", 1.0, dtype="float16"),
               row("matmul", "triton", "4096x4096x4096 fwd", 9.0, dtype="float16")]
    triton = verdict(records, "matmul", "triton", "cuBLAS")
    assert (triton.status, triton.rows, triton.worst_shape) == ("met", 2, "4096x4096x4096 fwd bfloat16")
    assert abs(triton.value - 1 / 1.05) < 1e-12  # 0.952x >= 0.9x
    records[1] = row("matmul", "triton", "4096x4096x4096 fwd", 1.25)  # 0.8x
    assert verdict(records, "matmul", "triton", "cuBLAS").status == "missed"
    assert verdict(records, "matmul", "cuda", "cuBLAS").status == "not measured (no rows)"


def test_fraction_and_secondary_baseline_targets():
    shape = "(16384, 8192) fwd+bwd"
    records = [row("rms_norm", "torch", shape, 2.0), row("rms_norm", "torch.compile", shape, 1.2),
               row("rms_norm", "triton", shape, 1.4, fraction=0.83)]
    assert verdict(records, "rms_norm", "triton", "torch").status == "met"  # 1.43x >= 1.3x eager
    assert verdict(records, "rms_norm", "triton", "torch.compile").status == "missed"  # 0.86x < 1.0x
    fraction = verdict(records, "rms_norm", "triton", targets.FRACTION)
    assert (fraction.status, fraction.value) == ("met", 0.83)
    decode = [row("int4_matmul", "cuBLAS", "M=1 N=4096 K=4096 g128", 3.0),
              row("int4_matmul", "torch int4 (tinygemm)", "M=1 N=4096 K=4096 g128", 1.1),
              row("int4_matmul", "cuda", "M=1 N=4096 K=4096 g128", 1.0)]
    assert verdict(decode, "int4_matmul", "cuda", "cuBLAS").status == "met"
    assert verdict(decode, "int4_matmul", "cuda", "torch int4 (tinygemm)").status == "met"
    assert verdict(decode, "int4_matmul", "triton", "cuBLAS").status == "not measured (no rows)"


def test_absolute_rate_target_reads_each_long_sequence_row():
    def attention(label, shape, tflops):
        return row("flash_attention", label, shape, 1.0) | {"tflops": tflops}

    records = [attention("cuda-wgmma", "B2 H16 S8192 D128 fwd", 610.0),
               attention("cuda-wgmma", "B1 H16 S16384 D128 causal fwd", 560.0),
               attention("cuda-wgmma", "B4 H32 S4096 D128 fwd", 100.0),  # S 4K: not a row of this target
               attention("cuda-wgmma", "B2 H16 S8192 D128 fwd+bwd", 100.0)]
    rate = verdict(records, "flash_attention", "cuda-wgmma", targets.TFLOPS)
    assert (rate.status, rate.value, rate.rows) == ("met", 560.0, 2)
    assert "560 TFLOP/s" in targets.markdown_table([rate]) and ">= 550 TFLOP/s" in rate.target.describe()
    records[1] = attention("cuda-wgmma", "B1 H16 S16384 D128 causal fwd", 500.0)
    assert verdict(records, "flash_attention", "cuda-wgmma", targets.TFLOPS).status == "missed"
