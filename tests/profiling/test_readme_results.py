"""The README results section is rendered from a results file, between its markers, and nowhere else."""

import json

from gpuforge.profiling import readme_results


def test_render_and_replace_between_markers(tmp_path):
    records = [
        {"op": "matmul", "label": "cuBLAS", "shape": "4096^3", "dtype": "bfloat16", "size": 4096, "tflops": 700.0,
         "gbps": 1.0, "fraction_of_peak": 0.88, "speedup_vs_baseline": 1.0, "baseline": "cuBLAS", "max_rel_error": 0.0},
        {"op": "matmul", "label": "triton", "shape": "4096^3", "dtype": "bfloat16", "size": 4096, "tflops": 650.0,
         "gbps": 1.0, "fraction_of_peak": 0.81, "speedup_vs_baseline": 0.93, "baseline": "cuBLAS",
         "max_rel_error": 3e-3},
        {"op": "matmul", "label": "triton", "shape": "64^3", "dtype": "bfloat16", "size": 64, "tflops": 1.0,
         "gbps": 1.0, "fraction_of_peak": 0.01, "speedup_vs_baseline": 2.0, "baseline": "cuBLAS",
         "max_rel_error": 1e-3},
    ]
    env = {"device": "NVIDIA H100", "date": "2026-11-23T00:00:00", "git_commit": "0123456789abc",
           "command": "bench all",
           "peaks": {"copy_gbps": 3000.0, "matmul_tflops": 800.0, "matmul_dtype": "bfloat16"}, "gpu_timings": True}
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"environment": env, "records": records}))
    rows = readme_results.summary_rows(records)
    assert rows == ["| matmul | 4096^3 | bfloat16 | triton | 650.0 TFLOP/s | 81% | 0.93x cuBLAS | 3.0e-03 |"]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_results.START}\nold\n{readme_results.END}\noutro\n")
    readme_results.update_readme(readme, results)
    updated = readme.read_text()
    assert updated.startswith("intro\n") and updated.endswith("outro\n") and "old" not in updated
    assert "NVIDIA H100" in updated and rows[0] in updated
