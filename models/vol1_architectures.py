"""Volume 1, architectures: a ConvNeXt-style image classifier and graph networks (GCN, GAT).

TinyConvNeXt: patchify stem (4×4 conv, stride 4), residual blocks y = x + F(x) with F = 7×7 depthwise conv →
LayerNorm (or RMSNorm) → 1×1 conv as a Linear (inverted bottleneck, 4×) → GELU → 1×1 back; no BatchNorm, so
data-parallel ranks never disagree on batch statistics (BatchNorm under DDP normalises each rank's shard by
its own statistics unless synchronised). TinyGCN: H' = σ(D^-1/2 (A + I) D^-1/2 H W). TinyGAT: attention
coefficients softmax_j(LeakyReLU(aᵀ[W hᵢ ‖ W hⱼ])) masked to the neighbours of i (self-loop included). A
graph batch is a set of independent graphs (a leading graph dim), so data parallelism splits whole graphs.

gpuforge ops exercised: matmul (1×1 convs, the GCN/GAT feature transforms), layer_norm or rms_norm (the
norm variants), softmax with masks (GAT). Parallel strategies: DDP, PP (the ConvNeXt stages are a
sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.models._layers import ReferenceModel, RMSNorm, Softmax, to_model_dtype

# ----------------------------------------------------------------------------------------------- images

IMAGE_SIZE, N_CLASSES = 16, 4


def make_image_batch(seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 1, 16, 16), labels (B,)): class 0 horizontal stripes, 1 vertical, 2 diagonal,
    3 checkerboard, each with a random phase and period 2-4, plus N(0, 0.5²) noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(N_CLASSES, (batch_size,), generator=generator)
    period = torch.randint(2, 5, (batch_size, 1, 1), generator=generator).float()
    phase = torch.randint(4, (batch_size, 1, 1), generator=generator).float()
    r = torch.arange(IMAGE_SIZE).float()[None, :, None]
    c = torch.arange(IMAGE_SIZE).float()[None, None, :]
    shape = (batch_size, IMAGE_SIZE, IMAGE_SIZE)
    patterns = torch.stack([
        torch.floor((r + phase) / period).expand(shape), torch.floor((c + phase) / period).expand(shape),
        torch.floor((r + c + phase) / period), torch.floor((r + phase) / period) + torch.floor(c / period)])
    clean = (patterns.remainder(2) * 2 - 1)[labels, torch.arange(batch_size)]
    images = clean + 0.5 * torch.randn(batch_size, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return images[:, None], labels


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, norm: str = "layer"):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm == "layer" else RMSNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # a 1×1 conv is a matmul over channels-last pixels
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):  # x: (B, C, H, W)
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """(B, 1, 16, 16) -> class logits (B, 4). norm: "layer" (ConvNeXt) or "rms"."""

    def __init__(self, dim: int = 32, depth: int = 2, norm: str = "layer", in_channels: int = 1,
                 n_classes: int = N_CLASSES):
        super().__init__()
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        self.stem = nn.Conv2d(in_channels, dim, kernel_size=4, stride=4)  # patchify
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim, norm) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm == "layer" else RMSNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        h = self.blocks(self.stem(x))
        return self.head(self.norm(h.mean(dim=(2, 3))))


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    images, labels = to_model_dtype(model, *batch)
    return F.cross_entropy(model(images), labels)


# ----------------------------------------------------------------------------------------------- graphs

N_COMMUNITIES, GRAPH_FEATURES, GRAPH_NODES = 3, 8, 48


def make_graph_batch(seed: int, batch_size: int, n_nodes: int = GRAPH_NODES):
    """`batch_size` independent graphs, each a stochastic block model of `n_nodes` nodes in 3 communities
    (edge probability 0.45 inside, 0.02 across) -> (features (G, N, 8), adjacency (G, N, N) symmetric 0/1
    without self-loops, labels (G, N)). Graphs are the samples: slicing the batch along dim 0 keeps whole
    graphs, so data parallelism splits graphs, never a graph's edges. Features are a weak community signal
    (+0.5 on 1 of the first 3 dims) under unit noise, so a node alone is hard to classify but averaging over
    neighbours is easy."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(N_COMMUNITIES, (batch_size, n_nodes), generator=generator)
    same = labels[:, :, None] == labels[:, None, :]
    prob = torch.where(same, 0.45, 0.02)
    upper = (torch.rand(batch_size, n_nodes, n_nodes, generator=generator) < prob).triu(1)
    adjacency = (upper | upper.transpose(1, 2)).float()
    features = torch.randn(batch_size, n_nodes, GRAPH_FEATURES, generator=generator)
    features[..., :N_COMMUNITIES] += 0.5 * F.one_hot(labels, N_COMMUNITIES).float()
    return features, adjacency, labels


