"""TinyLlama serving: full recomputation, contiguous and paged KV caches give the same logits."""

import copy

import pytest
import torch

from gpuforge.models import vol2_llm as llm
from gpuforge.models import vol6_systems as sysm

CONFIG = dict(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, n_layers=2, max_seq_len=64)


def _model(dtype):
    torch.manual_seed(0)
    return llm.TinyLlama(llm.TinyLlamaConfig(**CONFIG)).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("block_size", [1, 4, 7])
def test_recompute_contiguous_and_paged_logits_agree(dtype, tol, block_size):
    model = _model(dtype)
    tokens = llm.make_batch(0, 3, 23)[0]
    full = model(tokens).detach()
    contiguous = sysm.incremental_logits(model, tokens, 9, model.new_cache(3))
    n_blocks = 3 * -(-23 // block_size) + 2
    paged_cache = sysm.new_paged_cache(model, 3, num_blocks=n_blocks, block_size=block_size)
    paged = sysm.incremental_logits(model, tokens, 9, paged_cache)
    scale = full.abs().max()
    assert (contiguous - full).abs().max() <= tol * scale
    assert (paged - full).abs().max() <= tol * scale
    # blocks are scattered through the pool: the table, not the layout, makes the answer right
    table = paged_cache.block_tables[:, : -(-23 // block_size)]
    assert (table >= 0).all() and table.unique().numel() == table.numel()
    assert not torch.equal(table.flatten(), torch.arange(table.numel()))


def test_paged_generation_and_memory():
    model = _model(torch.float32)
    prompt = llm.make_batch(1, 2, 10)[0]
    contiguous = llm.generate(model, prompt, 12, cache=model.new_cache(2))
    cache = sysm.new_paged_cache(model, 2, num_blocks=14, block_size=4, seed=3)
    assert torch.equal(llm.generate(model, prompt, 12, cache=cache), contiguous)
    assert cache.blocks_in_use == 2 * 6  # 21 cached positions -> 6 blocks of 4 per sequence, on demand
    assert sysm.kv_cache_bytes(cache) < sysm.kv_cache_bytes(model.new_cache(2))
    cache.free(0)
    assert cache.blocks_in_use == 6 and len(cache.free_blocks) == 2 + 6
    with pytest.raises(RuntimeError, match="out of blocks"):
        llm.generate(model, prompt, 60, cache=sysm.new_paged_cache(model, 2, num_blocks=4, block_size=4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_decode_through_gf_paged_attention(backend):
    model = _model(torch.float32)
    tokens = llm.make_batch(2, 2, 15)[0]
    full = model(tokens).detach()
    cache = sysm.new_paged_cache(model, 2, num_blocks=10, block_size=4, decode_backend=backend)
    paged = sysm.incremental_logits(model, tokens, 6, cache)
    assert (paged - full).abs().max() <= 2e-5 * full.abs().max()


def test_int4_tiny_llama_serves_close_to_float_and_caches_agree():
    torch.manual_seed(0)
    model = llm.TinyLlama()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(15):  # trained weights, not just the N(0, 0.02) init
        loss = llm.loss_fn(model, llm.make_batch(step, 8, 48))
        opt.zero_grad()
        loss.backward()
        opt.step()
    inputs, targets = llm.make_batch(100, 4, 48)
    with torch.no_grad():
        full = model(inputs)
        errors = {}
        for method, group in [("rtn", 32), ("rtn", 128), ("gptq", 128), ("awq", 128)]:
            quantized = sysm.int4_tiny_llama(copy.deepcopy(model), group, method)
            out = quantized(inputs)
            errors[method, group] = float((out - full).abs().max() / full.abs().max())
            assert abs(llm.lm_loss(out, targets) - llm.lm_loss(full, targets)) < 0.02 * llm.lm_loss(full, targets)
        assert max(errors.values()) < 0.05, errors
        assert errors["rtn", 32] < errors["rtn", 128]  # smaller groups, finer scales
        assert errors["gptq", 128] < errors["rtn", 128]  # GPTQ compensates rounding error with the Hessian
        # AWQ gets only the shared bounds: it pays off on outlier activation channels, which this small model
        # lacks (measured max logit error 4.3e-3 for AWQ vs 3.3e-3 for RTN at group 128)
        cache = sysm.new_paged_cache(quantized, 4, num_blocks=4 * 4, block_size=16)
        paged = sysm.incremental_logits(quantized, inputs, 20, cache)
        reference = quantized(inputs)
        assert (paged - reference).abs().max() <= 2e-5 * reference.abs().max()
