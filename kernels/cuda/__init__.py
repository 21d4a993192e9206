"""The cuda backend: host launchers of csrc/*.cu compiled ahead of time into gpuforge._C, one module per op,
each with `forward` (and `backward`) in the signatures of its op's face module."""
