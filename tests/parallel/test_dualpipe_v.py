"""DualPipeV (2 model chunks per stage in a V, backward split into B and W): the schedule on the simulator
(deadlock-freedom, bubble, memory, the order of every unit), and executed on real processes — p = 2 on gloo
and MPI, p = 4 on gloo, m = 2p and more: gradients and losses equal single-process gradient accumulation in
float64 over 20 steps (10 at p = 4; 1e-12), and the p2p ledger is the V's: no message at its turn."""

import functools
from fractions import Fraction

import pytest

from gpuforge.models.vol2_llm import TinyLlama
from gpuforge.parallel.model_parallel.pipeline_runtime import PipelineExecutor, pipeline_split
from gpuforge.parallel.model_parallel.pipeline_schedule import dualpipe_v, make_schedule, virtual_stage
from gpuforge.parallel.model_parallel.pipeline_sim import simulate
from tests.parallel.dist_harness import run_distributed
from tests.parallel.test_pipeline import STEPS, B, pipeline_parity
from tests.parallel.test_tensor_parallel import S, tiny_config

UNIT = lambda s, a: 1.0 if a.op in ("F", "B", "W") else 0.0  # noqa: E731  per chunk


def test_bubble_memory_and_deadlock_freedom_at_unit_costs():
    """At F = B = W = 1 per chunk a stage works 6m units and idles p − 1, half a stage-unit each: the bubble is
    (p − 1)/(6m + p − 1), half of ZB-H1's idle time; each stage holds at most 2p + 1 chunk micro-batches."""
    for p in range(2, 9):
        for m in (2 * p, 2 * p + 1, 3 * p, 4 * p + 3):
            result = simulate(dualpipe_v(p, m), UNIT, placement="v")  # raises DeadlockError if it hangs
            assert Fraction(result.bubble_fraction).limit_denominator(100000) == Fraction(p - 1, 6 * m + p - 1)
            assert result.peak_in_flight == [2 * p + 1] * p, (p, m, result.peak_in_flight)
    uneven = lambda s, a: {"F": 1.0 + (s == 1), "B": 1.5, "W": 0.5 + s}.get(a.op, 0.3)  # noqa: E731
    for p, m in [(2, 4), (3, 7), (4, 8)]:
        assert 0 < simulate(dualpipe_v(p, m), uneven, placement="v").bubble_fraction < 1


def test_each_unit_once_in_order_and_the_turn_has_no_message():
    p, m = 4, 9
    for s, actions in enumerate(dualpipe_v(p, m)):
        order = [(a.op, a.microbatch, a.chunk) for a in actions if a.op in ("F", "B", "W")]
        assert sorted(order) == sorted((op, mb, c) for op in "FBW" for mb in range(m) for c in (0, 1))
        for mb in range(m):
            for c in (0, 1):
                assert order.index(("F", mb, c)) < order.index(("B", mb, c)) < order.index(("W", mb, c))
        peers = {a.peer for a in actions if a.peer is not None}
        assert peers == {q for q in (s - 1, s + 1) if 0 <= q < p}  # the turn (stage p − 1) talks to p − 2 only
    assert [virtual_stage(s, c, p, "v") for s in range(p) for c in (0, 1)] == [0, 7, 1, 6, 2, 5, 3, 4]


def test_sizes_it_cannot_run_are_errors():
    with pytest.raises(ValueError, match=r"DualPipeV needs num_microbatches \(3\) >= 2 · num_stages \(4\)"):
        make_schedule("dualpipev", 2, 3, 2)
    with pytest.raises(ValueError, match="DualPipeV runs 2 model chunks per stage"):
        make_schedule("dualpipev", 2, 4, 1)


def _bad_stages(comm):
    """A stage cut for the loop placement under DualPipeV; selectively checkpointed blocks under a split backward."""
    from gpuforge.models.activation_checkpointing import checkpoint_blocks

    errors = []
    for schedule, placement, policy in (("dualpipev", "loop", None), ("dualpipev", "v", "selective")):
        model = TinyLlama(tiny_config(n_layers=4)).double()
        if policy:
            checkpoint_blocks(model, policy)
        stage = pipeline_split(model, comm.world_size, 2, placement)[comm.rank]
        try:
            PipelineExecutor(stage, comm, schedule=schedule, num_microbatches=4)
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    return errors


@pytest.mark.distributed
def test_stages_it_cannot_run_are_errors_on_every_rank():
    for placement, selective in run_distributed(_bad_stages, 2, timeout=60):
        assert placement is not None and "places its chunks 'v'; the stage was cut for 'loop'" in placement
        assert selective is not None and "torch's selective activation checkpointing allows one" in selective


def dualpipe_suite(comm, ms, steps):
    return {m: pipeline_parity(comm, "dualpipev", m, steps, 2 * comm.world_size, num_chunks=2) for m in ms}


# (communicator, p, micro-batch counts, steps). At p = 4 the model has 8 layers and m = 8 micro-batches of one
# sample: rounding differences amplified by 20 AdamW steps reach 1.4e-12 there under 1F1B itself, so 10 steps
LAYOUTS = [("torch", 2, (4, 8), STEPS), ("mpi", 2, (4,), STEPS), ("torch", 4, (8,), 10)]


@functools.cache
def dualpipe_results(comm, p, ms, steps):
    return run_distributed(dualpipe_suite, p, ms, steps, comm=comm, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize(("comm", "p", "ms", "steps"), LAYOUTS)
def test_dualpipe_v_matches_gradient_accumulation(comm, p, ms, steps):
    results = dualpipe_results(comm, p, ms, steps)
    for m in ms:
        for rank, by_m in enumerate(results):
            worst, losses, p2p = by_m[m]
            assert worst < 1e-12, (m, rank, worst)
            assert (len(losses) == steps) == (rank == 0)  # the V ends where it starts: the loss is on stage 0
            assert all(d < 1e-12 for d in losses), losses
            act = (B // m, S, 32)
            sends = [e for e in p2p if e[0] == "send"]
            assert all(e[1] == act for e in p2p), {e[1] for e in p2p}  # no tied-weight swap: one stage holds both
            # each chunk boundary but the turn: m activations one way and m gradients back, per step
            links = 2 * ((rank < p - 1) + (rank > 0))
            assert len(sends) == steps * m * links and len(p2p) == 2 * len(sends), (rank, len(sends))
