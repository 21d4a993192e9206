"""Integrations of gpuforge into other libraries. `gpuforge.integrations.transformers` (apply_gpuforge, the
"gpuforge" attention implementation) needs the optional `transformers` extra (`pip install gpuforge[hf]`);
importing this package imports nothing of it."""
