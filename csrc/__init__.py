"""CUDA C++ sources, shipped with the package so the cupy backend can compile them at run time (NVRTC)."""
