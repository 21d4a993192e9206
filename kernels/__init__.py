"""gpuforge.kernels: every op's Python side (functional API, autograd, torch.library registration, torch
reference) and its Triton and Numba kernels; the CUDA C++ kernels live in csrc/."""
