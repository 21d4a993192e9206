"""Rows of 32K, 64K and 128K elements through the Triton softmax, rms_norm and layer_norm at their default
one-pass limits (one-pass or looped kernels, picked by width), forward and backward, against float64 autograd.
Two rows each keep the interpreter quick."""

import pytest
import torch

import gpuforge as gf
from gpuforge.kernels import backends
from tests.helpers import assert_close_rel

pytestmark = pytest.mark.skipif(not backends.is_available("triton")[0], reason="triton cannot run here")

WIDTHS = (32768, 65536 + 3, 131072)
FWD_TOL, BWD_TOL = 1e-5, 2e-5


def inputs(n, device, seed):
    g = torch.Generator().manual_seed(seed)
    x, dy = (torch.randn(2, n, generator=g) for _ in range(2))
    w, b = 1 + 0.5 * torch.randn(n, generator=g), torch.randn(n, generator=g)
    return [t.to(device) for t in (x, dy, w, b)]


def grads(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


def check(fn, ref, leaves, dy):
    got = grads(fn, leaves, dy)
    want = grads(ref, [t.double() for t in leaves], dy.double())
    for name, mine, exact in zip(("y", *(f"d{i}" for i in range(len(leaves)))), got, want, strict=True):
        assert_close_rel(mine, exact, FWD_TOL if name == "y" else BWD_TOL, name)


@pytest.mark.parametrize("n", WIDTHS)
def test_softmax(n, device):
    x, dy, _, _ = inputs(n, device, seed=n)
    check(lambda t: gf.softmax(t, backend="triton"), lambda t: torch.softmax(t, -1), [4 * x], dy)


@pytest.mark.parametrize("n", WIDTHS)
def test_rms_norm(n, device):
    x, dy, w, _ = inputs(n, device, seed=n + 1)
    check(lambda t, u: gf.rms_norm(t, u, backend="triton"),
          lambda t, u: t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6) * u, [x, w], dy)


@pytest.mark.parametrize("n", WIDTHS)
def test_layer_norm(n, device):
    x, dy, w, b = inputs(n, device, seed=n + 2)
    check(lambda t, u, v: gf.layer_norm(t, u, v, backend="triton"),
          lambda t, u, v: torch.nn.functional.layer_norm(t, (n,), u, v, 1e-5), [x + 3, w, b], dy)
