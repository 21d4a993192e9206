"""Volume 2, large language models: TinyLlama (the central oracle), TinyMoE and LoRA.

TinyLlama is a byte-level (vocab 256) decoder: pre-RMSNorm, rotary position embeddings, grouped-query
attention, a SwiGLU feed-forward and an output head tied to the token embedding. The default sizes (dim 128,
8 query / 4 key-value heads of 16, hidden 384, 2 layers) are divisible by int4 groups 32/64/128 and by
tensor-parallel degrees 2 and 4. It decodes with a KV cache (`forward(tokens, cache, start_pos)`), samples
greedily or with temperature / top-k / top-p, runs beam search, and speculative decoding with the exact
acceptance rule min(1, p/q) and residual resampling from max(0, p − q). TinyMoE swaps the feed-forward for
a top-2 mixture of experts with the load-balancing loss α·N·Σ fᵢPᵢ (per sequence); LoRALinear adds (α/r)·BA
with B = 0.

gpuforge ops exercised (through `kernelize`): rms_norm, flash_attention (causal, GQA, Sq ≠ Sk when
decoding), softmax, matmul, int4_matmul (vol6). Parallel strategies: DDP, ZeRO, TP (column/row splits of
wq/wk/wv/wo and w1/w3/w2, vocab-parallel embedding), PP (the blocks are a sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.models._layers import (
    Attention,
    ReferenceModel,
    RMSNorm,
    RotaryEmbedding,
    Softmax,
    SwiGLU,
)


@dataclass
class TinyLlamaConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 4
    hidden_dim: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    n_experts: int = 0  # > 0: a top-k mixture of experts replaces each feed-forward (TinyMoE)
    moe_top_k: int = 2
    aux_loss_coef: float = 0.01

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def small(cls, **overrides) -> TinyLlamaConfig:
        """Half the default width (dim 64, 4 query over 2 key/value heads, hidden 128): the size of the models
        built on TinyLlama (TinyMoE, LoRA, TinyLlava), so their tests stay fast."""
        return cls(**{"dim": 64, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128, **overrides})


# ----------------------------------------------------------------------------------------------- KV cache

class KVCache:
    """Contiguous KV cache: per layer, keys and values of shape (B, Hkv, max_seq_len, D), filled in order.

    `attend` writes the new keys/values at positions start_pos .. start_pos + S − 1 and runs causal attention
    of the new queries over every cached position (the last query aligned with the last key)."""

    def __init__(self, config: TinyLlamaConfig, batch_size: int, *, dtype=torch.float32, device="cpu",
                 max_seq_len: int | None = None):
        length = max_seq_len or config.max_seq_len
        shape = (config.n_layers, batch_size, config.n_kv_heads, length, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def attend(self, layer: int, q, k, v, start_pos: int, attention: Attention):
        end = start_pos + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"cache holds {self.k.shape[3]} positions, asked to write up to {end}")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], causal=True)


# ----------------------------------------------------------------------------------------------- layers

class GQAttention(nn.Module):
    """Grouped-query self-attention with RoPE: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, config: TinyLlamaConfig, rope: RotaryEmbedding):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.attn = Attention()
        self.rope = [rope]  # shared tables; a list keeps them out of this module's children

    def forward(self, x, start_pos: int = 0, cache: KVCache | None = None, layer: int = 0):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        rope = self.rope[0]
        q, k = rope(q, start_pos), rope(k, start_pos)
        if cache is None:
            out = self.attn(q, k, v, causal=True)
        else:
            out = cache.attend(layer, q, k, v, start_pos, self.attn)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class MoEFeedForward(nn.Module):
    """Top-k mixture of SwiGLU experts. The router's softmax picks k experts per token, whose outputs are
    mixed with the renormalised router weights. After each forward, `aux_loss` holds the load-balancing loss
    α·N·Σᵢ fᵢPᵢ (fᵢ: fraction of token→expert assignments that went to expert i, Pᵢ: mean router probability
    of expert i); it equals α when the load is uniform and grows as routing collapses.

    fᵢ and Pᵢ are taken per sequence (dim −2 of x) and the loss averaged over sequences (the sequence-wise
    balance loss of DeepSeek-V3): batch-wide fᵢPᵢ is a product of two batch means, which would couple the
    samples, so a data-parallel slice of the batch would see a different loss. Every expert runs, on an
    empty set of tokens if the router chose it for none, so every expert is in the autograd graph and gets a
    (zero) gradient on every rank, as data parallelism needs."""

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int = 2, aux_loss_coef: float = 0.01):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.top_k, self.aux_loss_coef = top_k, aux_loss_coef
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.softmax = Softmax(dim=-1)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., S, dim) -> (..., S, dim)."""
        flat = x.reshape(-1, x.shape[-1])
        probs = self.softmax(self.router(flat))
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, token, weights[token, slot, None] * expert(flat[token]))
        n, seq_len = len(self.experts), x.shape[-2]
        assigned = F.one_hot(chosen, n).sum(-2).to(probs.dtype).view(-1, seq_len, n)  # (sequences, S, N)
        fraction = assigned.mean(-2) / self.top_k
        mean_prob = probs.view(-1, seq_len, n).mean(-2)
        self.aux_loss = self.aux_loss_coef * n * (fraction * mean_prob).sum(-1).mean()
        return out.view_as(x)


class Block(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, config: TinyLlamaConfig, rope: RotaryEmbedding):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = GQAttention(config, rope)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        if config.n_experts:
            self.feed_forward = MoEFeedForward(config.dim, config.hidden_dim, config.n_experts,
                                               config.moe_top_k, config.aux_loss_coef)
        else:
            self.feed_forward = SwiGLU(config.dim, config.hidden_dim)

    def forward(self, x, start_pos: int = 0, cache: KVCache | None = None, layer: int = 0):
        h = x + self.attention(self.attention_norm(x), start_pos, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class TinyLlama(nn.Module):
    """Byte-level Llama. forward(tokens (B, S) int64, cache=None, start_pos=0) -> logits (B, S, vocab).

    With a cache, `tokens` are the positions start_pos .. start_pos + S − 1 and earlier positions come from
    the cache. `inputs_embeds` (B, S, dim) replaces the token embedding (a LLaVA projector uses it)."""

    def __init__(self, config: TinyLlamaConfig | None = None):
        super().__init__()
        self.config = config = config or TinyLlamaConfig()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(Block(config, self.rope) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.reset_parameters()

    def reset_parameters(self):
        """N(0, 0.02) everywhere; the residual outputs (wo, w2) scaled by 1/sqrt(2·n_layers) (GPT-2)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens=None, cache: KVCache | None = None, start_pos: int = 0, *, inputs_embeds=None):
        h = self.tok_embeddings(tokens) if inputs_embeds is None else inputs_embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, cache, i)
        return F.linear(self.norm(h), self.tok_embeddings.weight)  # tied output head

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the last forward (0 for a dense model)."""
        losses = [layer.feed_forward.aux_loss for layer in self.layers
                  if isinstance(layer.feed_forward, MoEFeedForward)]
        return sum(losses) if losses else torch.zeros(())

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.config, batch_size, dtype=p.dtype, device=p.device, max_seq_len=max_seq_len)


class TinyMoE(TinyLlama):
    """TinyLlama whose feed-forwards are top-2 mixtures of SwiGLU experts (defaults: TinyLlamaConfig.small
    with 4 experts of hidden size 128)."""

    def __init__(self, config: TinyLlamaConfig | None = None):
        config = config or TinyLlamaConfig.small(n_experts=4, moe_top_k=2)
        if config.n_experts < 2:
            raise ValueError(f"TinyMoE needs n_experts >= 2, got {config.n_experts}")
        super().__init__(config)


# ----------------------------------------------------------------------------------------------- data, loss

_SUBJECTS = ("the cat", "a dog", "the bird", "my friend", "the robot", "a child", "the old man", "our team")
_VERBS = ("sees", "likes", "eats", "finds", "chases", "builds", "paints", "carries")
_OBJECTS = ("the ball", "a fish", "the tree", "some bread", "the moon", "a red box", "the river", "an apple")


def synthetic_text(generator: torch.Generator, n_chars: int) -> bytes:
    """Sentences 'subject verb object. ' from a small grammar: spelling and word order are learnable."""
    out = bytearray()
    while len(out) < n_chars:
        words = [w[torch.randint(len(w), (1,), generator=generator).item()]
                 for w in (_SUBJECTS, _VERBS, _OBJECTS)]
        out += (" ".join(words) + ". ").encode()
    return bytes(out)


def make_batch(seed: int, batch_size: int, seq_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (batch_size, seq_len) int64 bytes; targets are inputs shifted by one."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch_size):
        text = synthetic_text(generator, seq_len + 40)
        start = torch.randint(20, (1,), generator=generator).item()
        rows.append(torch.tensor(list(text[start:start + seq_len + 1]), dtype=torch.int64))
    data = torch.stack(rows)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in at least float32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def loss_fn(model: TinyLlama, batch) -> torch.Tensor:
    """Cross-entropy, plus the MoE load-balancing loss when the model has experts."""
    inputs, targets = batch
    loss = lm_loss(model(inputs), targets)
    if model.config.n_experts:
        loss = loss + model.aux_loss()
    return loss


# ----------------------------------------------------------------------------------------------- sampling

def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The distribution a sampler draws from, (..., V): temperature 0 is greedy (one-hot argmax); top_k keeps
    the k largest logits; top_p keeps the smallest set of most likely tokens whose mass reaches top_p."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,)."""
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: TinyLlama, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             cache=None) -> torch.Tensor:
    """Prefill the prompt (B, S0) into a KV cache, then decode one token at a time. -> (B, S0 + new)."""
    cache = cache if cache is not None else model.new_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    tokens = prompt
    logits = model(prompt, cache, 0)[:, -1]
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if step + 1 < max_new_tokens:
            logits = model(nxt[:, None], cache, tokens.shape[1])[:, -1]
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return tokens


