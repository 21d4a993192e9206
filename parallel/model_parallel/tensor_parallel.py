"""`tensor_parallelize(model, comm)`: shard a reference model over the tensor-parallel group, by the sharding
table of its kind: the TinyLlama (tp_llama.py, a TensorParallelLM) or the TinyDiT (tp_dit.py). The layers
(tp_layers.py) and the f/g operators (tp_mappings.py) are shared by both tables.
"""

from __future__ import annotations

from torch import nn

from gpuforge.models.vol3_generative import TinyDiT
from gpuforge.parallel.comm import as_group_comm
from gpuforge.parallel.model_parallel.tp_dit import tensor_parallelize_dit
from gpuforge.parallel.model_parallel.tp_llama import TensorParallelLM


def tensor_parallelize(model: nn.Module, comm, group=None, *, sequence_parallel: bool = False) -> nn.Module:
    """Shard a TinyLlama over the ranks of `group` (default: all of `comm`), Megatron's layout: wq/wk/wv and
    w1/w3 by columns, wo/w2 by rows, embedding and tied head by vocabulary (a TensorParallelLM); a TinyDiT
    by `tensor_parallel_dit`. Every rank must pass the same full model; its layers are converted in place and
    reused. `comm`: a Communicator or a GroupComm."""
    if isinstance(model, TinyDiT):
        if sequence_parallel:
            raise ValueError("sequence_parallel: not supported for the TinyDiT (its 16 tokens stay whole)")
        return tensor_parallelize_dit(model, as_group_comm(comm, group))
    return TensorParallelLM(model, as_group_comm(comm, group), sequence_parallel=sequence_parallel)
