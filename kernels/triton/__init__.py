"""Triton kernels, one module per op. Imported lazily, on first use, so that TRITON_INTERPRET is read then."""