@torch.no_grad()
def sequence_logprob(model: TinyLlama, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Σ log p(token_t | tokens_<t) over the generated part (t ≥ prompt_len), per row."""
    logp = torch.log_softmax(model(tokens[:, :-1]).double(), dim=-1)
    picked = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return picked[:, prompt_len - 1:].sum(-1)


@torch.no_grad()
def beam_search(model: TinyLlama, prompt: torch.Tensor, beam_width: int, max_new_tokens: int):
    """Keep the beam_width most likely continuations of prompt (1, S0) by summed log-probability (no length
    penalty, no end token). -> (best tokens (1, S0 + new), its log-probability)."""
    beams, scores = prompt, torch.zeros(1, dtype=torch.float64, device=prompt.device)
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(model(beams)[:, -1].double(), dim=-1)
        total = (scores[:, None] + logp).flatten()
        scores, flat = total.topk(min(beam_width, total.numel()))
        vocab = logp.shape[-1]
        beams = torch.cat([beams[flat // vocab], (flat % vocab)[:, None]], dim=1)
    return beams[:1], scores[0]


def speculative_verify(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The exact acceptance step of speculative sampling (Leviathan et al. 2023, Chen et al. 2023).

    p: (γ + 1, V) target probabilities at the γ draft positions and one beyond; q: (γ, V) the draft's;
    draft_tokens: (γ,) sampled from q. Draft token x at position i is accepted with probability
    min(1, p_i(x) / q_i(x)); at the first rejection the token is resampled from max(0, p_i − q_i) normalised
    and the rest discarded; if all γ are accepted, one more token is drawn from p_γ. The returned tokens are
    distributed exactly as sampling from the target alone."""
    out = []
    for i, x in enumerate(draft_tokens.tolist()):
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        if u * q[i, x].item() < p[i, x].item():  # u < p/q without dividing
            out.append(x)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if residual.sum() <= 0:  # p == q up to rounding: any draw from p is exact
            residual = p[i]
        out.append(torch.multinomial(residual / residual.sum(), 1, generator=generator).item())
        return torch.tensor(out, dtype=torch.int64, device=p.device)
    out.append(torch.multinomial(p[-1], 1, generator=generator).item())
    return torch.tensor(out, dtype=torch.int64, device=p.device)


@torch.no_grad()
def speculative_generate(target: TinyLlama, draft: TinyLlama, prompt: torch.Tensor, max_new_tokens: int, *,
                         gamma: int = 4, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, generator: torch.Generator | None = None):
    """Speculative decoding for one sequence (1, S0): the draft proposes γ tokens, the target scores them in
    one forward, `speculative_verify` keeps a prefix plus one token. Full recomputation (no cache) keeps the
    oracle simple. Returns (1, S0 + max_new_tokens)."""
    tokens = prompt
    goal = prompt.shape[1] + max_new_tokens
    while tokens.shape[1] < goal:
        drafted, q_rows = tokens, []
        for _ in range(gamma):
            q = next_token_probs(draft(drafted)[0, -1], temperature, top_k, top_p)
            x = torch.multinomial(q, 1, generator=generator)
            q_rows.append(q)
            drafted = torch.cat([drafted, x[None]], dim=1)
        p = next_token_probs(target(drafted)[0, -gamma - 1:], temperature, top_k, top_p)
        new = speculative_verify(p, torch.stack(q_rows).to(p.dtype), drafted[0, tokens.shape[1]:], generator)
        tokens = torch.cat([tokens, new[None]], dim=1)
    return tokens[:, :goal]


# ----------------------------------------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """y = W₀x + (α/r)·B A x with W₀ frozen, A (r, in) Kaiming-uniform, B (out, r) zero, so the adapted
    layer equals the base layer at initialisation. merge() folds (α/r)·BA into W₀; unmerge() takes it out."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.base = base
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        for p in base.parameters():
            p.requires_grad_(False)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, targets=("wq", "wv")) -> nn.Module:
    """Freeze every parameter; wrap the nn.Linear children named in `targets` with LoRALinear (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha))
    return model


def lora_tiny_llama(r: int = 8, alpha: float = 16.0) -> TinyLlama:
    """A small TinyLlama (TinyLlamaConfig.small) with LoRA adapters on wq and wv; only the adapters train."""
    return apply_lora(TinyLlama(TinyLlamaConfig.small()), r, alpha)


REFERENCE_MODELS = {
    "tiny_llama": ReferenceModel(TinyLlama, make_batch, loss_fn),
    "tiny_moe": ReferenceModel(TinyMoE, make_batch, loss_fn),
    "tiny_llama_lora": ReferenceModel(lora_tiny_llama, make_batch, loss_fn),
}
