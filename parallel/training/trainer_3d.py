"""`Trainer3D`: one rank's part of dp × tp × pp (× cp) training of a TinyLlama (the same full model on every rank).

It shards the model with tensor parallelism over the mesh's TP group, with cp > 1 swaps every block's attention
for ring attention (or Ulysses) over the CP group (parallel/model_parallel/context_parallel.py), cuts it into
pipeline stages over the PP group (run by a GPipe, 1F1B, interleaved 1F1B (`num_chunks` model chunks per stage)
or ZB-H1 executor; `checkpoint_activations` "full" or "selective" checkpoints every block,
models/activation_checkpointing.py), and trains the stage with ZeRO-1 over the DP × CP group
(`ZeroRedundancyOptimizer(zero_stage=1, group=dp_cp_group)`: each DP rank gets its slice of the global batch,
each CP rank of it its positions of the sequence (the zigzag chunks r and 2cp − 1 − r under ring attention);
every CP shard holds as many tokens, so the mean of the DP × CP ranks' mean losses is the global mean loss and
their averaged gradient its gradient; every DP × CP rank keeps AdamW state for 1/(dp·cp) of the stage's
parameters). The pipeline carries (b/m, s/cp, dim) activations between the stages of one CP rank.
The global gradient norm for clipping counts every parameter of the full model exactly once. It is summed
from the ZeRO shards of the averaged gradient (each rank holds 1/(dp·cp) of its stage's gradient; a 0/1
mask over the shard says which elements count): the DP × CP group sums the shards, the TP group the TP shards
(replicated norm weights counted on TP rank 0 only), the PP group the stages (the tied embedding/head
counted on the first stage only). The clipping factor scales the shard gradients the optimizer steps on.
`train_model_parallel` runs it for the `tp`, `pp` and `3d` strategies of `gpuforge train` (4D with `cp`);
`single_process_losses` is the same run in one process (the oracle).
"""

from __future__ import annotations

import torch
from torch import nn

from gpuforge.models.activation_checkpointing import checkpoint_blocks
from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig, lm_loss, make_batch
from gpuforge.parallel.comm import GroupComm
from gpuforge.parallel.data_parallel.clipping import scale_to_max_norm_
from gpuforge.parallel.data_parallel.flat import flatten_padded
from gpuforge.parallel.data_parallel.zero import ZeroRedundancyOptimizer
from gpuforge.parallel.model_parallel.context_parallel import check_cp_config, sequence_positions, shard_attention
from gpuforge.parallel.model_parallel.mesh import DeviceMesh
from gpuforge.parallel.model_parallel.pipeline_runtime import PipelineExecutor, pipeline_split
from gpuforge.parallel.model_parallel.pipeline_schedule import placement_of
from gpuforge.parallel.model_parallel.tensor_parallel import tensor_parallelize
from gpuforge.parallel.model_parallel.tp_llama import check_tp_config
from gpuforge.parallel.training.data_parallel import DataParallelTrainer
from gpuforge.parallel.training.gathered_loss import DataParallelLoss
from gpuforge.parallel.training.loop import Trainer, run_steps


