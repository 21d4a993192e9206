"""3D parallelism: a (pp, dp, tp) grid of ranks, its process groups, and a training step combining them.

Rank r sits at (pp, dp, tp) = coordinates of r in a grid with tp varying fastest, then dp, then pp
(Megatron's order: the TP group, which talks most, is made of neighbouring ranks, i.e. one node).
`DeviceMesh(comm, dp, tp, pp)` creates every group on every rank (as torch.distributed requires) and keeps
this rank's three: `tp_group`, `dp_group`, `pp_group`.

`Trainer3D` shards a TinyLlama with tensor parallelism over the TP group, cuts it into pipeline stages over
the PP group (run by a GPipe or 1F1B executor), and trains the stage with ZeRO-1 over the DP group
(`ZeroRedundancyOptimizer(stage=1, group=dp_group)`: each DP rank gets its slice of the global batch, the
gradients are averaged over DP, and every DP rank keeps AdamW state for 1/dp of the stage's parameters).
The global gradient norm for clipping counts every parameter of the full model exactly once. It is summed
from the ZeRO shards of the DP-averaged gradient (each DP rank holds 1/dp of its stage's gradient; a 0/1
mask over the shard says which elements count): the DP group sums the shards, the TP group the TP shards
(replicated norm weights counted on TP rank 0 only), the PP group the stages (the tied embedding/head
counted on the first stage only). The clipping factor scales the shard gradients the optimizer steps on.
"""

from __future__ import annotations

import torch
from torch import nn

from gpuforge.parallel import parity
from gpuforge.parallel.group_comm import GroupComm
from gpuforge.parallel.pipeline import PipelineExecutor, pipeline_split, split_layers
from gpuforge.parallel.tensor_parallel import check_tp_config, tensor_parallelize
from gpuforge.parallel.zero import ZeroRedundancyOptimizer, flatten_padded


