"""gf.paged_attention: decode attention (one or a few new query tokens per sequence) against a paged KV cache.

q (B, Hq, D) for one new token, or (B, Hq, Sq, D) for Sq new tokens (speculative verification, chunked decode);
k_cache, v_cache (num_blocks, block_size, Hkv, D) pages shared by all sequences; block_table
(B, max_blocks) int32: sequence b's token t lives in page block_table[b, t // block_size], row t % block_size
(vLLM's PagedAttention layout); seq_lens (B,) int32 tokens per sequence (0 gives a zero output). The query sees
every cached token of its sequence (decode: the new tokens' K/V are already in the cache, as its last Sq
tokens); with Sq > 1, new token i sees the first seq_lens[b] − (Sq − 1 − i) tokens (causal, bottom-right aligned
as in gf.flash_attention). seq_lens[b] must lie in 0..max_blocks·block_size. Hq % Hkv == 0 (GQA).
Inference only: no autograd. The Triton kernel splits the context (flash-decoding) and merges the splits.
"""

from __future__ import annotations

import math

import torch

from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_tensor
from gpuforge.kernels.dispatch import Implementation, OpBackends
from gpuforge.kernels.flash_attention import MAX_HEAD_DIM, attention_math

# Every backend: forward(q, k_cache, v_cache, block_table, seq_lens, scale) -> q's shape, contiguous.


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """Sequence b's first `length` cached rows as (Hkv, length, D), gathered page by page."""
    block_size = cache.shape[1]
    pages = block_table[b, :-(-length // block_size)].long()
    return cache[pages].reshape(-1, *cache.shape[2:])[:length].transpose(0, 1)


def paged_attention_reference(q, k_cache, v_cache, block_table, seq_lens, scale):
    """The torch backend: gather each sequence's pages, then plain softmax attention (float64-capable);
    q (B, Hq, D) or (B, Hq, Sq, D), causal among the Sq new tokens."""
    q4 = q if q.dim() == 4 else q.unsqueeze(2)
    out = torch.zeros_like(q4)
    for b, length in enumerate(seq_lens.tolist()):
        if length:
            k, v = gather_kv(k_cache, block_table, b, length), gather_kv(v_cache, block_table, b, length)
            out[b] = attention_math(q4[b][None], k[None], v[None], scale, -1, 0)[0][0]
    return out if q.dim() == 4 else out.squeeze(2)


def _triton():
    from gpuforge.kernels.triton import paged_attention

    return paged_attention


REFERENCE = Implementation(forward=paged_attention_reference)
BACKENDS = OpBackends(op="paged_attention", loaders={"torch": lambda: REFERENCE, "triton": _triton},
                      auto_order=("triton",))


@torch.library.custom_op("gpuforge::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    return BACKENDS.impl(backend).forward(q, k_cache, v_cache, block_table, seq_lens, scale)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def check_paged_indices(block_table: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int,
                        block_size: int) -> None:
    """The kernels' memory safety: 0 <= seq_lens <= max_blocks·block_size, and every page a sequence uses (the
    first ceil(seq_lens[b] / block_size) entries of its row) lies in 0 .. num_blocks − 1. Entries past a
    sequence's length are never read and may hold anything (−1 for unassigned, as serving allocators leave
    them). All of it is computed on the tensors' device and read back with one host sync; skipped while
    torch.compile traces (there the caller's tensors are trusted)."""
    if torch.compiler.is_compiling() or seq_lens.numel() == 0:
        return
    capacity = block_table.shape[1] * block_size
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] \
        < (seq_lens.long()[:, None] + block_size - 1) // block_size
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    lo, hi, n_bad = torch.stack([seq_lens.min().long(), seq_lens.max().long(), bad.sum()]).tolist()
    if lo < 0 or hi > capacity:
        raise ValueError(f"seq_lens: expected values in 0..{capacity} (block_table.shape[1] x block_size), "
                         f"got min {lo}, max {hi}")
    if n_bad:
        b, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"block_table: {n_bad} page number(s) used by seq_lens lie outside the cache's "
                         f"0..{num_blocks - 1}; first at [{b}, {i}] = {int(block_table[b, i])} "
                         f"(seq_lens[{b}] = {int(seq_lens[b])}, block_size {block_size})")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, *, scale: float | None = None, check_inputs: bool = True,
                    backend: str = "auto") -> torch.Tensor:
    """softmax(q·Kᵀ·scale)·V per sequence over its seq_lens[b] cached tokens; returns q's shape.

    block_table and seq_lens may have any strides. check_inputs=True (the default) verifies that every page
    the sequences use lies inside the cache and that seq_lens fits the table, with one host sync per call
    (`check_paged_indices`); False skips that sync and makes the caller responsible: an out-of-range page
    then reads outside the cache."""
    check_tensor(q, "q")
    if q.dim() not in (3, 4):
        raise ValueError(f"q: expected a (B, Hq, D) or (B, Hq, Sq, D) tensor, got shape {tuple(q.shape)}")
    check_tensor(k_cache, "k_cache", ndim=4)
    check_tensor(v_cache, "v_cache", ndim=4)
    check_tensor(block_table, "block_table", dtypes=(torch.int32,), ndim=2)
    check_tensor(seq_lens, "seq_lens", dtypes=(torch.int32,), ndim=1)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    batch, heads_q, head_dim = q.shape[0], q.shape[1], q.shape[-1]
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {tuple(k_cache.shape)} (that of k_cache), "
                         f"got {tuple(v_cache.shape)}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: expected head dim D={head_dim} (that of q), got shape {tuple(k_cache.shape)}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim D={head_dim} unsupported; expected 1..{MAX_HEAD_DIM}")
    heads_kv = k_cache.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"k_cache: the number of query heads Hq={heads_q} must be a multiple of the number of "
                         f"KV heads Hkv={heads_kv} (k_cache is (num_blocks, block_size, Hkv, D))")
    if block_table.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(f"block_table, seq_lens: expected batch {batch} (that of q), got {block_table.shape[0]} "
                         f"and {seq_lens.shape[0]}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    if not isinstance(check_inputs, bool):
        raise TypeError(f"check_inputs: expected a bool, got {type(check_inputs).__name__}")
    if check_inputs:
        check_paged_indices(block_table, seq_lens, k_cache.shape[0], k_cache.shape[1])
    return _paged_attention_op(q, k_cache, v_cache, block_table, seq_lens, float(scale),
                               BACKENDS.select(backend, q.device, dtype=q.dtype))


def random_paged_cache(batch: int, heads_q: int, heads_kv: int, head_dim: int, block_size: int,
                       seq_lens: list[int], dtype=torch.float32, device="cpu", generator=None):
    """Inputs for tests and benchmarks: pages shuffled across sequences, as a serving allocator leaves them."""
    max_blocks = max(1, max(-(-n // block_size) for n in seq_lens))
    num_blocks = batch * max_blocks + 1
    order = torch.randperm(num_blocks, generator=generator)[:batch * max_blocks]
    block_table = order.view(batch, max_blocks).to(device=device, dtype=torch.int32)

    def rand(*shape):  # drawn on the device unless a (CPU) generator fixes the values
        if generator is None:
            return torch.randn(*shape, device=device).to(dtype)
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    q = rand(batch, heads_q, head_dim)
    k_cache = rand(num_blocks, block_size, heads_kv, head_dim)
    v_cache = rand(num_blocks, block_size, heads_kv, head_dim)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, block_table, lens


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)):
        inputs = random_paged_cache(3, 4, 2, 64, 16, [1, 37, 100], dtype, device,
                                    torch.Generator().manual_seed(0))
        cases.append(CheckCase(
            "paged_attention", f"{str(dtype).removeprefix('torch.')} B3 Hq4 Hkv2 D64 block16 lens(1,37,100)",
            run=lambda backend, inputs=inputs: paged_attention(*inputs, backend=backend),
            reference=lambda inputs=inputs: paged_attention_reference(
                inputs[0].double(), inputs[1].double(), inputs[2].double(), *inputs[3:], 0.125),
            tol=tol, dtype=dtype))
    return cases
