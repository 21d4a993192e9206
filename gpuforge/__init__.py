"""gpuforge: hand-written GPU kernels (Triton, CUDA C++, CuPy, Numba) and distributed training, each
checked against a PyTorch reference. Importing it initialises neither CUDA, NVML nor Triton's driver, and
imports neither Triton nor Numba (each backend's kernels are imported at their first call)."""

from gpuforge import models, nn, parallel, quant
from gpuforge.kernelize import kernelize
from gpuforge.kernels import backends
from gpuforge.kernels.flash_attention import (
    flash_attention,
    flash_attention_backward,
    flash_attention_varlen,
    flash_attention_with_lse,
)
from gpuforge.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from gpuforge.kernels.int4_matmul import int4_matmul
from gpuforge.kernels.layer_norm import layer_norm
from gpuforge.kernels.matmul import matmul
from gpuforge.kernels.paged_attention import paged_attention
from gpuforge.kernels.rms_norm import rms_norm
from gpuforge.kernels.rope import rope
from gpuforge.kernels.softmax import softmax
from gpuforge.kernels.swiglu import swiglu
from gpuforge.kernels.vector_add import vector_add

__version__ = "0.1.0"

__all__ = ["backends", "flash_attention", "flash_attention_backward", "flash_attention_varlen",
           "flash_attention_with_lse", "fused_linear_cross_entropy", "int4_matmul",
           "kernelize", "layer_norm", "matmul", "models", "nn", "paged_attention", "parallel", "quant", "rms_norm",
           "rope", "softmax", "swiglu", "vector_add"]
