"""Drop-in torch.nn modules running gpuforge ops: the same constructor arguments and state-dict names as the
torch module each one replaces, so `load_state_dict` works across the two."""

from __future__ import annotations

import math

import torch

from gpuforge.kernels.rms_norm import rms_norm


class RMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm computed by gf.rms_norm (statistics in fp32, one fused kernel each way).

    normalized_shape may span several trailing dims: they are flattened into one, whose RMS is the same.
    eps=None means torch.finfo(x.dtype).eps, as in torch. The output has x's dtype (the weight is cast to it);
    `backend` (keyword only, not in torch's signature) picks the gf backend."""

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            raise ValueError(f"x: expected trailing dims {self.normalized_shape} (normalized_shape), "
                             f"got shape {tuple(x.shape)}")
        n = math.prod(self.normalized_shape)
        if self.weight is not None:
            weight = self.weight.reshape(n).to(x.dtype)
        else:
            weight = torch.ones(n, dtype=x.dtype, device=x.device)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        y = rms_norm(x.reshape(*x.shape[:x.dim() - k], n), weight, eps, backend=self.backend)
        return y.view(x.shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
