"""Interleaved 1F1B executed on real processes: p = 2 stages × v = 2 model chunks of one layer, on gloo and on
MPI (world size 2), m = 2 and 4 micro-batches; gradients and losses equal
single-process gradient accumulation in float64 over 20 steps (1e-12), the loss lives on the last stage, and
the p2p ledger is the theory's: per step m·v activations and m·v activation gradients per neighbour link
(the ring closes: the last stage sends chunk c's output to the first stage's chunk c + 1)."""

import functools
import re

import pytest

from gpuforge.models.vol2_llm import TinyLlama
from gpuforge.parallel.model_parallel.pipeline_runtime import PipelineExecutor, pipeline_split
from tests.parallel.dist_harness import run_distributed
from tests.parallel.test_pipeline import STEPS, B, pipeline_parity
from tests.parallel.test_tensor_parallel import S, tiny_config

pytestmark = pytest.mark.distributed
CASES = [(2, 2, 4), (2, 4, 4)]  # (v, m, n_layers) at p = 2


def interleaved_suite(comm, cases):
    return {case: pipeline_parity(comm, "interleaved-1f1b", case[1], STEPS, case[2], num_chunks=case[0])
            for case in cases}


@functools.cache
def interleaved_results(comm):
    return run_distributed(interleaved_suite, 2, CASES, comm=comm, timeout=300)


@pytest.mark.parametrize("comm", ["torch", "mpi"])
def test_interleaved_matches_gradient_accumulation(comm):
    p, results = 2, interleaved_results(comm)
    for case in CASES:
        v, m, _ = case
        for rank, by_case in enumerate(results):
            worst, losses, p2p = by_case[case]
            assert worst < 1e-12, (case, rank, worst)
            assert (len(losses) == STEPS) == (rank == p - 1)
            assert all(d < 1e-12 for d in losses), losses
            act = (B // m, S, 32)
            boundary = [e for e in p2p if e[1] == act]
            # every virtual-stage boundary but the model's two ends: v·p − 1 links, each m sends and m recvs of
            # activations and as many of gradients, over the two ranks that share it
            sends = sum(1 for e in boundary if e[0] == "send")
            links_out = v - (rank == p - 1)  # chunk boundaries this rank sends activations over
            links_in = v - (rank == 0)
            assert sends == STEPS * m * (links_out + links_in), (rank, sends)
            assert len(boundary) == 2 * sends


def _bad(comm, case):
    n_layers, v, m = case
    torch_model = TinyLlama(tiny_config(n_layers=n_layers)).double()
    try:
        stage = pipeline_split(torch_model, comm.world_size, v)[comm.rank]
        PipelineExecutor(stage, comm, schedule="interleaved-1f1b", num_microbatches=m)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("case,message", [
    ((6, 2, 2), r"n_layers \(6\) must be divisible by pp · virtual stages = 2 · 2"),
    ((4, 2, 1), r"num_microbatches \(1\) to be a multiple of num_stages \(2\)"),
])
def test_a_schedule_the_sizes_cannot_fill_is_an_error_on_every_rank(case, message):


    errors = run_distributed(_bad, 2, case, timeout=60)
    assert all(e is not None and re.search(message, e) for e in errors), errors
