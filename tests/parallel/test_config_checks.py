"""Every strategy fingerprints its configuration once at construction (shapes, dtypes, hyper-parameters,
buffers, model sizes) and, when the ranks disagree, raises the same ValueError on every rank instead of
training silently or aborting one rank inside a collective. 2 ranks on gloo; rank 1 differs in one thing."""

import pytest
import torch

from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig
from gpuforge.parallel.comm import GroupComm
from gpuforge.parallel.data_parallel.ddp import DistributedDataParallel
from gpuforge.parallel.data_parallel.zero import ZeroRedundancyOptimizer
from gpuforge.parallel.model_parallel.pipeline_runtime import PipelineExecutor, pipeline_split
from gpuforge.parallel.model_parallel.tensor_parallel import tensor_parallelize
from tests.parallel.dist_harness import TiedMLP, run_distributed

pytestmark = pytest.mark.distributed


def _llama(**changes):
    torch.manual_seed(0)
    sizes = dict(vocab_size=67, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=32, max_seq_len=16)
    return TinyLlama(TinyLlamaConfig(**{**sizes, **changes})).double()


def _build(what: str, rank: int, comm):
    """Construct `what` on this rank; rank 1 gets the mismatched configuration."""
    odd = rank == 1
    if what == "ddp-dtype":
        model = TiedMLP().float() if odd else TiedMLP()
        return DistributedDataParallel(model, comm)
    if what == "ddp-buffer":
        model = TiedMLP()
        model.register_buffer("running", torch.zeros(3 if odd else 4, dtype=torch.float64))
        return DistributedDataParallel(model, comm)
    if what == "zero2-lr":
        return ZeroRedundancyOptimizer(TiedMLP().parameters(), torch.optim.AdamW, comm, zero_stage=2,
                                       lr=0.02 if odd else 0.01)
    if what == "tp-hidden":
        return tensor_parallelize(_llama(hidden_dim=64 if odd else 32), comm)
    if what == "tp-vocab":
        return tensor_parallelize(_llama(vocab_size=71 if odd else 67), comm)
    if what in ("pp-layers", "pp-hidden"):
        model = _llama(n_layers=4 if odd and what == "pp-layers" else 2, dim=32 if odd and what == "pp-hidden"
                       else 16)
        return PipelineExecutor(pipeline_split(model, 2)[rank], GroupComm(comm), num_microbatches=2)
    raise AssertionError(what)


def _construct(comm, what):
    try:
        _build(what, comm.rank, comm)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("what, owner, field", [
    ("ddp-dtype", "DistributedDataParallel", "dtypes"),
    ("ddp-buffer", "DistributedDataParallel", "buffers"),
    ("zero2-lr", "ZeroRedundancyOptimizer", "hyperparameters"),
    ("tp-hidden", "tensor_parallelize", "hidden_dim"),
    ("tp-vocab", "tensor_parallelize", "vocab_size"),
    ("pp-layers", "PipelineExecutor", "n_layers"),
    ("pp-hidden", "PipelineExecutor", "dim"),
])
def test_a_mismatch_raises_on_every_rank(what, owner, field):
    messages = run_distributed(_construct, 2, what, comm_timeout=30)
    for rank, message in enumerate(messages):
        assert message is not None, f"rank {rank} built {what} without an error"
        assert message.startswith(f"{owner}: mismatched configurations between ranks (")
        assert field in message.split(" differ)")[0], message
