"""Atomic output files: checkpoints (``torch.save``), JSON metrics and CSV plots.

Every file the pipeline writes for DVC or for resuming goes through here, so there is one way to
write a file atomically.  A file is written to a temporary file in the destination's own directory and moved over the
destination with :func:`os.replace`, which is atomic on POSIX and Windows when both paths are on
the same file system (which the same directory guarantees).  A crash, a full disk or an exception
during serialisation therefore leaves either the previous file or the new one, never a truncated
mix; the temporary file is removed on failure.

The file is flushed and ``fsync``-ed before the rename so that the rename cannot reach the disk
before the data does (otherwise a power loss could leave a complete-looking but empty file).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same directory + ``os.replace``)."""
    return _write_atomic(path, lambda f: torch.save(obj, f))


def write_json(path: str | Path, data: dict) -> Path:
    """``data`` as indented JSON with sorted keys (reruns give identical bytes), atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return _write_atomic(path, lambda f: f.write(text.encode()))


def write_csv(path: str | Path, rows: list[dict], header: list[str] | None = None) -> Path | None:
    """``rows`` as CSV with the first row's keys as header, atomically.  With no rows: only ``header``
    (a declared DVC output must exist even when empty), or nothing when ``header`` is None."""
    if not rows and header is None:
        return None
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else list(header))
    writer.writeheader()
    writer.writerows(rows)
    return _write_atomic(path, lambda f: f.write(buf.getvalue().encode()))


def _write_atomic(path: str | Path, write: Callable[[Any], Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_atomic` (or any trusted ``torch.save`` file).

    ``weights_only=False`` because our checkpoints hold plain Python containers next to tensors
    (RNG states, metric history); only load files this pipeline wrote.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found; run the pretrain stage first")
    return torch.load(path, map_location=map_location, weights_only=False)
