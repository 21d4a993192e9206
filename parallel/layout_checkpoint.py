"""Layout-free checkpoints of 3D training: saved under one (dp, tp, pp) layout, loaded under any other.

The files hold the FULL model, as one process would (the canonical format):
- `model.pt`: {name: tensor} under TinyLlama's own parameter names (`layers.3.attention.wq.weight`), TP shards
  joined by concatenation (column-parallel weights along dim 0, row-parallel along dim 1, the vocabulary
  along dim 0 with its padding rows dropped), PP stages joined, the tied embedding/head stored once;
- `optimizer.pt`: AdamW's state in the same shape: {"step": int, "exp_avg": {name: tensor},
  "exp_avg_sq": {name: tensor}, "hyper": lr, betas, eps, weight_decay, ...};
- `metadata.json`, written last: format, training step, the layout it was saved under, the model config.

Saving (`save_layout_checkpoint`, every rank calls it): each rank all-gathers its ZeRO-1 shard of the AdamW
state over the DP group and cuts it back into per-parameter tensors, each TP group all-gathers its shards,
and one rank per stage writes that stage's part; rank 0 merges the parts, writes metadata.json and moves
the directory into place (tmp dir, then rename: a kill during the save leaves the previous checkpoint).
Loading (`load_layout_checkpoint` into a Trainer3D of any layout, `load_full_model` into one process's
model and AdamW) slices every tensor for the new layout; padding rows get zeros, which AdamW keeps at zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from gpuforge.parallel.group_comm import GroupComm
from gpuforge.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from gpuforge.parallel.zero import flatten_padded

FORMAT = "gpuforge-full-model/1"
MOMENTS = ("exp_avg", "exp_avg_sq")
TP_DIM = {"column": 0, "row": 1, "vocab": 0}  # the dimension a layout splits; "replicated" splits none


# ----------------------------------------------------------------------------------------------- layouts


def stage_layouts(stage) -> dict[str, tuple[str, str]]:
    """{stage parameter name: (full-model name, TP layout)} for a PipelineStage of a TensorParallelLM."""
    kinds = {}
    for prefix, module in stage.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, ColumnParallelLinear):
            kinds.update({f"{dot}weight": "column", f"{dot}bias": "column"})
        elif isinstance(module, RowParallelLinear):
            kinds.update({f"{dot}weight": "row", f"{dot}bias": "replicated"})  # the bias is added after the sum
        elif isinstance(module, VocabParallelEmbedding):
            kinds[f"{dot}weight"] = "vocab"
    kinds["head_weight"] = "vocab"
    return {name: (full_name(stage, name), kinds.get(name, "replicated")) for name, _ in stage.named_parameters()}


def full_name(stage, name: str) -> str:
    """The full TinyLlama's name of a stage parameter: global layer index, no TP wrapper, tied head = embedding."""
    if name == "head_weight":
        return "tok_embeddings.weight"
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        name = f"layers.{stage.layer_range[int(i)]}.{rest}"
    return name.replace(".inner.", ".")


