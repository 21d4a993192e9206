"""The communicator on real gloo process groups and real MPI: results, ledger, timeout, desync, errors."""

import time

import pytest
import torch

from tests.parallel.dist_harness import run_distributed

pytestmark = pytest.mark.distributed
KINDS = ["torch", "mpi"]


def _collectives(comm):
    r, n = comm.rank, comm.world_size
    out = {}
    t = torch.arange(5, dtype=torch.float64) + r
    comm.all_reduce(t)
    out["sum"] = t
    t = torch.full((3,), float(r + 1))
    comm.all_reduce(t, op="avg")
    out["avg"] = t
    t = torch.tensor([float(r)], dtype=torch.bfloat16)
    comm.all_reduce(t, op="max")
    out["max_bf16"] = t
    inp = torch.arange(2 * n, dtype=torch.float32) * (r + 1)
    rs = torch.empty(2)
    comm.reduce_scatter(rs, inp)
    out["reduce_scatter"] = rs
    ag = torch.empty(3 * n, dtype=torch.bfloat16)
    comm.all_gather(ag, torch.full((3,), float(r), dtype=torch.bfloat16))
    out["all_gather"] = ag
    b = torch.full((4,), float(r))
    comm.broadcast(b, src=n - 1)
    out["broadcast"] = b
    if r == 0:
        comm.send(torch.tensor([42.0, 43.0]), dst=1)
    elif r == 1:
        got = torch.empty(2)
        comm.recv(got, src=0)
        out["recv"] = got
    sub = comm.new_group([1, 0])
    t = torch.ones(1) * (r + 1)
    if sub.member(r):
        work = comm.all_reduce(t, group=sub, async_op=True)
        work.wait()
        out["sub"] = (t, comm.group_rank(sub))
    comm.barrier()
    out["ledger"] = [(e.op, e.group, e.bytes, e.seq) for e in comm.ledger.entries]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_collectives_results_and_ledger(kind):
    n = 3
    res = run_distributed(_collectives, n, comm=kind)
    for r, out in enumerate(res):
        assert torch.equal(out["sum"], torch.arange(5, dtype=torch.float64) * n + sum(range(n)))
        assert torch.equal(out["avg"], torch.full((3,), (n + 1) / 2))
        assert out["max_bf16"].item() == n - 1 and out["max_bf16"].dtype == torch.bfloat16
        full = torch.arange(2 * n, dtype=torch.float32) * sum(range(1, n + 1))
        assert torch.equal(out["reduce_scatter"], full[2 * r:2 * r + 2])
        assert torch.equal(out["all_gather"].float(), torch.arange(n).repeat_interleave(3).float())
        assert torch.equal(out["broadcast"], torch.full((4,), float(n - 1)))
        if r in (0, 1):
            assert torch.equal(out["sub"][0], torch.tensor([3.0])) and out["sub"][1] == [1, 0].index(r)
        expected = [("all_reduce", (0, 1, 2), 40, 0), ("all_reduce", (0, 1, 2), 12, 1),
                    ("all_reduce", (0, 1, 2), 2, 2), ("reduce_scatter", (0, 1, 2), 24, 3),
                    ("all_gather", (0, 1, 2), 18, 4), ("broadcast", (0, 1, 2), 16, 5)]
        expected += {0: [("send", (0, 1, 2), 8, 0)], 1: [("recv", (0, 1, 2), 8, 0)], 2: []}[r]
        expected += [("all_reduce", (1, 0), 4, 0)] if r < 2 else []
        assert out["ledger"] == expected
    assert torch.equal(res[1]["recv"], torch.tensor([42.0, 43.0]))


def _hang_on_rank1(comm):
    t = torch.ones(7, 3)
    comm.all_reduce(t)  # seq 0: everyone
    if comm.rank == 1:
        time.sleep(2.5)  # rank 1 never joins seq 1
        return None
    try:
        comm.all_reduce(torch.ones(7, 3))
    except Exception as exc:  # noqa: BLE001 - the test inspects the error
        return type(exc).__name__, str(exc)
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_timeout_names_rank_op_shape_and_dumps_recorder(kind):
    res = run_distributed(_hang_on_rank1, 2, comm=kind, comm_timeout=0.5)
    name, msg = res[0]
    assert name == "CommTimeoutError"
    assert "rank 0" in msg and "#1 all_reduce" in msg and "[7, 3]" in msg
    assert "Flight recorder" in msg and "#0 all_reduce" in msg and "completed" in msg


