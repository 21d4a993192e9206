"""3D parallelism (dp × tp × pp, ZeRO-1 over dp) and 4D (× cp: ring attention or Ulysses, ZeRO-1 over dp × cp)
on 8 real gloo processes vs one process, with global grad-norm clipping."""

import copy
from types import SimpleNamespace

import pytest
import torch

from gpuforge.models.vol2_llm import TinyLlama, lm_loss, make_batch
from gpuforge.parallel.checkpoint.layout import full_name
from gpuforge.parallel.comm.ledger import optimizer_state_bytes
from gpuforge.parallel.model_parallel.mesh import DeviceMesh, check_layout
from gpuforge.parallel.training.trainer_3d import Trainer3D
from tests.parallel.dist_harness import run_distributed
from tests.parallel.test_tensor_parallel import S, shard_of, tiny_config

B, STEPS, MAX_NORM, LR = 8, 20, 0.05, 1e-2


def train_3d(comm, dp, tp, pp, m, cp=1, cp_attention="ring", schedule="1f1b"):
    torch.manual_seed(0)
    ref = TinyLlama(tiny_config(n_layers=2)).double()
    mesh = DeviceMesh(comm, dp=dp, tp=tp, pp=pp, cp=cp)
    trainer = Trainer3D(copy.deepcopy(ref), mesh, schedule=schedule, num_microbatches=m, lr=LR,
                        cp_attention=cp_attention)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=LR)
    worst_loss, worst_norm, clipped = 0.0, 0.0, False
    for step in range(STEPS):
        x, y = make_batch(step, B, S)
        loss_ref = lm_loss(ref(x), y)
        loss_ref.backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM).item()
        clipped |= norm_ref > MAX_NORM
        opt_ref.step()
        opt_ref.zero_grad()
        loss, norm = trainer.step((x, y), MAX_NORM)
        worst_norm = max(worst_norm, abs(norm - norm_ref) / norm_ref)
        if loss is not None:
            worst_loss = max(worst_loss, abs(loss - loss_ref.item()) / loss_ref.item())
    full = dict(ref.named_parameters())
    worst_param = 0.0
    for name, p in trainer.stage.named_parameters():
        ref_name = full_name(trainer.stage, name)
        w = shard_of(ref_name, full[ref_name].detach(), tp, mesh.tp_index)
        worst_param = max(worst_param, ((p.detach() - w).abs().max() / w.abs().max()).item())
    stage_numel = sum(p.numel() for p in trainer.stage.parameters())
    state_elements = optimizer_state_bytes(trainer.optimizer.optimizer) // 8  # AdamW: exp_avg, exp_avg_sq
    return (worst_loss, worst_norm, worst_param, clipped, (mesh.pp_index, mesh.dp_index, mesh.tp_index),
            state_elements / (2 * stage_numel), mesh.cp_index,
            {e.op for e in comm.ledger.entries if e.group == tuple(mesh.cp_group.ranks)},
            [(e.op, e.shape) for e in comm.ledger.entries if e.op == "send"
             and e.group in (tuple(mesh.cp_group.ranks), tuple(mesh.pp_group.ranks))])


@pytest.mark.distributed
def test_3d_dp2_tp2_pp2_matches_single_process_float64():
    results = run_distributed(train_3d, 8, 2, 2, 2, 2)
    assert [r[4] for r in results] == [(p, d, t) for p in range(2) for d in range(2) for t in range(2)]
    for worst_loss, worst_norm, worst_param, clipped, _, state_fraction, *_ in results:
        assert clipped  # the clipping path really ran
        assert 0.5 <= state_fraction < 0.5 + 1e-3, state_fraction  # ZeRO-1: AdamW state for 1/dp of the stage
        assert worst_loss < 1e-12 and worst_norm < 1e-12 and worst_param < 1e-12, (worst_loss, worst_norm,
                                                                                    worst_param)


