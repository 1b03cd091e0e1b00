"""Nothing the pipeline loads can run code: checkpoints, final.pt and prepared .npz files.

Each hostile file carries a payload that would create a marker file when unpickled; the tests assert
the load is refused with a message naming the file *and* that the marker was never created.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.checkpoint as ckpt_io
from pipeline.data import load_split
from pipeline.models import build_backbone, load_backbone
from pipeline.train import CHECKPOINT, FINAL, checkpoint_resumable, pretrain
from tests.test_train import tiny_images, tiny_params


class Payload:
    """Unpickling this calls ``open(marker, 'w')``: the file appears iff the pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def final_dict(**extra) -> dict:
    backbone, feat_dim = build_backbone("resnet_small", 16, 4, True)
    return {"backbone": backbone.state_dict(), "backbone_name": "resnet_small", "width": 4, "cifar_stem": True,
            "image_size": 16, "feat_dim": feat_dim, "method": "simclr", "variant": "baseline", "lambda": 0.0,
            "mean": [0.5] * 3, "std": [0.5] * 3, "params_hash": "x", **extra}


def test_the_payload_runs_under_full_unpickling(tmp_path):
    """Guards the other tests: the payload really does create the marker when pickle is trusted."""
    marker = tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / CHECKPOINT
    ckpt_io.save_atomic({"step": 3, "model": {}, "history": Payload(marker)}, path)
    with pytest.raises(ckpt_io.UnsafeCheckpointError) as err:
        ckpt_io.load(path)
    assert str(path) in str(err.value) and "cannot be read safely" in str(err.value)
    assert "open" in str(err.value)                                     # names what it refused
    assert not marker.exists()
    # the trainer's resume check treats it as not resumable (and so overwrites it) without running it
    assert not checkpoint_resumable(tiny_params(), "simclr", "baseline", tmp_path)
    assert not marker.exists()


def test_final_pt_with_pickled_code_is_refused_by_load_backbone(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / FINAL
    torch.save(final_dict(extra_info=Payload(marker)), path)
    with pytest.raises(ValueError, match="cannot be read safely") as err:
        load_backbone(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    torch.save(final_dict(), path)                                       # the same file without the payload
    backbone, meta = load_backbone(path)
    assert meta["feat_dim"] == 32 and not backbone.training


def test_corrupt_file_is_named_as_unreadable_not_unsafe(tmp_path):
    path = tmp_path / CHECKPOINT
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a torch checkpoint") as err:
        ckpt_io.load(path)
    assert not isinstance(err.value, ckpt_io.UnsafeCheckpointError) and str(path) in str(err.value)


@pytest.mark.parametrize("method, variant", [("moco", "augself"), ("byol", "baseline")])
def test_the_pipelines_own_checkpoints_load_with_weights_only(tmp_path, method, variant):
    """What the loop saves today (optimiser, LambdaLR, RNG states, loss history, momentum encoders,
    MoCo queue) fits the restricted unpickler without registering any extra type."""
    params = tiny_params(epochs=1, checkpoint_every=1)
    pretrain(params, method, variant, tiny_images(), tmp_path, device="cpu")
    for name in (CHECKPOINT, FINAL):
        torch.load(tmp_path / name, map_location="cpu", weights_only=True)
    state = ckpt_io.load(tmp_path / CHECKPOINT)
    assert state["step"] == 2 and isinstance(state["rng"][0]["torch"], torch.Tensor)
    assert checkpoint_resumable(params, method, variant, tmp_path)


def test_prepared_npz_with_an_object_array_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "prepared"
    (root / "toy").mkdir(parents=True)
    images = np.empty(2, dtype=object)
    images[0], images[1] = Payload(marker), Payload(marker)
    np.savez(root / "toy" / "train.npz", images=images, labels_class=np.zeros(2, np.int64))
    meta = {"name": "toy", "source": "test", "image_size": 16, "tasks": {"class": {"num_classes": 1,
            "class_names": ["a"]}}, "splits": {"train": 2}, "sha256": {}, "pretrain_splits": ["train"],
            "params": {}, "format": 1}
    (root / "toy" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="refused, it holds pickled objects") as err:
        load_split(root, "toy", "train")
    assert str(root / "toy" / "train.npz") in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("compressed", [False, True])
def test_write_npz_round_trips_and_a_failure_keeps_the_previous_file(tmp_path, compressed):
    path = tmp_path / "sub" / "items.npz"
    arrays = {"a/pred": np.arange(5, dtype=np.int32), "b": np.linspace(0, 1, 7)}
    assert ckpt_io.write_npz(path, arrays, compressed=compressed) == path
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == set(arrays) and all(np.array_equal(z[k], v) for k, v in arrays.items())
    before = path.read_bytes()
    reference = tmp_path / "reference.npz"        # the same bytes as numpy's own writer (the files DVC tracks)
    (np.savez_compressed if compressed else np.savez)(reference, **arrays)
    assert reference.read_bytes() == before
    reference.unlink()
    class Boom:
        def __array__(self, *args, **kwargs):
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):  # fails after the first member is written: no partial file
        ckpt_io.write_npz(path, {"ok": np.arange(3), "bad": Boom()}, compressed=compressed)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["items.npz"]


def test_write_text_writes_the_text_as_it_is(tmp_path):
    path = ckpt_io.write_text(tmp_path / "r.json", json.dumps({"b": 1, "a": [2]}, indent=1, sort_keys=True))
    assert path.read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}'


def test_no_module_hand_rolls_an_atomic_write():
    """checkpoint.py owns atomic writes (temp file + fsync + rename): nothing else renames a temp file over
    an output, in the library, the stages, the scripts or the benches.  The one exception is the prepared
    dataset, a directory swapped whole (pipeline/data/prepared.py)."""
    import re

    root = Path(ckpt_io.__file__).parents[1]
    pattern = re.compile(r"os\.replace\(|\btmp\w*\.replace\(|\.tmp\"?\)?\.replace\(|with_suffix\(\"\.tmp\"\)|\.json\.tmp")
    files = [f for d in ("pipeline", "stages", "scripts", "bench") for f in sorted((root / d).rglob("*.py"))
             if "node_modules" not in f.parts]
    found = [f"{f.relative_to(root)}:{i}: {line.strip()}"
             for f in files if f.relative_to(root).as_posix() not in ("pipeline/checkpoint.py", "pipeline/data/prepared.py")
             for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "write through pipeline.checkpoint (write_json / write_csv / write_npz / write_text) instead:\n" + "\n".join(found)
