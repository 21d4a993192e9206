"""Sharded checkpoints of every data-parallel layout (DDP, ZeRO-1/2, ZeRO-3) that survive a kill at any instant.

    path = save_checkpoint(root, step, model, optimizer, comm, extra={...})   # every rank calls it
    path = latest_checkpoint(root)                          # None before the first save
    meta = load_checkpoint(path, model, optimizer, comm)    # meta["step"], meta["extra"]

`model`/`optimizer` are what the strategy built (DistributedDataParallel / FullyShardedDataParallel / a plain
module; a torch optimizer or ZeroRedundancyOptimizer). What is written and how it is resharded on load (another
world size, another layout) is state.py's; this module is the crash-safe protocol:

    root/latest                  one line: the name of the newest complete checkpoint
    root/step-00000004/          complete checkpoints: shard-<rank>.pt, rank0.pt, metadata.json
    root/step-00000006.tmp/      a save in progress, or one a kill interrupted: never read, removed later

1. every rank writes its files into <dir>.tmp; barrier; rank 0 fsyncs them, records each file's SHA-256 and
   writes metadata.json LAST;
2. rank 0 renames <dir>.tmp -> <dir> (atomic);
3. rank 0 writes root/latest.tmp, fsyncs it and os.replace()s it onto root/latest (atomic);
4. only then are the other directories removed, except the `keep` - 1 newest before the new one (leftover .tmp
   directories and unpublished ones of a later step go too).
A kill before 3 leaves `latest` naming the previous checkpoint, which nothing has touched since it was
published; from 3 on it names the new one, complete. So at every instant `latest` names a complete checkpoint.
Loading verifies every file it reads against its recorded digest (a flipped byte is an error naming the file),
the shapes against the model's, and the optimizer's class against the saving one's.
Steps 1-2 (`write_directory_atomically`) and 1-4 (`commit_checkpoint`) are reusable for other layouts. The
fault points ckpt-files-written, ckpt-before-metadata, ckpt-before-rename, ckpt-before-latest and
ckpt-before-prune (faults.py) let tests kill a rank between the steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import torch

from gpuforge.parallel.checkpoint import state as checkpoint_state
from gpuforge.parallel.checkpoint.faults import fail_point

FORMAT = "gpuforge-checkpoint/2"
_STEP_DIR = re.compile(r"step-(\d+)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_directory_atomically(path, comm, write_files, metadata: dict) -> Path:
    """Make `path` appear complete or not at all: every rank calls `write_files(tmp_dir)` for its own files; rank
    0 then writes `metadata` as metadata.json last and renames the directory into place. `path` must not exist
    (a directory is written once; `commit_checkpoint` versions them). Call on every rank."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.exists():
        raise FileExistsError(f"path: {path} exists; a checkpoint directory is written once")
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    write_files(tmp)
    fail_point("ckpt-files-written", comm.rank)
    comm.barrier()
    if comm.rank == 0:
        digests = {}
        for f in sorted(tmp.iterdir()):
            _fsync(f)
            digests[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
        fail_point("ckpt-before-metadata", comm.rank)
        _write_synced(tmp / "metadata.json", json.dumps({**metadata, "files": digests}, indent=1))
        _fsync(tmp)
        fail_point("ckpt-before-rename", comm.rank)
        os.rename(tmp, path)
        _fsync(path.parent)
    comm.barrier()
    return path


def _latest_name(root: Path) -> str | None:
    """The checkpoint directory name root/latest holds: a step-NNNNNNNN name inside root, nothing else (a
    pointer to another directory, or a path, is refused)."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _STEP_DIR.fullmatch(name):
        raise ValueError(f"root: {pointer} must name a step-NNNNNNNN directory of {root}, got {name!r}")
    return name


def latest_checkpoint(root) -> Path | None:
    """The checkpoint `root/latest` names, or None when there is none yet."""
    root = Path(root)
    name = _latest_name(root)
    if name is None:
        return None
    path = root / name
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"root: {root / 'latest'} names {path}, which is not a complete checkpoint")
    return path


def _prune(root: Path, latest: int, keep: int) -> None:
    """Keep step-<latest> and the keep - 1 newest before it; remove older ones, unpublished later ones (a kill
    between rename and publish, then a restart from an earlier step) and leftover .tmp directories."""
    steps = sorted(int(m.group(1)) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir())
    kept = {latest, *[s for s in steps if s < latest][-(keep - 1):]} if keep > 1 else {latest}
    for d in root.iterdir():
        step = _STEP_DIR.match(d.name)
        if d.is_dir() and (d.name.endswith(".tmp") or (step and int(step.group(1)) not in kept)):
            shutil.rmtree(d, ignore_errors=True)


def commit_checkpoint(root, step: int, comm, write_files, metadata: dict, *, keep: int = 2) -> Path:
    """Write root/step-<step> atomically (`write_directory_atomically`), point root/latest at it, then keep only
    the newest `keep` checkpoints. Call on every rank; returns the new directory."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the latest checkpoint is always kept), got {keep}")
    root = Path(root)
    name = f"step-{step:08d}"
    if _latest_name(root) == name:
        raise ValueError(f"step: {step} is already the latest checkpoint in {root}")
    if comm.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / name, ignore_errors=True)  # complete but never published: a kill before step 3
    comm.barrier()
    path = write_directory_atomically(root / name, comm, write_files, metadata)
    if comm.rank == 0:
        fail_point("ckpt-before-latest", comm.rank)
        _write_synced(root / "latest.tmp", name + "\n")
        os.replace(root / "latest.tmp", root / "latest")
        _fsync(root)
        fail_point("ckpt-before-prune", comm.rank)
        _prune(root, step, keep)
    comm.barrier()
    return path


