"""`check_same_config`: the ranks of a group agree on a strategy's configuration, or all of them raise.

Each rank encodes its configuration as a short int64 vector (ints as they are, dtypes as an index, shape
lists by a process-independent hash) and one all-gather shows every rank every fingerprint; where they differ,
every rank raises the same ValueError naming the fields and each rank's values — instead of hanging later in a
collective whose sizes do not match.
"""

from __future__ import annotations

import zlib

import torch

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def shapes_fingerprint(tensors) -> int:
    """A hash of the tensors' shapes that is the same in every process (ints hash without a random seed)."""
    return hash(tuple(s for t in tensors for s in (t.dim(), *t.shape))) % (1 << 62)


def _stable(value):
    """`value` as ints/floats only, the same in every process (Python salts its str hashes per process)."""
    if isinstance(value, torch.dtype):
        return _encode(value)
    if isinstance(value, str):
        return zlib.crc32(value.encode())
    if value is None:
        return -1
    if isinstance(value, (tuple, list)):
        return tuple(_stable(v) for v in value)
    if isinstance(value, dict):
        return tuple((_stable(k), _stable(v)) for k, v in sorted(value.items()))
    if isinstance(value, (bool, int, float)):
        return value
    return zlib.crc32(type(value).__qualname__.encode())


def fingerprint(values) -> int:
    """A hash of ints, floats, bools, strings, None, dtypes and nests of them that is the same in every process."""
    return hash(_stable(tuple(values))) % (1 << 62)


def hyperparameters_fingerprint(optimizer_class: type, defaults: dict) -> int:
    """The optimizer class and its hyper-parameters (lr, betas, weight_decay, ...)."""
    return fingerprint((optimizer_class.__qualname__, defaults))


def tensors_fingerprint(tensors) -> int:
    """A process-independent hash of the tensors' shapes and dtypes (buffers, parameters)."""
    return fingerprint(s for t in tensors for s in (t.dim(), *t.shape, t.dtype))


def _encode(value) -> int:
    if isinstance(value, torch.dtype):
        return _DTYPES.index(value) if value in _DTYPES else len(_DTYPES)
    if isinstance(value, str):
        return zlib.crc32(value.encode())
    return int(value)


def _decode(template, code: int) -> str:
    """A rank's value in words, decoded with this rank's value as the template (a string another rank holds
    is known only by its hash)."""
    if isinstance(template, torch.dtype):
        return str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else "?"
    if isinstance(template, str):
        return repr(template) if code == _encode(template) else f"<another string, crc32 {code}>"
    return str(code)


def check_same_config(comm, group, owner: str, device, **fields) -> None:
    """One all-gather of this rank's `fields` (ints, bools, strings or torch dtypes) over `group`."""
    names, values = list(fields), list(fields.values())
    mine = torch.tensor([_encode(v) for v in values], dtype=torch.int64, device=device)
    n = comm.group_size(group)
    everyone = torch.empty(n * len(names), dtype=torch.int64, device=device)
    comm.all_gather(everyone, mine, group=group)
    rows = everyone.view(n, len(names)).tolist()
    differ = [name for i, name in enumerate(names) if len({row[i] for row in rows}) > 1]
    if differ:
        ranks = group.ranks if group is not None else range(n)
        lines = "; ".join(f"rank {r}: " + ", ".join(f"{k}={_decode(v, c)}" for k, v, c in zip(names, values, row))
                          for r, row in zip(ranks, rows))
        raise ValueError(f"{owner}: mismatched configurations between ranks ({', '.join(differ)} differ): {lines}")
