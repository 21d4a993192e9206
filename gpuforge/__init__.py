"""gpuforge: hand-written GPU kernels (Triton, CUDA C++, CuPy, Numba) and distributed training, each
checked against a PyTorch reference. Importing it initialises neither CUDA, NVML nor Triton's driver."""

from gpuforge import backends, models, nn, parallel, quant
from gpuforge.kernels.flash_attention import flash_attention, flash_attention_varlen
from gpuforge.kernels.int4_matmul import int4_matmul
from gpuforge.kernels.matmul import matmul
from gpuforge.kernels.paged_attention import paged_attention
from gpuforge.kernels.rms_norm import rms_norm
from gpuforge.kernels.softmax import softmax
from gpuforge.kernels.vector_add import vector_add

__version__ = "0.1.0"

__all__ = ["backends", "int4_matmul", "quant", "models", "matmul", "vector_add", "rms_norm", "nn",
           "flash_attention", "flash_attention_varlen", "paged_attention", "softmax", "parallel"]
