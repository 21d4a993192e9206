"""Sequence parallelism on real gloo process groups: parity with one process in float64, residual stream
sharded along the sequence, and the same communication volume as plain tensor parallelism."""

from fractions import Fraction

import pytest
import torch

from gpuforge.models.vol2_llm import TinyLlama, make_batch
from gpuforge.parallel.sequence_parallel import sequence_parallelize
from tests.parallel.dist_harness import run_distributed
from tests.parallel.test_tensor_parallel import B, S, ledger_one_step, tiny_config, train_parity

pytestmark = pytest.mark.distributed


def test_sp_matches_single_process_float64():
    for worst in run_distributed(train_parity, 2, 5, True):
        assert worst["loss"] < 1e-12 and worst["grad"] < 1e-12 and worst["param"] < 1e-12, worst


def sp_ledger_and_shapes(comm):
    torch.manual_seed(0)
    sp = sequence_parallelize(TinyLlama(tiny_config()).double(), comm)
    x, y = make_batch(0, B, S)
    residual_shape = tuple(sp.tok_embeddings(x).shape)
    comm.ledger.clear()
    sp.loss(x, y).backward()
    return residual_shape, [(e.op, e.shape, e.bytes, e.wire_bytes) for e in comm.ledger.entries]


def test_sp_shards_activations_and_keeps_the_volume():
    t, h = 2, 32
    residual_shape, entries = run_distributed(sp_ledger_and_shapes, t)[0]
    assert residual_shape == (B, S // t, h)
    tp_entries = run_distributed(ledger_one_step, t, 2)[0]
    big = lambda es, ops: [e for e in es if e[0] in ops and e[2] == B * S * h * 8]
    sp_big = big(entries, ("reduce_scatter", "all_gather"))
    tp_big = big(tp_entries, ("all_reduce",))
    # every all-reduce of (b, s, h) became one reduce-scatter and one all-gather of the same total traffic
    assert len(sp_big) == 2 * len(tp_big)
    assert sum((e[3] for e in sp_big), Fraction(0)) == sum((e[3] for e in tp_big), Fraction(0))
