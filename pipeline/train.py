"""The pretraining loop: one SSL method, optionally with the AugSelf auxiliary loss.

``pretrain(params, method, variant, images, out_dir)`` trains ``method`` on ``images`` (uint8 NHWC)
and writes, under ``out_dir``:

``checkpoint.pt``  resumable state (atomic write): model, AugSelf head, optimiser, scheduler, AMP
                   scaler, step, epoch, RNG states, loss history, and the :func:`training_hash`.
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
:func:`pretrain` checks the request once (:func:`check_request`, the images, the world size) and
:func:`_pretrain` is the loop, one named phase per function, each taking the shared :class:`_Run`:
``_setup`` (schedule sizes, seeded model, optimiser) → ``_resume`` (checkpoint or fresh RNG
stream) → ``_place`` (DDP/compile, data on the device) → per step ``_train_step`` → at log points
``_read_losses`` (the NaN guard) and ``_log`` → at epoch ends ``_monitor`` and the progress line →
``_save_checkpoint`` → ``_finish`` (final.pt and the files).

Conventions
-----------
* **Loss.** ``L = L_SSL + λ·Σ_aug w_aug·L_aug`` with ``λ = params.lambda_for(variant)``.  With
  ``λ = 0`` no AugSelf head is built, so the baseline pays nothing for it.
* **Data.** The whole uint8 array lives on the training device (copied from pinned memory when it
  goes to CUDA).  Epoch ``e`` visits a permutation drawn from a generator seeded by ``(seed, e)``;
  batches of ``ssl.batch_size`` (the *global* batch) with the last incomplete one dropped.  Under DDP
  every rank draws the same permutation and takes its contiguous slice of each global batch.
* **Views.** Two :class:`~pipeline.augment.BatchAugment` calls on one generator from
  :func:`~pipeline.augment.view_generator` ``(seed, epoch, step, rank)`` (``step`` is the global step
  index), so a resumed run sees exactly the views of an uninterrupted one.  Views have the size of
  the images.
* **Optimisation** (the official AugSelf recipe): SGD over every trainable parameter (backbone,
  heads, AugSelf head), ``lr = ssl.lr · batch_size / 256``, momentum, weight decay on all
  parameters; SimSiam's predictor keeps a constant lr (its ``fixed_lr_parameters``, the official
  second optimiser without scheduler).  The schedule is cosine **per step** with a linear warm-up
  of ``ssl.warmup_epochs``;
  the official code steps ``CosineAnnealingLR`` once per epoch (200 epochs there, so the two curves
  nearly coincide; per step keeps short CPU runs smooth and makes the lr a pure function of the
  step, which exact resume needs).
* **Precision and speed.** ``ssl.amp``: ``auto`` = bf16 autocast on CUDA, fp32 on CPU; ``fp16`` uses
  a gradient scaler.  ``ssl.channels_last`` puts model and views in NHWC memory.  ``ssl.compile``
  wraps the model in ``torch.compile``.  ``ssl.threads > 0`` sets ``torch.set_num_threads`` for the run.
* **No host sync per step.** Each step's loss terms are written into a small device buffer; it is
  read back every ``ssl.log_every`` steps (and before each checkpoint), which is when ``on_log`` is
  called, the progress bar updated and non-finite losses detected.  A non-finite term raises
  :class:`NonFiniteLossError` naming the first bad step and term; since the check runs before every
  checkpoint write, the last good checkpoint is never overwritten with a diverged model.
* **kNN monitor** (``ssl.monitor_every`` epochs, 0 = off, and at the last epoch; only when
  ``pretrain(monitor=...)`` is given): rank 0 evaluates the frozen backbone in eval mode under
  ``no_grad`` after the epoch's losses were read back and before its checkpoint, drawing no
  randomness, so training is the same with and without it; its rows are stored in the checkpoint, so
  a resumed run has the same curve.  Its time is excluded from images/s and reported as
  ``pretrain/monitor_s``.
* **Progress** (rank 0): a tqdm bar on a terminal; off a terminal one line per epoch on stderr
  (epoch/total, mean loss terms, kNN top-1 when measured, images/s, elapsed, ETA).
* **Checkpoints** every ``ssl.checkpoint_every`` steps and at the end.  On start an existing
  ``checkpoint.pt`` with the same hash (and world size) is resumed; one with another hash is
  reported and ignored (a fresh run overwrites it).  A finished checkpoint skips training and only
  (re)writes the outputs.
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

import csv
import functools
import hashlib
import math
import os
import struct
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from pipeline import checkpoint as ckpt_io
from pipeline import distributed
from pipeline.augment import BatchAugment, view_generator
from pipeline.augself import build_augself_head
from pipeline.cassle import Conditioning
from pipeline.config import ConfigError, check_choice, stable_hash, to_dict
from pipeline.methods import build_method
from pipeline.models import build_backbone
from pipeline.monitor import KnnMonitor, MonitorData
from pipeline.params import METHODS, SSL_BOOKKEEPING_KEYS, Params

__all__ = ["pretrain", "TrainResult", "NonFiniteLossError", "training_hash", "checkpoint_resumable", "PretrainModel",
           "build_pretrain_model", "build_optimizer", "lr_factor", "resolve_amp", "train_step",
           "check_request", "CHECKPOINT", "FINAL", "METRICS", "LOSSES", "TIMING", "TIMING_CSV", "MONITOR"]

CHECKPOINT, FINAL, METRICS, LOSSES, TIMING = "checkpoint.pt", "final.pt", "metrics.json", "losses.csv", "timing.json"
TIMING_CSV, MONITOR = "timing.csv", "monitor.csv"
TIMING_KEYS = ("pretrain/images_per_s", "pretrain/wall_time_s", "pretrain/monitor_s")
NAN_ENV = "AUGSELF_INJECT_NAN"   # test hook, see pretrain(inject_nan=...)
_CKPT_VERSION = 1
# ssl.* keys left out of the training hash: the method list, the bookkeeping keys (editing them must not
# void a run in progress) and the method sections (the run's own is hashed as method_params).
_NOT_TRAINING_KEYS = ("methods", *SSL_BOOKKEEPING_KEYS) + METHODS


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or ±inf.  ``step`` is 1-based (the step that produced it)."""

    def __init__(self, step: int, term: str, value: float, checkpoint: Path | None = None):
        self.step, self.term, self.value = step, term, value
        where = (f"; the last good checkpoint ({checkpoint}) was left untouched" if checkpoint
                 else "; no checkpoint was written after it")
        super().__init__(f"non-finite loss at step {step}: term '{term}' = {value}{where}. "
                         f"Lower ssl.lr, add ssl.warmup_epochs or set ssl.amp: off, then rerun.")


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


