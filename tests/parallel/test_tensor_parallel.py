"""Tensor parallelism (Megatron f/g, column/row linears, vocab-parallel embedding and cross-entropy) on real
gloo process groups: parity with one process in float64 over 20 steps (TinyLlama and TinyDiT) and the
communication ledger, exactly, at t = 2 and 4.

Every case of one TP degree runs in ONE spawned job (`tp_results(t)`, cached), so process start-up is paid
once per world size; test_sequence_parallel.py reads the sequence-parallel cases from the same jobs."""

import copy
import functools
from fractions import Fraction

import pytest
import torch

from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig, lm_loss, make_batch
from gpuforge.parallel.model_parallel.tensor_parallel import tensor_parallelize
from gpuforge.parallel.model_parallel.tp_llama import check_tp_config
from tests.parallel.dist_harness import run_distributed

B, S = 4, 8
STEPS = 20


def tiny_config(vocab_size=131, n_layers=2):
    # vocab 131 is prime: not divisible by any TP degree, so the padding path always runs
    return TinyLlamaConfig(vocab_size=vocab_size, dim=32, n_layers=n_layers, n_heads=8, n_kv_heads=4,
                           hidden_dim=48, max_seq_len=16)


def shard_of(name, full, t, rank):
    """This rank's slice of a full parameter, in the Megatron layout tensor_parallelize uses."""
    leaf = name.split(".")[-2]
    if leaf in ("wq", "wk", "wv", "w1", "w3"):
        return full.chunk(t, 0)[rank]
    if leaf in ("wo", "w2"):
        return full.chunk(t, 1)[rank]
    if name == "tok_embeddings.weight":
        rows = -(-full.shape[0] // t)
        padded = torch.zeros(rows * t, full.shape[1], dtype=full.dtype)
        padded[:full.shape[0]] = full
        return padded.chunk(t, 0)[rank]
    return full  # norms: replicated


def train_parity(comm, steps, sequence_parallel):
    """AdamW steps on the TP model and on one full model; max relative differences of loss, grads, params."""
    from gpuforge.parallel.model_parallel.sequence_parallel import allreduce_sequence_parallel_grads

    torch.manual_seed(0)
    ref = TinyLlama(tiny_config()).double()
    tp = tensor_parallelize(copy.deepcopy(ref), comm, sequence_parallel=sequence_parallel)
    full = dict(ref.named_parameters())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_tp = torch.optim.AdamW(tp.parameters(), lr=1e-2)
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for step in range(steps):
        x, y = make_batch(step, B, S)
        loss_ref = lm_loss(ref(x), y)
        loss_ref.backward()
        loss = tp.loss(x, y)
        loss.backward()
        if sequence_parallel:
            allreduce_sequence_parallel_grads(tp)
        worst["loss"] = max(worst["loss"], abs(loss.item() - loss_ref.item()) / abs(loss_ref.item()))
        for name, p in tp.named_parameters():
            ref_name = name.replace(".inner.", ".")
            g = shard_of(ref_name, full[ref_name].grad, comm.world_size, comm.rank)
            worst["grad"] = max(worst["grad"], ((p.grad - g).abs().max() / g.abs().max()).item())
        opt_ref.step()
        opt_tp.step()
        opt_ref.zero_grad()
        opt_tp.zero_grad()
    for name, p in tp.named_parameters():
        ref_name = name.replace(".inner.", ".")
        w = shard_of(ref_name, full[ref_name].detach(), comm.world_size, comm.rank)
        worst["param"] = max(worst["param"], ((p.detach() - w).abs().max() / w.abs().max()).item())
    return worst


def dit_shard_of(name, full, t, rank):
    """This rank's slice of a TinyDiT parameter: q and MLP-in by rows, kv per head, out and MLP-out by columns."""
    path, _, leaf = name.rpartition(".")
    module = path.rpartition(".")[2]
    mlp = ".mlp." in name
    if module == "kv":
        return full.reshape(2, -1, *full.shape[1:]).chunk(t, 1)[rank].reshape(-1, *full.shape[1:])
    if module == "q" or (mlp and module == "0"):
        return full.chunk(t, 0)[rank]
    if leaf == "weight" and (module == "out" or (mlp and module == "2")):
        return full.chunk(t, 1)[rank]
    return full  # row-parallel biases, adaLN, embeddings, final layer: replicated


def dit_parity(comm, steps):
    """The TinyDiT's SGD steps with heads split over the ranks vs one process (max relative differences)."""
    from gpuforge.models.vol3_generative import TinyDiT, dit_loss, make_dit_batch

    torch.manual_seed(0)
    ref = TinyDiT(dim=32, depth=2, heads=4).double()
    with torch.no_grad():  # adaLN-Zero starts the modulation and the final layer at 0: start them elsewhere,
        for p in ref.parameters():  # so every weight carries gradient from the first step
            if not p.any():
                p.normal_(0, 0.2)
    tp = tensor_parallelize(copy.deepcopy(ref), comm)
    full = dict(ref.named_parameters())
    # SGD, not Adam: the key biases' gradient is 0 in exact arithmetic (softmax ignores a score shift shared by
    # all keys), so it is rounding noise, which Adam would scale up to lr-sized steps that differ by rank count
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_tp = torch.optim.SGD(tp.parameters(), lr=0.1, momentum=0.9)
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for step in range(steps):
        batch = make_dit_batch(step, B)
        comm.ledger.clear()
        loss_ref, loss = dit_loss(ref, batch), dit_loss(tp, batch)
        loss_ref.backward()
        loss.backward()
        worst["ledger"] = sorted((e.op, e.shape) for e in comm.ledger.entries)
        worst["loss"] = max(worst["loss"], abs(loss.item() - loss_ref.item()) / loss_ref.item())
        for name, p in tp.named_parameters():
            g = dit_shard_of(name, full[name].grad, comm.world_size, comm.rank)
            worst["grad"] = max(worst["grad"], ((p.grad - g).abs().max() / g.abs().max()).item())
        for opt in (opt_ref, opt_tp):
            opt.step()
            opt.zero_grad()
    for name, p in tp.named_parameters():
        w = dit_shard_of(name, full[name].detach(), comm.world_size, comm.rank)
        worst["param"] = max(worst["param"], ((p.detach() - w).abs().max() / w.abs().max()).item())
    return worst


def ledger_one_step(comm, n_layers, m=1, sequence_parallel=False):
    """The ledger of one forward + backward of the batch as m micro-batches; and the residual stream's shape."""
    torch.manual_seed(0)
    tp = tensor_parallelize(TinyLlama(tiny_config(n_layers=n_layers)).double(), comm,
                            sequence_parallel=sequence_parallel)
    x, y = make_batch(0, B, S)
    residual_shape = tuple(tp.tok_embeddings(x).shape)
    comm.ledger.clear()
    for xm, ym in zip(x.chunk(m), y.chunk(m), strict=True):
        tp.loss(xm, ym).backward()
    return residual_shape, [(e.op, e.shape, e.bytes, e.wire_bytes) for e in comm.ledger.entries]


def tp_suite(comm):
    """Every tensor- and sequence-parallel case of this TP degree."""
    return {"tp": train_parity(comm, STEPS, False), "sp": train_parity(comm, STEPS, True),
            "dit": dit_parity(comm, STEPS),
            "ledger": {(n, m): ledger_one_step(comm, n, m)[1] for n in (1, 2) for m in (1, 2)},
            "sp_ledger": ledger_one_step(comm, 2, sequence_parallel=True)}


@functools.cache
def tp_results(t):
    """Every rank's results of tp_suite on t gloo processes (run once per t and pytest session)."""
    return run_distributed(tp_suite, t, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("case", ["tp", "dit"])
def test_tp_matches_single_process_float64(t, case):
    for rank, results in enumerate(tp_results(t)):
        worst = results[case]
        assert worst["loss"] < 1e-12 and worst["grad"] < 1e-12 and worst["param"] < 1e-12, (rank, worst)


@pytest.mark.distributed
@pytest.mark.parametrize("t", [2, 4])
def test_dit_all_reduces_per_block(t):
    """Per block and step: g after self-attention, cross-attention and the MLP forward; f backward on each of
    their inputs, plus one on the text context (b, 3, dim), whose gradient sums every rank's heads."""
    depth, tokens, ctx, dim = 2, 16, 3, 32
    expected = sorted([("all_reduce", (B, tokens, dim))] * (6 * depth) + [("all_reduce", (B, ctx, dim))] * depth)
    assert tp_results(t)[0]["dit"]["ledger"] == expected


@pytest.mark.distributed
@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("m", [1, 2])
def test_ledger_tp_bytes_per_layer_per_microbatch_exact(t, m):
    h, itemsize, b = 32, 8, B // m
    per_layer = {}
    for n_layers in (1, 2):
        entries = tp_results(t)[0]["ledger"][(n_layers, m)]
        assert {op for op, *_ in entries} == {"all_reduce"}
        big = [e for e in entries if e[1] == (b, S, h)]
        small = [e for e in entries if e[1] == (b, S)]
        # per micro-batch: the embedding's g and the head's f, plus 2 per layer forward (g) and 2 backward (f)
        assert len(big) == m * (4 * n_layers + 2) and all(e[2] == b * S * h * itemsize for e in big)
        # vocab-parallel cross-entropy: max, sum of exponentials, target logit, over b·s tokens
        assert len(small) == 3 * m and len(entries) == len(big) + len(small)
        per_layer[n_layers] = sum((e[3] for e in big), Fraction(0)) / m
    assert per_layer[2] - per_layer[1] == Fraction(4 * 2 * (t - 1), t) * b * S * h * itemsize


def test_bad_tp_configs_name_the_dimension():
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be divisible by the TP degree \(4\)"):
        check_tp_config(TinyLlamaConfig(dim=48, n_heads=6, n_kv_heads=2, hidden_dim=64), 4)
    with pytest.raises(ValueError, match=r"n_kv_heads \(2\) must be divisible by the TP degree \(4\)"):
        check_tp_config(TinyLlamaConfig(dim=32, n_heads=4, n_kv_heads=2, hidden_dim=64), 4)
    with pytest.raises(ValueError, match=r"hidden_dim \(50\) must be divisible by the TP degree \(4\)"):
        check_tp_config(TinyLlamaConfig(dim=32, n_heads=4, n_kv_heads=4, hidden_dim=50), 4)


def test_bad_dit_configs_and_row_bias_without_reduction():
    from gpuforge.models.vol3_generative import TinyDiT
    from gpuforge.parallel.model_parallel.tp_dit import check_dit_tp_config
    from gpuforge.parallel.model_parallel.tp_layers import RowParallelLinear

    with pytest.raises(ValueError, match=r"heads \(2\) must be divisible by the TP degree \(4\)"):
        check_dit_tp_config(TinyDiT(dim=32, heads=2), 4)
    with pytest.raises(ValueError, match="bias: a RowParallelLinear adds its bias after the sum"):
        RowParallelLinear(torch.zeros(2, 2), None, bias=torch.zeros(2), reduce_output=None)
