"""gpuforge.parallel: data parallelism (DDP, ZeRO-1/2/3) and model parallelism (tensor, sequence, context: ring
attention and Ulysses, expert, pipeline, 3D)
over one communicator (torch.distributed or mpi4py), with communication and memory ledgers. Layers, each
importing only those before it: comm/ -> data_parallel/ -> model_parallel/ -> checkpoint/ -> training/.
Names mirror PyTorch / Megatron where a counterpart exists."""

from gpuforge.parallel.checkpoint.layout import load_full_model, load_layout_checkpoint, save_layout_checkpoint
from gpuforge.parallel.checkpoint.sharded import latest_checkpoint, load_checkpoint, save_checkpoint
from gpuforge.parallel.comm import CommDesyncError, CommError, CommTimeoutError, Communicator, init_comm
from gpuforge.parallel.data_parallel.ddp import DistributedDataParallel
from gpuforge.parallel.data_parallel.fsdp import FullyShardedDataParallel
from gpuforge.parallel.data_parallel.mixed_precision import LossScaler, MixedPrecision, MixedPrecisionOptimizer
from gpuforge.parallel.data_parallel.zero import ZeroRedundancyOptimizer
from gpuforge.parallel.model_parallel.context_parallel import context_parallelize
from gpuforge.parallel.model_parallel.expert_parallel import expert_parallelize
from gpuforge.parallel.model_parallel.mesh import DeviceMesh
from gpuforge.parallel.model_parallel.pipeline_runtime import PipelineExecutor, pipeline_split
from gpuforge.parallel.model_parallel.pipeline_schedule import (
           gpipe,
           interleaved_one_f_one_b,
           make_schedule,
           one_f_one_b,
)
from gpuforge.parallel.model_parallel.pipeline_sim import simulate
from gpuforge.parallel.model_parallel.ring_attention import ring_attention
from gpuforge.parallel.model_parallel.sequence_parallel import sequence_parallelize
from gpuforge.parallel.model_parallel.tensor_parallel import tensor_parallelize
from gpuforge.parallel.model_parallel.tp_layers import (
           ColumnParallelLinear,
           RowParallelLinear,
           VocabParallelEmbedding,
           vocab_parallel_cross_entropy,
)
from gpuforge.parallel.model_parallel.ulysses import ulysses_attention
from gpuforge.parallel.training.data_parallel import DataParallelTrainer
from gpuforge.parallel.training.gathered_loss import DataParallelLoss
from gpuforge.parallel.training.trainer_3d import Trainer3D
from gpuforge.parallel.training.trainer_cp_ep import ContextParallelTrainer, ExpertParallelTrainer

__all__ = ["ColumnParallelLinear", "CommDesyncError", "CommError", "CommTimeoutError", "Communicator",
           "ContextParallelTrainer", "DataParallelLoss", "DataParallelTrainer", "DeviceMesh", "DistributedDataParallel",
           "ExpertParallelTrainer", "context_parallelize", "expert_parallelize", "ring_attention", "ulysses_attention",
           "FullyShardedDataParallel", "LossScaler", "MixedPrecision", "MixedPrecisionOptimizer", "PipelineExecutor",
           "RowParallelLinear", "Trainer3D", "VocabParallelEmbedding", "ZeroRedundancyOptimizer", "gpipe", "init_comm",
           "interleaved_one_f_one_b", "latest_checkpoint", "load_checkpoint", "load_full_model",
           "load_layout_checkpoint", "make_schedule", "one_f_one_b", "pipeline_split", "save_checkpoint",
           "save_layout_checkpoint", "sequence_parallelize", "simulate", "tensor_parallelize",
           "vocab_parallel_cross_entropy"]
