"""Ledgers: what each collective moved (communication) and what each rank holds (memory).

`CommLedger` gets one `CommEntry` per collective or point-to-point call, recorded by the communicator when
the call is launched: the op, the group (a tuple of global ranks), the payload bytes, the training step
(`ledger.step`, advanced by the training loop) and the call's sequence number on its group. The payload
is the size of the logical operand — all_reduce / broadcast / send / recv: the tensor; reduce_scatter: the
full input; all_gather: the full output; all_to_all: the input, of which `kept` bytes stay on the rank — and
`wire_bytes` gives the per-rank traffic of the ring algorithm: all_reduce 2(n−1)/n·B, reduce_scatter and
all_gather (n−1)/n·B, all_to_all B − kept ((n−1)/n·B for equal splits), broadcast/send/recv B.

`MemoryLedger` is what each strategy's `memory()` returns: this rank's bytes of model parameters, gradients,
master weights (the optimizer's own copy: float32 under mixed precision) and optimizer state, plus what
CPU offload moved to the host (`offloaded`, not in `total`), and, where measured, the activations a forward
keeps for its backward (`activations`, not in `total` either: the ZeRO formula counts model states only;
models/activation_checkpointing.saved_activation_bytes measures them). `zero_formula_bytes` gives the ZeRO paper's
numbers for mixed-precision Adam (K = 12: fp32 master, momentum and variance):
DDP 16Ψ, stage 1 4Ψ + 12Ψ/N, stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

import torch


@dataclass(frozen=True)
class CommEntry:
    op: str
    group: tuple[int, ...]
    bytes: int
    step: int
    seq: int
    shape: tuple[int, ...]
    dtype: str
    kept: int = 0  # all_to_all: the bytes of this rank's own split, which stay on the rank

    @property
    def wire_bytes(self) -> Fraction:
        """Bytes each rank sends under the ring algorithm (exact, as a fraction)."""
        n = len(self.group)
        if self.op == "all_reduce":
            return Fraction(2 * (n - 1), n) * self.bytes
        if self.op in ("reduce_scatter", "all_gather"):
            return Fraction(n - 1, n) * self.bytes
        if self.op == "all_to_all":
            return Fraction(self.bytes - self.kept)
        return Fraction(self.bytes)


class CommLedger:
    """Every collective this rank launched, in order. `step` is stamped on each new entry."""

    def __init__(self) -> None:
        self.entries: list[CommEntry] = []
        self.step = 0
        self.enabled = True

    def record(self, entry: CommEntry) -> None:
        if self.enabled:
            self.entries.append(entry)

    def select(self, *, op: str | None = None, step: int | None = None, group=None) -> list[CommEntry]:
        group = None if group is None else tuple(group)
        return [e for e in self.entries
                if (op is None or e.op == op) and (step is None or e.step == step)
                and (group is None or e.group == group)]

    def total_bytes(self, **filters) -> int:
        return sum(e.bytes for e in self.select(**filters))

    def wire_bytes(self, **filters) -> Fraction:
        return sum((e.wire_bytes for e in self.select(**filters)), Fraction(0))

    def bytes_per_step(self, op: str | None = None) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for e in self.select(op=op):
            out[e.step] += e.bytes
        return dict(out)

    def clear(self) -> None:
        self.entries.clear()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)


def optimizer_memory(optimizer) -> tuple[int, int]:
    """(master-weight bytes, state bytes) of a torch optimizer (no master copy) or of a mixed-precision wrapper
    holding `master_params` and an inner torch `optimizer`."""
    if optimizer is None:
        return 0, 0
    if hasattr(optimizer, "master_params"):
        return tensor_bytes(optimizer.master_params), optimizer_state_bytes(optimizer.optimizer)
    return 0, optimizer_state_bytes(optimizer)


@dataclass(frozen=True)
class MemoryLedger:
    params: int
    grads: int
    optimizer_state: int
    master: int = 0
    offloaded: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        """Bytes on this rank's device (what the ZeRO formula counts); `offloaded` bytes live on the host."""
        return self.params + self.grads + self.master + self.optimizer_state


def zero_formula_bytes(num_params: int, world_size: int, stage: int, *, k: int = 12) -> Fraction:
    """Per-rank bytes of mixed-precision Adam training (2Ψ params, 2Ψ grads, KΨ optimizer state)."""
    psi, n = Fraction(num_params), world_size
    return {0: (4 + k) * psi, 1: 4 * psi + k * psi / n, 2: 2 * psi + (2 + k) * psi / n,
            3: (4 + k) * psi / n}[stage]
