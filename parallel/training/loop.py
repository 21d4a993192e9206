"""The one training step and the one loop over steps that every strategy runs.

A `Trainer` gives two things: `forward_backward(batch)` (this rank's forward and backward of one global step,
its gradients accumulated into the parameters; returns the loss, or None on a rank that does not see it) and
`clip_grad_norm_(max_norm)` (the clipping protocol: the 2-norm of the whole model's gradient, each parameter
counted once across ranks, and every gradient scaled by torch's rule, data_parallel/clipping.py). `step` is
then the same everywhere: zero the gradients, forward and backward, clip, step the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class Trainer:
    optimizer: torch.optim.Optimizer

    def forward_backward(self, batch) -> float | None:
        raise NotImplementedError

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        raise NotImplementedError

    def step(self, batch, max_norm: float | None = None) -> tuple[float | None, float | None]:
        """One optimizer step. Returns (this rank's loss or None, the global gradient norm before clipping, or
        None without max_norm)."""
        self.optimizer.zero_grad()
        loss = self.forward_backward(batch)
        norm = None if max_norm is None else float(self.clip_grad_norm_(max_norm))
        self.optimizer.step()
        return loss, norm


def run_steps(trainer: Trainer, batch_of: Callable[[int], object], steps: int, *, max_norm: float | None,
              losses: Sequence[float] = (), before_step: Callable[[int], None] | None = None,
              after_step: Callable[[int, list[float]], None] | None = None) -> list[float]:
    """Steps len(losses) .. steps − 1 (so a resumed run continues where its losses end): `before_step(step)`,
    `trainer.step(batch_of(step), max_norm)`, `after_step(steps_done, losses)`. Returns every step's loss."""
    losses = list(losses)
    for step in range(len(losses), steps):
        if before_step is not None:
            before_step(step)
        loss, _ = trainer.step(batch_of(step), max_norm)
        losses.append(loss)
        if after_step is not None:
            after_step(step + 1, losses)
    return losses
