"""Checkpoints salvaged from interrupted DVC experiment workspaces, so that a re-queued experiment resumes
its models where they stopped instead of from step 0.

`dvc exp run --queue` trains each experiment in a temporary workspace of its own (``.dvc/tmp/exps/tmp*/``).
When the queue's workers die with the machine (a session that ends, a reboot, a killed job), those
workspaces stay on disk with each model's ``checkpoint.pt``, but the experiment, queued again, starts in a
new, empty workspace: its pretraining would start over.  So the study runner, finding no live worker,
:func:`salvage` s those checkpoints into a pool keyed by what they resume (the training hash and the world
size), and names the pool to the workers in ``AUGSELF_CHECKPOINT_POOL``; the pretrain stage (its glue,
:func:`pipeline.workflow.run_pretraining`) :func:`adopt` s the pool's checkpoint for its own hash before it
starts.  Nothing here decides whether to resume: :mod:`pipeline.run_state` checks the adopted file like
any other (same hash, same world size, a readable checkpoint) and the resumed run is bit-identical to an
uninterrupted one (tests/test_train.py::test_resume_is_exact, tests/test_checkpoint_pool.py).

The model's MLflow run goes with its checkpoint (``<entry>.mlflow_run_id`` beside it in the pool), so the
resumed model logs on into the run it started instead of opening a second one; the study runner ends the
interrupted runs as KILLED when it salvages (:func:`pipeline.study.queue.salvage_interrupted`), and the
resumed model sets its run back to RUNNING.

Without the variable (``dvc repro``, ``make repro``) nothing changes: a run resumes only from its own
``models/<name>/checkpoint.pt``.
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

from pipeline import checkpoint as ckpt_io
from pipeline.progress import say
from pipeline.tracking import RUN_ID_FILE

__all__ = ["POOL_ENV", "entry_name", "run_id_entry", "salvage", "adopt"]

POOL_ENV = "AUGSELF_CHECKPOINT_POOL"
CHECKPOINT = "checkpoint.pt"      # pipeline.run_state.CHECKPOINT (not imported: run_state imports torch models)


def entry_name(params_hash: str, world_size: int) -> str:
    """The pool's file name for a checkpoint that resumes ``params_hash`` with ``world_size`` processes."""
    return f"{params_hash}-w{world_size}.pt"


def run_id_entry(entry: Path) -> Path:
    """The pool's file for the MLflow run id of the model whose checkpoint is ``entry``."""
    return entry.with_suffix("." + RUN_ID_FILE)


def _resume_key(state: dict) -> tuple[str, int] | None:
    phash, world, step = state.get("params_hash"), state.get("world_size"), state.get("step")
    if not isinstance(phash, str) or not isinstance(world, int) or not isinstance(step, int):
        return None
    return phash, world


def _copy_atomic(src: Path, dest: Path) -> None:
    # pipeline.checkpoint's atomic write (temp file, fsync, rename), called by its private name: a public copy
    # function there would edit training code (fingerprint.TRAINING_CODE) and change every training hash.
    with open(src, "rb") as f:
        ckpt_io._write_atomic(dest, partial(shutil.copyfileobj, f))


def salvage(workspaces: str | Path, pool: str | Path) -> list[Path]:
    """Copy every ``<workspaces>/tmp*/models/*/checkpoint.pt`` into ``pool`` under :func:`entry_name`,
    keeping, for each name, the checkpoint with the most steps.  Unreadable files are skipped (named).
    Returns the checkpoints copied.  Call it only while no worker trains in those workspaces."""
    pool = Path(pool)
    copied = []
    for path in sorted(Path(workspaces).glob(f"tmp*/models/*/{CHECKPOINT}")):
        try:
            state = ckpt_io.load(path, map_location="cpu")
        except Exception as e:   # damaged (a kill during a non-atomic copy elsewhere) or foreign: not resumable
            print(f"[study] not salvaging {path}: {type(e).__name__}: {e}", flush=True)
            continue
        key = _resume_key(state)
        if key is None:
            continue
        dest = pool / entry_name(*key)
        if dest.exists():
            try:
                if ckpt_io.load(dest, map_location="cpu").get("step", -1) >= state["step"]:
                    continue
            except Exception:
                pass      # a damaged pool entry: replace it
        _copy_atomic(path, dest)
        run_id = path.parent / RUN_ID_FILE
        if run_id.exists():
            _copy_atomic(run_id, run_id_entry(dest))
        else:
            run_id_entry(dest).unlink(missing_ok=True)    # a run id left by an earlier, shorter entry is not this one's
        copied.append(path)
        print(f"[study] salvaged {path.parent.name} at step {state['step']}/{state.get('total_steps', '?')} "
              f"from {path.parents[2].name} into {dest}", flush=True)
    return copied


def adopt(params_hash: str, world_size: int, out_dir: str | Path, pool: str | Path | None = None) -> bool:
    """Put the pool's checkpoint for (``params_hash``, ``world_size``) at ``out_dir/checkpoint.pt`` when
    ``out_dir`` has none; ``pool`` defaults to ``$AUGSELF_CHECKPOINT_POOL`` (unset: nothing happens).
    True when a checkpoint was adopted; the run then resumes it by run_state's usual checks.  The model's
    MLflow run id comes with it (when the pool has one and ``out_dir`` none), so the run goes on logging there.
    The entry leaves the pool."""
    pool = pool if pool is not None else os.environ.get(POOL_ENV)
    if not pool:
        return False
    src, dest = Path(pool) / entry_name(params_hash, world_size), Path(out_dir) / CHECKPOINT
    if dest.exists() or not src.exists():
        return False
    _copy_atomic(src, dest)
    say(f"adopted {src} (salvaged from an interrupted experiment) as {dest}")
    run_id, own_run_id = run_id_entry(src), Path(out_dir) / RUN_ID_FILE
    if run_id.exists() and not own_run_id.exists():
        _copy_atomic(run_id, own_run_id)
    # Moved, not copied: the pool holds only what waits to resume.  Interrupted again, this workspace's own
    # checkpoint (the adopted one, or a later one) is what the next salvage finds.
    src.unlink()
    run_id.unlink(missing_ok=True)
    return True