class Trainer3D(Trainer):
    """One rank's part of dp × tp × pp × cp training of a TinyLlama (the same full model on every rank); a batch
    is the global (inputs, targets). `self.dp` is the DP × CP group, the ranks that average gradients."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh, *, schedule: str = "1f1b",
                 num_microbatches: int = 1, num_chunks: int = 1, lr: float = 1e-3,
                 checkpoint_activations: str | None = None, cp_attention: str = "ring"):
        check_tp_config(model.config, mesh.tp)
        if mesh.cp > 1:
            check_cp_config(model.config, mesh.cp, cp_attention, heads_per_rank=mesh.tp)
        self.mesh, self.cp_attention = mesh, cp_attention
        self.tp = GroupComm(mesh.comm, mesh.tp_group)
        self.pp = GroupComm(mesh.comm, mesh.pp_group)
        self.dp = GroupComm(mesh.comm, mesh.dp_cp_group)
        if checkpoint_activations is not None:
            checkpoint_blocks(model, checkpoint_activations, blocks=model.layers)
        sharded = tensor_parallelize(model, self.tp)
        if mesh.cp > 1:
            shard_attention(sharded.layers, GroupComm(mesh.comm, mesh.cp_group), attention=cp_attention)
        self.stage = pipeline_split(sharded, mesh.pp, num_chunks, placement_of(schedule))[mesh.pp_index]
        self.executor = PipelineExecutor(self.stage, self.pp, schedule=schedule,
                                         num_microbatches=num_microbatches)
        self.optimizer = ZeroRedundancyOptimizer(self.stage.parameters(), torch.optim.AdamW, mesh.comm, zero_stage=1,
                                                 group=mesh.dp_cp_group, lr=lr)
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
        """The 2-norm of the full model's averaged gradient, from this rank's ZeRO shard of it."""
        grad = self.optimizer.master_grads()[0]
        sq = (grad.double().pow(2) * self._counted.to(grad.device)).sum().reshape(1)
        for group in (self.dp, self.tp, self.pp):
            group.all_reduce(sq)
        return sq[0].sqrt()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return scale_to_max_norm_(self.optimizer.master_grads(), self.global_grad_norm(), max_norm)

    def forward_backward(self, batch) -> float | None:
        """This rank's slice of the global (inputs, targets) (its DP share of the batch, its CP positions of the
        sequence) through the pipeline schedule. Returns the loss, averaged over DP × CP, on the last stage;
        None on the other stages."""
        inputs, targets = batch
        mesh = self.mesh
        if inputs.shape[0] % mesh.dp:
            raise ValueError(f"global batch size {inputs.shape[0]} is not divisible by dp={mesh.dp}")
        x, y = (t.chunk(mesh.dp)[mesh.dp_index] for t in (inputs, targets))
        if mesh.cp > 1:
            pos = sequence_positions(x.shape[1], mesh.cp, mesh.cp_index, self.cp_attention).to(x.device)
            x, y = x[:, pos], y[:, pos]
        loss = self.executor.step(x, y)
        if loss is None:
            return None
        if self.dp.size > 1:
            loss = self.dp.all_reduce(loss.detach().reshape(1).clone(), op="avg")[0]
        return loss.item()


def tiny_llama(seed: int, seq_len: int, config, dtype: torch.dtype) -> TinyLlama:
    """The TinyLlama every rank of `train_model_parallel` (and the oracle) starts from."""
    torch.manual_seed(seed)
    return TinyLlama(config or TinyLlamaConfig(max_seq_len=max(seq_len, 256))).to(dtype)


def _batches(seed: int, batch_size: int, seq_len: int):
    return lambda step: make_batch(seed * 100_003 + step, batch_size, seq_len)


def train_model_parallel(comm, *, dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1, cp_attention: str = "ring",
                         steps: int = 20, batch_size: int = 8,
                         seq_len: int = 32, num_microbatches: int = 2, schedule: str = "1f1b", num_chunks: int = 1,
                         lr: float = 1e-3, max_norm: float | None = 1.0, seed: int = 0, config=None,
                         dtype: torch.dtype = torch.float32, checkpoint_activations: str | None = None,
                         losses=(), before_step=None, after_step=None, trainer_ready=None) -> list[float]:
    """Train a TinyLlama for `steps` steps on dp × tp × pp × cp ranks (the `tp`, `pp` and `3d` strategies of
    `gpuforge train`). Returns the losses (on every rank: shared from the last stage). `trainer_ready(trainer)`
    may load a checkpoint and return the losses of the steps it holds; `before_step(step)` and
    `after_step(done, losses)` are run_steps' (a resumed run saves and fails where an uninterrupted one would)."""
    mesh = DeviceMesh(comm, dp=dp, tp=tp, pp=pp, cp=cp)
    trainer = Trainer3D(tiny_llama(seed, seq_len, config, dtype), mesh, schedule=schedule,
                        num_microbatches=num_microbatches, num_chunks=num_chunks, lr=lr,
                        checkpoint_activations=checkpoint_activations, cp_attention=cp_attention)
    if trainer_ready is not None:
        losses = trainer_ready(trainer)

    def before(step):
        comm.ledger.step = step
        if before_step is not None:
            before_step(step)

    def after(done, so_far):
        if after_step is not None:
            after_step(done, _shared(comm, mesh, so_far))
    mine = run_steps(trainer, _batches(seed, batch_size, seq_len), steps, max_norm=max_norm, losses=losses,
                     before_step=before, after_step=after)
    return _shared(comm, mesh, mine)


def _shared(comm, mesh: DeviceMesh, losses) -> list[float]:
    """Every rank's copy of the losses the last stage saw (a max-reduce: the others hold -inf)."""
    out = torch.tensor([float("-inf") if loss is None else loss for loss in losses], dtype=torch.float64)
    if mesh.pp > 1 and len(out):
        comm.all_reduce(out, op="max", group=mesh.pp_group)
    return out.tolist()


def single_process_losses(*, steps: int, batch_size: int, seq_len: int, lr: float, max_norm: float | None,
                          seed: int = 0, config=None, dtype: torch.dtype = torch.float32) -> list[float]:
    """The same run as `train_model_parallel` in one process (the oracle)."""
    model = tiny_llama(seed, seq_len, config, dtype)
    trainer = DataParallelTrainer("single", DataParallelLoss(model, lambda m, batch: lm_loss(m(batch[0]), batch[1])),
                                  lr=lr)
    return run_steps(trainer, lambda step: [_batches(seed, batch_size, seq_len)(step)], steps, max_norm=max_norm)