# ---------------------------------------------------------------------------- config helpers
def training_hash(params: Params, method: str, variant: str) -> str:
    """Hash of everything that determines the trained weights of (method, variant).

    Covers the seed, the pretraining dataset (its name, its entry under ``data.datasets`` and
    ``data.seed``, which fix the images), ``ssl`` without ``methods`` and the bookkeeping keys
    (:data:`pipeline.params.SSL_BOOKKEEPING_KEYS`) and without the other methods' sections,
    ``augment``, this method's parameters, λ, and ``augself`` when λ > 0 (a baseline does not
    depend on it), ``cassle`` for the CASSLE variant (the only one it shapes), and
    :func:`training_code_fingerprint`: a checkpoint written by other training code
    is never resumed or reused, so fixing a bug in, say, the augmentations retrains the model.
    """
    check_choice("method", method, METHODS)
    lam = params.lambda_for(variant)
    d = to_dict(params)
    payload = {
        "seed": d["seed"],
        "data": {"pretrain": d["data"]["pretrain"], "seed": d["data"]["seed"],
                 "entry": d["data"]["datasets"][d["data"]["pretrain"]]},
        "ssl": {k: v for k, v in d["ssl"].items() if k not in _NOT_TRAINING_KEYS},
        "augment": d["augment"],
        "method": method,
        "method_params": d["ssl"][method],
        "lambda": lam,
        "code": training_code_fingerprint(),
    }
    if lam > 0:
        payload["augself"] = {k: v for k, v in d["augself"].items() if k != "lambda"}
    if variant == "cassle":
        payload["cassle"] = d["cassle"]
    return stable_hash(payload)


