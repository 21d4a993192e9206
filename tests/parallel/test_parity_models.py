"""Reference models trained 20 steps by every data-parallel strategy vs one process on the concatenated batches.

TinyLlama, TinyCLIP (its contrastive loss in the gathered form: embeddings all-gathered with gradient) and
TinyConvNeXt, in small configurations, each with its REFERENCE_MODELS batches and loss; DDP, ZeRO-1, ZeRO-2
and ZeRO-3; gradient accumulation over 2 micro-batches and global-norm clipping; world sizes 2 and 4 on gloo
and on MPI, every rank on its own slice of each micro-batch. After 20 steps every parameter equals the
single-process one to 1e-12 in float64 and 1e-6 in float32 (parallel/training/parity.py). One spawned
job per (world size, communicator) trains every (model, dtype, strategy), so process start-up is paid once.

AdamW at lr 1e-3: its update g/√v is scale-free, so a relative rounding error in a nearly cancelling gradient
becomes an error of order lr in that parameter; float32 differences measured ≤ 3e-7 at lr 1e-3, but 6e-6
for TinyLlama at lr 1e-2. One exclusion: the key part of TinyCLIP's qkv biases. Softmax is invariant to
adding one number to every score of a row, so the exact gradient of a key bias is zero and autograd returns
rounding noise, different in every run (another summation order), which AdamW (÷ its RMS + eps 1e-8) turns
into updates (at lr 1e-2: 2e-3 after 20 steps in float32, 1.7e-12 after 5 in float64, ours vs torch's ZeRO).
Those elements are compared with nothing: a bound on them would be one on AdamW's step, not on the
parallel arithmetic.
"""

import functools

import pytest
import torch

from gpuforge.models.vol1_architectures import REFERENCE_MODELS as VOL1
from gpuforge.models.vol1_architectures import ConvNeXtBlock, TinyConvNeXt
from gpuforge.models.vol2_llm import REFERENCE_MODELS as VOL2
from gpuforge.models.vol2_llm import Block, TinyLlama, TinyLlamaConfig
from gpuforge.models.vol4_multimodal import REFERENCE_MODELS as VOL4
from gpuforge.models.vol4_multimodal import TinyCLIP, TransformerBlock
from gpuforge.parallel.training.data_parallel import OURS, DataParallelTrainer
from gpuforge.parallel.training.gathered_loss import DataParallelLoss
from gpuforge.parallel.training.parity import FLOAT32_SMALL_MODEL_BOUND, TOLERANCE
from tests.parallel.dist_harness import run_distributed

pytestmark = pytest.mark.distributed
STEPS, ACCUM, MICRO_BATCH, LR, MAX_NORM = 20, 2, 4, 1e-3, 0.5
DTYPES = ("float64", "float32")
BOUND = {"float64": TOLERANCE["float64"], "float32": FLOAT32_SMALL_MODEL_BOUND}


def _small_llama():
    return TinyLlama(TinyLlamaConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=8))


# name -> (small build, make_batch(seed, batch_size), loss_fn(model, batch), ZeRO-3 unit types)
MODELS = {
    "tiny_llama": (_small_llama, functools.partial(VOL2["tiny_llama"].make_batch, seq_len=8),
                   VOL2["tiny_llama"].loss_fn, (Block,)),
    "tiny_clip": (lambda: TinyCLIP(dim=8, embed_dim=8, depth=1, heads=2), VOL4["tiny_clip"].make_batch,
                  VOL4["tiny_clip"].loss_fn, (TransformerBlock,)),
    "tiny_convnext": (lambda: TinyConvNeXt(dim=4, depth=2), VOL1["tiny_convnext"].make_batch,
                      VOL1["tiny_convnext"].loss_fn, (ConvNeXtBlock,)),
}


def _micro_batches(name, step, rank=0, world=1):
    """Step `step`'s ACCUM global micro-batches of MICRO_BATCH samples; rank r takes its r-th slice of each."""
    make_batch = MODELS[name][1]
    return [tuple(t.chunk(world)[rank] for t in make_batch(step * ACCUM + m, MICRO_BATCH)) for m in range(ACCUM)]


def _train(name, dtype, strategy, comm=None, steps=STEPS):
    """(final parameters, this rank's loss per step, gradient norm per step) of `strategy` on model `name`."""
    build, _, loss_fn, units = MODELS[name]
    torch.manual_seed(0)
    model = build().to(getattr(torch, dtype))
    trainer = DataParallelTrainer(strategy, DataParallelLoss(model, loss_fn, comm), comm, lr=LR, auto_wrap=units)
    rank, world = (0, 1) if comm is None else (comm.rank, comm.world_size)
    losses, norms = zip(*(trainer.step(_micro_batches(name, step, rank, world), MAX_NORM) for step in range(steps)))
    return trainer.full_state_dict(), list(losses), list(norms)


def _every_case(comm, dtypes):
    return {(name, dtype, strategy): _train(name, dtype, strategy, comm)[0]
            for name in MODELS for dtype in dtypes for strategy in OURS}


def max_param_diff(state, reference) -> float:
    """Largest |difference| over the parameters, less the key parts of qkv biases (the module docstring)."""
    def comparable(key, t):
        return t.view(3, -1)[[0, 2]] if key.endswith("qkv.bias") else t

    return max((comparable(k, state[k]) - comparable(k, v)).abs().max().item() for k, v in reference.items())


@functools.cache
def _reference(name, dtype):
    return _train(name, dtype, "single")


# float32 at world size 2 on both communicators: its tolerance is about rounding, which one more level of
# sharding does not change; world size 4 checks the sharding arithmetic (padding, offsets) in float64.
@pytest.mark.parametrize("world,kind,dtypes", [(2, "torch", DTYPES), (4, "torch", ("float64",)),
                                               (2, "mpi", DTYPES), (4, "mpi", ("float64",))])
def test_every_strategy_matches_single_process(world, kind, dtypes):
    results = run_distributed(_every_case, world, dtypes, comm=kind, timeout=300)
    failures = []
    for rank, cases in enumerate(results):
        for (name, dtype, strategy), state in cases.items():
            reference = _reference(name, dtype)[0]
            diff = max_param_diff(state, reference)
            if not diff <= BOUND[dtype]:
                failures.append(f"rank {rank} {name} {dtype} {strategy}: max |param diff| {diff:.3e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", MODELS)
def test_reference_runs_clip_and_learn(name):
    """The matrix above would be weak if clipping never fired or nothing moved: both happen in float64."""
    torch.manual_seed(0)
    initial = MODELS[name][0]().to(torch.float64).state_dict()
    state, _, norms = _reference(name, "float64")
    assert any(n > MAX_NORM for n in norms), norms
    assert max((state[f"model.{k}"] - v).abs().max().item() for k, v in initial.items()) > 10 * LR
