"""`DataParallelLoss`: a reference model and its loss as one module, `forward(*batch)` -> this rank's loss.

Most losses are a mean over samples, so the mean over ranks of each rank's loss on its shard is the loss of
the whole batch, and averaging gradients (what every data-parallel strategy does) gives its gradient. A
contrastive loss couples the samples: every image is scored against every caption of the GLOBAL batch. Its
data-parallel form (`gathered_contrastive_loss`) all-gathers the embeddings with gradient and scores this
rank's rows against all columns (`clip_loss_shard`): L = (1/N) Σ_r L_r, with L_r rank r's rows.

The gradient. Rank q's embeddings e_q reach the loss of every rank r through the gathered copy, so
∂L/∂e_q = (1/N) Σ_r ∂L_r/∂e_q. Rank q's backward must deliver N·∂L/∂e_q, since the strategy then averages the
parameter gradients over ranks: the gradient of the gathered tensor is therefore reduce-scattered with a
SUM (Σ_r of slice q, not the mean), and added to the local path's ∂L_q/∂e_q — exactly the backward of
`gather_from_sp` (all-gather forward, reduce-scatter backward), reused here along the batch dimension.
Every rank must hold the same number of samples (the all-gather concatenates equal shards in rank order).

Keeping the loss inside `forward` also matters for ZeRO-3: a parameter used only in the loss (CLIP's
`logit_scale`) is then used while its unit's parameters are gathered.
"""

from __future__ import annotations

from torch import nn

from gpuforge.models._layers import to_model_dtype
from gpuforge.models.vol4_multimodal import clip_loss_shard, contrastive_loss
from gpuforge.parallel.comm import as_group_comm
from gpuforge.parallel.model_parallel.tp_mappings import gather_from_sp


def gathered_contrastive_loss(model, batch, comm, group=None):
    """TinyCLIP's symmetric InfoNCE under data parallelism: this rank's share L_r of the global loss."""
    images, captions = to_model_dtype(model, *batch)
    image_emb, text_emb = model(images, captions)
    gc = as_group_comm(comm, group)
    image_all, text_all = gather_from_sp(image_emb, gc, dim=0), gather_from_sp(text_emb, gc, dim=0)
    return clip_loss_shard(image_emb, text_emb, image_all, text_all, gc.rank * image_emb.shape[0],
                           model.logit_scale)


# losses that couple the samples of a batch -> their data-parallel form (model, batch, comm, group) -> loss
GATHERED_FORMS = {contrastive_loss: gathered_contrastive_loss}


def data_parallel_loss_fn(loss_fn, comm=None, group=None):
    """loss_fn itself, or its gathered form (GATHERED_FORMS) when it couples samples and there is a comm."""
    gathered = GATHERED_FORMS.get(loss_fn)
    if gathered is None or comm is None:
        return loss_fn
    return lambda model, batch: gathered(model, batch, comm, group)


class DataParallelLoss(nn.Module):
    """forward(*batch) = loss_fn(model, batch) on this rank's shard, or its gathered form when the loss
    couples samples (GATHERED_FORMS). `comm=None` is one process on the whole batch (the reference)."""

    def __init__(self, model: nn.Module, loss_fn, comm=None, group=None):
        super().__init__()
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (model, batch) -> loss, got {type(loss_fn).__name__}")
        self.model, self.loss_fn, self.comm, self.group = model, loss_fn, comm, group
        self._rank_loss = data_parallel_loss_fn(loss_fn, comm, group)

    def forward(self, *batch):
        return self._rank_loss(self.model, batch)