def shard(full: torch.Tensor, kind: str, t: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s slice of a full tensor (the vocabulary padded with zero rows to a multiple of t)."""
    if kind == "replicated":
        return full
    if kind == "vocab" and full.shape[0] % t:
        padded = full.new_zeros(-(-full.shape[0] // t) * t, *full.shape[1:])
        padded[:full.shape[0]] = full
        full = padded
    return full.chunk(t, TP_DIM[kind])[rank]


def unshard(local: torch.Tensor, kind: str, tp: GroupComm, vocab_size: int) -> torch.Tensor:
    """The full tensor from every TP rank's slice (one all-gather over the TP group)."""
    if kind == "replicated":
        return local
    full = tp.all_gather(local.contiguous(), TP_DIM[kind])
    return full[:vocab_size] if kind == "vocab" else full


# ----------------------------------------------------------------------------------------------- ZeRO state


def zero_moments(zero, dp: GroupComm) -> dict[str, list[torch.Tensor]]:
    """AdamW's moments of every parameter of a ZeRO-1/2 optimizer, shaped like it (all-gathered over DP)."""
    state = zero.optimizer.state.get(zero.shard, {})
    moments = {}
    for key in MOMENTS:
        if key not in state:
            return {}
        flat = dp.all_gather(state[key].detach().contiguous(), 0)
        offsets = [0]
        for p in zero.params:
            offsets.append(offsets[-1] + p.numel())
        moments[key] = [flat[lo:hi].view_as(p) for p, lo, hi in zip(zero.params, offsets, offsets[1:])]
    return moments


def _adam_step(state) -> int:
    step = state.get("step", 0)
    return int(step.item() if isinstance(step, torch.Tensor) else step)


def _hyper(optimizer) -> dict:
    return {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}


# ----------------------------------------------------------------------------------------------- save


def save_layout_checkpoint(path, trainer, step: int) -> None:
    """Write the full model and AdamW state of a Trainer3D to the directory `path` (every rank calls this)."""
    mesh, stage, zero = trainer.mesh, trainer.stage, trainer.optimizer
    comm, vocab = mesh.comm, stage.config.vocab_size
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    moments = zero_moments(zero, trainer.dp)
    index = {id(p): i for i, p in enumerate(zero.params)}
    part = {"params": {}, **{key: {} for key in moments}}
    for name, (full, kind) in stage_layouts(stage).items():
        p = stage.get_parameter(name)
        if name == "head_weight" and not stage.is_first:
            continue  # the tied weight is stored once, from the first stage (the copies are equal)
        part["params"][full] = unshard(p.detach(), kind, trainer.tp, vocab)
        for key, tensors in moments.items():
            part[key][full] = unshard(tensors[index[id(p)]], kind, trainer.tp, vocab)
    if mesh.dp_index == 0 and mesh.tp_index == 0:
        part["step"] = _adam_step(zero.optimizer.state.get(zero.shard, {}))
        torch.save(part, tmp / f"part-{mesh.pp_index}.pt")
    comm.barrier()
    if comm.rank == 0:
        _merge_parts(tmp, mesh, _hyper(zero.optimizer), stage.config, step)
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    comm.barrier()


def _merge_parts(tmp: Path, mesh, hyper: dict, config, step: int) -> None:
    parts = [torch.load(tmp / f"part-{s}.pt", weights_only=True) for s in range(mesh.pp)]
    merged = {key: {k: v for part in parts for k, v in part[key].items()} for key in ("params", *MOMENTS)
              if key in parts[0]}
    torch.save(merged.pop("params"), tmp / "model.pt")
    torch.save({"step": parts[0]["step"], "hyper": hyper, **merged}, tmp / "optimizer.pt")
    for s in range(mesh.pp):
        (tmp / f"part-{s}.pt").unlink()
    meta = {"format": FORMAT, "step": step, "layout": {"dp": mesh.dp, "tp": mesh.tp, "pp": mesh.pp},
            "config": dataclasses.asdict(config)}
    (tmp / "metadata.json").write_text(json.dumps(meta))


# ----------------------------------------------------------------------------------------------- load


def _read(path, config) -> tuple[dict, dict, dict]:
    path = Path(path)
    meta_file = path / "metadata.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"path: {path} is not a complete checkpoint (no metadata.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta["config"] != dataclasses.asdict(config):
        raise ValueError(f"checkpoint config {meta['config']} differs from the model's {dataclasses.asdict(config)}")
    return meta, torch.load(path / "model.pt", weights_only=True), torch.load(path / "optimizer.pt",
                                                                             weights_only=True)


def _adam_state_dict(saved: dict, moments: list[dict[str, torch.Tensor]]) -> dict:
    """A state dict for a one-group AdamW whose i-th parameter has the moments `moments[i]` (none: fresh)."""
    state = {i: {"step": torch.tensor(float(saved["step"])), **m} for i, m in enumerate(moments) if m}
    return {"state": state, "param_groups": [{**saved["hyper"], "params": list(range(len(moments)))}]}


@torch.no_grad()
def load_layout_checkpoint(path, trainer) -> int:
    """Load a layout checkpoint into a Trainer3D of any layout. Returns the saved training step."""
    meta, params, opt = _read(path, trainer.stage.config)
    stage, zero, tp = trainer.stage, trainer.optimizer, trainer.tp
    layouts = stage_layouts(stage)
    for name, (full, kind) in layouts.items():
        stage.get_parameter(name).copy_(shard(params[full], kind, tp.size, tp.rank))
    names = {id(p): n for n, p in stage.named_parameters()}
    lo = zero.rank * zero.shard_size
    moments = {}
    for key in MOMENTS:
        if key in opt:
            full = [shard(opt[key][layouts[names[id(p)]][0]], layouts[names[id(p)]][1], tp.size, tp.rank)
                    for p in zero.params]
            moments[key] = flatten_padded(zero.params, full, zero.padded)[lo:lo + zero.shard_size].clone()
    zero.optimizer.load_state_dict(_adam_state_dict(opt, [moments]))
    flat = flatten_padded(zero.params, [p.detach() for p in zero.params], zero.padded)
    zero.shard.copy_(flat[lo:lo + zero.shard_size])
    return meta["step"]


@torch.no_grad()
def load_full_model(path, model, optimizer: torch.optim.Optimizer) -> int:
    """Load a layout checkpoint into one process's TinyLlama and its AdamW. Returns the saved training step."""
    meta, params, opt = _read(path, model.config)
    named = dict(model.named_parameters())
    if set(named) != set(params):
        raise ValueError(f"checkpoint parameters {sorted(set(params) ^ set(named))} do not match the model's")
    for name, p in named.items():
        p.copy_(params[name])
    names = {id(p): n for n, p in named.items()}
    group = optimizer.param_groups[0]["params"]
    if len(optimizer.param_groups) != 1 or sorted(names.get(id(p), "") for p in group) != sorted(named):
        raise ValueError("optimizer: expected one param group holding every model parameter")
    moments = [{k: opt[k][names[id(p)]] for k in MOMENTS if k in opt} for p in group]
    optimizer.load_state_dict(_adam_state_dict(opt, moments))
    return meta["step"]