# The modules whose source determines the trained weights (the same list as the pretrain stages'
# code deps in dvc.yaml, less the glue that only logs and writes files).
TRAINING_CODE = ("train.py", "augment.py", "augself.py", "cassle.py", "models.py", "methods", "distributed.py",
                 "checkpoint.py", "data/prepared.py", "augmentations.py")
# The rest of the pretrain stages' pipeline/ deps: the glue, which logs and writes files but does not
# change the weights (tests/test_keys.py: TRAINING_CODE + PRETRAIN_GLUE are the stage's deps).
PRETRAIN_GLUE = ("monitor.py", "tracking.py", "workflow.py")


@functools.lru_cache(maxsize=1)
def training_code_fingerprint() -> str:
    """Short hash of the source of :data:`TRAINING_CODE` (comments and all: any edit counts)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        path = root / name
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f.relative_to(root).as_posix().encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``ssl.amp`` → autocast dtype (None: full fp32).  ``auto``: bf16 on CUDA, off elsewhere."""
    check_choice("ssl.amp", amp, ("auto", "bf16", "fp16", "off"))
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr for 0-based ``step``: linear warm-up to 1, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _derive_seed(*parts: int) -> int:
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8,
                             person=b"augself-train").digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_derive_seed(seed, epoch))
    return torch.randperm(n, generator=g)


# ---------------------------------------------------------------------------- model and step
class PretrainModel(nn.Module):
    """The SSL method and (when λ > 0) the AugSelf head: one forward gives every loss term.

    One module so that DDP wraps a single forward.  ``forward`` returns ``(total, terms)`` where
    ``terms`` is a 1-d tensor ``[L_SSL, L_aug for aug in augs..., total]`` (unweighted per-aug
    losses) that the loop logs without a host sync.

    ``total = L_SSL + λ·Σ w_a L_a``; with ``ss_only`` (``augself.ss_only``, the official
    ``--ss-only`` ablation) ``total = λ·Σ w_a L_a``: the SSL loss is still computed and logged but
    is not part of the total, so no gradient reaches the projector (or predictor) through it.
    When the method is conditioned (CASSLE), each view's ω is encoded here
    (:meth:`pipeline.cassle.Conditioning.encode`) and passed to the method with its view.
    """

    def __init__(self, method: nn.Module, head: nn.Module | None, lam: float, ss_only: bool = False):
        super().__init__()
        if ss_only and head is None:
            raise ConfigError("augself.ss_only: the AugSelf-only ablation needs the AugSelf head "
                              "(the augself variant with augself.lambda > 0)")
        self.method = method
        self.head = head
        self.lam = float(lam)
        self.ss_only = bool(ss_only)
        self.augs: list[str] = list(head.augmentations) if head is not None else []

    @property
    def term_names(self) -> list[str]:
        return ["ssl", *(f"augself/{a}" for a in self.augs), "total"]

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, omega1: dict[str, torch.Tensor],
                omega2: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        conditioning = getattr(self.method, "conditioning", None)
        if conditioning is not None:
            out = self.method(v1, v2, conditioning.encode(omega1), conditioning.encode(omega2))
        else:
            out = self.method(v1, v2)
        loss_ssl = out.loss.float()
        if self.head is None:
            return loss_ssl, torch.stack([loss_ssl, loss_ssl])
        aug_losses = {a: loss.float() for a, loss in self.head.loss_from_omega(out.f1, out.f2, omega1, omega2).items()}
        aug_total = self.lam * self.head.weighted_total(aug_losses)
        total = aug_total if self.ss_only else loss_ssl + aug_total
        per_aug = [aug_losses[a] for a in self.augs]
        return total, torch.stack([loss_ssl, *per_aug, total])


