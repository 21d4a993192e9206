"""Output allocation for every kernel wrapper. Tests switch on poisoning, so each output starts as NaN
(integers: their minimum) and an element a kernel forgets to write fails the comparison."""

from __future__ import annotations

import contextlib

import torch

_poison = False


def set_poison(enabled: bool) -> None:
    global _poison
    _poison = enabled


@contextlib.contextmanager
def poisoned_outputs():
    previous = _poison
    set_poison(True)
    try:
        yield
    finally:
        set_poison(previous)


def _fill(t: torch.Tensor) -> torch.Tensor:
    if _poison and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)
    return t


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _fill(torch.empty(shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _fill(torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format))
