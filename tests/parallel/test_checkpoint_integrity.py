"""What a checkpoint loader refuses, each with an error naming the file or the parameter (one process; the
files are written by the same protocol every strategy uses): a shape that would broadcast, flipped bytes, an
optimizer of another class, a `latest` pointer leaving the root, files that are not checkpoint files."""

import json
from types import SimpleNamespace

import pytest
import torch

from gpuforge.parallel.checkpoint.sharded import latest_checkpoint, load_checkpoint, save_checkpoint

SOLO = SimpleNamespace(rank=0, world_size=1, barrier=lambda: None)  # the protocol's view of one process


class Pair(torch.nn.Module):
    def __init__(self, rows=3):
        super().__init__()
        self.a = torch.nn.Linear(4, rows, bias=False)
        self.register_buffer("count", torch.zeros(2))


def _saved(tmp_path, optimizer_class=torch.optim.AdamW, rows=3):
    torch.manual_seed(0)
    model = Pair(rows)
    opt = optimizer_class(model.parameters(), lr=0.1)
    model.a.weight.sum().backward()
    opt.step()
    return save_checkpoint(tmp_path / "ckpt", 1, model, opt, SOLO)


def test_a_shape_mismatch_names_the_parameter(tmp_path):
    """A (1, 4) weight used to load into a (3, 4) parameter by broadcasting."""
    path = _saved(tmp_path, rows=1)
    model = Pair(3)
    with pytest.raises(ValueError, match=r"checkpoint: parameter a.weight has shape \(1, 4\) there, \(3, 4\)"):
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))


def test_flipped_bytes_are_detected(tmp_path):
    path = _saved(tmp_path)
    shard = path / "shard-0.pt"
    data = bytearray(shard.read_bytes())
    for i in range(8):
        data[len(data) // 2 + i] ^= 0xFF
    shard.write_bytes(bytes(data))
    model = Pair()
    with pytest.raises(ValueError, match=r"shard-0.pt: its SHA-256 differs from the one recorded at save time"):
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))


def test_an_adamw_checkpoint_does_not_load_into_sgd(tmp_path):
    path = _saved(tmp_path)
    model = Pair()
    with pytest.raises(ValueError, match="optimizer: the checkpoint .* was saved with torch.optim.adamw.AdamW, "
                                         "this run steps torch.optim.sgd.SGD"):
        load_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("pointer", ["../elsewhere", "/tmp", "step-00000001/../../x", "not-a-step"])
def test_latest_may_not_point_outside_the_root(tmp_path, pointer):
    path = _saved(tmp_path)
    (path.parent / "latest").write_text(pointer + "\n")
    with pytest.raises(ValueError, match="must name a step-NNNNNNNN directory"):
        latest_checkpoint(path.parent)


@pytest.mark.parametrize("damage, match", [
    (lambda p: (p / "metadata.json").write_text("{not json"), r"metadata.json: not a readable checkpoint metadata"),
    (lambda p: (p / "metadata.json").write_text("[]"), r"metadata.json: format 'list'"),
    (lambda p: (p / "rank0.pt").unlink(), r"rank0.pt: cannot be read"),
    (lambda p: _rewrite(p, "rank0.pt", b"not a pickle"), r"rank0.pt: not a readable checkpoint file"),
    (lambda p: _rewrite(p, "rank0.pt", _saved_bytes({"x": 1})), r"rank0.pt: expected a dict with keys"),
])
def test_bad_files_are_errors_that_name_the_file(tmp_path, damage, match):
    path = _saved(tmp_path)
    damage(path)
    model = Pair()
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))


def _saved_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rewrite(path, name, data: bytes):
    """Replace a file and record its new digest, so only its contents are wrong, not its checksum."""
    import hashlib

    (path / name).write_bytes(data)
    meta = json.loads((path / "metadata.json").read_text())
    meta["files"][name] = hashlib.sha256(data).hexdigest()
    (path / "metadata.json").write_text(json.dumps(meta))


def test_an_intact_checkpoint_loads(tmp_path):
    path = _saved(tmp_path)
    model = Pair()
    meta = load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    assert meta["step"] == 1 and set(meta["files"]) == {"shard-0.pt", "rank0.pt"}
