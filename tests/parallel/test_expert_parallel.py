"""Expert parallelism for the TinyMoE on real gloo process groups and real MPI at ep = 2 and 4:
20 steps in no-drop mode equal one process in float64 (1e-12), the ledger of a step equals theory, the
capacity factor drops by the documented policy, and experts that ep does not divide raise on every rank.
Every case of one (communicator, ep) runs in ONE spawned job (`ep_results`, cached)."""

import copy
import functools
import math

import pytest
import torch

from gpuforge.models.vol2_llm import TinyLlamaConfig, TinyMoE, make_batch
from gpuforge.parallel.comm import GroupComm
from gpuforge.parallel.model_parallel.expert_parallel import (
    ExpertParallelMoE,
    check_ep_config,
    expert_parallelize,
    keep_within_capacity,
)
from tests.parallel.dist_harness import run_distributed

B, S, STEPS = 4, 8, 20
LAYOUTS = [("torch", 2), ("torch", 4), ("mpi", 2), ("mpi", 4)]


def tiny_config(n_experts=4):
    return TinyLlamaConfig(vocab_size=131, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=32,
                           max_seq_len=S, n_experts=n_experts, moe_top_k=2)


def _loss(model, x, y):
    from gpuforge.models.vol2_llm import loss_fn

    return loss_fn(model, (x, y))


def train_parity(comm, steps=STEPS):
    """AdamW steps (lr 1e-3) with the experts over every rank vs one process: max relative differences."""
    torch.manual_seed(0)
    ref = TinyMoE(tiny_config()).double()
    ep = expert_parallelize(copy.deepcopy(ref), comm)
    full = dict(ref.named_parameters())
    per_rank = 4 // comm.world_size
    names = {}  # this rank's parameter name -> the reference's
    for name, _ in ep.named_parameters():
        ref_name = name.removeprefix("model.")
        if ".experts." in ref_name:
            head, _, rest = ref_name.partition(".experts.")
            index, _, leaf = rest.partition(".")
            ref_name = f"{head}.experts.{int(index) + comm.rank * per_rank}.{leaf}"
        names[name] = ref_name
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt_ep = torch.optim.AdamW(ep.parameters(), lr=1e-3)
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for step in range(steps):
        x, y = make_batch(step, B, S)
        comm.ledger.clear()
        loss_ref = _loss(ref, x, y)
        loss_ref.backward()
        loss = ep.loss(x, y)
        loss.backward()
        ep.allreduce_grads()
        worst["ledger"] = [(e.op, e.shape, e.dtype) for e in comm.ledger.entries]
        worst["loss"] = max(worst["loss"], abs(loss.item() - loss_ref.item()) / loss_ref.item())
        for name, p in ep.named_parameters():
            g = full[names[name]].grad
            worst["grad"] = max(worst["grad"], ((p.grad - g).abs().max() / g.abs().max()).item())
        for opt in (opt_ref, opt_ep):
            opt.step()
            opt.zero_grad()
    for name, p in ep.named_parameters():
        w = full[names[name]]
        worst["param"] = max(worst["param"], ((p - w).abs().max() / w.abs().max()).item())
    return worst


def capacity_reference(moe, x, capacity_factor):
    """One process's MoE output under the documented drop policy: per expert, the first ceil(c·T·k/E) of this
    rank's assignments in token order are kept; the others contribute nothing."""
    flat = x.reshape(-1, x.shape[-1])
    weights, chosen = torch.softmax(moe.router(flat), -1).topk(moe.top_k, -1)
    weights = weights / weights.sum(-1, keepdim=True)
    cap = math.ceil(capacity_factor * chosen.numel() / len(moe.experts))
    out, dropped = torch.zeros_like(flat), 0
    for e, expert in enumerate(moe.experts):
        token, slot = (chosen == e).nonzero(as_tuple=True)  # row-major: token order
        dropped += max(0, len(token) - cap)
        token, slot = token[:cap], slot[:cap]
        out.index_add_(0, token, weights[token, slot, None] * expert(flat[token]))
    return out.view_as(x), dropped


