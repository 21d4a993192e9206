"""What a checkpoint holds for each data-parallel layout, and how a saved state is resharded on load.

A layout is a list of flat groups: trainable parameters laid end to end (no padding) in a fixed order.
- replicated (`DistributedDataParallel`, or a plain module, with a torch optimizer): one group of every trainable
  parameter (a tied one once); every rank holds all of it and writes the slice [r·S, (r+1)·S) of an even split,
  so this save is sharded too;
- `ZeroRedundancyOptimizer` (stages 1, 2): one group, its parameters; each rank holds and writes its shard;
- `FullyShardedDataParallel` (stage 3): one group per unit; each rank holds and writes its shard of each.
Per group a rank writes its range [lo, hi) of the flat values and of each per-element optimizer state
(exp_avg, exp_avg_sq, momentum_buffer: tensors shaped like the parameter). Rank 0 also writes the per-parameter
scalar state (everything else, e.g. AdamW's "step"), the optimizer's hyper-parameters and the module's
untrained state (buffers, frozen parameters).

Loading reads every rank's pieces, rebuilds each parameter's full value and state (name -> tensor, the form no
layout owns) and gives the current layout what it holds. So a checkpoint loads at another world size and into
another layout (DDP, ZeRO-1/2, ZeRO-3 in any direction); a flat shard needs one scalar state for all of its
parameters (a ValueError otherwise). Every rank reads every piece: simple, and bounded by host memory, which
is enough for the models here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gpuforge.parallel.data_parallel.ddp import DistributedDataParallel
from gpuforge.parallel.data_parallel.fsdp import FullyShardedDataParallel
from gpuforge.parallel.data_parallel.wrappers import innermost
from gpuforge.parallel.data_parallel.zero import ZeroRedundancyOptimizer


@dataclass
class FlatGroup:
    """Parameters `names` laid end to end; this rank holds (or writes) elements [start, start + size).
    `shard`: the flat parameter the optimizer updates (ZeRO, FSDP); None when it updates `params` directly.
    `params`: the full parameters to set on load (replicated and ZeRO; FSDP keeps none between uses)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    optimizer: torch.optim.Optimizer
    start: int
    size: int
    shard: torch.nn.Parameter | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def lo(self) -> int:
        return min(self.start, self.numel)

    @property
    def hi(self) -> int:
        return min(self.start + self.size, self.numel)


