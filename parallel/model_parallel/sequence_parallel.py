"""Sequence parallelism (Korthikanti et al. 2022) on top of tensor parallelism.

Outside the tensor-parallel regions (the RMSNorms and the residual stream) every TP rank would hold the same
(b, s, h) activations. Sequence parallelism shards them along the sequence instead: each rank keeps
(b, s/t, h). Entering a region, an all-gather along the sequence replaces f; leaving it, a reduce-scatter
along the sequence replaces g's all-reduce. An all-reduce is a reduce-scatter plus an all-gather, so the
communication volume is unchanged while the activations outside the regions shrink by t.

The norms' weights (and row-parallel biases) are replicated but now see only their rank's tokens, so their
gradients are partial sums: `allreduce_sequence_parallel_grads` adds them over the TP group after the backward pass.
The mappings (`gather_from_sp`, `reduce_scatter_to_sp`) live with f and g in `tp_mappings`.
"""

from __future__ import annotations

from torch import nn

from gpuforge.parallel.model_parallel.tensor_parallel import tensor_parallelize
from gpuforge.parallel.model_parallel.tp_layers import RowParallelLinear
from gpuforge.parallel.model_parallel.tp_llama import TensorParallelLM


def sequence_parallelize(model: nn.Module, comm, group=None) -> TensorParallelLM:
    """Shard a TinyLlama over `comm` with tensor and sequence parallelism. Its forward takes the full
    (b, s) tokens on every rank (s divisible by t) and returns this rank's vocabulary slice of the logits."""
    return tensor_parallelize(model, comm, group, sequence_parallel=True)


def replicated_parameters(model: TensorParallelLM) -> list[nn.Parameter]:
    """Parameters every TP rank holds whole but applies to its own tokens only: the norm weights and the
    row-parallel biases (everything else is a shard)."""
    biases = [m.bias for m in model.modules() if isinstance(m, RowParallelLinear) and m.bias is not None]
    return [p for name, p in model.named_parameters() if name.endswith("norm.weight")] + biases


def allreduce_sequence_parallel_grads(model: TensorParallelLM) -> None:
    """Sum the replicated parameters' gradients over the TP group (each rank saw s/t of the tokens)."""
    for p in replicated_parameters(model):
        if p.grad is not None:
            p.grad = model.comm.all_reduce(p.grad.contiguous().clone())

