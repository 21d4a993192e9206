"""Communication: one communicator interface (communicator.py) with its torch.distributed and mpi4py backends,
the ledger of every byte moved, group views for model parallelism, and the cross-rank configuration check."""

from gpuforge.parallel.comm.communicator import (
    CommDesyncError,
    CommError,
    CommTimeoutError,
    Communicator,
    Group,
    P2POp,
)
from gpuforge.parallel.comm.factory import init_comm
from gpuforge.parallel.comm.group import GroupComm, as_group_comm

__all__ = ["CommDesyncError", "CommError", "CommTimeoutError", "Communicator", "Group", "GroupComm", "P2POp",
           "as_group_comm", "init_comm"]
