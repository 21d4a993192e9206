"""The int4 format: exact pack/unpack, the RTN error bound, dequantization, serialisation, bad input."""

import io

import pytest
import torch

from gpuforge.quant import Int4Weight, dequantize_int4, pack_int4, quantize_int4, unpack_int4

GROUPS = (32, 64, 128, -1)


def test_pack_unpack_round_trip_is_exact():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (7, 130), generator=generator)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 65)
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_pack_layout_is_low_nibble_first():
    assert pack_int4(torch.tensor([3, 10])).item() == 3 | (10 << 4)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("scale_dtype", (torch.float16, torch.bfloat16))
def test_rtn_error_within_half_a_scale(group_size, symmetric, scale_dtype):
    generator = torch.Generator().manual_seed(group_size + symmetric)
    w = torch.randn(37, 256, generator=generator) * torch.rand(37, 1, generator=generator) * 3
    w[0, :] = 0  # an all-zero row must not divide by zero
    q = quantize_int4(w, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    assert q.scales.dtype == scale_dtype
    group = 256 if group_size == -1 else group_size
    assert q.group_size == group and q.scales.shape == (37, 256 // group)
    if symmetric:
        assert bool((q.zeros == 8).all())
    error = (dequantize_int4(q, torch.float64) - w.double()).abs()
    bound = q.scales.double().repeat_interleave(group, dim=1) / 2
    assert bool((error <= bound * (1 + 1e-12)).all()), f"max excess {(error - bound).max().item():.3e}"
    assert bool((dequantize_int4(q, torch.float64)[0] == 0).all())


def test_dequantize_formula():
    codes = torch.tensor([[0, 15, 7, 8]])
    q = Int4Weight(pack_int4(codes), torch.tensor([[0.5, 2.0]], dtype=torch.float16),
                   torch.tensor([[8, 3]], dtype=torch.uint8), group_size=2, symmetric=False)
    expected = torch.tensor([[(0 - 8) * 0.5, (15 - 8) * 0.5, (7 - 3) * 2.0, (8 - 3) * 2.0]],
                            dtype=torch.float64)
    assert torch.equal(dequantize_int4(q, torch.float64), expected)
    q.in_scales = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert torch.equal(dequantize_int4(q, torch.float64), expected / q.in_scales.double())


@pytest.mark.parametrize("awq", (False, True))
def test_state_dict_loads_with_weights_only(awq):
    generator = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, 64, generator=generator), torch.randn(40, 64, generator=generator)
    q = quantize_int4(w, 32, method="awq" if awq else "rtn", calibration=x, symmetric=False,
                      scale_dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    loaded = Int4Weight.from_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.group_size == 32 and loaded.symmetric is False and (loaded.in_scales is not None) == awq
    assert torch.equal(dequantize_int4(loaded, torch.float64), dequantize_int4(q, torch.float64))


def test_bad_inputs_raise_naming_the_argument():
    w = torch.randn(8, 96)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(w, 64)  # 96 % 64 != 0
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(8, 99), -1)  # odd K cannot be packed
    with pytest.raises(TypeError, match="scale_dtype"):
        quantize_int4(w, 32, scale_dtype=torch.float64)
    with pytest.raises(TypeError, match="w"):
        quantize_int4(torch.randn(96), 32)
    with pytest.raises(ValueError, match="method"):
        quantize_int4(w, 32, method="nf4")
    with pytest.raises(ValueError, match="calibration"):
        quantize_int4(w, 32, method="gptq")
    with pytest.raises(ValueError, match="codes"):
        pack_int4(torch.tensor([0, 16]))
    with pytest.raises(TypeError, match="packed"):
        unpack_int4(torch.tensor([1, 2]))
    q = quantize_int4(w, 32)
    with pytest.raises(ValueError, match="scales"):
        Int4Weight(q.qweight, q.scales[:, :2], q.zeros, 32, True)