def _per_element(key: str, value, like: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and key != "step" and value.shape == like.shape


def _names(module: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}


def layout_of(model, optimizer, rank: int, world: int) -> tuple[str, torch.nn.Module, list[FlatGroup]]:
    """(layout name, the user's module, its flat groups) for what a strategy built: `model` is the module the
    training loop calls (DistributedDataParallel / FullyShardedDataParallel / plain), `optimizer` what steps.
    Names are those of the innermost module (a parameterless loss wrapper is looked through)."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        module = innermost(model.module if isinstance(model, DistributedDataParallel) else model)
        names = _names(module)
        group = FlatGroup([names[id(p)] for p in optimizer.params], [tuple(p.shape) for p in optimizer.params],
                          optimizer.optimizer, optimizer.rank * optimizer.shard_size, optimizer.shard_size,
                          shard=optimizer.shard, params=optimizer.params)
        return "zero", module, [group]
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or a ZeroRedundancyOptimizer, got "
                        f"{type(optimizer).__name__}")
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if isinstance(model, FullyShardedDataParallel):
        module = innermost(model.module)
        names, me = _names(module), model.comm.group_rank(model.group)
        groups = [FlatGroup([names[id(p)] for p in u.params], [tuple(p.shape) for p in u.params], optimizer,
                            me * u.shard_size, u.shard_size, shard=u.shard) for u in model.units]
        expected = {id(u.shard) for u in model.units}
    else:
        module = innermost(model.module if isinstance(model, DistributedDataParallel) else model)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        numel = sum(p.numel() for _, p in named)
        size = -(-numel // world)
        groups = [FlatGroup([n for n, _ in named], [tuple(p.shape) for _, p in named], optimizer, rank * size, size,
                            params=[p for _, p in named])]
        expected = {id(p) for _, p in named}
        if not stepped <= {id(p) for p in module.parameters()}:
            raise ValueError("optimizer: steps tensors that are not parameters of the model; a checkpoint could "
                             "not restore them")
        stepped &= expected  # frozen parameters may sit in the optimizer: they never get state
    if stepped != expected:
        raise ValueError("optimizer: must step every trainable parameter (FullyShardedDataParallel: exactly its "
                         "shard_parameters()); a checkpoint could not restore the others")
    return ("fsdp" if isinstance(model, FullyShardedDataParallel) else "replicated"), module, groups


# ------------------------------------------------------------------------------------------------- save
def _untrained(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state-dict entries the optimizer does not train: buffers and frozen parameters."""
    trained = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {n: t for n, t in module.state_dict().items() if n not in trained}


def _piece(g: FlatGroup) -> dict:
    """This rank's elements [lo, hi) of the group's flat values and per-element optimizer state (copies: a view
    would save its whole storage)."""
    n = g.hi - g.lo
    if g.shard is not None:
        state = g.optimizer.state.get(g.shard, {})
        values = g.shard.detach()[:n]
        per_element = {k: v[:n] for k, v in state.items() if _per_element(k, v, g.shard)}
    else:
        values = torch.cat([p.detach().reshape(-1) for p in g.params])[g.lo:g.hi]
        keys = sorted({k for p in g.params for k, v in g.optimizer.state.get(p, {}).items() if _per_element(k, v, p)})
        per_element = {k: torch.cat([g.optimizer.state[p][k].reshape(-1) if k in g.optimizer.state.get(p, {})
                                     else torch.zeros_like(p).reshape(-1) for p in g.params])[g.lo:g.hi]
                       for k in keys}
    return {"lo": g.lo, "hi": g.hi, "values": values.clone(), "state": {k: v.clone() for k, v in per_element.items()}}


def _scalars(g: FlatGroup) -> dict[str, dict]:
    """name -> the scalar optimizer state of that parameter; absent: the parameter has no state yet."""
    def scalars(state, like):
        return {k: v for k, v in state.items() if not _per_element(k, v, like)}
    if g.shard is not None:
        state = g.optimizer.state.get(g.shard)
        return {name: scalars(state, g.shard) for name in g.names} if state else {}
    return {name: scalars(g.optimizer.state[p], p) for name, p in zip(g.names, g.params, strict=True)
            if g.optimizer.state.get(p)}


def export_shard(groups: list[FlatGroup]) -> dict:
    """What this rank writes: its piece of every group, and its RNG state."""
    return {"pieces": [_piece(g) for g in groups], "rng": torch.get_rng_state()}


def export_rank0(module: torch.nn.Module, groups: list[FlatGroup]) -> dict:
    """What rank 0 alone writes: scalar optimizer state, hyper-parameters, the module's untrained state."""
    scalars = {}
    for g in groups:
        scalars.update(_scalars(g))
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in groups[0].optimizer.param_groups]
    return {"scalars": scalars, "param_groups": hyper, "untrained": _untrained(module)}


