"""transformers' attention registry entry "gpuforge": HF attention layers computed by gf.flash_attention and
gf.flash_attention_varlen, selected with `attn_implementation="gpuforge"` (`register()` adds it).

HF builds one mask per forward (per layer type) through its AttentionMaskInterface and hands it to every
layer. Ours, `gpuforge_mask`, materialises the boolean mask HF's SDPA path would use (transformers'
`sdpa_mask`: causal, sliding window, padding, packed sequences from resetting position_ids) and checks that
the kernels can compute it exactly: each sequence is a contiguous run of the kept keys, each kept query sees
the keys of its own sequence up to itself (bottom-right aligned, as gf's causal), and, for a sliding window
of size w, only the last w of them. It returns a `MaskLayout`: "dense" (one sequence per row, no padding:
one gf.flash_attention call, which also covers the KV-cache decode step, whose queries are the last keys)
or the gather indices and cu_seqlens of the packed (varlen) form. Any other layout (a bidirectional overlay, a
hole in a windowed sequence, a 4-D mask handed in by the caller) raises ValueError: never silently
different scores. Padding queries (a 0 in the 2-D mask) get zeros, as FlashAttention-2's unpadding gives.

The check evaluates the mask on the (batch, q, kv) grid once per forward, as HF's own SDPA mask does, and
reads back a few sizes (one host sync). Not supported, with an error: attention-logit softcapping (Gemma 2;
gf.flash_attention has no softcap), attention dropout, attention sinks, non-causal layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gpuforge.kernels.flash_attention import flash_attention, flash_attention_varlen

NAME = "gpuforge"


@dataclass(frozen=True)
class MaskLayout:
    """What gpuforge_mask found: the mask's shape, the sliding windows (HF's sizes, None = unbounded) it was
    checked against, and for a non-dense layout the packed form: flat row indices of the kept queries
    (into batch·q) and keys (into batch·kv), int32 cu_seqlens, the longest sequence of each."""

    batch: int
    q_length: int
    kv_length: int
    windows: frozenset
    dense: bool
    q_index: torch.Tensor | None = None
    k_index: torch.Tensor | None = None
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0


def _render(seg_q, seg_k, diag, rank_k, window):
    """The (B, q, kv) mask gf's varlen kernels compute: same sequence, key rank <= the query's diagonal
    rank, and within a window of `window` keys (HF's size: the query itself and the window − 1 before it)."""
    visible = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] > 0)
    visible &= rank_k[:, None, :] <= diag[:, :, None]
    if window is not None:
        visible &= rank_k[:, None, :] > diag[:, :, None] - window
    return visible


def _layout(full: torch.Tensor, query_kept: torch.Tensor, windows) -> MaskLayout:
    """Read a varlen layout off HF's boolean mask `full` (B, q, kv) for the kept queries (B, q); raise when
    none reproduces it for any of `windows`."""
    batch, q_len, kv_len = full.shape
    seen = full & query_kept[:, :, None]
    key_used = seen.any(1)
    # consecutive used keys belong to one sequence when some kept query sees both
    cols = torch.arange(kv_len, device=full.device).expand(batch, kv_len)
    last_used = torch.where(key_used, cols, -1).cummax(1).values
    prev = torch.nn.functional.pad(last_used[:, :-1], (1, 0), value=-1)
    seen_prev = seen.gather(2, prev.clamp(min=0)[:, None, :].expand(batch, q_len, kv_len))
    joined = (seen & seen_prev).any(1) & (prev >= 0)
    starts = key_used & ~joined
    seg_k = torch.cumsum(starts.flatten(), 0).view(batch, kv_len) * key_used
    last_seen = torch.where(seen, cols[:, None, :], -1).amax(2)
    seg_q = torch.where(last_seen >= 0, seg_k.gather(1, last_seen.clamp(min=0)), 0)
    n_seg = int(seg_k.max()) if key_used.any() else 0
    counts_k = torch.bincount(seg_k.flatten(), minlength=n_seg + 1)
    counts_q = torch.bincount(seg_q.flatten(), minlength=n_seg + 1)
    zero = counts_k.new_zeros(1)
    cu_k = torch.cat((zero, counts_k[1:].cumsum(0)))
    cu_q = torch.cat((zero, counts_q[1:].cumsum(0)))
    flat_q = seg_q.flatten()
    q_index = torch.argsort(torch.where(flat_q > 0, flat_q, n_seg + 1), stable=True)[:int(counts_q[1:].sum())]
    k_index = torch.nonzero(seg_k.flatten(), as_tuple=True)[0]
    rank_k = torch.zeros(batch * kv_len, dtype=torch.long, device=full.device)
    rank_k[k_index] = torch.arange(k_index.numel(), device=full.device) - cu_k[seg_k.flatten()[k_index] - 1]
    rank_q = torch.zeros(batch * q_len, dtype=torch.long, device=full.device)
    rank_q[q_index] = torch.arange(q_index.numel(), device=full.device) - cu_q[flat_q[q_index] - 1]
    # the key rank a query sits on: bottom-right alignment in its sequence
    diag = (rank_q + counts_k[flat_q] - counts_q[flat_q]).view(batch, q_len)
    rank_k = rank_k.view(batch, kv_len)
    matched = frozenset(w for w in windows if torch.equal(_render(seg_q, seg_k, diag, rank_k, w), seen))
    if not matched:
        raise ValueError("attention_mask: this mask layout cannot be computed by gf.flash_attention(_varlen): it "
                         "needs each sequence to be a contiguous run of kept keys attended causally (bottom-right) "
                         f"within a sliding window among {sorted(windows, key=str)}; use attn_implementation="
                         "'sdpa' for it")
    # dense: one sequence per row (a row's first used key always starts one), every query and key in it
    dense = n_seg == batch and bool(query_kept.all() and key_used.all() and (seg_q > 0).all())
    if dense:
        return MaskLayout(batch, q_len, kv_len, matched, True)
    return MaskLayout(batch, q_len, kv_len, matched, False, q_index, k_index, cu_q.to(torch.int32),
                      cu_k.to(torch.int32), int(counts_q[1:].max()) if n_seg else 0,
                      int(counts_k[1:].max()) if n_seg else 0)


