"""``prepare_dataset``: raw files → the prepared format; ``validate_dataset_available``: the cheap check.

Steps of ``prepare_dataset(name, entry, data)``:

1. look the name up in the registry and validate the entry (ConfigError naming the key);
2. find the raw files (``data.root`` layouts, then system copies); download them through torchvision
   only when ``data.download`` is true; otherwise raise :class:`DatasetUnavailableError` naming the
   dataset, every path looked at and the fix;
3. per split, choose the kept indices (``entry.max_train``/``max_test``: a sorted uniform random subset
   from ``data.seed``, the name and the split, so it is reproducible and independent of chunking),
   then decode/resize chunk by chunk into a preallocated uint8 array;
4. write ``<split>.npz`` + ``meta.json`` in a temp dir and rename it into place (see ``prepared.py``).

A corrupt raw file surfaces as :class:`CorruptDatasetError` whose message names the dataset, the file
and the fix; nothing previously prepared is touched.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import numpy as np

from pipeline.config import to_dict
from pipeline.data import prepared
from pipeline.data.errors import CorruptDatasetError, DatasetUnavailableError
from pipeline.data.registry import DatasetSpec, check_entry, image_size
from pipeline.data.sources import Source
from pipeline.params import DataParams, DatasetEntry

log = logging.getLogger(__name__)

CHUNK = 2048      # images decoded/resized per step (bounds the float working memory of a resize)
_SPLIT_CODES = {"train": 0, "test": 1, "unlabeled": 2}


def _not_found(name: str, source: Source, data: DataParams, reason: str = "") -> DatasetUnavailableError:
    looked = "\n".join(f"  - {p}" for p in source.candidates(data))
    why = reason or (f"data.download is {'true' if data.download else 'false'}"
                     + ("" if source.downloadable else f" and {name} cannot be downloaded automatically"))
    return DatasetUnavailableError(
        f"dataset {name!r} is not on disk: no complete copy of {source.what} found ({why}).\n"
        f"Looked in:\n{looked}\nFix: {source.fix(data)}.")


def _find(source: Source, data: DataParams) -> Path | None:
    return next((p for p in source.candidates(data) if source.is_complete(p)), None)


def validate_dataset_available(name: str, entry: DatasetEntry, data_params: DataParams) -> Path | None:
    """Refuse early: check the entry and that the raw files exist (existence only; nothing is read).

    Returns the directory that will be read, or None when it is absent but will be downloaded
    (``data.download`` true).  Raises ConfigError (unknown name/task, bad size) or
    DatasetUnavailableError (not on disk, not downloadable).
    """
    spec = check_entry(name, entry)
    found = _find(spec.source, data_params)
    if found is None and not (data_params.download and spec.source.downloadable):
        raise _not_found(name, spec.source, data_params)
    return found


def _locate(name: str, spec: DatasetSpec, data: DataParams) -> Path:
    found = validate_dataset_available(name, DatasetEntry(), data)
    if found is not None:
        return found
    log.info("%s: downloading into %s with torchvision (data.download is true)", name, data.root)
    try:
        spec.source.download(data)
    except Exception as e:  # network and archive errors come in many types (URLError, RuntimeError, OSError ...)
        raise _not_found(name, spec.source, data, f"download failed: {type(e).__name__}: {e}") from e
    found = _find(spec.source, data)
    if found is None:
        raise _not_found(name, spec.source, data, "the download finished but the expected files are missing")
    return found


def subsample(n: int, limit: int, seed: int, name: str, split: str) -> np.ndarray:
    """Sorted indices of the kept images: all when ``limit`` is 0 or ≥ n, else a uniform random subset."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), _SPLIT_CODES.get(split, 3)]))
    return np.sort(rng.choice(n, size=limit, replace=False))


def _check_labels(raw) -> None:
    """Every label indexes its task's class names (a wrong file, e.g. CIFAR-100 pickles named CIFAR-10)."""
    for split, rs in raw.splits.items():
        for task, y in rs.labels.items():
            n = len(raw.class_names[task])
            if len(y) and (y.min() < 0 or y.max() >= n):
                raise CorruptDatasetError(f"{raw.origin}: {split} labels of task {task!r} span "
                                          f"{y.min()}..{y.max()} but there are {n} classes", raw.origin)


def prepare_dataset(name: str, entry: DatasetEntry, data_params: DataParams) -> Path:
    """Build ``<data.prepared>/<name>/`` from the raw files; return that directory."""
    spec = check_entry(name, entry)
    size = image_size(name, entry)
    source_dir = _locate(name, spec, data_params)
    target = Path(data_params.prepared) / name
    start = time.perf_counter()
    try:
        raw = spec.source.open(source_dir, data_params)
        _check_labels(raw)
        with prepared.staging(target) as tmp:
            counts = {}
            for split, rs in raw.splits.items():
                limit = entry.max_test if split == "test" else entry.max_train
                keep = subsample(rs.n, limit, data_params.seed, name, split)
                images = prepared.allocate_images(tmp, split, len(keep), size)
                for lo in range(0, len(keep), CHUNK):
                    images[lo:lo + CHUNK] = rs.read(keep[lo:lo + CHUNK], size)
                prepared.write_split(tmp, split, images, {task: y[keep] for task, y in rs.labels.items()})
                counts[split] = int(len(keep))
                log.info("%s/%s: %d images at %dx%d", name, split, len(keep), size, size)
            prepared.write_meta(tmp, {
                "name": name, "source": raw.origin, "image_size": size,
                "tasks": {task: {"num_classes": len(names), "class_names": names}
                          for task, names in raw.class_names.items()},
                "splits": counts, "pretrain_splits": list(spec.pretrain_splits),
                "params": {"seed": data_params.seed, "entry": to_dict(entry), "image_size": size, **raw.params},
            })
    except CorruptDatasetError as e:
        raise CorruptDatasetError(f"dataset {name!r}: {e}\nFix: {spec.source.repair(data_params)}.", e.path) from e
    log.info("%s: prepared in %.1f s -> %s", name, time.perf_counter() - start, target)
    return target


def validate_datasets(data_params: DataParams) -> None:
    """``validate_dataset_available`` for every entry of ``data.datasets``."""
    for name, entry in data_params.datasets.items():
        validate_dataset_available(name, entry, data_params)

