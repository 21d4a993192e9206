"""numba.cuda kernels, one module per op. Imported lazily, so that NUMBA_ENABLE_CUDASIM is read then."""