def build_pretrain_model(params: Params, method: str, variant: str, image_size: int) -> tuple[PretrainModel, nn.Module, dict]:
    """Build backbone, method and head; returns ``(model, backbone, backbone_info)``.

    ``backbone_info`` holds the keys of final.pt that describe the architecture.  Parameters are
    initialised from the global torch RNG: seed it first for a reproducible initialisation.
    The variant decides the rest: ``baseline`` the method alone, ``augself`` the method and the
    AugSelf head (λ = ``augself.lambda``, ``augself.ss_only``), ``cassle`` the method with its
    projector conditioned on ω (``cassle`` section, :mod:`pipeline.cassle`) and no AugSelf head.
    """
    ssl = params.ssl
    lam = params.lambda_for(variant)
    ss_only = variant == "augself" and params.augself.ss_only
    if ss_only and distributed.world_size() > 1:
        raise ConfigError("augself.ss_only: not supported under DDP (the projector gets no gradient, which "
                          "DistributedDataParallel refuses); run it on one process or set augself.ss_only: false")
    cifar_stem = ssl.cifar_stem if ssl.cifar_stem is not None else image_size <= 64
    backbone, feat_dim = build_backbone(ssl.backbone, image_size, ssl.width, cifar_stem)
    conditioning = Conditioning.from_params(params.cassle) if variant == "cassle" else None
    ssl_method = build_method(method, backbone, feat_dim, ssl.method(method), conditioning)
    head = build_augself_head(feat_dim, params.augself, lam)
    info = {"backbone_name": ssl.backbone, "width": ssl.width, "cifar_stem": bool(cifar_stem),
            "image_size": int(image_size), "feat_dim": int(feat_dim)}
    return PretrainModel(ssl_method, head, lam, ss_only), backbone, info


