"""The prepared on-disk format (docs/architecture.md, "Prepared data") and its atomic writer.

``<prepared_root>/<name>/``

* ``<split>.npz`` (uncompressed, so loading is a plain read): ``images`` uint8 (N, H, W, 3) RGB NHWC
  and one int64 ``labels_<task>`` per task; splits are ``train`` and ``test`` (STL-10 adds
  ``unlabeled``, images only).
* ``meta.json``: ``{name, source, image_size, tasks: {task: {num_classes, class_names}},
  splits: {split: n}, sha256: {file: hash}, params: {...}, pretrain_splits: [...], format: 1}``.

A dataset directory is written under a temporary sibling and renamed into place only when complete,
so a failure (missing or corrupt raw data, Ctrl-C, full disk) never leaves a half-written dataset and
never deletes a previously prepared one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data.errors import PreparedDataMissingError

FORMAT_VERSION = 1
META = "meta.json"
# Image arrays larger than this are staged as a memory-mapped .npy on disk instead of in RAM.
MEMMAP_BYTES = 1 << 30


@dataclass
class Split:
    images: np.ndarray                   # uint8 (N, H, W, 3)
    labels: dict[str, np.ndarray]        # task -> int64 (N,)
    meta: dict


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def staging(target: Path) -> Iterator[Path]:
    """Yield an empty temp dir next to ``target``; on success it replaces ``target`` atomically.

    The previous ``target`` (if any) is moved aside, the new one renamed in, then the old one removed;
    on any exception the temp dir is removed and ``target`` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset directory is an ordinary shared output
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def allocate_images(tmp: Path, split: str, n: int, size: int) -> np.ndarray:
    """Preallocated uint8 (n, size, size, 3): in RAM, or memory-mapped in ``tmp`` when large."""
    shape = (n, size, size, 3)
    if n * size * size * 3 <= MEMMAP_BYTES:
        return np.empty(shape, dtype=np.uint8)
    return np.lib.format.open_memmap(tmp / f".{split}-images.npy", mode="w+", dtype=np.uint8, shape=shape)


def write_split(tmp: Path, split: str, images: np.ndarray, labels: dict[str, np.ndarray]) -> Path:
    """``tmp/<split>.npz`` with ``images`` and ``labels_<task>`` (int64); drops the staging memmap."""
    path = tmp / f"{split}.npz"
    np.savez(path, images=images, **{f"labels_{task}": np.asarray(y, dtype=np.int64) for task, y in labels.items()})
    staged = tmp / f".{split}-images.npy"
    if staged.exists():  # the caller's memmap stays valid until dropped (POSIX unlink semantics)
        staged.unlink()
    return path


def write_meta(tmp: Path, meta: dict) -> None:
    meta = dict(meta, format=FORMAT_VERSION,
                sha256={p.name: sha256_file(p) for p in sorted(tmp.glob("*.npz"))})
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")


def _missing(path: Path, name: str) -> PreparedDataMissingError:
    return PreparedDataMissingError(f"prepared dataset file {path} not found; run `dvc repro prepare@{name}` first")


def load_meta(prepared_root: str | Path, name: str) -> dict:
    path = Path(prepared_root) / name / META
    if not path.is_file():
        raise _missing(path, name)
    return json.loads(path.read_text())


def load_split(prepared_root: str | Path, name: str, split: str, verify: bool = False) -> Split:
    """Read ``<prepared_root>/<name>/<split>.npz`` fully into memory.

    ``verify``: also check the file's sha256 against meta.json (a full extra read).
    """
    meta = load_meta(prepared_root, name)
    path = Path(prepared_root) / name / f"{split}.npz"
    if split not in meta["splits"]:
        raise ValueError(f"{name}: no split {split!r}; prepared splits: {', '.join(meta['splits'])}")
    if not path.is_file():
        raise _missing(path, name)
    if verify and sha256_file(path) != meta["sha256"][path.name]:
        raise ValueError(f"{path}: sha256 differs from {META}; the file changed after preparing: "
                         f"run `dvc repro prepare@{name}`")
    try:  # allow_pickle=False: an object array (a pickle) in a prepared file is refused, never unpickled
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
            labels = {key[len("labels_"):]: z[key] for key in z.files if key.startswith("labels_")}
    except ValueError as e:
        raise ValueError(f"{path}: refused, it holds pickled objects ({e}); prepared files hold only numeric "
                         f"arrays: run `dvc repro prepare@{name}`") from None
    return Split(images, labels, meta)


def pretrain_images(prepared_root: str | Path, name: str) -> np.ndarray:
    """The images of every split listed in meta.json's ``pretrain_splits``, concatenated (uint8 NHWC)."""
    meta = load_meta(prepared_root, name)
    parts = [load_split(prepared_root, name, s).images for s in meta["pretrain_splits"]]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