def with_self_loops(adjacency: torch.Tensor) -> torch.Tensor:
    """A + I for adjacency (..., N, N)."""
    return adjacency + torch.eye(adjacency.shape[-1], dtype=adjacency.dtype, device=adjacency.device)


def normalized_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2 with D the degree matrix of A + I, for adjacency (..., N, N)."""
    a = with_self_loops(adjacency)
    d = a.sum(-1).rsqrt()
    return d[..., :, None] * a * d[..., None, :]


class GCNLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, h, a_hat):
        return a_hat @ self.linear(h)


class TinyGCN(nn.Module):
    """Two GCN layers: logits = Â · ReLU(Â X W₁) · W₂, Â = D^-1/2 (A + I) D^-1/2; features (..., N, F) and
    adjacency (..., N, N) with any leading (graph) dims."""

    def __init__(self, in_dim: int = GRAPH_FEATURES, hidden: int = 16, n_classes: int = N_COMMUNITIES):
        super().__init__()
        self.layer1 = GCNLayer(in_dim, hidden)
        self.layer2 = GCNLayer(hidden, n_classes)

    def forward(self, features, adjacency):
        a_hat = normalized_adjacency(adjacency)
        return self.layer2(F.relu(self.layer1(features, a_hat)), a_hat)


class GATLayer(nn.Module):
    """Multi-head graph attention: e_ij = LeakyReLU(a_srcᵀ W hᵢ + a_dstᵀ W hⱼ) (= aᵀ[W hᵢ ‖ W hⱼ]), α_ij =
    softmax over j ∈ N(i) ∪ {i}, h'ᵢ = ‖_heads Σⱼ α_ij W hⱼ. Non-neighbours get exactly zero weight.
    h (..., N, in) and adjacency (..., N, N), any leading (graph) dims."""

    def __init__(self, in_dim: int, out_dim: int, heads: int = 2):
        super().__init__()
        self.heads, self.out_dim = heads, out_dim
        self.linear = nn.Linear(in_dim, heads * out_dim, bias=False)
        self.att_src = nn.Parameter(torch.randn(heads, out_dim) * 0.1)
        self.att_dst = nn.Parameter(torch.randn(heads, out_dim) * 0.1)
        self.softmax = Softmax(dim=-1)

    def attention(self, h, adjacency):
        """α: (..., heads, N, N), rows summing to 1 over each node's neighbourhood; and W h (..., N, heads, out)."""
        wh = self.linear(h).unflatten(-1, (self.heads, self.out_dim))
        src = (wh * self.att_src).sum(-1).transpose(-1, -2)  # (..., heads, N)
        dst = (wh * self.att_dst).sum(-1).transpose(-1, -2)
        scores = F.leaky_relu(src[..., :, None] + dst[..., None, :], 0.2)
        neighbours = with_self_loops(adjacency) > 0
        return self.softmax(scores, neighbours.unsqueeze(-3)), wh

    def forward(self, h, adjacency):
        alpha, wh = self.attention(h, adjacency)
        out = alpha @ wh.transpose(-2, -3)  # (..., heads, N, out)
        return out.transpose(-2, -3).flatten(-2)


class TinyGAT(nn.Module):
    def __init__(self, in_dim: int = GRAPH_FEATURES, hidden: int = 8, heads: int = 2,
                 n_classes: int = N_COMMUNITIES):
        super().__init__()
        self.layer1 = GATLayer(in_dim, hidden, heads)
        self.layer2 = GATLayer(hidden * heads, n_classes, heads=1)

    def forward(self, features, adjacency):
        return self.layer2(F.elu(self.layer1(features, adjacency)), adjacency)


def node_classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy over every node of every graph (each graph has the same node count, so this is also the
    mean over graphs of their mean node loss)."""
    features, adjacency, labels = to_model_dtype(model, *batch)
    return F.cross_entropy(model(features, adjacency).flatten(0, -2), labels.flatten())


REFERENCE_MODELS = {
    "tiny_convnext": ReferenceModel(TinyConvNeXt, make_image_batch, classification_loss),
    "tiny_gcn": ReferenceModel(TinyGCN, make_graph_batch, node_classification_loss),
    "tiny_gat": ReferenceModel(TinyGAT, make_graph_batch, node_classification_loss),
}