def capacity_case(comm, capacity_factor):
    torch.manual_seed(1)
    moe = TinyMoE(tiny_config()).double().layers[0].feed_forward
    ep_moe = ExpertParallelMoE(copy.deepcopy(moe), GroupComm(comm), capacity_factor=capacity_factor)
    x = torch.randn(2, S, 32, generator=torch.Generator().manual_seed(10 + comm.rank), dtype=torch.float64)
    out = ep_moe(x)
    ref, dropped = capacity_reference(moe, x, capacity_factor)
    return (out - ref).abs().max().item(), ep_moe.dropped, dropped


def bad_experts(comm):
    try:
        expert_parallelize(TinyMoE(tiny_config(n_experts=6)).double(), comm)
    except ValueError as e:
        return str(e)
    return "no error"


def ep_suite(comm):
    return {"moe": train_parity(comm), "capacity": [capacity_case(comm, c) for c in (0.5, 1.0)],
            "bad": bad_experts(comm)}


@functools.cache
def ep_results(kind, n):
    return run_distributed(ep_suite, n, comm=kind, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize(("kind", "n"), LAYOUTS)
def test_tinymoe_no_drop_steps_match_one_process(kind, n):
    for rank, results in enumerate(ep_results(kind, n)):
        worst = results["moe"]
        assert worst["loss"] < 1e-12 and worst["grad"] < 1e-12 and worst["param"] < 1e-12, (rank, worst)


@pytest.mark.distributed
@pytest.mark.parametrize(("kind", "n"), LAYOUTS)
def test_tinymoe_step_ledger(kind, n):
    """Per MoE layer: one all-to-all of the counts (n, E/n) int64 and two of the token rows forward, two of
    the rows backward; then the loss's all-reduce and one all-reduce of the replicated gradients."""
    config = tiny_config()
    ledger = ep_results(kind, n)[0]["moe"]["ledger"]
    counts = [e for e in ledger if e[0] == "all_to_all" and e[2] == "int64"]
    rows = [e for e in ledger if e[0] == "all_to_all" and e[2] == "float64"]
    assert counts == [("all_to_all", (n, 1, config.n_experts // n), "int64")] * config.n_layers
    assert len(rows) == 4 * config.n_layers and all(e[1][1:] == (config.dim,) for e in rows)
    # no drops: each layer's dispatch, right after its counts, sends all T·k assignments of the rank's tokens
    assignments = B // n * S * config.moe_top_k
    after_counts = [ledger[i + 1] for i, e in enumerate(ledger) if e[2] == "int64"]
    assert [e[1][0] for e in after_counts] == [assignments] * config.n_layers
    model = TinyMoE(config)
    experts = sum(p.numel() for b in model.layers for p in b.feed_forward.experts.parameters())
    replicated = sum(p.numel() for p in model.parameters()) - experts
    assert sorted(e for e in ledger if e[0] == "all_reduce") == sorted(
        [("all_reduce", (1,), "float64"), ("all_reduce", (replicated,), "float64")])
    assert len(ledger) == len(counts) + len(rows) + 2


@pytest.mark.distributed
@pytest.mark.parametrize(("kind", "n"), LAYOUTS)
def test_capacity_factor_drops_by_the_documented_policy(kind, n):
    for results in ep_results(kind, n):
        (err_half, ours_half, ref_half), (err_one, ours_one, ref_one) = results["capacity"]
        assert err_half < 1e-12 and err_one < 1e-12
        assert ours_half == ref_half > 0 and ours_one == ref_one


@pytest.mark.distributed
@pytest.mark.parametrize(("kind", "n"), LAYOUTS)
def test_experts_not_divisible_raise_on_every_rank(kind, n):
    for results in ep_results(kind, n):
        if 6 % n:
            assert results["bad"] == f"n_experts (6) must be divisible by the EP degree ({n})"
        else:
            assert results["bad"] == "no error"


def test_keep_within_capacity_and_checks():
    expert_of = torch.tensor([0, 0, 0, 1, 2, 2])
    assert keep_within_capacity(expert_of, 4, 2).tolist() == [True, True, False, True, True, True]
    with pytest.raises(ValueError, match=r"n_experts \(6\) must be divisible by the EP degree \(4\)"):
        check_ep_config(6, 4)
    with pytest.raises(ValueError, match="capacity_factor: expected None"):
        check_ep_config(4, 2, 0)