@pytest.mark.distributed
@pytest.mark.parametrize(("dp", "tp", "cp_attention", "schedule"), [(1, 2, "ring", "1f1b"), (2, 1, "ulysses", "zb-h1")])
def test_4d_pp2_cp2_matches_single_process_float64(dp, tp, cp_attention, schedule):
    """dp × tp × pp × cp = 8 processes, pp = cp = 2: every rank's pipeline stage runs its CP positions of its DP
    share of the batch, attention talks over CP (ring attention, or Ulysses with ZB-H1's split backward), ZeRO-1
    shards AdamW over DP × CP; 20 steps equal one process with clipping."""
    results = run_distributed(train_3d, 8, dp, tp, 2, 2, 2, cp_attention, schedule)
    cells = [(p, d, c, t) for p in range(2) for d in range(dp) for c in range(2) for t in range(tp)]
    assert [(*r[4][:2], r[6], r[4][2]) for r in results] == cells
    for (worst_loss, worst_norm, worst_param, clipped, (pp_index, *_), state_fraction, _, cp_ops,
         sends) in results:
        assert clipped
        assert 1 / (2 * dp) <= state_fraction < 1 / (2 * dp) + 1e-2, state_fraction  # 1/(dp·cp) of the stage
        # attention over the CP group: K/V blocks round the ring, or Ulysses' all-to-alls (at dp = 1 the group
        # is also ZeRO's, whose collectives it carries too)
        ring = {"send", "recv"} <= cp_ops and "all_to_all" not in cp_ops
        assert ring if cp_attention == "ring" else ("all_to_all" in cp_ops and "send" not in cp_ops), cp_ops
        # ledger = theory per step: each of the m = 2 micro-batches crosses the stage boundary once (activation
        # forward from stage 0, its gradient back from stage 1: (b/m, s/cp, dim)); under ring attention each
        # micro-batch and layer (one per stage) sends K and V cp − 1 times forward, K/V cp − 1 times and
        # dK/dV cp times backward: 4(cp − 1) + 2cp blocks of (b/m, kv heads / tp, s/cp, head dim); and once a
        # step the first and last stage swap the tied embedding's gradient (this rank's vocabulary rows)
        boundary = [("send", (B // dp // 2, S // 2, 32))] * 2 * STEPS + [("send", (-(-131 // tp), 32))] * STEPS
        ring = [("send", (B // dp // 2, 4 // tp, S // 2, 4))] * (4 + 4) * 2 * STEPS if cp_attention == "ring" else []
        assert sorted(sends) == sorted(boundary + ring), (pp_index, len(sends), sorted(set(sends)))
        assert worst_loss < 1e-12 and worst_norm < 1e-12 and worst_param < 1e-12, (worst_loss, worst_norm,
                                                                                    worst_param)


def test_mesh_rejects_bad_sizes():
    comm = SimpleNamespace(world_size=8, rank=0)
    with pytest.raises(ValueError, match=r"dp·cp·tp·pp = 2·1·2·1 = 4 must equal the world size 8"):
        DeviceMesh(comm, dp=2, tp=2, pp=1)
    with pytest.raises(ValueError, match="tp must be a positive int"):
        DeviceMesh(comm, dp=8, tp=0, pp=1)


def test_check_layout_names_what_cannot_run():
    from gpuforge.models.vol2_llm import TinyLlamaConfig

    config = TinyLlamaConfig(n_layers=2)
    ok = dict(dp=1, tp=2, pp=2, batch_size=8, num_microbatches=2)
    check_layout(4, config, **ok)
    with pytest.raises(ValueError, match=r"more pipeline stages \(4\) than layers \(2\)"):
        check_layout(4, config, **{**ok, "tp": 1, "pp": 4})
    with pytest.raises(ValueError, match=r"n_heads \(8\) must be divisible by the TP degree \(3\)"):
        check_layout(3, config, **{**ok, "tp": 3, "pp": 1})
    with pytest.raises(ValueError, match=r"batch size 8 must be divisible by dp·microbatches = 2·8"):
        check_layout(8, config, **{**ok, "dp": 2, "num_microbatches": 8})
    with pytest.raises(ValueError, match=r"dp·cp·tp·pp = 1·1·2·2 = 4 must equal the world size 8"):
        check_layout(8, config, **ok)


def _train(comm, dp, tp, pp):
    from gpuforge.models.vol2_llm import TinyLlamaConfig
    from gpuforge.parallel.training.trainer_3d import train_model_parallel

    return train_model_parallel(comm, dp=dp, tp=tp, pp=pp, steps=3, batch_size=4, seq_len=8,
                                config=TinyLlamaConfig(dim=32, n_heads=4, n_kv_heads=2, hidden_dim=64))


@pytest.mark.distributed
@pytest.mark.parametrize("dp,tp,pp", [(1, 2, 1), (1, 1, 2), (2, 1, 2)])
def test_train_model_parallel_losses_agree_and_fall(dp, tp, pp):
    results = run_distributed(_train, dp * tp * pp, dp, tp, pp)
    assert all(r == results[0] for r in results)
    assert all(torch.isfinite(torch.tensor(results[0]))) and results[0][-1] < results[0][0]


def test_cp_and_ep_groups_of_the_mesh():
    """(pp, dp, cp, tp) with tp fastest then cp; ep blocks of consecutive dp ranks (no processes: the groups
    are only listed)."""
    from gpuforge.parallel.comm.communicator import Communicator, Group

    class Listing(Communicator):
        def _make_group(self, ranks):
            return Group(ranks)

    groups = {}
    for r in range(8):
        m = DeviceMesh(Listing(r, 8, r, torch.device("cpu")), dp=4, cp=2, ep=2)
        groups[r] = (m.cp_group.ranks, m.dp_group.ranks, m.ep_group.ranks, m.expert_dp_group.ranks)
    assert groups[0] == ((0, 1), (0, 2, 4, 6), (0, 2), (0, 4))
    assert groups[7] == ((6, 7), (1, 3, 5, 7), (5, 7), (3, 7))
    m = DeviceMesh(Listing(5, 8, 5, torch.device("cpu")), dp=2, tp=2, pp=2)  # cp = ep = 1: the 3D layout
    assert (m.tp_group.ranks, m.dp_group.ranks, m.pp_group.ranks, m.cp_group.ranks) == ((4, 5), (5, 7), (1, 5), (5,))
    with pytest.raises(ValueError, match=r"ep \(3\) must divide dp \(4\)"):
        DeviceMesh(Listing(0, 8, 0, torch.device("cpu")), dp=4, cp=2, ep=3)
    with pytest.raises(ValueError, match=r"dp·cp·tp·pp = 2·2·1·1 = 4 must equal the world size 8"):
        DeviceMesh(Listing(0, 8, 0, torch.device("cpu")), dp=2, cp=2)


def train_moe_pipeline(comm, dp, pp, ep, m, checkpoint=None):
    """dp × pp × ep TinyMoE (4 experts, top-2, no drops) vs one process: worst relative loss, norm, parameter
    differences over 20 clipped AdamW steps; and this rank's mesh cell."""
    import re

    from gpuforge.models.vol2_llm import TinyMoE, loss_fn
    from gpuforge.parallel.training.trainer_moe_pipeline import MoEPipelineTrainer
    from tests.parallel.test_expert_parallel import tiny_config as moe_config

    torch.manual_seed(0)
    ref = TinyMoE(moe_config()).double()
    mesh = DeviceMesh(comm, dp=dp, pp=pp, ep=ep)
    trainer = MoEPipelineTrainer(copy.deepcopy(ref), mesh, num_microbatches=m, lr=LR, checkpoint_activations=checkpoint)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=LR)
    worst_loss = worst_norm = 0.0
    for step in range(STEPS):
        x, y = make_batch(step, B, S)
        loss_ref = loss_fn(ref, (x, y))
        loss_ref.backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM).item()
        opt_ref.step()
        opt_ref.zero_grad()
        loss, norm = trainer.step((x, y), MAX_NORM)
        worst_loss = max(worst_loss, abs(loss - loss_ref.item()) / loss_ref.item())
        worst_norm = max(worst_norm, abs(norm - norm_ref) / norm_ref)
    full, first = dict(ref.named_parameters()), mesh.ep_index * (4 // ep)
    worst_param = 0.0
    for name, p in trainer.stage.named_parameters():
        ref_name = re.sub(r"experts\.(\d+)\.", lambda e: f"experts.{first + int(e.group(1))}.",
                          full_name(trainer.stage, name))
        w = full[ref_name].detach()
        worst_param = max(worst_param, ((p.detach() - w).abs().max() / w.abs().max()).item())
    policies = {getattr(layer.forward, "checkpoint_policy", None) for layer in trainer.stage.layers}
    return (worst_loss, worst_norm, worst_param, (mesh.pp_index, mesh.dp_index, mesh.ep_index), len(trainer.experts),
            policies)


@pytest.mark.distributed
def test_moe_dp4_pp2_ep2_matches_single_process_float64():
    """The TinyMoE on 8 processes: 2 pipeline stages, each over 4 DP ranks whose pairs share the 4 experts of
    every MoE layer (ep = 2: two experts per rank; the expert-DP groups of 2 sum their experts' gradients);
    the balance losses of both stages join the loss. 20 clipped steps equal one process (1e-12)."""
    results = run_distributed(train_moe_pipeline, 8, 4, 2, 2, 2)
    assert [r[3] for r in results] == [(p, d, d % 2) for p in range(2) for d in range(4)]
    for worst_loss, worst_norm, worst_param, _, n_expert_tensors, policies in results:
        assert policies == {None}
        assert n_expert_tensors == 2 * 3  # one MoE layer per stage, 2 local SwiGLU experts of 3 weights each
        assert worst_loss < 1e-12 and worst_norm < 1e-12 and worst_param < 1e-12, (worst_loss, worst_norm,
                                                                                    worst_param)


@pytest.mark.distributed
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_moe_pipeline_with_activation_checkpointing_matches_single_process_float64(policy):
    """dp 2 × pp 2 × ep 2 on 4 processes with every block checkpointed: the recomputed forward repeats the
    routing and the experts' all-to-alls in the backward, and the 20 steps still equal one process (1e-12)."""
    for worst_loss, worst_norm, worst_param, _, _, policies in run_distributed(train_moe_pipeline, 4, 2, 2, 2, 2,
                                                                               policy):
        assert policies == {policy}, policies  # every block of the stage is checkpointed
        assert worst_loss < 1e-12 and worst_norm < 1e-12 and worst_param < 1e-12, (worst_loss, worst_norm,
                                                                                    worst_param)
