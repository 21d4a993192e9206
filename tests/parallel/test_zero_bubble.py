"""ZB-H1 (backward split into B, the input gradient, and W, the weight gradient, W deferred): the schedule on
the simulator (bubble, memory, deadlock-freedom), and executed on real processes — world size 2 on gloo
(m = 2, 4) and on MPI (m = 4): gradients and losses equal single-process gradient accumulation in float64
over 20 steps (1e-12), with the same p2p traffic as 1F1B."""

import functools
from fractions import Fraction

import pytest

from gpuforge.parallel.model_parallel.pipeline_schedule import make_schedule, one_f_one_b, zero_bubble_h1
from gpuforge.parallel.model_parallel.pipeline_sim import simulate
from tests.parallel.dist_harness import run_distributed
from tests.parallel.test_pipeline import STEPS, B, pipeline_parity
from tests.parallel.test_tensor_parallel import S


def test_zb_h1_bubble_memory_and_deadlock_freedom():
    zb_cost = lambda s, a: {"F": 1.0, "B": 1.0, "W": 1.0}.get(a.op, 0.0)  # noqa: E731
    one_f_cost = lambda s, a: {"F": 1.0, "B": 2.0}.get(a.op, 0.0)  # noqa: E731  (B + W of ZB)
    for p in range(1, 7):
        for m in range(1, 19):
            zb = simulate(zero_bubble_h1(p, m), zb_cost)  # raises DeadlockError if it hangs
            assert zb.peak_in_flight == [min(p, m)] * p, (p, m)  # never more held than 1F1B's first stage
            if m >= p:  # p - 1 idle units per stage: a third of 1F1B's 3(p - 1)
                assert Fraction(zb.bubble_fraction).limit_denominator(10000) == Fraction(p - 1, 3 * m + p - 1)
                one_f = simulate(one_f_one_b(p, m), one_f_cost)
                assert zb.makespan * p - 3 * m * p == (one_f.makespan * p - 3 * m * p) / 3, (p, m)
    uneven = lambda s, a: {"F": 1.0 + (s == 1), "B": 1.5, "W": 0.5 + s}.get(a.op, 0.3)  # noqa: E731
    for p, m in [(2, 1), (3, 5), (4, 8)]:
        assert 0 < simulate(make_schedule("zb-h1", p, m), uneven).bubble_fraction < 1


def test_w_after_b_after_f():
    for actions in zero_bubble_h1(4, 6):
        order = [(a.op, a.microbatch) for a in actions if a.op in "FBW"]
        for mb in range(6):
            assert order.index(("F", mb)) < order.index(("B", mb)) < order.index(("W", mb))


def zb_suite(comm, ms):
    return {m: pipeline_parity(comm, "zb-h1", m, STEPS, comm.world_size) for m in ms}


@functools.cache
def zb_results(comm):
    return run_distributed(zb_suite, 2, (2, 4) if comm == "torch" else (4,), comm=comm, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize("comm", ["torch", "mpi"])
def test_zb_h1_matches_gradient_accumulation(comm):
    results = zb_results(comm)
    for m in results[0]:
        for rank, by_m in enumerate(results):
            worst, losses, p2p = by_m[m]
            assert worst < 1e-12, (m, rank, worst)
            assert (len(losses) == STEPS) == (rank == 1)
            assert all(d < 1e-12 for d in losses), losses
            act = (B // m, S, 32)
            assert len([e for e in p2p if e[1] == act]) == STEPS * 2 * m  # as 1F1B: one neighbour
