"""The state of one pretraining run: what the loop's phases share, what ``checkpoint.pt`` holds, and
the files of a finished run.

* :class:`RunState`: the request, the built objects (model, optimiser, loss log, monitor) and the
  loop's counters, shared by the phases of :mod:`pipeline.train`.
* **Checkpoints** (:func:`save_checkpoint`, rank 0, atomic): model, AugSelf head, optimiser,
  scheduler, AMP scaler, step, epoch, the RNG states of every rank, the loss log and the rows of the
  CSV files, and the :func:`~pipeline.fingerprint.training_hash`.  On start (:func:`restore`) an
  existing ``checkpoint.pt`` with the same hash (and world size) is resumed; one with another hash is
  reported and ignored (a fresh run overwrites it).  A finished checkpoint skips training and only
  (re)writes the outputs.  :func:`checkpoint_resumable` answers the same question for the stage glue.
* **Outputs** (:func:`finish`, once the schedule is complete, rank 0): ``final.pt`` (the backbone in
  the format evaluation reads), ``metrics.json``, ``losses.csv``, ``monitor.csv`` (committed DVC
  files, byte-identical for a seed) and ``timing.json`` / ``timing.csv`` (the speed, which varies).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as torch_dist
from torch import nn

from pipeline import checkpoint as ckpt_io
from pipeline.fingerprint import training_hash
from pipeline.params import Params
from pipeline.progress import LossLog, say
from pipeline.recipe import PretrainModel
from pipeline.request import RunRequest

if TYPE_CHECKING:
    from pipeline.augment import BatchAugment
    from pipeline.monitor import KnnMonitor

__all__ = ["RunState", "TrainResult", "restore", "save_checkpoint", "finish", "checkpoint_resumable",
           "CHECKPOINT", "FINAL", "METRICS", "LOSSES", "TIMING", "TIMING_CSV", "MONITOR", "TIMING_KEYS"]

# The files of a run's directory (models/<method>-<variant>/, docs/architecture.md).
CHECKPOINT, FINAL, METRICS, LOSSES, TIMING = "checkpoint.pt", "final.pt", "metrics.json", "losses.csv", "timing.json"
TIMING_CSV, MONITOR = "timing.csv", "monitor.csv"
# The metrics that vary between runs of the same params: timing.json, never metrics.json.
TIMING_KEYS = ("pretrain/images_per_s", "pretrain/wall_time_s", "pretrain/monitor_s")
_CKPT_VERSION = 1


@dataclass
class TrainResult:
    out_dir: Path
    step: int                         # steps done (== total_steps when finished)
    total_steps: int
    finished: bool                    # False when stopped early by max_steps
    resumed_from: int                 # 0 for a fresh run
    params_hash: str
    metrics: dict[str, float] = field(default_factory=dict)   # what metrics.json holds
    checkpoint: Path | None = None
    final: Path | None = None         # final.pt (None until the schedule is complete)


@dataclass
class RunState:
    """What the phases of one run share: the request, the built objects and the loop's counters."""
    request: RunRequest
    out_dir: Path
    dev: torch.device
    on_log: Callable[[int, dict[str, float]], None] | None
    rank: int
    world: int
    phash: str
    steps_per_epoch: int
    total_steps: int
    stop_at: int                      # total_steps, or max_steps when stopping early
    amp_dtype: torch.dtype | None
    model: PretrainModel
    backbone: nn.Module
    arch: dict                        # the architecture keys of final.pt
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    log: LossLog
    monitor: KnnMonitor | None
    nan_hook: tuple[int, str] | None
    runner: nn.Module | None = None   # the model as the forward sees it (DDP / compiled); set by train._place
    data: torch.Tensor | None = None  # the images on the training device
    augment: BatchAugment | None = None
    perm: torch.Tensor | None = None  # this epoch's order of the images
    perm_epoch: int = -1
    step: int = 0                     # global steps done
    start: int = 0                    # the step this process started from (resumed_from)
    wall: float = 0.0                 # training seconds (checkpoint writes and the monitor excluded)
    images_seen: int = 0
    monitor_s: float = 0.0            # seconds spent in the kNN monitor
    window_t0: float = 0.0
    window_images: int = 0
    monitor_rows: list[dict] = field(default_factory=list)   # monitor.csv rows so far
    timing_rows: list[dict] = field(default_factory=list)    # timing.csv rows so far

    @property
    def params(self) -> Params:
        return self.request.params

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT


def restore(run: RunState) -> bool:
    """Continue from a matching checkpoint.pt (state, RNG, histories): True.  Without one, remove the
    outputs of an earlier run (rank 0) and return False: the loop starts fresh."""
    state = _read_checkpoint(run.ckpt_path, run.phash, run.world)
    if state is None:
        if run.main:
            for stale in (FINAL, METRICS, TIMING, LOSSES, TIMING_CSV, MONITOR):
                (run.out_dir / stale).unlink(missing_ok=True)
        return False
    run.model.method.load_state_dict(state["model"])
    if run.model.head is not None:
        run.model.head.load_state_dict(state["head"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.log.load(state["log"])
    run.start = run.step = state["step"]
    run.wall, run.images_seen, run.monitor_s = state["wall_time_s"], state["images_seen"], state["monitor_s"]
    run.monitor_rows, run.timing_rows = list(state["monitor"]), list(state["timing"])
    rng = state["rng"][run.rank] if run.rank < len(state["rng"]) else None
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if run.dev.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], run.dev)
    if run.main:                                  # drop rows logged after the checkpoint
        for name, rows in ((LOSSES, run.log.rows), (TIMING_CSV, run.timing_rows), (MONITOR, run.monitor_rows)):
            ckpt_io.write_csv(run.out_dir / name, rows)
    if run.step >= run.total_steps:
        say(f"{run.ckpt_path} is finished ({run.step}/{run.total_steps} steps): rewriting the outputs only")
    else:
        say(f"resuming from {run.ckpt_path} at step {run.step}/{run.total_steps} "
            f"(epoch {run.step // run.steps_per_epoch})")
    return True


