"""`MoEPipelineTrainer`: one rank's part of dp × pp × ep training of a TinyMoE (the same full model on every rank).

The mixture-of-experts model in the mesh: pipeline stages over the PP group, and within each stage the experts
of every MoE layer sharded over the EP group (parallel/model_parallel/expert_parallel.py: all-to-all dispatch
and combine, no drops), EP carved out of DP (mesh.py). Each DP rank takes its slice of the global batch; every
stage adds its layers' load-balancing losses to each micro-batch's backward (pipeline_runtime.py), so the loss
is the last stage's cross-entropy plus every stage's balance losses, summed over PP and averaged over DP.

Gradients: a replicated parameter (router, attention, norms, embedding) holds its rank's own gradient and is
averaged over DP. A local expert already received, through the combine's backward, the gradients of every EP
rank's tokens; the ranks holding the same experts (the expert-DP group, dp/ep of them) sum theirs, and the sum
is divided by dp. AdamW steps on both (not sharded). The global norm for clipping counts each replicated
parameter once per stage (the tied head on the first stage only), each expert once per EP group, summed over
PP. `train_moe_pipeline` is the `pp`/`3d` run of `gpuforge train --model tinymoe --ep N` (its oracle:
trainer_cp_ep.single_process_cp_ep_losses("ep", ...)). `checkpoint_activations` ("full" or "selective")
checkpoints every block; its recomputation repeats the experts' dispatch and combine all-to-alls in the backward.
Tensor and context parallelism do not combine with the MoE (its balance loss is per sequence and its
feed-forward is not TP-sharded); they raise.
"""

from __future__ import annotations

import torch
from torch import nn

from gpuforge.models.activation_checkpointing import checkpoint_blocks
from gpuforge.models.vol2_llm import make_batch
from gpuforge.parallel.comm import GroupComm
from gpuforge.parallel.data_parallel.clipping import scale_to_max_norm_
from gpuforge.parallel.model_parallel.expert_parallel import ExpertParallelMoE, check_ep_config
from gpuforge.parallel.model_parallel.mesh import DeviceMesh
from gpuforge.parallel.model_parallel.pipeline_runtime import PipelineExecutor, pipeline_split
from gpuforge.parallel.model_parallel.pipeline_schedule import placement_of
from gpuforge.parallel.training.loop import Trainer, run_steps
from gpuforge.parallel.training.trainer_cp_ep import reduce_grads, seeded_model


class MoEPipelineTrainer(Trainer):
    def __init__(self, model: nn.Module, mesh: DeviceMesh, *, schedule: str = "1f1b", num_microbatches: int = 1,
                 num_chunks: int = 1, lr: float = 1e-3, checkpoint_activations: str | None = None):
        config = model.config
        if not config.n_experts:
            raise ValueError("MoEPipelineTrainer: the model has no mixture-of-experts layers (n_experts = 0)")
        if mesh.tp > 1 or mesh.cp > 1:
            raise ValueError(f"MoEPipelineTrainer: tp ({mesh.tp}) and cp ({mesh.cp}) must be 1: the MoE's "
                             "feed-forward is not tensor-parallel and its balance loss is per whole sequence")
        check_ep_config(config.n_experts, mesh.ep)
        self.mesh = mesh
        self.dp, self.pp = GroupComm(mesh.comm, mesh.dp_group), GroupComm(mesh.comm, mesh.pp_group)
        self.ep, self.expert_dp = GroupComm(mesh.comm, mesh.ep_group), GroupComm(mesh.comm, mesh.expert_dp_group)
        if mesh.ep > 1:
            for block in model.layers:
                block.feed_forward = ExpertParallelMoE(block.feed_forward, self.ep)
        if checkpoint_activations is not None:  # the recomputed forward repeats its dispatch and combine
            checkpoint_blocks(model, checkpoint_activations, blocks=model.layers)
        self.stage = pipeline_split(model, mesh.pp, num_chunks, placement_of(schedule))[mesh.pp_index]
        self.executor = PipelineExecutor(self.stage, self.pp, schedule=schedule, num_microbatches=num_microbatches)
        expert_ids = {id(p) for layer in self.stage.layers for p in layer.feed_forward.experts.parameters()}
        self.experts = [p for p in self.stage.parameters() if id(p) in expert_ids]
        self.replicated = [p for p in self.stage.parameters() if id(p) not in expert_ids]
        tied = self.stage.head_weight if self.stage.is_last and not self.stage.is_first else None
        self._counted = [p for p in self.replicated if p is not tied]  # the tied weight: on the first stage
        self.optimizer = torch.optim.AdamW(self.stage.parameters(), lr=lr)

    def forward_backward(self, batch) -> float:
        """This DP rank's slice through the pipeline; gradients reduced. Returns the global loss (every rank)."""
        inputs, targets = batch
        if inputs.shape[0] % self.mesh.dp:
            raise ValueError(f"global batch size {inputs.shape[0]} is not divisible by dp={self.mesh.dp}")
        x, y = (t.chunk(self.mesh.dp)[self.mesh.dp_index] for t in (inputs, targets))
        cross_entropy = self.executor.step(x, y)
        loss = self.executor.aux_loss + (0.0 if cross_entropy is None else cross_entropy.double())
        loss = self.pp.all_reduce(loss.reshape(1).clone())
        reduce_grads(self.dp, self.replicated)
        reduce_grads(self.expert_dp, self.experts, op="sum", scale=1.0 / self.mesh.dp)
        return self.dp.all_reduce(loss, op="avg")[0].item()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        square = lambda params: sum((p.grad.double().pow(2).sum() for p in params if p.grad is not None),  # noqa: E731
                                    torch.zeros((), dtype=torch.float64))
        experts = self.ep.all_reduce(square(self.experts).reshape(1))
        total = self.pp.all_reduce(experts + square(self._counted))
        grads = [p.grad for p in self.stage.parameters() if p.grad is not None]
        return scale_to_max_norm_(grads, total[0].sqrt(), max_norm)


def train_moe_pipeline(comm, *, dp: int, pp: int, ep: int, steps: int, batch_size: int, seq_len: int, lr: float,
                       max_norm: float | None, config, dtype: torch.dtype, schedule: str = "1f1b",
                       num_microbatches: int = 2, num_chunks: int = 1, seed: int = 0,
                       checkpoint_activations: str | None = None) -> list[float]:
    """Train a TinyMoE for `steps` steps on dp × pp ranks, experts over ep; the losses (on every rank)."""
    mesh = DeviceMesh(comm, dp=dp, pp=pp, ep=ep)
    trainer = MoEPipelineTrainer(seeded_model("ep", seed, config, dtype), mesh, schedule=schedule,
                                 num_microbatches=num_microbatches, num_chunks=num_chunks, lr=lr,
                                 checkpoint_activations=checkpoint_activations)
    batches = lambda step: make_batch(seed * 100_003 + step, batch_size, seq_len)  # noqa: E731
    return run_steps(trainer, batches, steps, max_norm=max_norm,
                     before_step=lambda step: setattr(comm.ledger, "step", step))