def check_degrees(world_size: int, *, dp: int, tp: int, pp: int) -> None:
    """Raise ValueError unless dp, tp, pp are positive ints whose product is the world size."""
    for name, size in (("dp", dp), ("tp", tp), ("pp", pp)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if dp * tp * pp != world_size:
        raise ValueError(f"dp·tp·pp = {dp}·{tp}·{pp} = {dp * tp * pp} must equal the world size {world_size}")


def check_layout(world_size: int, config, *, dp: int, tp: int, pp: int, batch_size: int,
                 num_microbatches: int) -> None:
    """Raise ValueError for a 3D configuration that cannot run (before any process group is made)."""
    check_degrees(world_size, dp=dp, tp=tp, pp=pp)
    check_tp_config(config, tp)
    split_layers(config.n_layers, pp)
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


class Trainer3D:
    """One rank's part of dp × tp × pp training of a TinyLlama (the same full model on every rank)."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh, *, schedule: str = "1f1b",
                 num_microbatches: int = 1, lr: float = 1e-3, max_norm: float | None = 1.0):
        check_tp_config(model.config, mesh.tp)
        self.mesh, self.max_norm = mesh, max_norm
        self.tp = GroupComm(mesh.comm, mesh.tp_group)
        self.pp = GroupComm(mesh.comm, mesh.pp_group)
        self.dp = GroupComm(mesh.comm, mesh.dp_group)
        sharded = tensor_parallelize(model, self.tp)
        self.stage = pipeline_split(sharded, mesh.pp)[mesh.pp_index]
        self.executor = PipelineExecutor(self.stage, self.pp, schedule=schedule,
                                         num_microbatches=num_microbatches)
        self.optimizer = ZeroRedundancyOptimizer(self.stage.parameters(), torch.optim.AdamW, mesh.comm, stage=1,
                                                 group=mesh.dp_group, lr=lr)
        self._counted = self._counted_mask()

    def _counted_once(self, name: str) -> bool:
        if name == "head_weight" and not self.stage.is_first:
            return False  # the tied weight is counted on the first stage
        return self.tp.rank == 0 or not name.endswith("norm.weight")

    def _counted_mask(self) -> torch.Tensor:
        """1 where this rank's ZeRO shard holds a parameter counted in the global norm, else 0 (and padding)."""
        zero = self.optimizer
        names = {id(p): n for n, p in self.stage.named_parameters()}
        ones = [torch.ones_like(p) if self._counted_once(names[id(p)]) else None for p in zero.params]
        lo = zero.rank * zero.shard_size
        return flatten_padded(zero.params, ones, zero.padded, torch.float64)[lo:lo + zero.shard_size]

    def global_grad_norm(self) -> torch.Tensor:
        """The 2-norm of the full model's DP-averaged gradient, from this rank's ZeRO shard of it."""
        grad = self.optimizer.master_grads()[0]
        sq = (grad.double().pow(2) * self._counted.to(grad.device)).sum().reshape(1)
        for group in (self.dp, self.tp, self.pp):
            group.all_reduce(sq)
        return sq[0].sqrt()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float | None, float]:
        """One optimizer step on the global batch. Returns (loss on the last stage else None, grad norm)."""
        if inputs.shape[0] % self.mesh.dp:
            raise ValueError(f"global batch size {inputs.shape[0]} is not divisible by dp={self.mesh.dp}")
        x, y = (t.chunk(self.mesh.dp)[self.mesh.dp_index] for t in (inputs, targets))
        loss = self.executor.step(x, y)
        norm = self.global_grad_norm()
        if self.max_norm is not None:
            coef = self.max_norm / (norm.item() + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
            if coef < 1.0:
                self.optimizer.master_grads()[0].mul_(coef)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if loss is not None and self.mesh.dp > 1:
            loss = self.dp.all_reduce(loss.detach().reshape(1).clone(), op="avg")[0]
        return (None if loss is None else loss.item()), norm.item()


def train_model_parallel(comm, *, dp: int = 1, tp: int = 1, pp: int = 1, steps: int = 20, batch_size: int = 8,
                         seq_len: int = 32, num_microbatches: int = 2, schedule: str = "1f1b", lr: float = 1e-3,
                         max_norm: float | None = 1.0, seed: int = 0, config=None,
                         dtype: torch.dtype = torch.float32) -> list[float]:
    """Train a TinyLlama for `steps` steps on dp × tp × pp ranks (the `tp`, `pp` and `3d` strategies of
    `gpuforge train`). Returns the losses (on every rank: broadcast from the last stage)."""
    from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig, make_batch

    torch.manual_seed(seed)
    model = TinyLlama(config or TinyLlamaConfig(max_seq_len=max(seq_len, 256))).to(dtype)
    mesh = DeviceMesh(comm, dp=dp, tp=tp, pp=pp)
    trainer = Trainer3D(model, mesh, schedule=schedule, num_microbatches=num_microbatches, lr=lr,
                        max_norm=max_norm)
    last_stage_rank = mesh.pp_group.ranks[-1]
    losses = []
    for step in range(steps):
        comm.ledger.step = step
        x, y = make_batch(seed * 100_003 + step, batch_size, seq_len)
        loss, _ = trainer.step(x, y)
        out = torch.tensor([float("nan") if loss is None else loss], dtype=torch.float64)
        if pp > 1:
            comm.broadcast(out, src=last_stage_rank, group=mesh.pp_group)
        losses.append(out.item())
    return losses


def single_process_losses(*, steps: int, batch_size: int, seq_len: int, lr: float, max_norm: float | None,
                          seed: int = 0, config=None, dtype: torch.dtype = torch.float32) -> list[float]:
    """The same run as `train_model_parallel` in one process (the oracle)."""
    from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig, lm_loss, make_batch

    torch.manual_seed(seed)
    model = TinyLlama(config or TinyLlamaConfig(max_seq_len=max(seq_len, 256))).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = make_batch(seed * 100_003 + step, batch_size, seq_len)
        loss = lm_loss(model(x), y)
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def train_cli(comm, args) -> int:
    """`gpuforge train --strategy tp|pp|3d [--tp T --pp P --dp D --n-layers L]`: unset degrees default to 1,
    except the one the strategy names (the world size) and --dp (whatever is left); the TinyLlama gets
    max(2, pp) layers unless --n-layers says. A configuration that cannot run exits with a message naming
    the option, on every rank, before any process group is made. Rank 0 compares the losses with one process."""
    from gpuforge.models.vol2_llm import TinyLlamaConfig

    if args.model not in ("tinyllama", "tiny_llama"):
        raise SystemExit(f"gpuforge train: --strategy {args.strategy} trains the TinyLlama, not --model {args.model}")
    world = comm.world_size
    tp = args.tp if args.tp is not None else (world if args.strategy == "tp" else 1)
    pp = args.pp if args.pp is not None else (world if args.strategy == "pp" else 1)
    dp = args.dp if args.dp is not None else max(1, world // max(1, tp * pp))
    n_layers = getattr(args, "n_layers", None) or max(2, pp)
    try:
        config = TinyLlamaConfig(n_layers=n_layers, max_seq_len=max(args.seq_len, 256))
        check_layout(world, config, dp=dp, tp=tp, pp=pp, batch_size=args.batch, num_microbatches=args.microbatches)
    except ValueError as e:
        raise SystemExit(f"gpuforge train --strategy {args.strategy}: {e} (--dp {dp} --tp {tp} --pp {pp} "
                         f"--n-layers {n_layers} --batch {args.batch} --microbatches {args.microbatches}, "
                         f"world size {world})") from None
    dtype = getattr(torch, args.dtype)
    opts = dict(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr, max_norm=args.clip,
                config=config, dtype=dtype)
    losses = train_model_parallel(comm, dp=dp, tp=tp, pp=pp, num_microbatches=args.microbatches,
                                  schedule=args.schedule, **opts)
    ok = True
    if comm.rank == 0:
        single = single_process_losses(**opts)
        diff = max(abs(a - b) for a, b in zip(losses, single, strict=True))
        ok, line = parity.verdict("loss - single-process loss", diff, args.dtype)
        print(f"strategy={args.strategy} dp={dp} tp={tp} pp={pp} n_layers={n_layers} schedule={args.schedule} "
              f"microbatches={args.microbatches} dtype={args.dtype}\n"
              f"losses         {[f'{x:.6f}' for x in losses]}\n"
              f"single process {[f'{x:.6f}' for x in single]}\n{line}", flush=True)
    return 0 if ok else 1
