"""gpuforge.models: small plain-PyTorch reference models, one module per course volume (the oracles).

Each module exposes REFERENCE_MODELS: name -> ReferenceModel(build, make_batch, loss_fn), the uniform
interface the parallel tests train through. `kernelize(model, backend=...)` swaps in gpuforge ops."""

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
from gpuforge.models.kernelize import kernelize

__all__ = ["ReferenceModel", "kernelize", "vol0_math", "vol1_architectures", "vol2_llm", "vol3_generative",
           "vol4_multimodal", "vol5_rl", "vol6_systems"]
