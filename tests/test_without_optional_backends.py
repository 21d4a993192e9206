"""gpuforge with torch and without Triton, Numba or transformers (optional extras): in a virtualenv that has
torch, its dependencies and gpuforge but no triton, numba or transformers, every op runs with backend="torch"
and "auto", gf.nn works, every reference model trains a step, and gpuforge.integrations imports (its
transformers module says transformers is missing).

The virtualenv is real (`python -m venv`, its own interpreter and site-packages); rather than reinstalling
torch (a minute), its site-packages links to the project venv's installed distributions of torch and its
dependencies, and to gpuforge's editable install.
"""

import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import torch

# torch and what it imports, and gpuforge's own runtime dependency numpy
LINKED = ("torch", "numpy", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock",
          "typing_extensions")


def _installed_paths(dist_name: str) -> list[Path]:
    """The top-level files and folders of an installed distribution (its packages, modules and .dist-info)."""
    dist = metadata.distribution(dist_name)
    site = Path(dist.locate_file(""))
    tops = {Path(str(f)).parts[0] for f in dist.files or ()} - {"__pycache__"}
    return [site / t for t in sorted(tops) if not t.startswith("..") and (site / t).exists()]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("no-triton") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = Path(torch.__file__).parents[1]  # the project venv's site-packages
    editable = sorted(ours.glob("__editable__*gpuforge*")) + sorted(ours.glob("gpuforge-*.dist-info"))
    assert editable, f"no editable install of gpuforge in {ours}"
    for path in [p for name in LINKED for p in _installed_paths(name)] + editable:
        if not (site / path.name).exists():
            (site / path.name).symlink_to(path)
    return python


SCRIPT = textwrap.dedent("""
    import importlib.util, torch
    import gpuforge as gf
    from gpuforge.kernels.int4_matmul import random_int4_weight
    from gpuforge.models import reference_models

    assert importlib.util.find_spec("triton") is None and importlib.util.find_spec("numba") is None
    status = gf.backends.available()
    assert not status["triton"][0] and "not installed" in status["triton"][1], status
    assert not status["numba"][0] and "not installed" in status["numba"][1], status
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 33, generator=g)
    for backend in ("torch", "auto"):
        assert torch.allclose(gf.vector_add(x, x, backend=backend), 2 * x)
        assert torch.allclose(gf.matmul(x, x.T, backend=backend), x @ x.T, atol=1e-5)
        assert torch.allclose(gf.softmax(x, backend=backend), torch.softmax(x, -1), atol=1e-6)
        w = torch.ones(33)
        assert torch.allclose(gf.rms_norm(x, w, backend=backend), torch.nn.functional.rms_norm(x, (33,), w, 1e-6),
                              atol=1e-5)
        q, k = torch.randn(1, 4, 7, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
        out = gf.flash_attention(q, k, k, causal=True, backend=backend)
        assert out.shape == q.shape and torch.isfinite(out).all()
        qw = random_int4_weight(8, 64, 32, symmetric=True, generator=g)
        assert gf.int4_matmul(torch.randn(3, 64, generator=g), qw, backend=backend).shape == (3, 8)
        cache = torch.randn(4, 16, 2, 16, generator=g)
        table, lens = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([20, 5], dtype=torch.int32)
        assert gf.paged_attention(torch.randn(2, 4, 16, generator=g), cache, cache, table, lens,
                                  backend=backend).shape == (2, 4, 16)
        assert torch.allclose(gf.layer_norm(x, w, w, backend=backend),
                              torch.nn.functional.layer_norm(x, (33,), w, w), atol=1e-5)
        cos, sin = torch.ones(9, 8), torch.zeros(9, 8)  # angle 0: the identity
        assert torch.equal(gf.rope(k, k, cos, sin, backend=backend)[0], k)
        assert torch.allclose(gf.swiglu(x, x, backend=backend), torch.nn.functional.silu(x) * x, atol=1e-6)
        target = torch.randint(0, 7, (5,), generator=g)
        lm_head = torch.randn(7, 33, generator=g)
        assert torch.allclose(gf.fused_linear_cross_entropy(x, lm_head, target, backend=backend),
                              torch.nn.functional.cross_entropy(x @ lm_head.T, target), atol=1e-5)
    layers = [gf.nn.RMSNorm(33), gf.nn.LayerNorm(33), gf.nn.Linear(33, 7), gf.nn.Softmax(-1)]
    for layer in layers:
        xr = x.clone().requires_grad_()
        layer(xr).sum().backward()
        assert xr.grad is not None
    gf.nn.Attention(dim=32, n_heads=4, n_kv_heads=2)(torch.randn(2, 5, 32, generator=g)).sum().backward()
    trained = 0
    for name, ref in reference_models().items():
        torch.manual_seed(0)
        model = ref.build()
        loss = ref.loss_fn(model, ref.make_batch(0, 4))
        assert torch.isfinite(loss), name
        if not ref.inference_only:
            loss.backward()
            trained += 1
    gf.kernelize(reference_models()["tiny_llama"].build())
    # transformers is an optional extra too: gpuforge and its integrations package import without it
    import gpuforge.integrations
    assert importlib.util.find_spec("transformers") is None
    try:
        import gpuforge.integrations.transformers
    except ModuleNotFoundError as err:
        assert err.name == "transformers", err
    else:
        raise AssertionError("gpuforge.integrations.transformers imported without transformers")
    print("ok", len(reference_models()), trained)
""")


def test_ops_nn_and_reference_models_run_without_triton_and_numba(bare_python):
    proc = subprocess.run([str(bare_python), "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=bare_python.parents[2])  # not the checkout: gpuforge must come from its install
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.startswith("ok "), proc.stdout