def save_checkpoint(root, step: int, model, optimizer, comm, *, extra: dict | None = None, keep: int = 2) -> Path:
    """Save the training state after `step` steps as root/step-<step>; `extra` (JSON) comes back from load."""
    layout, module, groups = checkpoint_state.layout_of(model, optimizer, comm.rank, comm.world_size)
    shard = checkpoint_state.export_shard(groups)
    rank0 = checkpoint_state.export_rank0(module, groups) if comm.rank == 0 else None

    def write_files(tmp: Path) -> None:
        torch.save(shard, tmp / f"shard-{comm.rank}.pt")
        if rank0 is not None:
            torch.save(rank0, tmp / "rank0.pt")

    meta = {"format": FORMAT, "step": step, "world_size": comm.world_size, "layout": layout,
            "optimizer": checkpoint_state.optimizer_kind(groups), "groups": checkpoint_state.describe(groups),
            "extra": extra or {}}
    return commit_checkpoint(root, step, comm, write_files, meta, keep=keep)


def read_metadata(path: Path, expected_format: str) -> dict:
    """A complete checkpoint's metadata.json (written last, so its presence means complete), format checked."""
    path = Path(path)
    meta_file = path / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"path: {path} is not a complete checkpoint (no metadata.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_file}: not a readable checkpoint metadata file ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != expected_format:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_file}: format {found!r}, expected {expected_format!r}")
    if not isinstance(meta.get("files"), dict):
        raise ValueError(f"{meta_file}: no file digests ('files'); not a {expected_format} checkpoint")
    return meta


def load_file(path: Path, meta: dict, expected_keys: tuple[str, ...]) -> dict:
    """torch.load (weights_only) of one checkpoint file after checking its SHA-256 against the metadata; every
    failure (missing, corrupted, unreadable, wrong contents) is a ValueError naming the file."""
    path = Path(path)
    expected = meta["files"].get(path.name)
    if expected is None:
        raise ValueError(f"{path}: not listed in the checkpoint's metadata.json")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{path}: its SHA-256 differs from the one recorded at save time; the file is corrupted")
    try:
        content = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is reported with the file's name
        raise ValueError(f"{path}: not a readable checkpoint file ({type(err).__name__}: {err})") from None
    if not isinstance(content, dict) or not set(expected_keys) <= set(content):
        raise ValueError(f"{path}: expected a dict with keys {list(expected_keys)}")
    return content


def load_checkpoint(path, model, optimizer, comm=None) -> dict:
    """Restore a checkpoint directory into what the strategy built, at any world size and layout; returns its
    metadata. The RNG state is restored too when the world size is the one saved. No collective: `comm` (None:
    one process) only says this rank's place."""
    path = Path(path)
    meta = read_metadata(path, FORMAT)
    rank, world = (0, 1) if comm is None else (comm.rank, comm.world_size)
    _, module, groups = checkpoint_state.layout_of(model, optimizer, rank, world)
    kind = checkpoint_state.optimizer_kind(groups)
    if meta.get("optimizer") != kind:
        raise ValueError(f"optimizer: the checkpoint {path} was saved with {meta.get('optimizer')}, this run steps "
                         f"{kind}; its state cannot be loaded into another optimizer")
    # on the host: pieces saved from different GPUs are joined there, then copied to this rank's device
    shards = [load_file(path / f"shard-{r}.pt", meta, ("pieces", "rng")) for r in range(meta["world_size"])]
    values, state = checkpoint_state.assemble(meta["groups"], shards)
    rank0 = load_file(path / "rank0.pt", meta, ("scalars", "param_groups", "untrained"))
    checkpoint_state.restore(module, groups, values, state, rank0)
    if meta["world_size"] == world:
        torch.set_rng_state(shards[rank]["rng"])
    return meta
