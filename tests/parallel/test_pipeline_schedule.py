"""Pipeline schedules on the simulator (no processes): bubble, in-flight micro-batches, deadlock-freedom."""

from fractions import Fraction

import pytest

from gpuforge.parallel.model_parallel.pipeline_schedule import (
    Action,
    gpipe,
    interleaved_one_f_one_b,
    make_schedule,
    one_f_one_b,
)
from gpuforge.parallel.model_parallel.pipeline_sim import DeadlockError, plot_timeline, simulate

SIZES = [(p, m) for p in range(1, 9) for m in range(1, 33)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_bubble_equals_theory_at_unit_costs(name):
    for p, m in SIZES:
        result = simulate(make_schedule(name, p, m))  # raises DeadlockError if it hangs
        assert result.makespan == 2 * (m + p - 1), (p, m)
        assert Fraction(result.bubble_fraction).limit_denominator(1000) == Fraction(p - 1, m + p - 1), (p, m)


def test_peak_in_flight_1f1b_is_p_minus_stage_gpipe_is_m():
    for p, m in SIZES:
        assert simulate(one_f_one_b(p, m)).peak_in_flight == [min(p - s, m) for s in range(p)], (p, m)
        assert simulate(gpipe(p, m)).peak_in_flight == [m] * p, (p, m)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_deadlock_free_with_uneven_costs(name):
    # backward twice the forward, slow links, a slow middle stage: order of arrivals changes, no hang
    cost = lambda s, a: {"F": 1.0 + (s == 1), "B": 2.0 + 2 * (s == 1)}.get(a.op, 0.3)
    for p, m in [(2, 1), (3, 5), (4, 8), (5, 3)]:
        result = simulate(make_schedule(name, p, m), cost)
        assert result.makespan > 0
        assert 0 < result.bubble_fraction < 1


def test_each_send_has_its_receive():
    for p, m in [(4, 6)]:
        for sched in (gpipe(p, m), one_f_one_b(p, m)):
            sends = {(a.op[-1], a.microbatch, s, a.peer) for s, acts in enumerate(sched) for a in acts
                     if a.op.startswith("SEND")}
            recvs = {(a.op[-1], a.microbatch, a.peer, s) for s, acts in enumerate(sched) for a in acts
                     if a.op.startswith("RECV")}
            assert sends == recvs and len(sends) == 2 * m * (p - 1)


def test_stage_time_of_sends_and_receives_occupies_the_stage():
    """GPipe at p = 2, m = 1, F = B = 1, messages arriving as they are sent, each send and receive holding its
    stage 0.25: stage 1 receives at 1 + 0.25, its backward's gradient arrives at 3.25, stage 0's receive ends
    at 3.5 and its backward at 4.5."""
    cost = lambda s, a: 1.0 if a.op in ("F", "B") else 0.0  # noqa: E731
    result = simulate(gpipe(2, 1), cost, lambda s, a: 0.25)
    assert result.makespan == 4.5 and result.busy == [2.0, 2.0]
    assert {str(e.action): (e.start, e.end) for e in result.timeline if e.stage == 1}["F0"] == (1.25, 2.25)
    assert simulate(gpipe(2, 1), cost).makespan == 4.0


def test_deadlock_is_detected():
    # stage 0 waits for a gradient before it has sent the activation that would produce it
    bad = [[Action("F", 0), Action("RECV_B", 0, 1), Action("SEND_F", 0, 1), Action("B", 0)],
           [Action("RECV_F", 0, 0), Action("F", 0), Action("B", 0), Action("SEND_B", 0, 0)]]
    with pytest.raises(DeadlockError, match="RECV_B0@1"):
        simulate(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_stages"):
        gpipe(0, 4)
    with pytest.raises(ValueError, match="num_microbatches"):
        one_f_one_b(2, 0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_schedule("zb-v", 2, 2)
    with pytest.raises(ValueError, match="B0 comes before its forward"):
        simulate([[Action("B", 0), Action("F", 0)]])


def test_timeline_png(tmp_path):
    path = tmp_path / "timeline.png"
    plot_timeline(simulate(one_f_one_b(4, 6)), str(path), "1F1B p=4 m=6")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interleaved_1f1b_bubble_in_flight_and_deadlock_freedom():
    for p in range(1, 9):
        for m in range(p, 33, p):
            for v in (1, 2, 3):
                result = simulate(interleaved_one_f_one_b(p, m, v))  # unit cost per chunk
                bubble = Fraction(result.bubble_fraction).limit_denominator(10000)
                assert bubble == Fraction(p - 1, v * m + p - 1), (p, m, v)
                warmup = [min((p - s - 1) * 2 + (v - 1) * p, m * v) for s in range(p)]
                assert result.peak_in_flight == [min(w + 1, m * v) for w in warmup], (p, m, v)
    with pytest.raises(ValueError, match="multiple of num_stages"):
        interleaved_one_f_one_b(4, 6)
