"""The pretraining loop: one SSL method, optionally with the AugSelf auxiliary loss.

``pretrain_request(request, images, out_dir)`` trains a :class:`~pipeline.request.RunRequest` on
``images`` (uint8 NHWC); ``pretrain(params, method, variant, images, out_dir)`` resolves the request
from the names first.  It writes, under ``out_dir``:

``checkpoint.pt``  resumable state (atomic write): model, AugSelf head, optimiser, scheduler, AMP
                   scaler, step, epoch, RNG states, loss history, and the training hash.
``final.pt``       the backbone in the format evaluation reads (``docs/architecture.md``).
``metrics.json``   ``pretrain/*`` loss means over the last epoch (deterministic for a seed)
``losses.csv``     one row per log point: step, epoch, the loss terms and the lr (deterministic)
``monitor.csv``    one row per kNN monitor point (:mod:`pipeline.monitor`): step, epoch,
                   ``monitor/<task>/{knn_top1,nn1_top1}`` (deterministic; only the header without a monitor)
``timing.json``    images/s, training wall time and the monitor's seconds (vary between runs)
``timing.csv``     one row per log point: step, images/s of the window, wall time so far

The first three are committed DVC metrics/plots and are byte-identical for a seed, so a repro that
reproduces leaves git clean; the timing files are DVC-cached outputs (not in git).

Reading order
-------------
The request was checked once, where it was resolved (:meth:`RunRequest.resolve`);
:func:`pretrain_request` checks what only the loop knows (the images, the world size) and
:func:`_pretrain` is the loop, one named phase per function, each taking the shared
:class:`~pipeline.run_state.RunState`: ``_setup`` (schedule sizes, seeded model, optimiser) →
``_resume`` (checkpoint or fresh RNG stream) → ``_place`` (DDP/compile, data on the device) → per
step ``_train_step`` → at log points ``_read_losses`` (the NaN guard) and ``_log`` → at epoch ends
``_monitor`` and the progress line → ``run_state.save_checkpoint`` → ``run_state.finish`` (final.pt
and the files).

What the loop is made of, one job per module:

=========================== ==========================================================================
:mod:`pipeline.request`     the resolved request (method, variant, λ, ss_only, the sections it reads)
:mod:`pipeline.fingerprint` the training hash and the fingerprint of the training code
:mod:`pipeline.recipe`      the model (:class:`PretrainModel`), the optimiser and lr schedule, AMP, one step
:mod:`pipeline.run_state`   what the phases share, checkpoint.pt (save, restore), final.pt and the files
:mod:`pipeline.progress`    the loss log (device buffer, NaN guard, means), the progress bar and lines
=========================== ==========================================================================

Conventions
-----------
* **Loss, optimisation, precision**: :mod:`pipeline.recipe` (``L = L_SSL + λ·Σ_aug w_aug·L_aug``;
  with ``λ = 0`` no AugSelf head is built, so the baseline pays nothing for it).
* **Data.** The whole uint8 array lives on the training device (copied from pinned memory when it
  goes to CUDA).  Epoch ``e`` visits a permutation drawn from a generator seeded by ``(seed, e)``;
  batches of ``ssl.batch_size`` (the *global* batch) with the last incomplete one dropped.  Under DDP
  every rank draws the same permutation and takes its contiguous slice of each global batch.
* **Views.** Two :class:`~pipeline.augment.BatchAugment` calls on one generator from
  :func:`~pipeline.augment.view_generator` ``(seed, epoch, step, rank)`` (``step`` is the global step
  index), so a resumed run sees exactly the views of an uninterrupted one.  Views have the size of
  the images.
* **Speed.** ``ssl.channels_last`` puts model and views in NHWC memory.  ``ssl.compile`` wraps the
  model in ``torch.compile``.  ``ssl.threads > 0`` sets ``torch.set_num_threads`` for the run.
* **No host sync per step.** Each step's loss terms go into the loss log's device buffer
  (:class:`~pipeline.progress.LossLog`), read back every ``ssl.log_every`` steps (and before each
  checkpoint), which is when ``on_log`` is called, the progress bar updated and non-finite losses
  detected.  A non-finite term raises :class:`NonFiniteLossError` naming the first bad step and term;
  since the check runs before every checkpoint write, the last good checkpoint is never overwritten
  with a diverged model.
* **kNN monitor** (``ssl.monitor_every`` epochs, 0 = off, and at the last epoch; only when
  ``pretrain(monitor=...)`` is given): rank 0 evaluates the frozen backbone in eval mode under
  ``no_grad`` after the epoch's losses were read back and before its checkpoint, drawing no
  randomness, so training is the same with and without it; its rows are stored in the checkpoint, so
  a resumed run has the same curve.  Its time is excluded from images/s and reported as
  ``pretrain/monitor_s``.
* **Progress** (rank 0, :class:`~pipeline.progress.Progress`): a tqdm bar on a terminal; off a
  terminal one line per epoch on stderr.
* **Checkpoints** every ``ssl.checkpoint_every`` steps and at the end (:mod:`pipeline.run_state`:
  a checkpoint with the same training hash and world size is resumed, one with another is ignored).
* **DDP** (``torchrun``, ``WORLD_SIZE > 1``): ``ssl.batch_size`` is the global batch and must divide
  by the world size; the model (method + AugSelf head) is wrapped in ``DistributedDataParallel``;
  on CUDA every BatchNorm is converted to ``SyncBatchNorm``, as the official code does for all its
  networks (``idist.auto_model(sync_bn=True)``).  It matters most for SimCLR and MoCo: with per-rank
  BN statistics the positives of a rank share batch statistics that its negatives from other ranks
  do not, a shortcut the contrastive loss learns to exploit (the reason MoCo v1 shuffles BN); BYOL
  and SimSiam are less sensitive but are trained the same way for comparability.  ``torch``'s
  SyncBatchNorm has no CPU kernel, so gloo (CPU) runs keep per-rank BN and say so.  Only rank 0
  writes files, logs and draws the progress bar; the loss buffer is averaged over ranks when read.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline import checkpoint as ckpt_io
from pipeline import distributed
from pipeline.augment import BatchAugment, view_generator
from pipeline.config import ConfigError
from pipeline.fingerprint import training_hash
from pipeline.monitor import KnnMonitor, MonitorData
from pipeline.params import Params
from pipeline.progress import LossLog, NonFiniteLossError, Progress, append_csv, say
from pipeline.recipe import build_optimizer, build_pretrain_model, resolve_amp, train_step
from pipeline.request import RunRequest
from pipeline.run_state import (CHECKPOINT, FINAL, LOSSES, METRICS, MONITOR, TIMING, TIMING_CSV, TIMING_KEYS,
                                RunState, TrainResult, checkpoint_resumable, finish, restore, save_checkpoint)

# What a caller of the loop uses (the stage glue, the CLI's exit codes, the tests of the outputs).
__all__ = ["pretrain", "pretrain_request", "TrainResult", "NonFiniteLossError", "checkpoint_resumable", "NAN_ENV",
           "CHECKPOINT", "FINAL", "METRICS", "LOSSES", "TIMING", "TIMING_CSV", "MONITOR", "TIMING_KEYS"]

NAN_ENV = "AUGSELF_INJECT_NAN"   # test hook, see pretrain(inject_nan=...)


def _derive_seed(*parts: int) -> int:
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8,
                             person=b"augself-train").digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_derive_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def _parse_nan_hook(inject_nan: str | None) -> tuple[int, str] | None:
    spec = inject_nan if inject_nan is not None else os.environ.get(NAN_ENV)
    if not spec:
        return None
    step, _, term = spec.partition(":")
    try:
        return int(step), term or "ssl"
    except ValueError:
        raise ValueError(f"inject_nan / {NAN_ENV}: expected '<step>[:<term>]', got {spec!r}") from None


def _validate_images(images: np.ndarray, batch_size: int) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError("pretrain: images must be a uint8 numpy array (N, H, W, 3) as load_split returns; got "
                         f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"pretrain: images must be square (prepare them with data.datasets.<name>.image_size); "
                         f"got {images.shape[1]}x{images.shape[2]}")
    if images.shape[0] < batch_size:
        raise ConfigError(f"ssl.batch_size: {batch_size} is larger than the {images.shape[0]} pretraining images; "
                          f"lower ssl.batch_size or raise data.datasets.<name>.max_train")


# ---------------------------------------------------------------------------- the loop
def pretrain(params: Params, method: str, variant: str, images: np.ndarray, out_dir: str | Path,
             **options) -> TrainResult:
    """Pretrain ``method`` × ``variant`` of ``params``: :meth:`RunRequest.resolve` (the check of the
    names) and :func:`pretrain_request`, which takes the ``options``.  The entry for a caller that
    holds the names (tests, the premise study, the benches); the stage glue resolves the request
    itself (:func:`pipeline.workflow.run_pretraining`)."""
    return pretrain_request(RunRequest.resolve(params, method, variant), images, out_dir, **options)


def pretrain_request(request: RunRequest, images: np.ndarray, out_dir: str | Path,
                     on_log: Callable[[int, dict[str, float]], None] | None = None, device: str | None = None,
                     max_steps: int | None = None, progress: bool = True,
                     inject_nan: str | None = None, monitor: MonitorData | None = None) -> TrainResult:
    """Pretrain ``request`` (λ = 0 without the AugSelf head, ``augself.lambda`` with it) on ``images``.

    ``images``: uint8 ``(N, S, S, 3)``.  ``device``: default ``cuda`` when available (under DDP the
    rank's ``cuda:LOCAL_RANK``), else ``cpu``.  ``on_log(step, metrics)`` is called on rank 0 every
    ``ssl.log_every`` steps and at the last step with the window means of the ``pretrain/*`` terms,
    the lr and images/s, and after each kNN monitor evaluation with its ``monitor/*`` metrics.
    ``max_steps`` stops after that many steps in total (the schedule is still the one of
    ``ssl.epochs``; the run can be resumed later); ``final.pt`` and ``metrics.json`` are written
    only once the schedule is complete.  ``monitor``: the labelled images of the kNN monitor
    (:mod:`pipeline.monitor`), evaluated every ``ssl.monitor_every`` epochs; None (or
    ``ssl.monitor_every: 0``) runs without it.  ``progress``: a bar on a terminal, else one line per
    epoch on stderr.

    ``inject_nan`` is a **test hook**: ``"<step>[:<term>]"`` (1-based step; term ``ssl`` (default),
    ``augself/<aug>`` or ``total``) poisons that loss term with NaN; the environment variable
    ``AUGSELF_INJECT_NAN`` does the same for a run launched from the command line.
    """
    params = request.params
    _validate_images(images, params.ssl.batch_size)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if params.ssl.batch_size % env_world:
        raise ConfigError(f"ssl.batch_size: {params.ssl.batch_size} does not divide by the world size {env_world} "
                          f"(the global batch is split evenly across DDP ranks); use a multiple of {env_world}")
    if request.ss_only and env_world > 1:
        raise ConfigError("augself.ss_only: not supported under DDP (the projector gets no gradient, which "
                          "DistributedDataParallel refuses); run it on one process or set augself.ss_only: false")
    nan_hook = _parse_nan_hook(inject_nan)

    ctx = distributed.setup_from_env() if env_world > 1 else None
    threads = torch.get_num_threads()
    try:
        if ctx is not None:
            dev = ctx.device
        else:
            dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return _pretrain(request, images, Path(out_dir), on_log, dev, max_steps, progress, nan_hook, monitor)
    finally:
        torch.set_num_threads(threads)       # ssl.threads applies to this run only
        if ctx is not None:
            distributed.cleanup()


def _pretrain(request: RunRequest, images: np.ndarray, out_dir: Path, on_log, dev: torch.device,
              max_steps: int | None, progress: bool, nan_hook: tuple[int, str] | None,
              monitor: MonitorData | None) -> TrainResult:
    """The loop, phase by phase: set up, resume, place, then step / read losses / log / monitor /
    checkpoint until ``stop_at``, and finish (final.pt and the DVC files)."""
    run = _setup(request, images, out_dir, on_log, dev, max_steps, nan_hook, monitor)
    _resume(run)
    _place(run, images)
    shown = Progress(run, progress)
    run.window_t0 = time.perf_counter()
    try:
        while run.step < run.stop_at:
            _train_step(run)
            shown.update()
            step, ssl = run.step, run.params.ssl
            at_log = step % ssl.log_every == 0 or step == run.total_steps
            at_epoch = step % run.steps_per_epoch == 0
            at_ckpt = step % ssl.checkpoint_every == 0 or step == run.stop_at
            if at_log or at_ckpt or at_epoch or run.log.full:
                _read_losses(run)                 # the NaN guard: before anything is logged or saved
            if at_log:
                _log(run, shown)
            if at_epoch:
                knn = _off_the_clock(run, _monitor, run) if _monitor_due(run) else {}
                shown.epoch_done(run, knn)
            if at_ckpt:
                _off_the_clock(run, save_checkpoint, run)
    finally:
        shown.close()
    return finish(run)


def _setup(request: RunRequest, images: np.ndarray, out_dir: Path, on_log, dev: torch.device,
           max_steps: int | None, nan_hook: tuple[int, str] | None, monitor: MonitorData | None) -> RunState:
    """Sizes of the schedule, the model (seeded initialisation), optimiser, scaler and loss log."""
    params = request.params
    ssl = params.ssl
    rank, world = distributed.rank(), distributed.world_size()
    phash = training_hash(request)
    if ssl.threads > 0:
        torch.set_num_threads(ssl.threads)
    steps_per_epoch = images.shape[0] // ssl.batch_size
    total_steps = ssl.epochs * steps_per_epoch
    stop_at = total_steps if max_steps is None else min(total_steps, max(0, int(max_steps)))
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(params.seed)            # identical initialisation on every rank (DDP also broadcasts it)
    model, backbone, arch = build_pretrain_model(request, images.shape[1])
    model.to(dev)
    if use_channels_last(ssl, dev):
        model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(params, model, steps_per_epoch, total_steps)
    amp_dtype = resolve_amp(ssl.amp, dev)
    scaler = torch.amp.GradScaler(dev.type) if amp_dtype == torch.float16 else None
    log = LossLog(model.term_names, ssl.log_every, dev)
    if nan_hook is not None and nan_hook[1] not in model.term_names:
        raise ValueError(f"inject_nan: unknown term {nan_hook[1]!r}; this run has {', '.join(model.term_names)}")
    knn = (KnnMonitor(monitor, params.augment.mean, params.augment.std, params.eval.batch_size, dev)
           if monitor is not None and ssl.monitor_every > 0 else None)
    return RunState(request, out_dir, dev, on_log, rank, world, phash, steps_per_epoch, total_steps,
                stop_at, amp_dtype, model, backbone, arch, optimizer, scheduler, scaler, log, knn, nan_hook)


def _resume(run: RunState) -> None:
    """Continue from a matching checkpoint.pt (:func:`~pipeline.run_state.restore`), or start fresh:
    a new per-rank RNG stream for the methods."""
    if not restore(run):
        torch.manual_seed(_derive_seed(run.params.seed, 1 + run.rank))


def _place(run: RunState, images: np.ndarray) -> None:
    """Wrap the model for the forward (DDP, SyncBatchNorm, compile; state is saved from ``run.model``)
    and put the images on the training device, once."""
    runner: nn.Module = run.model
    if run.world > 1:
        if run.dev.type == "cuda":
            runner = nn.SyncBatchNorm.convert_sync_batchnorm(runner)
        else:
            say("gloo on CPU: SyncBatchNorm has no CPU kernel, BatchNorm statistics stay per rank")
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[run.dev.index] if run.dev.type == "cuda" else None)
    if run.params.ssl.compile:
        runner = torch.compile(runner)
    run.runner = runner
    data = torch.from_numpy(images)
    if run.dev.type == "cuda":
        data = data.pin_memory()
    run.data = data.to(run.dev, non_blocking=True)
    run.augment = BatchAugment(run.params.augment, images.shape[1])
    run.model.train()


# oneDNN's channels-last convolution backward crashes on the CPU when a layer has fewer than 8
# channels (measured session 8, AMD EPYC with AVX2, torch 2.14.1, resnet_small forward + backward,
# batch 64: width 4 segfaults with 1 thread and hangs with 2, width 6 aborts, widths 8-16 run).
_CPU_CHANNELS_LAST_MIN_WIDTH = 8


def use_channels_last(ssl, device: torch.device) -> bool:
    """Whether model and views use channels-last memory: ``ssl.channels_last``, except a narrow
    ``resnet_small`` on the CPU (< 8 channels), whose backward crashes there (contiguous instead;
    the default width 16 keeps channels-last, so its models are unchanged)."""
    if not ssl.channels_last:
        return False
    narrow = ssl.backbone == "resnet_small" and ssl.width < _CPU_CHANNELS_LAST_MIN_WIDTH
    return not (device.type == "cpu" and narrow)


def _train_step(run: RunState) -> None:
    """This rank's slice of the next global batch, two views from the step's generator, one update."""
    seed, ssl = run.params.seed, run.params.ssl
    epoch, i = divmod(run.step, run.steps_per_epoch)
    if epoch != run.perm_epoch:
        n = run.data.shape[0]
        run.perm = _epoch_permutation(seed, epoch, n)[: run.steps_per_epoch * ssl.batch_size].to(run.dev)
        run.perm_epoch = epoch
    local_batch = ssl.batch_size // run.world
    lo = i * ssl.batch_size + run.rank * local_batch
    x = run.data[run.perm[lo: lo + local_batch]]
    gen = view_generator(seed, epoch, run.step, "cpu", run.rank)
    v1, w1 = run.augment(x, gen)
    v2, w2 = run.augment(x, gen)
    if not use_channels_last(ssl, run.dev):         # BatchAugment returns channels-last memory
        v1, v2 = v1.contiguous(), v2.contiguous()
    run.step += 1
    nan_term = (run.model.term_names.index(run.nan_hook[1])
                if run.nan_hook is not None and run.nan_hook[0] == run.step else None)
    terms = train_step(run.runner, run.optimizer, run.scheduler, run.scaler, v1, v2, w1, w2, run.amp_dtype, nan_term)
    run.model.method.on_step_end(run.step / run.total_steps)
    run.log.push(terms, run.step, epoch)
    run.window_images += ssl.batch_size


def _read_losses(run: RunState) -> None:
    """Read the buffered loss terms back; a non-finite one stops the run naming the last good checkpoint."""
    try:
        run.log.flush()
    except NonFiniteLossError as e:
        raise NonFiniteLossError(e.step, e.term, e.value,
                                 run.ckpt_path if run.ckpt_path.exists() else None) from None


def _log(run: RunState, shown: Progress) -> None:
    """One log point: losses.csv row (deterministic), timing.csv row (speed), progress bar, ``on_log``."""
    now = time.perf_counter()
    run.wall += now - run.window_t0
    run.images_seen += run.window_images
    metrics = run.log.take_window()
    metrics["pretrain/lr"] = float(run.optimizer.param_groups[0]["lr"])
    speed = run.window_images / max(now - run.window_t0, 1e-9)
    if run.main:
        row = {"step": run.step, "epoch": (run.step - 1) // run.steps_per_epoch, **metrics}
        run.log.rows.append(row)
        append_csv(run.out_dir / LOSSES, row)
        timing = {"step": run.step, "pretrain/images_per_s": speed, "pretrain/wall_time_s": run.wall}
        run.timing_rows.append(timing)
        append_csv(run.out_dir / TIMING_CSV, timing)
        shown.postfix(metrics["pretrain/loss_total"], speed)
        if run.on_log is not None:
            run.on_log(run.step, {**metrics, "pretrain/images_per_s": speed})
    run.window_images = 0
    run.window_t0 = time.perf_counter()


def _monitor_due(run: RunState) -> bool:
    """At the end of every ``ssl.monitor_every``-th epoch, and of the last one (the final model)."""
    return run.monitor is not None and (
        (run.step // run.steps_per_epoch) % run.params.ssl.monitor_every == 0 or run.step == run.total_steps)


def _monitor(run: RunState) -> dict[str, float]:
    """kNN monitor of the frozen backbone (rank 0; draws no randomness): monitor.csv row and ``on_log``."""
    if not run.main:
        return {}
    t0 = time.perf_counter()
    metrics = run.monitor.evaluate(run.backbone)
    run.monitor_s += time.perf_counter() - t0
    run.monitor_rows.append({"step": run.step, "epoch": (run.step - 1) // run.steps_per_epoch, **metrics})
    ckpt_io.write_csv(run.out_dir / MONITOR, run.monitor_rows)
    if run.on_log is not None:
        run.on_log(run.step, metrics)
    return metrics


def _off_the_clock(run: RunState, phase: Callable, *args):
    """Run ``phase`` without counting its time as training time (images/s measures the steps only)."""
    t0 = time.perf_counter()
    try:
        return phase(*args)
    finally:
        run.window_t0 += time.perf_counter() - t0


