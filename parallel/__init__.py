"""gpuforge.parallel: data parallelism (DDP, ZeRO-1/2) and model parallelism over one communicator
(`comm.py`: torch.distributed or mpi4py), with communication and memory ledgers."""

from gpuforge.parallel.comm import CommDesyncError, CommError, CommTimeoutError, Communicator, init_comm
from gpuforge.parallel.ddp import DistributedDataParallel
from gpuforge.parallel.zero import ZeroRedundancyOptimizer

__all__ = ["CommDesyncError", "CommError", "CommTimeoutError", "Communicator", "DistributedDataParallel",
           "ZeroRedundancyOptimizer", "init_comm"]
