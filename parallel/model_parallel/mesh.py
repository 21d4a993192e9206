"""The (pp, dp, tp) grid of ranks and its process groups.

Rank r sits at (pp, dp, tp) = coordinates of r in a grid with tp varying fastest, then dp, then pp
(Megatron's order: the TP group, which talks most, is made of neighbouring ranks, i.e. one node).
`DeviceMesh(comm, dp, tp, pp)` creates every group on every rank (as torch.distributed requires) and keeps
this rank's three: `tp_group`, `dp_group`, `pp_group`. The trainer that combines them is
training/trainer_3d.py.
"""

from __future__ import annotations

from gpuforge.parallel.model_parallel.pipeline_runtime import check_schedule, split_chunks
from gpuforge.parallel.model_parallel.tp_llama import check_tp_config


def check_degrees(world_size: int, *, dp: int, tp: int, pp: int) -> None:
    """Raise ValueError unless dp, tp, pp are positive ints whose product is the world size."""
    for name, size in (("dp", dp), ("tp", tp), ("pp", pp)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if dp * tp * pp != world_size:
        raise ValueError(f"dp·tp·pp = {dp}·{tp}·{pp} = {dp * tp * pp} must equal the world size {world_size}")


def check_layout(world_size: int, config, *, dp: int, tp: int, pp: int, batch_size: int,
                 num_microbatches: int, schedule: str = "1f1b", num_chunks: int = 1) -> None:
    """Raise ValueError for a 3D configuration that cannot run (before any process group is made)."""
    check_degrees(world_size, dp=dp, tp=tp, pp=pp)
    check_tp_config(config, tp)
    split_chunks(config.n_layers, pp, num_chunks)
    check_schedule(schedule, pp, num_microbatches, num_chunks)
    if num_microbatches < 1 or batch_size % (dp * num_microbatches):
        raise ValueError(f"batch size {batch_size} must be divisible by dp·microbatches = {dp}·{num_microbatches}")


class DeviceMesh:
    def __init__(self, comm, *, dp: int = 1, tp: int = 1, pp: int = 1):
        check_degrees(comm.world_size, dp=dp, tp=tp, pp=pp)
        self.comm, self.dp, self.tp, self.pp = comm, dp, tp, pp
        self.pp_index, rest = divmod(comm.rank, dp * tp)
        self.dp_index, self.tp_index = divmod(rest, tp)
        rank = lambda p, d, t: (p * dp + d) * tp + t
        groups = {}
        for p in range(pp):  # every rank creates every group, in the same order
            for d in range(dp):
                groups[("tp", p, d)] = comm.new_group([rank(p, d, t) for t in range(tp)])
        for p in range(pp):
            for t in range(tp):
                groups[("dp", p, t)] = comm.new_group([rank(p, d, t) for d in range(dp)])
        for d in range(dp):
            for t in range(tp):
                groups[("pp", d, t)] = comm.new_group([rank(p, d, t) for p in range(pp)])
        self.tp_group = groups[("tp", self.pp_index, self.dp_index)]
        self.dp_group = groups[("dp", self.pp_index, self.tp_index)]
        self.pp_group = groups[("pp", self.dp_index, self.tp_index)]

    def __repr__(self) -> str:
        return (f"DeviceMesh(dp={self.dp}, tp={self.tp}, pp={self.pp}; rank {self.comm.rank} at "
                f"pp={self.pp_index}, dp={self.dp_index}, tp={self.tp_index})")
