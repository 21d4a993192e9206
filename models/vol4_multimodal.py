"""Volume 4, multimodal: TinyCLIP (contrastive image-text pretraining) and a LLaVA-style projector.

TinyCLIP: a ViT-tiny image tower (4×4 patches of a 16×16 image, a class token, pre-LayerNorm blocks) and a
causal text tower (last-token features), both projected and L2-normalised; the loss is the symmetric InfoNCE
½[CE(s·I Tᵀ, diag) + CE(s·T Iᵀ, diag)] with a learnable temperature s = exp(logit_scale). Data-parallel trap:
each rank must gather every rank's embeddings before forming the N×N logits (`clip_loss_shard`), or the
negatives and the loss change. TinyLlava: a 2-layer MLP projector maps ViT patch features into TinyLlama's
embedding space and prepends them to the text tokens (stage 1 trains only the projector).

gpuforge ops exercised: softmax over the N×N logits, attention (non-causal image tower, causal text tower),
layer norm, matmul. Parallel strategy: DDP with gathered embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.models._layers import Attention, ReferenceModel, to_model_dtype
from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig, lm_loss

N_CONCEPTS, IMAGE_SIZE, PATCH, TEXT_LEN, TEXT_VOCAB = 16, 16, 4, 6, 32


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + MLP(LN(x)); `causal` for the text tower."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = self.attn(q, k, v, causal=self.causal).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(h)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """(B, 1, 16, 16) -> token features (B, 1 + 16, dim): class token first, then the 4×4 patches."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2):
        super().__init__()
        n_patches = (IMAGE_SIZE // PATCH) ** 2
        self.patch_embed = nn.Linear(PATCH * PATCH, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images):
        b = images.shape[0]
        patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).reshape(b, -1, PATCH * PATCH)
        x = torch.cat([self.cls.expand(b, -1, -1), self.patch_embed(patches)], dim=1) + self.pos
        return self.norm(self.blocks(x))


class TinyCLIP(nn.Module):
    """encode_image / encode_text -> unit-norm embeddings (B, embed_dim); logit_scale starts at log(1/0.07)."""

    def __init__(self, dim: int = 32, embed_dim: int = 32, depth: int = 2, heads: int = 2):
        super().__init__()
        self.vision = TinyViT(dim, depth, heads)
        self.token_embed = nn.Embedding(TEXT_VOCAB, dim)
        self.text_pos = nn.Parameter(torch.randn(1, TEXT_LEN, dim) * 0.02)
        self.text_blocks = nn.Sequential(*(TransformerBlock(dim, heads, causal=True) for _ in range(depth)))
        self.text_norm = nn.LayerNorm(dim)
        self.image_proj = nn.Linear(dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images):
        return F.normalize(self.image_proj(self.vision(images)[:, 0]), dim=-1)

    def encode_text(self, tokens):
        h = self.text_norm(self.text_blocks(self.token_embed(tokens) + self.text_pos[:, :tokens.shape[1]]))
        return F.normalize(self.text_proj(h[:, -1]), dim=-1)  # the causal tower's last token has read it all

    def forward(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens)


def concept_images(concepts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Concept c is a fixed random 16×16 template (seed 7), shown with N(0, 0.5²) noise."""
    templates = torch.randn(N_CONCEPTS, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))
    noise = 0.5 * torch.randn(len(concepts), IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return (templates[concepts] + noise)[:, None]


def make_batch(seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 1, 16, 16), captions (B, 6) int64): caption = random filler words (ids 16..31) then the
    concept's word (id c) at one of the last two positions; concepts are distinct within a batch of ≤ 16."""
    generator = torch.Generator().manual_seed(seed)
    concepts = torch.randperm(N_CONCEPTS, generator=generator)[:batch_size]
    if batch_size > N_CONCEPTS:
        concepts = torch.randint(N_CONCEPTS, (batch_size,), generator=generator)
    captions = torch.randint(N_CONCEPTS, TEXT_VOCAB, (batch_size, TEXT_LEN), generator=generator)
    where = torch.randint(TEXT_LEN - 2, TEXT_LEN, (batch_size,), generator=generator)
    captions[torch.arange(batch_size), where] = concepts
    return concept_images(concepts, generator), captions


def clip_loss_shard(image_local, text_local, image_all, text_all, offset: int, logit_scale) -> torch.Tensor:
    """One rank's part of the symmetric InfoNCE loss: its rows (global indices offset .. offset + n − 1) against
    every gathered embedding. The mean over ranks of these equals `clip_loss` on the whole batch."""
    scale = logit_scale.exp()
    labels = torch.arange(offset, offset + image_local.shape[0], device=image_local.device)
    image_to_text = F.cross_entropy(scale * image_local @ text_all.T, labels)
    text_to_image = F.cross_entropy(scale * text_local @ image_all.T, labels)
    return 0.5 * (image_to_text + text_to_image)


def clip_loss(image_emb, text_emb, logit_scale) -> torch.Tensor:
    return clip_loss_shard(image_emb, text_emb, image_emb, text_emb, 0, logit_scale)


def contrastive_loss(model: TinyCLIP, batch) -> torch.Tensor:
    images, captions = to_model_dtype(model, *batch)
    image_emb, text_emb = model(images, captions)
    return clip_loss(image_emb, text_emb, model.logit_scale)


# ----------------------------------------------------------------------------------------------- LLaVA

class TinyLlava(nn.Module):
    """Image patches -> TinyViT -> MLP projector -> prepended to the caption's byte embeddings -> TinyLlama.

    forward(images, tokens) -> logits for the text positions only (B, S, 256)."""

    def __init__(self, vision: TinyViT | None = None, llm: TinyLlama | None = None):
        super().__init__()
        self.vision = vision or TinyViT()
        self.llm = llm or TinyLlama(TinyLlamaConfig.small())
        vision_dim, llm_dim = self.vision.pos.shape[-1], self.llm.config.dim
        self.projector = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def freeze_for_stage1(self):
        """Stage 1 (feature alignment): only the projector trains."""
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.projector.parameters():
            p.requires_grad_(True)

    def forward(self, images, tokens):
        image_tokens = self.projector(self.vision(images)[:, 1:])
        text = self.llm.tok_embeddings(tokens)
        logits = self.llm(inputs_embeds=torch.cat([image_tokens, text], dim=1))
        return logits[:, image_tokens.shape[1]:]


CONCEPT_NAMES = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree",
                 "fish", "bird", "car", "boat", "star", "rock", "leaf", "cake")


def make_caption_batch(seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, inputs, targets): the caption "a <concept>." as bytes, padded with spaces to 8; the model
    must read the concept off the image to predict it."""
    generator = torch.Generator().manual_seed(seed)
    concepts = torch.randint(N_CONCEPTS, (batch_size,), generator=generator)
    rows = [list(f"a {CONCEPT_NAMES[c]}.".ljust(9).encode()) for c in concepts.tolist()]
    data = torch.tensor(rows, dtype=torch.int64)
    return concept_images(concepts, generator), data[:, :-1], data[:, 1:]


def caption_loss(model: TinyLlava, batch) -> torch.Tensor:
    images, inputs, targets = to_model_dtype(model, *batch)
    return lm_loss(model(images, inputs), targets)


REFERENCE_MODELS = {
    # every sample is a negative for every other: a rank's slice alone gives a different loss (coupled)
    "tiny_clip": ReferenceModel(TinyCLIP, make_batch, contrastive_loss, coupled=True),
    "tiny_llava": ReferenceModel(TinyLlava, make_caption_batch, caption_loss),
}
