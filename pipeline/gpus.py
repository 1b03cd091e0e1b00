"""Which GPU a stage trains or extracts features on: one free GPU per process, claimed with a lock.

``dvc queue start -j N`` runs N experiments side by side, each stage in its own process.  Without a
choice of device every one of them would take ``cuda:0`` and the other GPUs would idle.  A stage
therefore claims a GPU: it takes an exclusive ``flock`` on ``<lock dir>/<GPU UUID>.lock`` for the
first visible GPU whose lock is free, and holds it until the process exits.  The kernel drops the
lock when the process ends, however it ends (SIGKILL, OOM), so a crashed stage never leaves a GPU
claimed.  When every visible GPU is claimed the stage waits for one to be freed.

* One visible GPU (or ``CUDA_VISIBLE_DEVICES`` narrowed to one): that GPU, no lock: nothing to share.
* No GPU: ``cpu``.
* Under ``torchrun`` (``WORLD_SIZE > 1``) each rank's device is ``cuda:LOCAL_RANK``
  (:mod:`pipeline.distributed`); this module is not consulted.

Locks are keyed by the GPU's UUID, not its index, so processes with different
``CUDA_VISIBLE_DEVICES`` views of the same machine agree on which physical GPU is taken.  The lock
directory is ``$AUGSELF_GPU_LOCK_DIR``, by default ``<tmp>/augself-gpu-locks``: one per machine,
shared by every queue worker (their workspaces are separate copies of the repository, so a
directory inside the repository would not be shared).
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Sequence

LOCK_DIR_ENV = "AUGSELF_GPU_LOCK_DIR"

_held: dict[str, IO] = {}     # GPU id → the open lock file; held until the process exits


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "augself-gpu-locks")


def try_claim(gpu_id: str, directory: Path) -> bool:
    """Take the lock of ``gpu_id`` without waiting; True when this process now holds it."""
    if gpu_id in _held:
        return True
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / f"{gpu_id}.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return False
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _held[gpu_id] = f
    return True


def release(gpu_id: str) -> None:
    """Give a claimed GPU back before the process ends (tests; a long-lived caller)."""
    f = _held.pop(gpu_id, None)
    if f is not None:
        f.close()          # closing the only descriptor drops the flock


def claim(gpu_ids: Sequence[str], directory: Path | None = None, timeout: float | None = None,
          poll: float = 2.0) -> int:
    """Index into ``gpu_ids`` of the first GPU this process could claim; waits while all are claimed.

    ``timeout``: seconds to wait at most (None: for ever); then ``TimeoutError`` naming the lock files.
    """
    directory = lock_dir() if directory is None else Path(directory)
    t0, said = time.monotonic(), False
    while True:
        for i, gpu_id in enumerate(gpu_ids):
            if try_claim(gpu_id, directory):
                if said:
                    print(f"[gpu] claimed GPU {i} ({gpu_id}) after {time.monotonic() - t0:.0f} s", file=sys.stderr)
                return i
        waited = time.monotonic() - t0
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"all {len(gpu_ids)} GPUs are claimed by other processes (locks in {directory}); "
                               f"waited {waited:.0f} s")
        if not said:
            print(f"[gpu] all {len(gpu_ids)} visible GPUs are claimed by other stages (locks in {directory}); "
                  "waiting for one to be freed", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll)


def visible_gpu_ids() -> list[str]:
    """Stable ids of the visible CUDA devices (their UUIDs; the index where torch gives none)."""
    import torch

    ids = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        ids.append(f"GPU-{uuid}" if uuid is not None else f"cuda{i}")
    return ids


def stage_device() -> str:
    """The device a stage process runs on: ``cpu``, ``cuda`` (one GPU) or a claimed ``cuda:<i>``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    ids = visible_gpu_ids()
    if len(ids) <= 1:
        return "cuda"
    return f"cuda:{claim(ids)}"