def optimizer_kind(groups: list[FlatGroup]) -> str:
    """The class of the torch optimizer that steps the parameters (inside ZeRO: the one it wraps)."""
    cls = type(groups[0].optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(groups: list[FlatGroup]) -> list[dict]:
    """The groups' names and shapes, for metadata.json."""
    return [{"names": g.names, "shapes": [list(s) for s in g.shapes]} for g in groups]


# ------------------------------------------------------------------------------------------------- load
def assemble(saved_groups: list[dict], shards: list[dict]) -> tuple[dict, dict]:
    """(name -> full value, name -> {key: full per-element state}) from every rank's pieces."""
    values, state = {}, {}
    for gi, saved in enumerate(saved_groups):
        shapes = [tuple(s) for s in saved["shapes"]]
        numel = sum(math.prod(s) for s in shapes)
        pieces = sorted((s["pieces"][gi] for s in shards), key=lambda p: p["lo"])
        pieces = [p for p in pieces if p["hi"] > p["lo"]]
        covered = 0
        for p in pieces:
            if p["lo"] != covered:
                raise ValueError(f"checkpoint: group {gi} has elements [{covered}, {p['lo']}) missing or written "
                                 "twice; the shards do not tile the parameters")
            covered = p["hi"]
        if covered != numel:
            raise ValueError(f"checkpoint: group {gi} covers {covered} of {numel} elements")
        keys = {frozenset(p["state"]) for p in pieces}
        if len(keys) > 1:
            raise ValueError(f"checkpoint: the shards of group {gi} hold different optimizer state keys {keys}")
        flat_state = {k: torch.cat([p["state"][k] for p in pieces]) for k in (keys.pop() if keys else ())}
        flat_values = torch.cat([p["values"] for p in pieces])
        offset = 0
        for name, shape in zip(saved["names"], shapes, strict=True):
            n = math.prod(shape)
            values[name] = flat_values[offset:offset + n].view(shape)
            state[name] = {k: v[offset:offset + n].view(shape) for k, v in flat_state.items()}
            offset += n
    return values, state


def _copy(scalars: dict) -> dict:
    """A parameter's own copy of scalar state (optimizers update "step" in place; several parameters may have
    been loaded from one shard's)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in scalars.items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _restore_group(g: FlatGroup, values: dict, state: dict, scalars: dict) -> None:
    missing = [n for n in g.names if n not in values]
    if missing:
        raise ValueError(f"checkpoint: has no parameters {missing}")
    if g.shard is None:
        for name, p in zip(g.names, g.params, strict=True):
            p.copy_(values[name])
            g.optimizer.state.pop(p, None)
            if name in scalars:
                g.optimizer.state[p] = {**{k: v.to(p).clone() for k, v in state[name].items()}, **_copy(scalars[name])}
        return
    padded = torch.zeros(max(g.start + g.size, g.numel), dtype=g.shard.dtype, device=g.shard.device)

    def my_slice(per_name):
        padded.zero_()
        padded[:g.numel] = torch.cat([t.reshape(-1) for t in per_name])
        return padded[g.start:g.start + g.size].clone()

    g.shard.copy_(my_slice([values[n] for n in g.names]))
    for name, p in zip(g.names, g.params):
        p.copy_(values[name])
    g.optimizer.state.pop(g.shard, None)
    with_state = [n for n in g.names if n in scalars]
    if not with_state:
        return
    if len(with_state) != len(g.names) or not all(_equal(scalars[n], scalars[g.names[0]]) for n in g.names):
        raise ValueError(f"checkpoint: parameters {g.names} must share one optimizer step to be loaded into one "
                         "flat shard (some have no state or a different scalar state)")
    per_element = {k: my_slice([state[n][k] for n in g.names]) for k in state[g.names[0]]}
    g.optimizer.state[g.shard] = {**per_element, **_copy(scalars[g.names[0]])}


@torch.no_grad()
def restore(module: torch.nn.Module, groups: list[FlatGroup], values: dict, state: dict, rank0: dict) -> None:
    """Set the layout's parameters, optimizer state and hyper-parameters and the module's untrained state."""
    expected = {n for g in groups for n in g.names}
    if expected != values.keys():
        raise ValueError(f"checkpoint: parameters differ from the model's: only in the checkpoint "
                         f"{sorted(values.keys() - expected)}, only in the model {sorted(expected - values.keys())}")
    for g in groups:
        for name, shape in zip(g.names, g.shapes, strict=True):
            if tuple(values[name].shape) != tuple(shape):
                raise ValueError(f"checkpoint: parameter {name} has shape {tuple(values[name].shape)} there, "
                                 f"{tuple(shape)} in the model")
    untrained, saved_untrained = _untrained(module), rank0["untrained"]
    if untrained.keys() != saved_untrained.keys():
        raise ValueError(f"checkpoint: buffers / frozen parameters {sorted(saved_untrained)} differ from the "
                         f"model's {sorted(untrained)}")
    for name, t in untrained.items():
        if tuple(saved_untrained[name].shape) != tuple(t.shape):
            raise ValueError(f"checkpoint: {name} has shape {tuple(saved_untrained[name].shape)} there, "
                             f"{tuple(t.shape)} in the model")
    for name, t in untrained.items():
        t.copy_(saved_untrained[name])
    for g in groups:
        _restore_group(g, values, state, rank0["scalars"])
    param_groups = groups[0].optimizer.param_groups
    if len(param_groups) != len(rank0["param_groups"]):
        raise ValueError(f"checkpoint: the optimizer had {len(rank0['param_groups'])} parameter groups, this one "
                         f"has {len(param_groups)}")
    for group, hyper in zip(param_groups, rank0["param_groups"], strict=True):
        group.update(hyper)