def _peer_never_answers(comm, op):
    """Rank 1 waits in a receive (or an all-to-all) that rank 0 never joins."""
    comm.barrier()
    if comm.rank == 0:
        time.sleep(2.5)
        return None
    try:
        if op == "recv":
            comm.recv(torch.empty(5, 2), src=0)
        else:
            comm.all_to_all(torch.empty(4, 3), torch.ones(4, 3))
    except Exception as exc:  # noqa: BLE001 - the test inspects the error
        return type(exc).__name__, str(exc)
    return None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", ["recv", "all_to_all"])
def test_receive_and_all_to_all_time_out_naming_rank_op_shape(kind, op):
    """gloo's receive and all-to-all cannot be polled; they are waited on with gloo's own timeout, and still
    end in our CommTimeoutError."""
    start = time.monotonic()
    res = run_distributed(_peer_never_answers, 2, op, comm=kind, comm_timeout=0.5)
    name, msg = res[1]
    assert name == "CommTimeoutError", msg
    seq, shape = ("#0", "[5, 2]") if op == "recv" else ("#1", "[4, 3]")  # p2p numbers its own sequence
    assert msg.startswith(f"rank 1: collective {seq} {op} with shape {shape}"), msg
    assert "did not complete within 0.5s" in msg and "Flight recorder" in msg, msg
    assert time.monotonic() - start < 60


def _desync(comm):
    try:
        if comm.rank == 0:
            comm.all_reduce(torch.ones(4))
        else:
            comm.broadcast(torch.ones(5), src=0)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_debug_mode_detects_desync_on_every_rank(kind):
    res = run_distributed(_desync, 2, comm=kind, debug=True)
    for name, msg in res:
        assert name == "CommDesyncError"
        assert "rank 0: all_reduce seq=0 shape=[4]" in msg and "rank 1: broadcast seq=0 shape=[5]" in msg


def _bad_calls(comm):
    errors = []
    for call in (lambda: comm.all_reduce(torch.ones(2), op="mean"),
                 lambda: comm.reduce_scatter(torch.empty(3), torch.empty(5)),
                 lambda: comm.all_gather(torch.empty(4), torch.empty(2, dtype=torch.float64)),
                 lambda: comm.all_reduce(torch.ones(4, 4).t()),
                 lambda: comm.broadcast(torch.ones(1), src=5)):
        try:
            call()
            errors.append(None)
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    return errors


def test_bad_arguments_are_named():
    errors = run_distributed(_bad_calls, 2)[0]
    assert "op must be one of" in errors[0]
    assert "inp must have group size (2)" in errors[1]
    assert "must have one dtype" in errors[2]
    assert "contiguous" in errors[3]
    assert "src must be a global rank" in errors[4]


@pytest.mark.parametrize("value", ["0", "-5", "abc", "nan", "inf"])
def test_comm_timeout_from_the_environment_is_checked(monkeypatch, value):
    """GPUFORGE_COMM_TIMEOUT must be a positive number of seconds: 0 or −5 would make every collective time out
    at once; the error names the variable (before any process group is made)."""
    from gpuforge.parallel.comm import init_comm

    monkeypatch.setenv("GPUFORGE_COMM_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"GPUFORGE_COMM_TIMEOUT: expected a positive number of seconds, got "
                                         f"'{value}'"):
        init_comm("torch")
    with pytest.raises(ValueError, match="timeout: expected a positive number of seconds"):
        init_comm("torch", timeout=0)


def _teardown_after_timeout(comm):
    """Rank 0 times out in an all-reduce rank 1 never joins, then tears the group down while rank 1 is still
    busy; returns how long the teardown took."""
    from gpuforge.parallel.comm import CommTimeoutError

    if comm.rank == 1:
        time.sleep(12)
        return None
    with pytest.raises(CommTimeoutError):
        comm.all_reduce(torch.ones(4))
    start = time.monotonic()
    comm.destroy()
    return time.monotonic() - start


def test_teardown_after_a_timeout_does_not_wait_for_the_stuck_collective():
    """The process group's own timeout is ours plus a few seconds, so destroying it after our timeout fired
    waits at most those seconds (it used to wait until the peer returned, up to a minute)."""
    teardown = run_distributed(_teardown_after_timeout, 2, comm_timeout=2)[0]
    assert teardown < 7.0, f"teardown took {teardown:.1f}s"
