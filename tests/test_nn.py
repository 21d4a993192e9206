"""gf.nn drop-in modules against the torch.nn modules they replace: outputs, gradients, state dicts."""

import pytest
import torch

import gpuforge as gf
from tests.helpers import REL_TOL, assert_close_rel


@pytest.mark.parametrize("normalized_shape, eps, affine",
                         [(24, None, True), ((3, 8), 1e-5, True), (24, 1e-6, False)])
def test_rms_norm_matches_torch(normalized_shape, eps, affine):
    torch.manual_seed(0)
    ours = gf.nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine)
    theirs = torch.nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            theirs.weight.normal_()
        ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 5, 24).view(2, 5, *((24,) if normalized_shape == 24 else (3, 8)))
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert_close_rel(y_ours, y_theirs, REL_TOL[torch.float32])
    dy = torch.randn_like(x)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    assert_close_rel(x_ours.grad, x_theirs.grad, 1e-5, "dx")
    if affine:
        assert_close_rel(ours.weight.grad, theirs.weight.grad, 1e-5, "dweight")


def test_rms_norm_on_the_triton_kernels_matches_torch():
    if not gf.backends.available()["triton"][0]:
        pytest.skip("triton cannot run here")
    torch.manual_seed(1)
    ours, theirs = gf.nn.RMSNorm(40, eps=1e-5, backend="triton"), torch.nn.RMSNorm(40, eps=1e-5)
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 7, 40)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert_close_rel(y_ours, y_theirs, REL_TOL[torch.float32])
    y_ours.backward(x)
    y_theirs.backward(x)
    assert_close_rel(x_ours.grad, x_theirs.grad, 1e-5, "dx")
    assert_close_rel(ours.weight.grad, theirs.weight.grad, 1e-5, "dweight")


def test_rms_norm_state_dict_round_trip_and_dtype():
    theirs = torch.nn.RMSNorm(16, dtype=torch.bfloat16)
    ours = gf.nn.RMSNorm(16, dtype=torch.bfloat16)
    assert ours.weight.dtype == torch.bfloat16 and torch.equal(ours.weight, theirs.weight)
    with torch.no_grad():
        ours.weight.uniform_()
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.weight, ours.weight)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert_close_rel(ours(x), theirs(x), REL_TOL[torch.bfloat16])


def test_rms_norm_rejects_wrong_trailing_dims():
    with pytest.raises(ValueError, match=r"x: expected trailing dims \(8,\)"):
        gf.nn.RMSNorm(8)(torch.randn(2, 9))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_default_eps_is_torchs_in_half_precision(dtype):
    """eps=None is the epsilon of the compute type (float32), as torch.nn.RMSNorm's: with x = 1e-2·randn the
    fp16/bf16 epsilon (1e-3, 8e-3) would change the output by up to ~3."""
    x = (1e-2 * torch.randn(4, 64, generator=torch.Generator().manual_seed(0))).to(dtype)
    ours = gf.nn.RMSNorm(64, backend="torch")(x)
    theirs = torch.nn.RMSNorm(64, dtype=dtype)(x)
    assert_close_rel(ours, theirs.detach(), 2 * REL_TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("normalized_shape, kwargs", [(24, {}), ((3, 8), dict(eps=1e-6)),
                                                      (24, dict(elementwise_affine=False)), (24, dict(bias=False))])
def test_layer_norm_matches_torch(backend, normalized_shape, kwargs):
    if backend == "triton" and not gf.backends.available()["triton"][0]:
        pytest.skip("triton cannot run here")
    torch.manual_seed(0)
    theirs = torch.nn.LayerNorm(normalized_shape, **kwargs)
    ours = gf.nn.LayerNorm(normalized_shape, **kwargs, backend=backend)
    assert isinstance(ours, torch.nn.LayerNorm) and ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = (3 * torch.randn(2, 5, 24) + 1).view(2, 5, *((24,) if normalized_shape == 24 else normalized_shape))
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert_close_rel(y_ours, y_theirs, REL_TOL[torch.float32])
    dy = torch.randn_like(x)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    assert_close_rel(x_ours.grad, x_theirs.grad, 1e-5, "dx")
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close_rel(p_ours.grad, p_theirs.grad, 1e-5, f"d{name}")


def test_layer_norm_rejects_wrong_trailing_dims():
    with pytest.raises(ValueError, match=r"x: expected trailing dims \(8,\)"):
        gf.nn.LayerNorm(8)(torch.randn(2, 9))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=32, n_heads=0), "n_heads: expected a positive int, got 0"),
    (dict(dim=32, n_heads=4, n_kv_heads=0), "n_kv_heads: expected a positive int, got 0"),
    (dict(dim=2, n_heads=4), r"head_dim: dim=2 // n_heads=4 is 0"),
    (dict(dim=32, n_heads=4, n_kv_heads=3), "n_kv_heads: n_heads=4 must be a multiple of n_kv_heads=3"),
])
def test_attention_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gf.nn.Attention(**kwargs)


def test_attention_rejects_a_negative_start_pos():
    """A negative start_pos would index the RoPE table from its end (wrapping to the last positions)."""
    attn = gf.nn.Attention(dim=32, n_heads=4, n_kv_heads=2, backend="torch")
    with pytest.raises(ValueError, match="start_pos: expected an int >= 0, got -1"):
        attn(torch.randn(1, 3, 32), start_pos=-1)
