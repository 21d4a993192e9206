"""all_to_all (equal and unequal splits) and batched isend/irecv rings on the communicator, on real gloo
process groups (world sizes 2 and 4) and real MPI (4): results, ledger (bytes and wire bytes), bad splits named,
and a timeout that names the rank and the collective."""

import functools
import time

import pytest
import torch

from gpuforge.parallel.comm import GroupComm, P2POp
from tests.parallel.dist_harness import run_distributed

pytestmark = pytest.mark.distributed

def _in_splits(r, n):
    """Rank r sends (r + j) % 3 rows to rank j (some splits empty)."""
    return [(r + j) % 3 for j in range(n)]


def _exchanges(comm):
    r, n = comm.rank, comm.world_size
    out = {}
    inp = torch.arange(2 * n * 3, dtype=torch.float64).view(2 * n, 3) + 100 * r  # two rows to each rank
    eq = torch.empty_like(inp)
    comm.all_to_all(eq, inp)
    out["equal"] = eq
    ins = _in_splits(r, n)
    outs = [_in_splits(j, n)[r] for j in range(n)]
    rows = torch.arange(sum(ins), dtype=torch.float32)[:, None].repeat(1, 2) + 1000 * r
    got = torch.empty(sum(outs), 2)
    comm.all_to_all(got, rows, outs, ins, async_op=True).wait()
    out["unequal"] = got
    bf = torch.full((n, 4), float(r), dtype=torch.bfloat16)
    bf_out = torch.empty_like(bf)
    comm.all_to_all(bf_out, bf)
    out["bf16"] = bf_out
    gc = GroupComm(comm)
    x = torch.full((2, 3), float(r), dtype=torch.float64)
    received, work = gc.ring_exchange([x, 2 * x])
    work.wait()
    out["ring"] = received
    a, b = torch.full((1,), float(r)), torch.empty(1)
    works = comm.batch_isend_irecv([P2POp("irecv", b, (r + 1) % n), P2POp("isend", a, (r - 1) % n)])
    for w in works:
        w.wait()
    out["backwards_ring"] = b
    out["ledger"] = [(e.op, e.bytes, e.kept, e.wire_bytes) for e in comm.ledger.entries]
    out["bad"] = _bad_splits(comm) if n == 2 else None
    return out


# MPI start-up costs ~5 s a job on the CI machine: MPI runs the 4-rank case, gloo both. The 4-rank gloo
# run is in debug mode: unequal splits (dim 0 differs between ranks) must not read as a desync.
@pytest.mark.parametrize(("kind", "n"), [("torch", 2), ("torch", 4), ("mpi", 4)])
def test_all_to_all_and_rings(kind, n):
    res = exchanges(kind, n)
    for r, out in enumerate(res):
        full = [torch.arange(2 * n * 3, dtype=torch.float64).view(2 * n, 3) + 100 * j for j in range(n)]
        assert torch.equal(out["equal"], torch.cat([f[2 * r:2 * r + 2] for f in full]))
        expected = []
        for j in range(n):
            ins = _in_splits(j, n)
            start = sum(ins[:r])
            expected += [[float(start + i + 1000 * j)] * 2 for i in range(ins[r])]
        assert out["unequal"].tolist() == expected
        assert out["bf16"].dtype == torch.bfloat16 and out["bf16"][:, 0].tolist() == list(map(float, range(n)))
        prev = (r - 1) % n
        assert out["ring"][0].eq(prev).all() and out["ring"][1].eq(2 * prev).all()
        assert out["backwards_ring"].item() == (r + 1) % n
        ins = _in_splits(r, n)
        a2a = [e for e in out["ledger"] if e[0] == "all_to_all"]
        b_eq, b_un, b_bf = 2 * n * 3 * 8, sum(ins) * 2 * 4, n * 4 * 2
        assert a2a == [("all_to_all", b_eq, 6 * 8, b_eq - 48), ("all_to_all", b_un, ins[r] * 8, b_un - ins[r] * 8),
                       ("all_to_all", b_bf, 8, b_bf - 8)]
        # equal splits: (n − 1)/n of the input crosses the wire
        assert a2a[0][3] * n == b_eq * (n - 1)
        p2p = [e[:2] for e in out["ledger"] if e[0] in ("send", "recv")]
        assert sorted(p2p) == sorted([("recv", 48), ("recv", 48), ("send", 48), ("send", 48), ("recv", 4),
                                      ("send", 4)])


def _bad_splits(comm):
    errors = {}
    inp = torch.zeros(5, 2)
    for name, call in {
        "uneven": lambda: comm.all_to_all(torch.zeros(5, 2), inp),
        "count": lambda: comm.all_to_all(torch.zeros(5, 2), inp, [5], [5]),
        "sum": lambda: comm.all_to_all(torch.zeros(5, 2), inp, [2, 2], [3, 2]),
        "dtype": lambda: comm.all_to_all(torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, 2)),
        "trailing": lambda: comm.all_to_all(torch.zeros(4, 3), torch.zeros(4, 2)),
        "p2p": lambda: comm.batch_isend_irecv([("isend", inp, 1)]),
    }.items():
        try:
            call()
        except (TypeError, ValueError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    return errors


@functools.cache
def exchanges(kind, n):
    return run_distributed(_exchanges, n, comm=kind, debug=(kind, n) == ("torch", 4))


def test_bad_all_to_all_arguments_are_named():
    errors = exchanges("torch", 2)[0]["bad"]
    assert "out_splits: None means equal splits, but dim 0 of size 5" in errors["uneven"]
    assert "out_splits: expected 2 non-negative ints" in errors["count"]
    assert "out_splits: the splits sum to 4, dim 0 has 5 rows" in errors["sum"]
    assert errors["dtype"].startswith("TypeError: out and inp must have one dtype")
    assert "agree beyond dim 0" in errors["trailing"]
    assert errors["p2p"].startswith("TypeError: ops[0]: expected P2POp")


def _hang(comm):
    """Rank 1 joins neither the all_to_all nor the ring exchange; rank 0 returns both errors."""
    t = torch.ones(comm.world_size, 3)
    if comm.rank == 1:
        time.sleep(2.5)  # never joins
        return None
    errors = []
    for call in (lambda: comm.all_to_all(torch.empty_like(t), t),
                 lambda: GroupComm(comm).ring_exchange([torch.ones(4)])[1].wait()):
        try:
            call()
        except Exception as e:  # noqa: BLE001 - the message is the result
            errors.append(f"{type(e).__name__}: {e}")
    return errors


def test_all_to_all_and_ring_timeouts_name_rank_and_collective():
    """gloo's all_to_all and send/recv works are waited on by a thread (not pollable); MPI's requests are polled
    like every other MPI request (test_comm.py covers that path)."""
    a2a, ring = run_distributed(_hang, 2, comm_timeout=0.5)[0]
    assert a2a.startswith("CommTimeoutError: rank 0: collective #0 all_to_all with shape [2, 3]"), a2a
    assert ring.startswith("CommTimeoutError: rank 0: collective #0 recv with shape [4]"), ring
