"""paged_attention benchmark: the Triton flash-decoding kernels beside the torch reference path (gather the
pages, then SDPA) on a decode step. Memory-bound: `bytes` is the KV cache read once (K and V of every cached
token) plus q and the output, so the GB/s column is the fraction of the bandwidth needed to read the cache once.
The speed target (H100/H200): batch 32, context 4K..32K, >= 70% of the copy bandwidth. The "triton unchecked"
row skips the index check (check_inputs=False), so the two triton rows measure what the check costs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpuforge.kernels import backends
from gpuforge.kernels.paged_attention import gather_kv, paged_attention, paged_attention_reference, random_paged_cache
from gpuforge.profiling.harness import BenchCase


def gathered_sdpa(q, k_cache, v_cache, block_table, seq_lens):
    """The baseline a PyTorch user writes: gather each sequence's pages into a dense K/V, then SDPA."""
    group = q.shape[1] // k_cache.shape[2]
    outs = []
    for b, length in enumerate(seq_lens.tolist()):
        k = gather_kv(k_cache, block_table, b, length).repeat_interleave(group, 0)
        v = gather_kv(v_cache, block_table, b, length).repeat_interleave(group, 0)
        outs.append(F.scaled_dot_product_attention(q[b, :, None], k, v)[:, 0])
    return torch.stack(outs)


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if device.type == "cuda":
        contexts = (4096, 32768) if quick else (4096, 8192, 16384, 32768)
        batch, heads_q, heads_kv, d, block_size, dtype = 32, 32, 8, 128, 16, torch.bfloat16
    else:
        contexts = (100,)
        batch, heads_q, heads_kv, d, block_size, dtype = 2, 4, 2, 32, 16, torch.float32
    fns = {"torch": gathered_sdpa}
    if backends.is_available("triton")[0] and backends.runs_on("triton", device):
        fns["triton"] = lambda *inputs: paged_attention(*inputs, backend="triton")
        # the same kernels without the block-table range check: the difference is that check's cost
        fns["triton unchecked"] = lambda *inputs: paged_attention(*inputs, check_inputs=False, backend="triton")
    cases = []
    for context in contexts:
        kv_bytes = 2 * batch * context * heads_kv * d * dtype.itemsize
        cases.append(BenchCase(
            op="paged_attention", shape=f"B{batch} Hq{heads_q} Hkv{heads_kv} D{d} ctx{context} block{block_size}",
            dtype=dtype,
            make_inputs=lambda context=context: random_paged_cache(batch, heads_q, heads_kv, d, block_size,
                                                                   [context] * batch, dtype, device),
            fns=fns, baseline="torch", bytes=kv_bytes + 2 * batch * heads_q * d * dtype.itemsize,
            flops=0,
            reference=lambda q, kc, vc, table, lens: paged_attention_reference(q, kc, vc, table, lens,
                                                                                q.shape[-1] ** -0.5),
            size=context))
    return cases
