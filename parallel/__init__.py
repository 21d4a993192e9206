"""gpuforge.parallel: data parallelism (DDP, ZeRO-1/2/3) and model parallelism (tensor, sequence, pipeline, 3D)
over one communicator (`comm.py`: torch.distributed or mpi4py), with communication and memory ledgers.
Names mirror PyTorch / Megatron where a counterpart exists."""

from gpuforge.parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gpuforge.parallel.comm import CommDesyncError, CommError, CommTimeoutError, Communicator, init_comm
from gpuforge.parallel.data_parallel import DataParallelTrainer
from gpuforge.parallel.ddp import DistributedDataParallel
from gpuforge.parallel.fsdp import FullyShardedDataParallel
from gpuforge.parallel.gathered_loss import DataParallelLoss
from gpuforge.parallel.layout_checkpoint import load_full_model, load_layout_checkpoint, save_layout_checkpoint
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

__all__ = ["ColumnParallelLinear", "CommDesyncError", "CommError", "CommTimeoutError", "Communicator",
           "DataParallelLoss", "DataParallelTrainer", "DeviceMesh", "DistributedDataParallel",
           "FullyShardedDataParallel", "LossScaler", "MixedPrecision", "MixedPrecisionOptimizer", "PipelineExecutor",
           "RowParallelLinear", "Trainer3D", "VocabParallelEmbedding", "ZeroRedundancyOptimizer", "gpipe", "init_comm",
           "interleaved_one_f_one_b", "latest_checkpoint", "load_checkpoint", "load_full_model",
           "load_layout_checkpoint", "make_schedule", "one_f_one_b", "pipeline_split", "save_checkpoint",
           "save_layout_checkpoint", "sequence_parallelize", "simulate", "tensor_parallelize",
           "vocab_parallel_cross_entropy"]
