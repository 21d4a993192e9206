"""gpuforge.models: small plain-PyTorch reference models, one module per course volume (the oracles).

Each module exposes REFERENCE_MODELS: name -> ReferenceModel(build, make_batch, loss_fn, coupled, inference_only),
the uniform interface the parallel tests train through; `reference_models()` merges them over every volume.
The models import only gpuforge.kernels and gpuforge.quant; `gf.kernelize(model, backend=...)` swaps in
gpuforge ops."""

from gpuforge.models import (
           vol0_math,
           vol1_architectures,
           vol2_llm,
           vol3_generative,
           vol4_multimodal,
           vol5_rl,
           vol6_systems,
)
from gpuforge.models._layers import ReferenceModel

VOLUMES = (vol0_math, vol1_architectures, vol2_llm, vol3_generative, vol4_multimodal, vol5_rl, vol6_systems)


def reference_models() -> dict[str, ReferenceModel]:
    """Every registered reference model of every volume, by name (names are unique across volumes)."""
    merged: dict[str, ReferenceModel] = {}
    for volume in VOLUMES:
        for name, ref in volume.REFERENCE_MODELS.items():
            if name in merged:
                raise ValueError(f"reference model {name!r} is registered twice (again in {volume.__name__})")
            merged[name] = ref
    return merged


__all__ = ["VOLUMES", "ReferenceModel", "reference_models", "vol0_math", "vol1_architectures",
           "vol2_llm", "vol3_generative", "vol4_multimodal", "vol5_rl", "vol6_systems"]
