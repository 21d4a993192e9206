"""The (pp, dp, cp, tp) grid of ranks and its process groups, with expert parallelism carved out of dp.

Rank r sits at (pp, dp, cp, tp) = coordinates of r in a grid with tp varying fastest, then cp, then dp, then
pp (Megatron's order: the groups that talk most, TP then CP, are made of neighbouring ranks, i.e. one node).
Expert parallelism splits each DP group into dp/ep blocks of ep consecutive DP ranks: the `ep_group` holds
one copy of every expert between them, and the `expert_dp_group` joins the ranks (one per block) holding the
same experts. `DeviceMesh(comm, dp=, tp=, pp=, cp=, ep=)` creates every group on every rank (as
torch.distributed requires) and keeps this rank's: `tp_group`, `cp_group`, `dp_group`, `pp_group`,
`ep_group`, `expert_dp_group`, and `dp_cp_group` (the dp × cp ranks of one (pp, tp) cell: they hold the same
weights and average their gradients, Megatron's data-parallel-with-context group). The trainers that combine
them are training/trainer_3d.py (dp × tp × pp × cp) and training/trainer_cp_ep.py (dp × cp, ep).
"""

from __future__ import annotations

from gpuforge.parallel.model_parallel.context_parallel import check_cp_config, sequence_positions
from gpuforge.parallel.model_parallel.pipeline_runtime import check_schedule, split_chunks
from gpuforge.parallel.model_parallel.tp_llama import check_tp_config


def check_degrees(world_size: int, *, dp: int, tp: int, pp: int, cp: int = 1, ep: int = 1) -> None:
    """Raise ValueError unless the degrees are positive ints, dp·cp·tp·pp is the world size and ep divides dp."""
    for name, size in (("dp", dp), ("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if dp * cp * tp * pp != world_size:
        raise ValueError(f"dp·cp·tp·pp = {dp}·{cp}·{tp}·{pp} = {dp * cp * tp * pp} must equal the world size "
                         f"{world_size}")
    if dp % ep:
        raise ValueError(f"ep ({ep}) must divide dp ({dp}): the expert-parallel groups are carved out of dp")


def check_layout(world_size: int, config, *, dp: int, tp: int, pp: int, batch_size: int,
                 num_microbatches: int, schedule: str = "1f1b", num_chunks: int = 1, cp: int = 1,
                 cp_attention: str = "ring", seq_len: int | None = None) -> None:
    """Raise ValueError for a dp × tp × pp (× cp) configuration that cannot run (before any process group is
    made); with cp > 1 and a `seq_len`, also a sequence the cp ranks cannot share."""
    check_degrees(world_size, dp=dp, tp=tp, pp=pp, cp=cp)
    check_tp_config(config, tp)
    if cp > 1:
        check_cp_config(config, cp, cp_attention, heads_per_rank=tp)
        if seq_len is not None:
            sequence_positions(seq_len, cp, 0, cp_attention)
    split_chunks(config.n_layers, pp, num_chunks)
    check_schedule(schedule, pp, num_microbatches, num_chunks)
    if num_microbatches < 1 or batch_size % (dp * num_microbatches):
        raise ValueError(f"batch size {batch_size} must be divisible by dp·microbatches = {dp}·{num_microbatches}")


class DeviceMesh:
    def __init__(self, comm, *, dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1):
        check_degrees(comm.world_size, dp=dp, tp=tp, pp=pp, cp=cp, ep=ep)
        self.comm, self.dp, self.tp, self.pp, self.cp, self.ep = comm, dp, tp, pp, cp, ep
        self.pp_index, rest = divmod(comm.rank, dp * cp * tp)
        self.dp_index, rest = divmod(rest, cp * tp)
        self.cp_index, self.tp_index = divmod(rest, tp)
        self.ep_index = self.dp_index % ep
        rank = lambda cell: ((cell[0] * dp + cell[1]) * cp + cell[2]) * tp + cell[3]
        cells = [(p, d, c, t) for p in range(pp) for d in range(dp) for c in range(cp) for t in range(tp)]
        me = (self.pp_index, self.dp_index, self.cp_index, self.tp_index)
        at = lambda cell, axis, i: tuple(i if a == axis else x for a, x in enumerate(cell))

        def groups(starts, members):
            """One group per start cell, made in the same order on every rank; returns this rank's."""
            mine = None
            for start in starts:
                cells_in = members(start)
                group = comm.new_group([rank(c) for c in cells_in])
                if me in cells_in:
                    mine = group
            return mine

        def along(axis: int, size: int):
            return groups([c for c in cells if c[axis] == 0], lambda s: [at(s, axis, i) for i in range(size)])

        self.tp_group, self.dp_group, self.pp_group, self.cp_group = along(3, tp), along(1, dp), along(0, pp), \
            along(2, cp)
        # ep blocks: dp indices b·ep .. b·ep + ep − 1; expert-dp: the same offset in every block
        self.ep_group = groups([c for c in cells if c[1] % ep == 0],
                               lambda s: [at(s, 1, s[1] + i) for i in range(ep)])
        self.expert_dp_group = groups([c for c in cells if c[1] < ep],
                                      lambda s: [at(s, 1, s[1] + b * ep) for b in range(dp // ep)])
        self.dp_cp_group = self.dp_group if cp == 1 else self.cp_group if dp == 1 else groups(
            [c for c in cells if c[1] == 0 and c[2] == 0],
            lambda s: [(s[0], d, c, s[3]) for d in range(dp) for c in range(cp)])

    def __repr__(self) -> str:
        return (f"DeviceMesh(dp={self.dp}, cp={self.cp}, tp={self.tp}, pp={self.pp}, ep={self.ep}; rank "
                f"{self.comm.rank} at pp={self.pp_index}, dp={self.dp_index}, cp={self.cp_index}, "
                f"tp={self.tp_index}, ep={self.ep_index})")
