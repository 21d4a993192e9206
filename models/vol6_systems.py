"""Volume 6, AI systems: serving TinyLlama with a paged KV cache (PagedAttention's memory layout).

Three ways to get the same logits: full recomputation (one forward over the whole sequence), a contiguous
KV cache (vol2_llm.KVCache: one (max_seq_len) slab per sequence) and a paged KV cache: keys and values live
in a pool of fixed-size blocks, each sequence owns a block table mapping logical block i (positions
i·block_size .. (i+1)·block_size − 1) to a physical block, allocated on demand from a free list, so memory
grows with the tokens actually held instead of the maximum length. The attention here gathers the blocks
back through the table in plain torch: the oracle for a paged decode-attention kernel.

`int4_tiny_llama` swaps every nn.Linear for gf.quant's Int4Linear (RTN, or GPTQ/AWQ calibrated on
synthetic text); the tied output head stays in floating point. It is registered as `int4_tiny_llama`, an
inference-only entry (scored by the LM loss, never trained).

gpuforge ops exercised: paged_attention for decode steps (`decode_backend`), int4_matmul (quantized layers),
flash_attention over the gathered cache (through `gf.kernelize`). Parallel strategy: TP for serving (heads
split across ranks).
"""

from __future__ import annotations

import torch

from gpuforge.kernels.paged_attention import paged_attention
from gpuforge.models._layers import Attention, ReferenceModel
from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig, loss_fn, make_batch
from gpuforge.quant import quantize_model


class PagedKVCache:
    """A block pool shared by a batch of sequences, addressed through per-sequence block tables.

    k_pool, v_pool: (n_layers, num_blocks, block_size, Hkv, D) (per layer, gf.paged_attention's layout).
    block_tables: (B, max_blocks) int64, −1 where no block is assigned yet. decode_backend: when set, single-token
    decode steps call gf.paged_attention with that backend instead of gathering the blocks in torch. Blocks
    are handed out from a free list in a seeded random order, so a sequence's blocks are scattered through
    the pool and every read really goes through the table. `attend` has the same
    contract as KVCache.attend, so vol2_llm.generate and TinyLlama.forward accept either cache."""

    def __init__(self, config: TinyLlamaConfig, batch_size: int, *, num_blocks: int, block_size: int = 16,
                 dtype=torch.float32, device="cpu", seed: int = 0, decode_backend: str | None = None):
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"block_size and num_blocks must be >= 1, got {block_size} and {num_blocks}")
        self.block_size, self.decode_backend = block_size, decode_backend
        shape = (config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim)
        self.k_pool = torch.zeros(shape, dtype=dtype, device=device)
        self.v_pool = torch.zeros(shape, dtype=dtype, device=device)
        max_blocks = -(-config.max_seq_len // block_size)
        self.block_tables = torch.full((batch_size, max_blocks), -1, dtype=torch.int64, device=device)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.free_blocks = order.tolist()
        self.seq_len = 0

    @property
    def blocks_in_use(self) -> int:
        return int((self.block_tables >= 0).sum())

    def _reserve(self, length: int):
        """Give every sequence enough blocks to hold `length` positions."""
        needed = -(-length // self.block_size)
        if needed > self.block_tables.shape[1]:
            raise ValueError(f"length {length} exceeds the block table ({self.block_tables.shape[1]} blocks)")
        for row in self.block_tables:
            for i in range(needed):
                if row[i] < 0:
                    if not self.free_blocks:
                        raise RuntimeError("paged KV cache out of blocks; free a sequence or grow num_blocks")
                    row[i] = self.free_blocks.pop()

    def free(self, seq: int):
        """Return sequence `seq`'s blocks to the pool."""
        row = self.block_tables[seq]
        self.free_blocks += row[row >= 0].tolist()
        row.fill_(-1)

    def _slots(self, start: int, end: int):
        """(physical block, offset) of positions start .. end − 1 for every sequence: two (B, end − start)."""
        pos = torch.arange(start, end, device=self.block_tables.device)
        offsets = (pos % self.block_size).expand(len(self.block_tables), -1)
        return self.block_tables[:, pos // self.block_size], offsets

    def attend(self, layer: int, q, k, v, start_pos: int, attention: Attention):
        end = start_pos + k.shape[2]
        self._reserve(end)
        blocks, offsets = self._slots(start_pos, end)
        self.k_pool[layer][blocks, offsets] = k.transpose(1, 2)  # (B, S, Hkv, D) slots
        self.v_pool[layer][blocks, offsets] = v.transpose(1, 2)
        self.seq_len = max(self.seq_len, end)
        if self.decode_backend is not None and q.shape[2] == 1:
            lens = torch.full((q.shape[0],), end, dtype=torch.int32, device=q.device)
            table = self.block_tables.clamp(min=0).to(torch.int32)  # entries past seq_lens are never read
            out = paged_attention(q[:, :, 0], self.k_pool[layer], self.v_pool[layer], table, lens,
                                     backend=self.decode_backend)
            return out[:, :, None]
        blocks, offsets = self._slots(0, end)
        keys = self.k_pool[layer][blocks, offsets].transpose(1, 2)
        values = self.v_pool[layer][blocks, offsets].transpose(1, 2)
        return attention(q, keys, values, causal=True)


def new_paged_cache(model: TinyLlama, batch_size: int, *, num_blocks: int, block_size: int = 16,
                    seed: int = 0, decode_backend: str | None = None) -> PagedKVCache:
    p = model.tok_embeddings.weight
    return PagedKVCache(model.config, batch_size, num_blocks=num_blocks, block_size=block_size,
                        dtype=p.dtype, device=p.device, seed=seed, decode_backend=decode_backend)


@torch.no_grad()
def incremental_logits(model: TinyLlama, tokens: torch.Tensor, prefill: int, cache) -> torch.Tensor:
    """Logits for every position of tokens (B, S): the first `prefill` positions in one forward into the
    cache, then one decode step per remaining position. Equals model(tokens) for any correct cache."""
    pieces = [model(tokens[:, :prefill], cache, 0)]
    pieces += [model(tokens[:, t:t + 1], cache, t) for t in range(prefill, tokens.shape[1])]
    return torch.cat(pieces, dim=1)


def kv_cache_bytes(cache) -> int:
    """Bytes of key/value storage the cache holds for its sequences: the whole slab for a contiguous cache,
    only the assigned blocks for a paged one."""
    if isinstance(cache, PagedKVCache):
        block_bytes = cache.k_pool[:, 0].numel() * cache.k_pool.element_size()
        return 2 * cache.blocks_in_use * block_bytes
    return 2 * cache.k.numel() * cache.k.element_size()


def int4_tiny_llama(model: TinyLlama, group_size: int = 128, method: str = "rtn", calibration_seed: int = 1000):
    """Quantize TinyLlama's linear layers to int4 in place through gf.quant.quantize_model; GPTQ and AWQ
    calibrate on 8 synthetic sequences of 64 bytes (seed `calibration_seed`). Returns the model."""
    calibration = None if method == "rtn" else [make_batch(calibration_seed, 8, 64)[0]]
    return quantize_model(model, method, calibration=calibration, group_size=group_size)


def default_int4_tiny_llama() -> TinyLlama:
    """A default TinyLlama (its N(0, 0.02) initialisation) with every linear layer RTN-quantized, groups of 64."""
    return int4_tiny_llama(TinyLlama(), group_size=64)


REFERENCE_MODELS = {
    # int4 weights are frozen buffers: evaluated (float32, the LM loss), not trained
    "int4_tiny_llama": ReferenceModel(default_int4_tiny_llama, make_batch, loss_fn, inference_only=True),
}
