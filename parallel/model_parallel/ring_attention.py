"""Ring attention (Liu et al. 2023) over the ranks of a context-parallel group, with zigzag load balancing.

Each of the n ranks holds a slice of the sequence for q, k and v. K and V travel around the ring: at step s
rank r holds the K/V of rank (r − s) mod n, attends its queries to them with gf.flash_attention_with_lse and
folds the block into its output by the blocks' log-sum-exps (out = Σᵢ exp(lseᵢ − lse)·outᵢ,
lse = logsumexp(lseᵢ)). The exchange for step s + 1 is posted before step s is computed, so the transfer
overlaps the block. Forward: n − 1 sends of K and of V per rank.

Causal attention uses the zigzag layout: the sequence is cut into 2n chunks and rank r holds chunks r and
2n − 1 − r, so every rank does the same work. Against the K/V of rank src:
  src == r: the two local chunks, causal (bottom-right on a square block is the global mask there);
  src < r:  every local query sees the first K/V chunk of src fully, the second not at all;
  src > r:  the second local query chunk sees both K/V chunks of src fully, the first sees none.
Off the diagonal each step is half a block of work, without a mask.

Backward, from the saved output, the final LSE and each step's block LSE: the block's gradients are those of
flash_attention_backward for dout·exp(lseᵢ − lse) against the final output, which is exp(S − lse)-weighted
as in one process whatever way a backend recomputes the block's probabilities. K and V go around the ring
again (n − 1 sends each) while the dK/dV accumulator of each block travels with it and returns to its owner
(n sends each). GQA: k and v have Hkv heads, q has a multiple of them; dK/dV are summed over the group.
"""

from __future__ import annotations

import torch

from gpuforge.kernels.flash_attention import flash_attention_backward, flash_attention_with_lse


def zigzag_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The global positions rank `rank` of `cp` holds: chunks rank and 2·cp − 1 − rank of 2·cp (all of them
    for cp = 1)."""
    if cp == 1:
        return torch.arange(seq_len)
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len: {seq_len} must be divisible by 2·cp = {2 * cp} (zigzag: two chunks per rank)")
    c = seq_len // (2 * cp)
    return torch.cat((torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * cp - 1 - rank) * c,
                                                                           (2 * cp - rank) * c)))


def zigzag_shard(x: torch.Tensor, dim: int, cp: int, rank: int) -> torch.Tensor:
    """This rank's zigzag slice of `x` along `dim`."""
    return x.index_select(dim, zigzag_positions(x.shape[dim], cp, rank).to(x.device))


def _block(src: int, rank: int, length: int, causal: bool) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of the block against rank src's K/V (see the module docstring)."""
    every, half = slice(0, length), length // 2
    if not causal:
        return every, every, False
    if src == rank:
        return every, every, True
    if src < rank:
        return every, slice(0, half), False
    return slice(half, length), every, False


def _accumulate(out, lse, rows, block_out, block_lse) -> None:
    """Fold one block's (output, LSE) into the running ones on `rows`, in place."""
    old = lse[:, :, rows]
    new = torch.logaddexp(old, block_lse)
    out[:, :, rows] = out[:, :, rows] * torch.exp(old - new)[..., None] + \
        block_out.to(out.dtype) * torch.exp(block_lse - new)[..., None]
    lse[:, :, rows] = new


class RingAttention(torch.autograd.Function):
    """out = attention(q, k, v) over the ring; q (B, Hq, L, D), k/v (B, Hkv, L, D) are this rank's slices."""

    @staticmethod
    def forward(ctx, q, k, v, comm, causal, scale, backend):
        n, rank, length = comm.size, comm.rank, q.shape[2]
        out = torch.zeros(q.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=out.dtype, device=q.device)
        kv, block_lses = (k, v), []
        for step in range(n):
            if step + 1 < n:
                next_kv, work = comm.ring_exchange(kv)  # posted before the block is computed
            rows, cols, block_causal = _block((rank - step) % n, rank, length, causal)
            block_out, block_lse = flash_attention_with_lse(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                                            causal=block_causal, scale=scale, backend=backend)
            _accumulate(out, lse, rows, block_out, block_lse)
            block_lses.append(block_lse)
            if step + 1 < n:
                work.wait()
                kv = next_kv
        out = out.to(q.dtype)
        ctx.comm, ctx.causal, ctx.scale, ctx.backend = comm, causal, scale, backend
        ctx.save_for_backward(q, k, v, out, lse, *block_lses)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *block_lses = ctx.saved_tensors
        comm, n, rank, length = ctx.comm, ctx.comm.size, ctx.comm.rank, q.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv, dkv, dkv_work = (k, v), None, None
        for step in range(n):
            if step + 1 < n:
                next_kv, kv_work = comm.ring_exchange(kv)
            rows, cols, block_causal = _block((rank - step) % n, rank, length, ctx.causal)
            weight = torch.exp(block_lses[step] - lse[:, :, rows])[..., None].to(dout.dtype)
            dq_b, dk_b, dv_b = flash_attention_backward(
                dout[:, :, rows] * weight, q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], out[:, :, rows],
                block_lses[step], causal=block_causal, scale=ctx.scale, backend=ctx.backend)
            dq[:, :, rows] += dq_b
            if dkv_work is None:
                dkv = [torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2)]
            else:
                dkv_work.wait()
            dkv[0][:, :, cols] += dk_b
            dkv[1][:, :, cols] += dv_b
            dkv, dkv_work = comm.ring_exchange(dkv)  # the accumulator moves on with the K/V it belongs to
            if step + 1 < n:
                kv_work.wait()
                kv = next_kv
        dkv_work.wait()  # after n moves each accumulator is back on the rank that owns its K/V
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm, *, causal: bool = False,
                   scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence's keys; `comm` a GroupComm of the CP group.
    causal: the slices must be the zigzag ones (zigzag_shard), of even length. `backend`: gf.flash_attention's
    for every block."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q, k, v: expected (B, H, L, D) with k and v of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"k: expected this rank's {q.shape[2]} positions (those of q), got {k.shape[2]}")
    if causal and comm.size > 1 and q.shape[2] % 2:
        raise ValueError(f"q: causal ring attention needs the zigzag slices (two equal chunks), got length "
                         f"{q.shape[2]}")
    if comm.size == 1:
        return flash_attention_with_lse(q, k, v, causal=causal, scale=scale, backend=backend)[0]
    return RingAttention.apply(q, k, v, comm, causal, scale, backend)
