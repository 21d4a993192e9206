"""Int4Linear and quantize_model: same function as the dequantized layer, frozen base with gradients for x
(QLoRA), state_dict round trip through torch.load(weights_only=True), whole-model quantization with skips."""

import io

import pytest
import torch
from torch import nn

import gpuforge as gf
from gpuforge.quant import Int4Linear, dequantize_int4, quantize_model
from tests.helpers import assert_close_rel


def _linear(k=128, n=45, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


@pytest.mark.parametrize("method", ("rtn", "gptq", "awq"))
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_from_linear_computes_the_dequantized_layer(method, backend):
    linear = _linear()
    calibration = torch.randn(512, 128)  # full rank: GPTQ's Hessian covers every input direction
    layer = Int4Linear.from_linear(linear, group_size=64, method=method, calibration=calibration)
    layer.backend = backend
    x = torch.randn(2, 5, 128, dtype=torch.float16)
    w = dequantize_int4(layer.weight_int4, torch.float64)
    ref = x.double() @ w.T + linear.bias.double()
    assert_close_rel(layer(x), ref, 4e-3)
    # and it approximates the float layer (int4, groups of 64: a few percent)
    assert_close_rel(layer(x), linear(x.float()).double(), 0.1)


def test_frozen_base_gradient_flows_to_input_and_lora():
    layer = Int4Linear.from_linear(_linear(), group_size=32)
    lora_a = nn.Parameter(torch.randn(4, 128) * 0.1)
    lora_b = nn.Parameter(torch.randn(45, 4) * 0.1)
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x) + x @ lora_a.T @ lora_b.T
    y.square().sum().backward()
    assert x.grad is not None and lora_a.grad is not None and lora_b.grad is not None
    assert all(not b.requires_grad for b in layer.buffers())
    w = dequantize_int4(layer.weight_int4, torch.float32)
    expected = 2 * y.detach() @ (w + lora_b.detach() @ lora_a.detach())
    assert_close_rel(x.grad, expected.double(), 1e-5)


@pytest.mark.parametrize("method", ("rtn", "awq"))
def test_state_dict_round_trip_weights_only(method):
    layer = Int4Linear.from_linear(_linear(), group_size=32, method=method, calibration=torch.randn(32, 128))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = Int4Linear(128, 45, group_size=32, awq=method == "awq")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(128, 45, group_size=64, awq=method == "awq").load_state_dict(layer.state_dict())


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="linear"):
        Int4Linear.from_linear(nn.Conv1d(4, 4, 1))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


@pytest.mark.parametrize("method", ("rtn", "gptq", "awq"))
def test_quantize_model_swaps_linears_and_skips(method):
    torch.manual_seed(1)
    model = _MLP()
    calibration = [torch.randn(32, 64), torch.randn(16, 64)]
    x = torch.randn(8, 64)
    ref = model(x).detach()
    quantize_model(model, method=method, calibration=calibration, group_size=32, skip=("head",))
    assert isinstance(model.up, Int4Linear) and isinstance(model.down, Int4Linear)
    assert type(model.head) is nn.Linear
    # two int4 layers in a row (groups of 32): ~10% of the output's max (measured 0.10 for RTN)
    assert_close_rel(model(x).detach(), ref.double(), 0.2)


def test_quantize_model_needs_calibration_that_reaches_layers():
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(_MLP(), method="gptq")
    model = _MLP()
    model.unused = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="unused"):
        quantize_model(model, method="awq", calibration=torch.randn(4, 64), group_size=-1)


def test_public_api():
    assert gf.quant.Int4Linear is Int4Linear and callable(gf.int4_matmul) and callable(gf.quant.quantize_int4)
