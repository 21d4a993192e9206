"""Int4Linear: a drop-in nn.Linear whose weight is stored as int4 (see gpuforge.kernels.int4_format) and multiplied
by gf.int4_matmul. The int4 weight is frozen (buffers, no gradient); gradients flow to the input (and bias),
which is what LoRA/QLoRA training over a quantized base needs."""

from __future__ import annotations

import torch
from torch import nn

from gpuforge.kernels.int4_format import Int4Weight, resolve_group_size
from gpuforge.kernels.int4_matmul import int4_matmul
from gpuforge.quant.quantize import quantize_int4


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W (out_features, in_features) stored as int4 groups. State dict: `qweight`, `scales`,
    `zeros`, `in_scales` (AWQ only), `bias`, plus the group size and symmetry as extra state."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = True, scale_dtype: torch.dtype = torch.float16, awq: bool = False,
                 device=None, dtype: torch.dtype | None = None, backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = resolve_group_size(group_size, in_features)
        self.symmetric = symmetric
        self.backend = backend
        groups = in_features // self.group_size
        packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.full((out_features, groups), 8, dtype=torch.uint8, device=device))
        self.register_buffer("in_scales", torch.ones(in_features, device=device) if awq else None)
        # the bias stays in floating point, in `dtype` (torch's default, as for nn.Linear)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def weight_int4(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.symmetric,
                          self.in_scales)

    @classmethod
    def from_int4(cls, weight: Int4Weight, bias: torch.Tensor | None = None) -> Int4Linear:
        n, k = weight.shape
        layer = cls(k, n, bias is not None, weight.group_size, weight.symmetric, weight.scales.dtype,
                    weight.in_scales is not None, device=weight.device,
                    dtype=None if bias is None else bias.dtype)
        for name in ("qweight", "scales", "zeros", "in_scales"):
            if getattr(weight, name) is not None:
                getattr(layer, name).copy_(getattr(weight, name))
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, method: str = "rtn",
                    calibration: torch.Tensor | None = None, symmetric: bool = True,
                    scale_dtype: torch.dtype = torch.float16) -> Int4Linear:
        """Quantize `linear` ("rtn", "gptq" or "awq"; the last two need its input activations (..., K))."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = quantize_int4(linear.weight.detach(), group_size, method, calibration, symmetric,
                               scale_dtype)
        return cls.from_int4(weight, linear.bias)

    def get_extra_state(self) -> dict:
        return {"group_size": self.group_size, "symmetric": self.symmetric}

    def set_extra_state(self, state: dict) -> None:
        if state["group_size"] != self.group_size:
            raise ValueError(f"state_dict: group_size {state['group_size']} does not match this layer's "
                             f"{self.group_size}")
        self.symmetric = bool(state["symmetric"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_matmul(x, self.weight_int4, backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, symmetric={self.symmetric}, "
                f"awq={self.in_scales is not None}")
