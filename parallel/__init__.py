"""gpuforge.parallel: data parallelism (DDP, ZeRO-1/2/3) and model parallelism (tensor, sequence, pipeline, 3D)
over one communicator (`comm.py`: torch.distributed or mpi4py), with communication and memory ledgers.
Names mirror PyTorch / Megatron where a counterpart exists."""

from gpuforge.parallel.comm import CommDesyncError, CommError, CommTimeoutError, Communicator, init_comm
from gpuforge.parallel.ddp import DistributedDataParallel
from gpuforge.parallel.fsdp import FullyShardedDataParallel
from gpuforge.parallel.mesh import DeviceMesh, Trainer3D
from gpuforge.parallel.mixed_precision import LossScaler, MixedPrecision, MixedPrecisionOptimizer
from gpuforge.parallel.pipeline import PipelineExecutor, pipeline_split
from gpuforge.parallel.pipeline_schedule import gpipe, interleaved_one_f_one_b, make_schedule, one_f_one_b
from gpuforge.parallel.pipeline_sim import simulate
from gpuforge.parallel.sequence_parallel import sequence_parallelize
from gpuforge.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    tensor_parallelize,
    vocab_parallel_cross_entropy,
)
from gpuforge.parallel.zero import ZeroRedundancyOptimizer

__all__ = ["ColumnParallelLinear", "CommDesyncError", "CommError", "CommTimeoutError", "Communicator", "DeviceMesh",
           "DistributedDataParallel", "FullyShardedDataParallel", "LossScaler", "MixedPrecision",
           "MixedPrecisionOptimizer", "PipelineExecutor", "RowParallelLinear", "Trainer3D",
           "VocabParallelEmbedding",
           "ZeroRedundancyOptimizer", "gpipe", "init_comm", "interleaved_one_f_one_b", "make_schedule", "one_f_one_b",
           "pipeline_split", "sequence_parallelize", "simulate", "tensor_parallelize", "vocab_parallel_cross_entropy"]
