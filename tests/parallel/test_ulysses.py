"""Ulysses sequence parallelism (all-to-all heads <-> sequence) on real gloo process groups and
real MPI at degree 2 and 4: 20 TinyLlama steps equal one process in float64, four all-to-alls per layer each
way, and a degree that does not divide the KV heads is a clear ValueError on every rank. The training runs
inside the context-parallel jobs (test_context_parallel.cp_results: one per communicator and degree)."""

import pytest

from gpuforge.models.vol2_llm import TinyLlama
from gpuforge.parallel.model_parallel.ulysses import check_ulysses_heads
from tests.parallel.test_context_parallel import LAYOUTS, SEQ, B, cp_results, tiny_config


@pytest.mark.distributed
@pytest.mark.parametrize(("kind", "n"), LAYOUTS)
def test_ulysses_steps_match_one_process(kind, n):
    for rank, results in enumerate(cp_results(kind, n)):
        worst = results["ulysses"]
        assert worst["loss"] < 1e-12 and worst["grad"] < 1e-12 and worst["param"] < 1e-12, (rank, worst)


@pytest.mark.distributed
@pytest.mark.parametrize(("kind", "n"), LAYOUTS)
def test_ulysses_ledger_four_all_to_alls_per_layer_each_way(kind, n):
    c = tiny_config()
    hd = c.dim // c.n_heads
    q, kv = (n, B, c.n_heads // n, SEQ // n, hd), (n, B, c.n_kv_heads // n, SEQ // n, hd)
    per_layer = [("all_to_all", q)] * 4 + [("all_to_all", kv)] * 4  # q, out (and their gradients); k, v
    n_params = sum(p.numel() for p in TinyLlama(c).parameters())
    ledger = cp_results(kind, n)[0]["ulysses"]["ledger"]
    assert sorted(ledger) == sorted([("all_reduce", (1,)), ("all_reduce", (n_params,))] + per_layer * c.n_layers)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["torch", "mpi"])
def test_degree_not_dividing_kv_heads_raises_on_every_rank(kind):
    for results in cp_results(kind, 4):
        assert results["bad_ulysses"].startswith("n_kv_heads (2) must be divisible by the Ulysses degree (4)")


def test_check_ulysses_heads():
    check_ulysses_heads(8, 4, 4)
    with pytest.raises(ValueError, match=r"n_kv_heads \(1\) must be divisible by the Ulysses degree \(2\)"):
        check_ulysses_heads(4, 1, 2)