@torch.compiler.disable  # data-dependent sizes: run eagerly, one graph break, instead of a dozen traced pieces
def gpuforge_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                  mask_function=None, attention_mask: torch.Tensor | None = None, config=None, **kwargs) -> MaskLayout:
    """AttentionMaskInterface entry: HF's mask for this forward as a MaskLayout (see the module docstring)."""
    options = {"mask_function": mask_function} if mask_function is not None else {}
    full = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, allow_is_causal_skip=False,
                     use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"), **options)
    full = full.expand(batch_size, 1, q_length, kv_length)[:, 0]
    query_kept = torch.ones(batch_size, q_length, dtype=torch.bool, device=full.device)
    if attention_mask is not None:
        positions = torch.arange(q_length, device=full.device) + q_offset
        inside = positions < attention_mask.shape[-1]
        kept = attention_mask.to(torch.bool)[:, positions.clamp(max=attention_mask.shape[-1] - 1)]
        query_kept = torch.where(inside, kept, True)
    window = getattr(config, "sliding_window", None) if config is not None else None
    return _layout(full, query_kept, {None, window})


def _window(sliding_window):
    """HF's sliding window (the query and the size − 1 keys before it) as gf's (left, right)."""
    return None if sliding_window is None else (int(sliding_window) - 1, 0)


def gpuforge_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, dropout: float = 0.0, scaling: float | None = None,
                       sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """AttentionInterface entry: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, Hq, D), None).
    The backend is the module's `gpuforge_backend` attribute (set by apply_gpuforge), else "auto"."""
    if softcap is not None:
        raise ValueError(f"softcap: gf.flash_attention has no attention-logit softcapping (got {softcap}); set the "
                         "config's attn_logit_softcapping to None or use attn_implementation='eager'")
    if dropout:
        raise ValueError(f"dropout: gf.flash_attention has no attention dropout (got {dropout}); set the config's "
                         "attention_dropout to 0.0")
    if kwargs.get("s_aux") is not None:
        raise ValueError("s_aux: gf.flash_attention has no attention sinks")
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        raise ValueError("is_causal: gpuforge attention is registered for causal (decoder) layers only")
    backend = getattr(module, "gpuforge_backend", "auto")
    options = {"scale": scaling, "causal": True, "window": _window(sliding_window), "backend": backend}
    batch, heads, q_len, head_dim = query.shape
    if attention_mask is None:
        # no mask at all: only HF's custom-mask paths skip the mask interface; a plain causal call is then right
        layout = MaskLayout(batch, q_len, key.shape[2], frozenset({sliding_window}), True)
    elif isinstance(attention_mask, MaskLayout):
        layout = attention_mask
    else:
        raise ValueError(f"attention_mask: gpuforge attention takes the mask HF builds for it (2-D padding masks, "
                         f"packed position_ids); got a {type(attention_mask).__name__} of shape "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}; use attn_implementation='sdpa' for it")
    built_for = (layout.batch, layout.q_length, layout.kv_length)
    if built_for != (batch, q_len, key.shape[2]):
        raise ValueError(f"attention_mask: built for (batch, q, kv) = {built_for}, got q {tuple(query.shape)} and "
                         f"k {tuple(key.shape)}")
    if sliding_window not in layout.windows:
        raise ValueError(f"sliding_window: the mask was checked for windows {sorted(layout.windows, key=str)}, "
                         f"not for this layer's {sliding_window}")
    if kwargs.get("cu_seq_lens_q") is not None and layout.dense:
        return _packed_by_offsets(query, key, value, kwargs, options), None
    if layout.dense:
        return flash_attention(query, key, value, **options).transpose(1, 2).contiguous(), None
    q_rows = query.transpose(1, 2).reshape(batch * q_len, heads, head_dim).index_select(0, layout.q_index)
    k_rows, v_rows = (t.transpose(1, 2).reshape(batch * key.shape[2], key.shape[1], head_dim)
                      .index_select(0, layout.k_index) for t in (key, value))
    packed = flash_attention_varlen(q_rows, k_rows, v_rows, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k,
                                    check_inputs=False, **options)
    out = packed.new_zeros(batch * q_len, heads, head_dim).index_copy(0, layout.q_index, packed)
    return out.view(batch, q_len, heads, head_dim), None


def _packed_by_offsets(query, key, value, kwargs, options):
    """FlashAttention-style packing: one row holding the sequences that cu_seq_lens_q/k delimit."""
    if query.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q: packed sequences come in one row, got batch {query.shape[0]}")
    cu_q = kwargs["cu_seq_lens_q"].to(torch.int32)
    cu_k = kwargs["cu_seq_lens_k"].to(torch.int32) if kwargs.get("cu_seq_lens_k") is not None else cu_q
    max_q = int(kwargs.get("max_length_q") or query.shape[2])
    max_k = int(kwargs.get("max_length_k") or key.shape[2])
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    return flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **options).unsqueeze(0)


def register() -> None:
    """Make "gpuforge" an attention implementation (and its mask builder) in transformers' registries."""
    AttentionInterface.register(NAME, gpuforge_attention)
    AttentionMaskInterface.register(NAME, gpuforge_mask)
