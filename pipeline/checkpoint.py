"""Atomic output files: checkpoints (``torch.save``), JSON metrics and CSV plots.

Every file the pipeline writes for DVC or for resuming goes through here, so there is one way to
write a file atomically.  A file is written to a temporary file in the destination's own directory and moved over the
destination with :func:`os.replace`, which is atomic on POSIX and Windows when both paths are on
the same file system (which the same directory guarantees).  A crash, a full disk or an exception
during serialisation therefore leaves either the previous file or the new one, never a truncated
mix; the temporary file is removed on failure.

The file is flushed and ``fsync``-ed before the rename so that the rename cannot reach the disk
before the data does (otherwise a power loss could leave a complete-looking but empty file).

Loading never runs code: :func:`load` uses ``torch.load(weights_only=True)``, PyTorch's restricted
unpickler, which rebuilds only tensors, storages and plain containers (dict, list, tuple, str, int,
float, bool, None).  Models travel between clones through the DVC remote and out of MLflow, so a
``checkpoint.pt`` / ``final.pt`` is input from elsewhere; with full unpickling a crafted file would run
arbitrary code on the machine that evaluates it.  Everything the pipeline saves fits the restricted
set as it is (RNG states are ``ByteTensor`` objects, the loss history is lists of floats, optimiser and
scheduler states are tensors and numbers), so no extra types are registered with
``torch.serialization.add_safe_globals``; a file that holds anything else is refused with
:class:`UnsafeCheckpointError`, naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
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


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds pickled Python objects besides tensors and plain containers."""


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_atomic` without running any code it may carry.

    Raises FileNotFoundError for a missing file, :class:`UnsafeCheckpointError` (a ValueError) for a
    file whose pickle names anything beyond tensors and plain containers, and ValueError for a file
    that is not a torch checkpoint at all; every message names the file and the fix.  The stages turn
    a ValueError into one ``error:`` line and exit status 2.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found; run the pretrain stage first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps the restricted unpickler's complaint in a long generic text: keep its one useful line.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
        why = why[why.find("Unsupported"):] if "Unsupported" in why else why
        why = why.split(". Please use")[0][:300]
        if "global" in why.lower():
            raise UnsafeCheckpointError(
                f"{path}: cannot be read safely: refused, it holds pickled Python objects that are not tensors "
                f"or plain containers ({why}); such a file can run code when unpickled, so it is never loaded. "
                f"Re-create it with `dvc repro` (pretrain stage) or fetch the pipeline's own file with "
                f"`dvc pull`") from None
        raise ValueError(f"{path}: cannot be read as a torch checkpoint (UnpicklingError: {why}); "
                         f"re-create it with `dvc repro` (pretrain stage)") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as e:
        # truncated zip archives, foreign formats, legacy files
        raise ValueError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else ''}); re-create it with `dvc repro` "
                         f"(pretrain stage)") from None
