"""The cupy backend: the same csrc/*.cu compiled at run time by NVRTC (cupy.RawModule), one module per op,
each with `forward` (and `backward`) in the signatures of its op's face module. Each launcher makes the same
choice of kernel, block and grid as the C++ launcher of csrc/ does."""
