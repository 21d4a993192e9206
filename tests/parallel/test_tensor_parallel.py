"""Tensor parallelism (Megatron f/g, column/row linears, vocab-parallel embedding and cross-entropy) on real
gloo process groups: parity with one process in float64 and the communication ledger, exactly."""

import copy
from fractions import Fraction

import pytest
import torch

from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig, lm_loss, make_batch
from gpuforge.parallel.tensor_parallel import check_tp_config, tensor_parallelize
from tests.parallel.dist_harness import run_distributed

B, S = 4, 8


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
    from gpuforge.parallel.sequence_parallel import allreduce_sequence_parallel_grads

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


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_matches_single_process_float64(world_size):
    for worst in run_distributed(train_parity, world_size, 5, False):
        assert worst["loss"] < 1e-12 and worst["grad"] < 1e-12 and worst["param"] < 1e-12, worst


def ledger_one_step(comm, n_layers):
    torch.manual_seed(0)
    tp = tensor_parallelize(TinyLlama(tiny_config(n_layers=n_layers)).double(), comm)
    comm.ledger.clear()
    x, y = make_batch(0, B, S)
    tp.loss(x, y).backward()
    return [(e.op, e.shape, e.bytes, e.wire_bytes) for e in comm.ledger.entries]


@pytest.mark.distributed
def test_ledger_tp_bytes_per_layer_exact():
    t, h, itemsize = 2, 32, 8
    activation = B * S * h * itemsize
    per_layer = {}
    for n_layers in (1, 2):
        entries = run_distributed(ledger_one_step, t, n_layers)[0]
        assert {op for op, *_ in entries} == {"all_reduce"}
        big = [e for e in entries if e[1] == (B, S, h)]
        small = [e for e in entries if e[1] == (B, S)]
        # the embedding's g and the head's f, plus 2 per layer forward (g) and 2 backward (f)
        assert len(big) == 4 * n_layers + 2 and all(e[2] == activation for e in big)
        # vocab-parallel cross-entropy: max, sum of exponentials, target logit, over b·s tokens
        assert len(small) == 3 and len(entries) == len(big) + len(small)
        per_layer[n_layers] = sum((e[3] for e in big), Fraction(0))
    assert per_layer[2] - per_layer[1] == Fraction(4 * 2 * (t - 1), t) * B * S * h * itemsize


def test_bad_tp_configs_name_the_dimension():
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be divisible by the TP degree \(4\)"):
        check_tp_config(TinyLlamaConfig(dim=48, n_heads=6, n_kv_heads=2, hidden_dim=64), 4)
    with pytest.raises(ValueError, match=r"n_kv_heads \(2\) must be divisible by the TP degree \(4\)"):
        check_tp_config(TinyLlamaConfig(dim=32, n_heads=4, n_kv_heads=2, hidden_dim=64), 4)
    with pytest.raises(ValueError, match=r"hidden_dim \(50\) must be divisible by the TP degree \(4\)"):
        check_tp_config(TinyLlamaConfig(dim=32, n_heads=4, n_kv_heads=4, hidden_dim=50), 4)
