"""Layout-free checkpoints of 3D/4D training: saved under one (dp, tp, pp, cp) layout, loaded under any other.

The files hold the FULL model, as one process would (the canonical format), under TinyLlama's own parameter
names (`layers.3.attention.wq.weight`): TP shards joined by concatenation (column-parallel weights along
dim 0, row-parallel along dim 1, the vocabulary along dim 0 with its padding rows dropped), the tied
embedding/head stored once, AdamW's moments (exp_avg, exp_avg_sq) in the same shapes and the same names,
the master weights (ZeRO's float32 shard under mixed precision) as the parameters. `part-<k>.pt` holds the
names of pipeline stage k of the saving run ({"params": {name: tensor}, "exp_avg": ..., "exp_avg_sq": ...,
"step", "hyper"}); the parts are disjoint and their union is the full model, whatever the new layout.
`metadata.json` (written last): format, training step, number of parts, the saving layout, the config and the
caller's `extra` (JSON; `gpuforge train` keeps its losses there).

Saving (`save_layout_checkpoint`, every rank calls it): each rank all-gathers its ZeRO-1 shards of the master
weights and AdamW state over the DP × CP group (the CP ranks hold the same weights) and cuts them back into per-
parameter tensors, each TP group all-gathers its TP shards, and one rank per stage writes that stage's part,
through sharded.py's crash-safe protocol (`commit_checkpoint`: tmp dir, metadata last, rename, then the `latest`
pointer).
Loading (`load_layout_checkpoint` into a Trainer3D of any layout, `load_full_model` into one process's
model and AdamW) slices every tensor for the new layout; padding rows get zeros, which AdamW keeps at zero.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gpuforge.parallel.checkpoint.sharded import commit_checkpoint, load_file, read_metadata
from gpuforge.parallel.comm.group import GroupComm
from gpuforge.parallel.data_parallel.flat import flat_views, flatten_padded
from gpuforge.parallel.model_parallel.tp_layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

FORMAT = "gpuforge-full-model/2"
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


def zero_state(zero, dp: GroupComm) -> dict[str, list[torch.Tensor]]:
    """The master weights ("params") and AdamW moments of every parameter of a ZeRO optimizer, each shaped
    like its parameter (the flat shards all-gathered over DP, in the master dtype); no moments before a step."""
    state = zero.optimizer.state.get(zero.shard, {})
    flats = {"params": zero.shard, **{key: state[key] for key in MOMENTS if key in state}}
    return {key: flat_views(zero.params, dp.all_gather(flat.detach().contiguous(), 0)) for key, flat in flats.items()}


def _adam_step(state) -> int:
    step = state.get("step", 0)
    return int(step.item() if isinstance(step, torch.Tensor) else step)


def _hyper(optimizer) -> dict:
    return {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}


# ----------------------------------------------------------------------------------------------- save


def save_layout_checkpoint(root, trainer, step: int, *, keep: int = 2, extra: dict | None = None) -> Path:
    """Write the full model and AdamW state of a Trainer3D as root/step-<step> (every rank calls this);
    `checkpoint.latest_checkpoint(root)` finds the newest. Returns the checkpoint directory."""
    mesh, stage, zero = trainer.mesh, trainer.stage, trainer.optimizer
    tensors = zero_state(zero, trainer.dp)
    index = {id(p): i for i, p in enumerate(zero.params)}
    part = {key: {} for key in tensors}
    for name, (full, kind) in stage_layouts(stage).items():
        if name == "head_weight" and not stage.is_first:
            continue  # the tied weight is stored once, from the first stage (the copies are equal)
        i = index[id(stage.get_parameter(name))]
        for key, values in tensors.items():
            part[key][full] = unshard(values[i], kind, trainer.tp, stage.config.vocab_size)
    part["step"] = _adam_step(zero.optimizer.state.get(zero.shard, {}))
    part["hyper"] = _hyper(zero.optimizer)

    def write_files(tmp: Path) -> None:
        if mesh.dp_index == 0 and mesh.cp_index == 0 and mesh.tp_index == 0:
            torch.save(part, tmp / f"part-{mesh.pp_index}.pt")

    layout = {"dp": mesh.dp, "tp": mesh.tp, "pp": mesh.pp, "cp": mesh.cp}
    meta = {"format": FORMAT, "step": step, "parts": mesh.pp, "layout": layout,
            "config": dataclasses.asdict(stage.config), "extra": extra or {}}
    return commit_checkpoint(root, step, mesh.comm, write_files, meta, keep=keep)


# ----------------------------------------------------------------------------------------------- load


def _read(path, config) -> tuple[dict, dict, dict]:
    """(metadata, {name: full tensor}, {"step", "hyper", moment: {name: full tensor}}) of a checkpoint."""
    path = Path(path)
    meta = read_metadata(path, FORMAT)
    if meta["config"] != dataclasses.asdict(config):
        raise ValueError(f"checkpoint config {meta['config']} differs from the model's {dataclasses.asdict(config)}")
    parts = [load_file(path / f"part-{s}.pt", meta, ("params", "step", "hyper")) for s in range(meta["parts"])]
    joined = {key: {k: v for part in parts for k, v in part[key].items()} for key in ("params", *MOMENTS)
              if key in parts[0]}
    return meta, joined.pop("params"), {"step": parts[0]["step"], "hyper": parts[0]["hyper"], **joined}


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

    def my_shard(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's ZeRO shard (master dtype) of the full tensors, TP-sliced for its stage's parameters."""
        local = [shard(tensors[layouts[names[id(p)]][0]], layouts[names[id(p)]][1], tp.size, tp.rank)
                 for p in zero.params]
        return flatten_padded(zero.params, local, zero.padded, zero.master_dtype)[lo:lo + zero.shard_size]

    moments = {key: my_shard(opt[key]).clone() for key in MOMENTS if key in opt}
    zero.optimizer.load_state_dict(_adam_state_dict(opt, [moments]))
    zero.shard.copy_(my_shard(params))
    return meta["step"]


@torch.no_grad()
def load_full_model(path, model, optimizer: torch.optim.Optimizer) -> int:
    """Load a layout checkpoint into one process's TinyLlama and its AdamW. Returns the saved training step."""
    meta, params, opt = _read(path, model.config)
    named = dict(model.named_parameters())
    if set(named) != set(params):
        raise ValueError(f"checkpoint parameters {sorted(set(params) ^ set(named))} do not match the model's")
    for name, p in named.items():
        if params[name].shape != p.shape:
            raise ValueError(f"checkpoint: parameter {name} has shape {tuple(params[name].shape)} there, "
                             f"{tuple(p.shape)} in the model")
        p.copy_(params[name])
    names = {id(p): n for n, p in named.items()}
    group = optimizer.param_groups[0]["params"]
    if len(optimizer.param_groups) != 1 or sorted(names.get(id(p), "") for p in group) != sorted(named):
        raise ValueError("optimizer: expected one param group holding every model parameter")
    moments = [{k: opt[k][names[id(p)]] for k in MOMENTS if k in opt} for p in group]
    optimizer.load_state_dict(_adam_state_dict(opt, moments))
    return meta["step"]
