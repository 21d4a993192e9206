"""The int4 weight format every quantizer (gpuforge.quant, which re-exports it) produces and every int4 kernel
reads.

A weight W of shape (N, K) (nn.Linear's (out_features, in_features)) is cut along K into groups of
`group_size` consecutive input channels (32, 64, 128, or K itself: one group per output channel). Each
element is stored as an unsigned 4-bit code q in 0..15 and decoded as

    W[n, k] ≈ (q[n, k] − zeros[n, g]) · scales[n, g] / in_scales[k],      g = k // group_size

- `qweight`: uint8 (N, K // 2), two codes per byte, little-nibble first along K:
  byte qweight[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4). A row of K codes is K/2 contiguous bytes, so a kernel
  reading 16 bytes gets 32 consecutive input channels of one output channel.
- `scales`: (N, K // group_size) in float16 or bfloat16 (the dtype the user asked for).
- `zeros`: uint8 (N, K // group_size), the integer zero point. Symmetric quantization fixes it at 8
  (codes −8..7 around 0); asymmetric picks it per group from the group's min and max.
- `in_scales`: optional float32 (K,), AWQ's per-input-channel scales (None for RTN and GPTQ). The stored
  codes quantize W · diag(in_scales); dividing by them again keeps the layer's function, and the GEMM does
  that by scaling the activations: x @ Wᵀ = (x / in_scales) @ (W · diag(in_scales))ᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpuforge.kernels._tensors import compute_dtype

SYMMETRIC_ZERO = 8
SCALE_DTYPES = (torch.float16, torch.bfloat16)
_STATE_KEYS = ("qweight", "scales", "zeros", "in_scales", "group_size", "symmetric")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes (..., K), values 0..15 (any integer dtype), K even -> uint8 (..., K // 2), low nibble first."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes: expected an integer dtype, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"codes: expected an even last dim (two codes per byte), "
                         f"got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("codes: expected values in 0..15")
    pairs = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K // 2) -> uint8 codes (..., K); the exact inverse of `pack_int4`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected uint8, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def resolve_group_size(group_size: int, k: int) -> int:
    """-1 or K means one group per output channel; otherwise the group size must divide K and be even."""
    if group_size in (-1, k):
        group_size = k
    elif not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size: expected a positive int or -1 (per channel), got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size: expected a divisor of K={k} (the in_features), got {group_size}")
    if group_size % 2:
        raise ValueError(f"group_size: expected an even size (two int4 codes per byte), got {group_size}")
    return group_size


@dataclass
class Int4Weight:
    """Packed int4 weight of logical shape (N, K); see the module docstring for the layout."""

    qweight: torch.Tensor  # uint8 (N, K // 2)
    scales: torch.Tensor  # float16/bfloat16 (N, K // group_size)
    zeros: torch.Tensor  # uint8 (N, K // group_size)
    group_size: int
    symmetric: bool
    in_scales: torch.Tensor | None = None  # float32 (K,), AWQ only

    def __post_init__(self):
        self.validate()

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], 2 * self.qweight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def validate(self) -> None:
        if self.qweight.dtype != torch.uint8 or self.qweight.dim() != 2:
            raise TypeError(f"qweight: expected a 2-D uint8 tensor, got {self.qweight.dtype} "
                            f"{tuple(self.qweight.shape)}")
        n, k = self.shape
        resolve_group_size(self.group_size, k)
        groups = (n, k // self.group_size)
        if self.scales.dtype not in SCALE_DTYPES + (torch.float32,):
            raise TypeError(f"scales: expected float16/bfloat16/float32, got {self.scales.dtype}")
        if tuple(self.scales.shape) != groups:
            raise ValueError(f"scales: expected shape {groups} (N, K // group_size), "
                             f"got {tuple(self.scales.shape)}")
        if self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != groups:
            raise ValueError(f"zeros: expected uint8 of shape {groups}, got {self.zeros.dtype} "
                             f"{tuple(self.zeros.shape)}")
        if self.in_scales is not None and (self.in_scales.dim() != 1 or self.in_scales.shape[0] != k):
            raise ValueError(f"in_scales: expected shape ({k},), got {tuple(self.in_scales.shape)}")
        for name in ("scales", "zeros", "in_scales"):
            t = getattr(self, name)
            if t is not None and t.device != self.qweight.device:
                raise ValueError(f"{name}: expected device {self.qweight.device} (that of qweight), "
                                 f"got {t.device}")

    def to(self, device: torch.device | str) -> Int4Weight:
        move = (lambda t: None if t is None else t.to(device))
        return Int4Weight(move(self.qweight), move(self.scales), move(self.zeros), self.group_size,
                          self.symmetric, move(self.in_scales))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only (metadata as 0-d int64), so `torch.load(weights_only=True)` reads it back."""
        state = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros,
                 "group_size": torch.tensor(self.group_size), "symmetric": torch.tensor(int(self.symmetric))}
        if self.in_scales is not None:
            state["in_scales"] = self.in_scales
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Int4Weight:
        unknown = set(state) - set(_STATE_KEYS)
        if unknown:
            raise ValueError(f"state: unexpected keys {sorted(unknown)}")
        return cls(state["qweight"], state["scales"], state["zeros"], int(state["group_size"]),
                   bool(int(state["symmetric"])), state.get("in_scales"))


def dequantize_int4(weight: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference decode: (N, K) W ≈ (q − zero) · scale / in_scale, computed in float64 or float32 and
    returned in `dtype` (default: the scales' dtype)."""
    dtype = dtype or weight.scales.dtype
    work = compute_dtype(dtype)
    codes = unpack_int4(weight.qweight).to(work)
    scales = weight.scales.to(work).repeat_interleave(weight.group_size, dim=1)
    zeros = weight.zeros.to(work).repeat_interleave(weight.group_size, dim=1)
    w = (codes - zeros) * scales
    if weight.in_scales is not None:
        w = w / weight.in_scales.to(work)
    return w.to(dtype)
