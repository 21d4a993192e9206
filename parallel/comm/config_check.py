"""`check_same_config`: the ranks of a group agree on a strategy's configuration, or all of them raise.

Each rank encodes its configuration as a short int64 vector (ints as they are, dtypes as an index, shape
lists by a process-independent hash) and one all-gather shows every rank every fingerprint; where they differ,
every rank raises the same ValueError naming the fields and each rank's values — instead of hanging later in a
collective whose sizes do not match.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def shapes_fingerprint(tensors) -> int:
    """A hash of the tensors' shapes that is the same in every process (ints hash without a random seed)."""
    return hash(tuple(s for t in tensors for s in (t.dim(), *t.shape))) % (1 << 62)


def fingerprint(values) -> int:
    """A hash of ints, floats, bools and dtypes that is the same in every process (str hashes are salted per
    process, so strings are not accepted)."""
    values = tuple(values)
    if any(isinstance(v, str) for v in values):
        raise TypeError("fingerprint: strings hash differently in every process; encode them first")
    return hash(tuple(_encode(v) if isinstance(v, torch.dtype) else v for v in values)) % (1 << 62)


def tensors_fingerprint(tensors) -> int:
    """A process-independent hash of the tensors' shapes and dtypes (buffers, parameters)."""
    return fingerprint(s for t in tensors for s in (t.dim(), *t.shape, t.dtype))


def _encode(value) -> int:
    if isinstance(value, torch.dtype):
        return _DTYPES.index(value) if value in _DTYPES else len(_DTYPES)
    return int(value)


def _decode(template, code: int) -> str:
    if isinstance(template, torch.dtype):
        return str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else "?"
    return str(code)


def check_same_config(comm, group, owner: str, device, **fields) -> None:
    """One all-gather of this rank's `fields` (ints, bools or torch dtypes) over `group`."""
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
