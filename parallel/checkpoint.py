"""Sharded checkpoints of a model trained with ZeroRedundancyOptimizer, written atomically.

`save_sharded(path, model, optimizer, comm, step)`: every rank writes its optimizer shard
(`shard-<rank>.pt`: the flat optimizer state tensors of its slice) into `<path>.tmp`; rank 0 also writes the
full model state; after a barrier rank 0 writes `metadata.json` LAST and renames the directory to `path`
(replacing an older checkpoint only then), so a kill during the save leaves the previous checkpoint intact.
A directory without metadata.json is not a checkpoint.

`load_sharded(path, model, optimizer)`: reads the model state and re-shards the optimizer state for the
current world size and ZeRO stage (stages 1 and 2 hold the same per-rank state): the saved flat shards are
concatenated, trimmed to the parameter count, padded and sliced for this rank. Returns the saved step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def save_sharded(path, model, optimizer, comm, step: int) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    state = optimizer.optimizer.state_dict()
    torch.save({"state": state["state"], "param_groups": state["param_groups"]}, tmp / f"shard-{comm.rank}.pt")
    if comm.rank == 0:
        torch.save(model.state_dict(), tmp / "model.pt")
    comm.barrier()
    if comm.rank == 0:
        meta = {"step": step, "world_size": comm.world_size, "numel": optimizer.numel,
                "shard_size": optimizer.shard_size, "stage": optimizer.stage}
        (tmp / "metadata.json").write_text(json.dumps(meta))
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    comm.barrier()


def load_sharded(path, model, optimizer) -> int:
    path = Path(path)
    meta_file = path / "metadata.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"path: {path} is not a complete checkpoint (no metadata.json)")
    meta = json.loads(meta_file.read_text())
    if meta["numel"] != optimizer.numel:
        raise ValueError(f"checkpoint has {meta['numel']} parameters, the optimizer {optimizer.numel}")
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    shards = [torch.load(path / f"shard-{r}.pt", weights_only=True) for r in range(meta["world_size"])]
    lo = optimizer.rank * optimizer.shard_size
    state = {}
    for key, value in shards[0]["state"].get(0, {}).items():
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            flat = torch.cat([s["state"][0][key] for s in shards])[:optimizer.numel]
            full = torch.zeros(optimizer.padded, dtype=flat.dtype)
            full[:optimizer.numel] = flat
            state[key] = full[lo:lo + optimizer.shard_size].clone()
        else:
            state[key] = value
    optimizer.optimizer.load_state_dict({"state": {0: state} if state else {},
                                         "param_groups": shards[0]["param_groups"]})
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in optimizer.params])
        optimizer.shard.zero_()
        n = max(0, min(optimizer.shard_size, optimizer.numel - lo))
        optimizer.shard[:n].copy_(flat[lo:lo + n])
    return meta["step"]
