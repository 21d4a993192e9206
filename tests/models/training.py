"""The short training loop the model tests share: AdamW (or a given optimizer) over the trainable parameters,
a fresh batch per step from `make_batch(step, batch_size)`, the losses returned."""

import torch


def train(model, make_batch, loss_fn, steps, lr, batch_size, optimizer=torch.optim.AdamW) -> list[float]:
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, make_batch(step, batch_size))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
