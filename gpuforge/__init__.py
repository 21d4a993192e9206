"""gpuforge: hand-written GPU kernels (Triton, CUDA C++, CuPy, Numba) and distributed training, each
checked against a PyTorch reference. Importing it initialises neither CUDA, NVML nor Triton's driver."""

from gpuforge import backends, models, nn
from gpuforge.kernels.matmul import matmul
from gpuforge.kernels.rms_norm import rms_norm
from gpuforge.kernels.vector_add import vector_add

__version__ = "0.1.0"

__all__ = ["backends", "models", "matmul", "vector_add", "nn", "rms_norm"]