def save_checkpoint(run: RunState) -> None:
    """checkpoint.pt (atomic, rank 0) with the RNG states of every rank and the histories of the files."""
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(run.dev) if run.dev.type == "cuda" else None}
    rngs = [None] * run.world
    if run.world > 1:
        torch_dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if not run.main:
        return
    model = run.model
    ckpt_io.save_atomic({
        "version": _CKPT_VERSION, "params_hash": run.phash, "world_size": run.world,
        "method": run.request.method, "variant": run.request.variant, "lambda": model.lam,
        "step": run.step, "epoch": run.step // run.steps_per_epoch, "total_steps": run.total_steps,
        "model": model.method.state_dict(),
        "head": model.head.state_dict() if model.head is not None else None,
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": rngs, "log": run.log.state(), "wall_time_s": run.wall, "images_seen": run.images_seen,
        "monitor": run.monitor_rows, "timing": run.timing_rows, "monitor_s": run.monitor_s,
    }, run.ckpt_path)


def finish(run: RunState) -> TrainResult:
    """The result; once the schedule is complete, final.pt and the DVC files (rank 0)."""
    finished = run.step >= run.total_steps
    last_epoch = max(run.log.epochs) if run.log.epochs else None
    metrics = run.log.epoch_means(last_epoch) if last_epoch is not None else {}
    metrics.update({"pretrain/images_per_s": run.images_seen / run.wall if run.wall > 0 else 0.0,
                    "pretrain/wall_time_s": run.wall, "pretrain/steps": float(run.step),
                    "pretrain/epochs": float(run.step / run.steps_per_epoch)})
    if run.monitor is not None:
        metrics["pretrain/monitor_s"] = run.monitor_s
    ckpt = run.ckpt_path if run.ckpt_path.exists() else None
    result = TrainResult(out_dir=run.out_dir, step=run.step, total_steps=run.total_steps, finished=finished,
                         resumed_from=run.start, params_hash=run.phash, metrics=metrics, checkpoint=ckpt)
    if finished and run.main:
        p = run.params
        final = {"backbone": {k: v.detach().cpu().clone() for k, v in run.backbone.state_dict().items()},
                 **run.arch, "method": run.request.method, "variant": run.request.variant, "lambda": run.model.lam,
                 "mean": list(p.augment.mean), "std": list(p.augment.std), "params_hash": run.phash}
        result.final = ckpt_io.save_atomic(final, run.out_dir / FINAL)
        # metrics.json, losses.csv and monitor.csv are DVC files committed to git and must be
        # bit-identical across runs with the same seed: the speed figures go to timing.json and
        # timing.csv (DVC-cached, not in git) and to MLflow through the returned metrics.
        ckpt_io.write_json(run.out_dir / METRICS, {k: v for k, v in metrics.items() if k not in TIMING_KEYS})
        ckpt_io.write_json(run.out_dir / TIMING, {k: v for k, v in metrics.items() if k in TIMING_KEYS})
        ckpt_io.write_csv(run.out_dir / LOSSES, run.log.rows)
        ckpt_io.write_csv(run.out_dir / TIMING_CSV, run.timing_rows)
        ckpt_io.write_csv(run.out_dir / MONITOR, run.monitor_rows, header=["step", "epoch"])   # a DVC out: always
    return result


def checkpoint_resumable(request: RunRequest, out_dir: str | Path) -> bool:
    """True when ``out_dir/checkpoint.pt`` exists and the loop would resume it (same hash and world size)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return False
    try:
        state = ckpt_io.load(path, map_location="cpu")
    except Exception:
        return False
    return (state.get("version") == _CKPT_VERSION
            and state.get("params_hash") == training_hash(request)
            and state.get("world_size") == int(os.environ.get("WORLD_SIZE", "1")))


def _read_checkpoint(path: Path, phash: str, world: int) -> dict | None:
    """The checkpoint to resume from, or None (absent, or written for another configuration)."""
    if not path.exists():
        return None
    try:
        state = ckpt_io.load(path, map_location="cpu")   # RNG states must stay CPU tensors
    except Exception as e:  # a foreign or damaged file: report it, never resume from it
        say(f"{path} could not be read ({type(e).__name__}: {e}); starting fresh")
        return None
    if state.get("version") != _CKPT_VERSION or state.get("params_hash") != phash:
        say(f"{path} was written for params hash {state.get('params_hash')}, this run is {phash}: "
            f"not resuming it, starting fresh (it will be overwritten)")
        return None
    if state.get("world_size") != world:
        say(f"{path} was written by {state.get('world_size')} process(es), this run has {world}: "
            f"the views and batch statistics would differ, starting fresh")
        return None
    return state