def build_optimizer(params: Params, model: PretrainModel, steps_per_epoch: int, total_steps: int):
    """SGD over the trainable parameters (lr scaled by batch/256) and the per-step schedule.

    Parameters the method lists in ``fixed_lr_parameters()`` (SimSiam's predictor) get their own
    param group that warms up with the others but is not cosine-decayed, as the official code
    does with its second, unscheduled optimiser.  Group 0 is the scheduled one (its lr is logged).
    """
    ssl = params.ssl
    lr = ssl.lr * ssl.batch_size / 256
    fixed_ids = {id(p) for p in model.method.fixed_lr_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in fixed_ids]}]
    fixed = [p for p in trainable if id(p) in fixed_ids]
    if fixed:
        groups.append({"params": fixed})
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=ssl.momentum, weight_decay=ssl.weight_decay)
    warmup = int(round(ssl.warmup_epochs * steps_per_epoch))
    schedules = [lambda s: lr_factor(s, total_steps, warmup),
                 lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0][:len(groups)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    return optimizer, scheduler


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
               v1: torch.Tensor, v2: torch.Tensor, omega1: dict, omega2: dict,
               amp_dtype: torch.dtype | None, nan_term: int | None = None) -> torch.Tensor:
    """One optimisation step; returns the detached loss terms (a device tensor, no host sync).

    ``nan_term`` (test hook) adds NaN to that entry of the terms before the backward pass, which
    poisons the weights the way a real divergence would.
    """
    device_type = v1.device.type
    autocast = (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    with autocast:
        total, terms = model(v1, v2, omega1, omega2)
    if nan_term is not None:
        total = total + float("nan")
        terms = terms.detach().clone()
        terms[nan_term] = float("nan")
        terms[-1] = float("nan")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()
    scheduler.step()
    return terms.detach()


# ---------------------------------------------------------------------------- loss bookkeeping
class _LossLog:
    """Per-step loss terms: device buffer → host sums per log window and per epoch."""

    def __init__(self, names: list[str], size: int, device: torch.device):
        self.names = names
        self.buf = torch.zeros(size, len(names), device=device)
        self.buf_steps: list[tuple[int, int]] = []    # (1-based step, epoch) of each buffered row
        self.window = np.zeros(len(names))
        self.window_n = 0
        self.epochs: dict[int, list] = {}              # epoch → [sum vector, count]
        self.rows: list[dict] = []                     # losses.csv rows so far

    def push(self, terms: torch.Tensor, step: int, epoch: int) -> None:
        self.buf[len(self.buf_steps)] = terms
        self.buf_steps.append((step, epoch))

    @property
    def full(self) -> bool:
        return len(self.buf_steps) == self.buf.shape[0]

    def flush(self) -> None:
        """Read the buffered steps back (one sync), check finiteness, add to the host sums."""
        n = len(self.buf_steps)
        if n == 0:
            return
        rows = self.buf[:n]
        if distributed.is_dist():
            rows = rows.clone()
            torch_dist.all_reduce(rows)                   # NaN on any rank reaches every rank
            rows /= distributed.world_size()
        values = rows.cpu().numpy().astype(np.float64)
        steps, self.buf_steps = self.buf_steps, []
        for (step, epoch), v in zip(steps, values):
            if not np.isfinite(v).all():
                j = int(np.flatnonzero(~np.isfinite(v))[0])
                raise NonFiniteLossError(step, self.names[j], float(v[j]))
            self.window += v
            self.window_n += 1
            acc = self.epochs.setdefault(epoch, [np.zeros(len(self.names)), 0])
            acc[0] += v
            acc[1] += 1
        for e in sorted(self.epochs)[:-2]:                 # keep the current and the last full epoch
            del self.epochs[e]

    def take_window(self) -> dict[str, float]:
        mean = self.window / max(1, self.window_n)
        self.window[:] = 0
        self.window_n = 0
        return {f"pretrain/loss_{k}": float(x) for k, x in zip(self.names, mean)}

    def epoch_means(self, epoch: int) -> dict[str, float]:
        s, n = self.epochs[epoch]
        return {f"pretrain/loss_{k}": float(x) for k, x in zip(self.names, s / n)}

    def state(self) -> dict:
        return {"epochs": {e: (s.tolist(), n) for e, (s, n) in self.epochs.items()}, "rows": list(self.rows),
                "window": (self.window.tolist(), self.window_n)}

    def load(self, state: dict) -> None:
        self.epochs = {int(e): [np.array(s), n] for e, (s, n) in state["epochs"].items()}
        self.rows = list(state["rows"])
        self.window, self.window_n = np.array(state["window"][0]), state["window"][1]


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _say(msg: str) -> None:
    if distributed.is_main():
        print(f"[pretrain] {msg}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class _Progress:
    """What a person watching the run sees (rank 0 only, nothing when ``enabled`` is False).

    On a terminal: a tqdm bar over the steps.  Off a terminal (``make repro`` piped to a log, nohup, a
    batch scheduler), where a bar would print nothing useful: one line per epoch on stderr with the
    epoch's mean loss terms, images/s over the epoch (wall clock, checkpoints and monitor included),
    the elapsed time of this process and the ETA from the steps it has done so far.
    """

    def __init__(self, run: "_Run", enabled: bool):
        from tqdm.auto import tqdm

        self.on = enabled and run.main
        self.tty = self.on and sys.stderr.isatty()
        self.bar = tqdm(total=run.total_steps, initial=run.step, disable=not self.tty, unit="step",
                        desc=f"{run.method}-{run.variant}", dynamic_ncols=True, leave=True)
        self.t0 = self.epoch_t0 = time.perf_counter()
        self.first_step = run.step

    def update(self) -> None:
        self.bar.update(1)

    def postfix(self, loss: float, images_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")

    def epoch_done(self, run: "_Run", monitor: dict[str, float]) -> None:
        if not self.on or self.tty:
            return
        now, epoch = time.perf_counter(), run.step // run.steps_per_epoch
        done = run.step - self.first_step
        losses = run.log.epoch_means(epoch - 1)
        terms = "  ".join(f"{k.removeprefix('pretrain/loss_')} {v:.4f}" for k, v in losses.items())
        knn = "".join(f"  {k.removeprefix('monitor/')} {v:.1f}" for k, v in monitor.items() if k.endswith("knn_top1"))
        speed = run.steps_per_epoch * run.params.ssl.batch_size / max(now - self.epoch_t0, 1e-9)
        eta = (now - self.t0) / max(done, 1) * (run.stop_at - run.step)
        print(f"[pretrain] {run.method}-{run.variant} epoch {epoch}/{run.params.ssl.epochs}  {terms}{knn}  "
              f"{speed:.0f} img/s  elapsed {_clock(now - self.t0)}  ETA {_clock(eta)}", file=sys.stderr, flush=True)
        self.epoch_t0 = now

    def close(self) -> None:
        self.bar.close()


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


def check_request(params: Params, method: str, variant: str) -> None:
    """The one check of what a caller asks to train: ``method`` in ``ssl.methods``, a known ``variant``.

    Called where the request enters the library (:func:`pretrain`, and the stage glue
    :func:`pipeline.workflow.run_pretraining` before it starts an MLflow run); the loop and the
    helpers below it take the names as checked.
    """
    check_choice("ssl.methods", method, params.ssl.methods)
    check_choice("variants", variant, params.variants)


# ---------------------------------------------------------------------------- the loop
def pretrain(params: Params, method: str, variant: str, images: np.ndarray, out_dir: str | Path,
             on_log: Callable[[int, dict[str, float]], None] | None = None, device: str | None = None,
             max_steps: int | None = None, progress: bool = True,
             inject_nan: str | None = None, monitor: MonitorData | None = None) -> TrainResult:
    """Pretrain ``method`` (``variant`` ``baseline``: λ = 0, ``augself``: λ = augself.lambda) on ``images``.

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
    check_request(params, method, variant)
    _validate_images(images, params.ssl.batch_size)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if params.ssl.batch_size % env_world:
        raise ConfigError(f"ssl.batch_size: {params.ssl.batch_size} does not divide by the world size {env_world} "
                          f"(the global batch is split evenly across DDP ranks); use a multiple of {env_world}")
    nan_hook = _parse_nan_hook(inject_nan)

    ctx = distributed.setup_from_env() if env_world > 1 else None
    threads = torch.get_num_threads()
    try:
        if ctx is not None:
            dev = ctx.device
        else:
            dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return _pretrain(params, method, variant, images, Path(out_dir), on_log, dev, max_steps, progress,
                         nan_hook, monitor)
    finally:
        torch.set_num_threads(threads)       # ssl.threads applies to this run only
        if ctx is not None:
            distributed.cleanup()


def _pretrain(params: Params, method: str, variant: str, images: np.ndarray, out_dir: Path, on_log,
              dev: torch.device, max_steps: int | None, progress: bool, nan_hook: tuple[int, str] | None,
              monitor: MonitorData | None) -> TrainResult:
    """The loop, phase by phase: set up, resume, place, then step / read losses / log / monitor /
    checkpoint until ``stop_at``, and finish (final.pt and the DVC files)."""
    run = _setup(params, method, variant, images, out_dir, on_log, dev, max_steps, nan_hook, monitor)
    _resume(run)
    _place(run, images)
    shown = _Progress(run, progress)
    run.window_t0 = time.perf_counter()
    try:
        while run.step < run.stop_at:
            _train_step(run)
            shown.update()
            step, ssl = run.step, params.ssl
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
                _off_the_clock(run, _save_checkpoint, run)
    finally:
        shown.close()
    return _finish(run)


@dataclass
class _Run:
    """What the phases of one run share: the request, the built objects and the loop's counters."""
    params: Params
    method: str
    variant: str
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
    log: _LossLog
    monitor: KnnMonitor | None
    nan_hook: tuple[int, str] | None
    runner: nn.Module | None = None   # the model as the forward sees it (DDP / compiled); set by _place
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
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT


def _setup(params: Params, method: str, variant: str, images: np.ndarray, out_dir: Path, on_log,
           dev: torch.device, max_steps: int | None, nan_hook: tuple[int, str] | None,
           monitor: MonitorData | None) -> _Run:
    """Sizes of the schedule, the model (seeded initialisation), optimiser, scaler and loss log."""
    ssl = params.ssl
    rank, world = distributed.rank(), distributed.world_size()
    phash = training_hash(params, method, variant)
    if ssl.threads > 0:
        torch.set_num_threads(ssl.threads)
    steps_per_epoch = images.shape[0] // ssl.batch_size
    total_steps = ssl.epochs * steps_per_epoch
    stop_at = total_steps if max_steps is None else min(total_steps, max(0, int(max_steps)))
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(params.seed)            # identical initialisation on every rank (DDP also broadcasts it)
    model, backbone, arch = build_pretrain_model(params, method, variant, images.shape[1])
    model.to(dev)
    if use_channels_last(ssl, dev):
        model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(params, model, steps_per_epoch, total_steps)
    amp_dtype = resolve_amp(ssl.amp, dev)
    scaler = torch.amp.GradScaler(dev.type) if amp_dtype == torch.float16 else None
    log = _LossLog(model.term_names, ssl.log_every, dev)
    if nan_hook is not None and nan_hook[1] not in model.term_names:
        raise ValueError(f"inject_nan: unknown term {nan_hook[1]!r}; this run has {', '.join(model.term_names)}")
    knn = (KnnMonitor(monitor, params.augment.mean, params.augment.std, params.eval.batch_size, dev)
           if monitor is not None and ssl.monitor_every > 0 else None)
    return _Run(params, method, variant, out_dir, dev, on_log, rank, world, phash, steps_per_epoch, total_steps,
                stop_at, amp_dtype, model, backbone, arch, optimizer, scheduler, scaler, log, knn, nan_hook)


def _resume(run: _Run) -> None:
    """Continue from a matching checkpoint.pt (state, RNG, histories), or start fresh (new RNG stream)."""
    state = _read_checkpoint(run.ckpt_path, run.phash, run.world)
    if state is None:
        torch.manual_seed(_derive_seed(run.params.seed, 1 + run.rank))      # per-rank stream for the methods
        if run.main:
            for stale in (FINAL, METRICS, TIMING, LOSSES, TIMING_CSV, MONITOR):
                (run.out_dir / stale).unlink(missing_ok=True)
        return
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
        _say(f"{run.ckpt_path} is finished ({run.step}/{run.total_steps} steps): rewriting the outputs only")
    else:
        _say(f"resuming from {run.ckpt_path} at step {run.step}/{run.total_steps} "
             f"(epoch {run.step // run.steps_per_epoch})")


def _place(run: _Run, images: np.ndarray) -> None:
    """Wrap the model for the forward (DDP, SyncBatchNorm, compile; state is saved from ``run.model``)
    and put the images on the training device, once."""
    runner: nn.Module = run.model
    if run.world > 1:
        if run.dev.type == "cuda":
            runner = nn.SyncBatchNorm.convert_sync_batchnorm(runner)
        else:
            _say("gloo on CPU: SyncBatchNorm has no CPU kernel, BatchNorm statistics stay per rank")
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


def _train_step(run: _Run) -> None:
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


def _read_losses(run: _Run) -> None:
    """Read the buffered loss terms back; a non-finite one stops the run naming the last good checkpoint."""
    try:
        run.log.flush()
    except NonFiniteLossError as e:
        raise NonFiniteLossError(e.step, e.term, e.value,
                                 run.ckpt_path if run.ckpt_path.exists() else None) from None


def _log(run: _Run, shown: _Progress) -> None:
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
        _append_csv(run.out_dir / LOSSES, row)
        timing = {"step": run.step, "pretrain/images_per_s": speed, "pretrain/wall_time_s": run.wall}
        run.timing_rows.append(timing)
        _append_csv(run.out_dir / TIMING_CSV, timing)
        shown.postfix(metrics["pretrain/loss_total"], speed)
        if run.on_log is not None:
            run.on_log(run.step, {**metrics, "pretrain/images_per_s": speed})
    run.window_images = 0
    run.window_t0 = time.perf_counter()


def _monitor_due(run: _Run) -> bool:
    """At the end of every ``ssl.monitor_every``-th epoch, and of the last one (the final model)."""
    return run.monitor is not None and (
        (run.step // run.steps_per_epoch) % run.params.ssl.monitor_every == 0 or run.step == run.total_steps)


def _monitor(run: _Run) -> dict[str, float]:
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


def _off_the_clock(run: _Run, phase: Callable, *args):
    """Run ``phase`` without counting its time as training time (images/s measures the steps only)."""
    t0 = time.perf_counter()
    try:
        return phase(*args)
    finally:
        run.window_t0 += time.perf_counter() - t0


def _save_checkpoint(run: _Run) -> None:
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
        "method": run.method, "variant": run.variant, "lambda": model.lam,
        "step": run.step, "epoch": run.step // run.steps_per_epoch, "total_steps": run.total_steps,
        "model": model.method.state_dict(),
        "head": model.head.state_dict() if model.head is not None else None,
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": rngs, "log": run.log.state(), "wall_time_s": run.wall, "images_seen": run.images_seen,
        "monitor": run.monitor_rows, "timing": run.timing_rows, "monitor_s": run.monitor_s,
    }, run.ckpt_path)


def _finish(run: _Run) -> TrainResult:
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
                 **run.arch, "method": run.method, "variant": run.variant, "lambda": run.model.lam,
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


def checkpoint_resumable(params: Params, method: str, variant: str, out_dir: str | Path) -> bool:
    """True when ``out_dir/checkpoint.pt`` exists and :func:`pretrain` would resume it (same hash)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return False
    try:
        state = ckpt_io.load(path, map_location="cpu")
    except Exception:
        return False
    return (state.get("version") == _CKPT_VERSION
            and state.get("params_hash") == training_hash(params, method, variant)
            and state.get("world_size") == int(os.environ.get("WORLD_SIZE", "1")))


def _read_checkpoint(path: Path, phash: str, world: int) -> dict | None:
    """The checkpoint to resume from, or None (absent, or written for another configuration)."""
    if not path.exists():
        return None
    try:
        state = ckpt_io.load(path, map_location="cpu")   # RNG states must stay CPU tensors
    except Exception as e:  # a foreign or damaged file: report it, never resume from it
        _say(f"{path} could not be read ({type(e).__name__}: {e}); starting fresh")
        return None
    if state.get("version") != _CKPT_VERSION or state.get("params_hash") != phash:
        _say(f"{path} was written for params hash {state.get('params_hash')}, this run is {phash}: "
             f"not resuming it, starting fresh (it will be overwritten)")
        return None
    if state.get("world_size") != world:
        _say(f"{path} was written by {state.get('world_size')} process(es), this run has {world}: "
             f"the views and batch statistics would differ, starting fresh")
        return None
    return state
