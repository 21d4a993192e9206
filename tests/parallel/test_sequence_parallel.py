"""Sequence parallelism on real gloo process groups at t = 2 and 4: parity with one process in float64 over
20 steps, residual stream sharded along the sequence, and the same communication volume as plain tensor
parallelism. The cases run inside the tensor-parallel jobs (test_tensor_parallel.tp_results: one per t)."""

from fractions import Fraction

import pytest

from tests.parallel.test_tensor_parallel import B, S, tp_results

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("t", [2, 4])
def test_sp_matches_single_process_float64(t):
    for rank, results in enumerate(tp_results(t)):
        worst = results["sp"]
        assert worst["loss"] < 1e-12 and worst["grad"] < 1e-12 and worst["param"] < 1e-12, (rank, worst)


@pytest.mark.parametrize("t", [2, 4])
def test_sp_shards_activations_and_keeps_the_volume(t):
    h = 32
    residual_shape, entries = tp_results(t)[0]["sp_ledger"]
    assert residual_shape == (B, S // t, h)
    tp_entries = tp_results(t)[0]["ledger"][(2, 1)]
    big = lambda es, ops: [e for e in es if e[0] in ops and e[2] == B * S * h * 8]
    sp_big = big(entries, ("reduce_scatter", "all_gather"))
    tp_big = big(tp_entries, ("all_reduce",))
    # every all-reduce of (b, s, h) became one reduce-scatter and one all-gather of the same total traffic
    assert len(sp_big) == 2 * len(tp_big) > 0
    assert sum((e[3] for e in sp_big), Fraction(0)) == sum((e[3] for e in tp_big), Fraction(0))
