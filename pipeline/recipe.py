"""The model recipe: what a :class:`~pipeline.request.RunRequest` trains and how one step updates it.

* **Model** (:func:`build_pretrain_model`): the backbone, the SSL method with its own section (its
  projector conditioned on ω for CASSLE) and, when λ > 0, the AugSelf head, in one
  :class:`PretrainModel` whose forward gives every loss term: ``L = L_SSL + λ·Σ_aug w_aug·L_aug``.
  With ``λ = 0`` no AugSelf head is built, so the baseline pays nothing for it.
* **Optimisation** (:func:`build_optimizer`, the official AugSelf recipe): SGD over every trainable
  parameter (backbone, heads, AugSelf head), ``lr = ssl.lr · batch_size / 256``, momentum, weight
  decay on all parameters; SimSiam's predictor keeps a constant lr (its ``fixed_lr_parameters``, the
  official second optimiser without scheduler).  The schedule is cosine **per step** with a linear
  warm-up of ``ssl.warmup_epochs`` (:func:`lr_factor`); the official code steps ``CosineAnnealingLR``
  once per epoch (200 epochs there, so the two curves nearly coincide; per step keeps short CPU runs
  smooth and makes the lr a pure function of the step, which exact resume needs).
* **Precision** (:func:`resolve_amp`): ``ssl.amp`` ``auto`` = bf16 autocast on CUDA, fp32 on CPU;
  ``fp16`` uses a gradient scaler (:func:`train_step`).

The loop (:mod:`pipeline.train`) seeds the global RNG before :func:`build_pretrain_model` and calls
:func:`train_step` once per step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from pipeline.augself import build_augself_head
from pipeline.cassle import Conditioning
from pipeline.config import ConfigError, check_choice
from pipeline.methods import build_method
from pipeline.models import build_backbone
from pipeline.params import Params
from pipeline.request import RunRequest

__all__ = ["PretrainModel", "build_pretrain_model", "build_optimizer", "lr_factor", "resolve_amp", "train_step"]


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


def build_pretrain_model(request: RunRequest, image_size: int) -> tuple[PretrainModel, nn.Module, dict]:
    """Build backbone, method and head; returns ``(model, backbone, backbone_info)``.

    ``backbone_info`` holds the keys of final.pt that describe the architecture.  Parameters are
    initialised from the global torch RNG: seed it first for a reproducible initialisation.
    The request decides the rest: the method with its own section, the AugSelf head when it is
    trained (λ, ``augself.ss_only``), the projector conditioned on ω when it is (the ``cassle``
    section, :mod:`pipeline.cassle`).
    """
    ssl = request.params.ssl
    cifar_stem = ssl.cifar_stem if ssl.cifar_stem is not None else image_size <= 64
    backbone, feat_dim = build_backbone(ssl.backbone, image_size, ssl.width, cifar_stem)
    conditioning = Conditioning.from_params(request.cassle) if request.uses_cassle else None
    ssl_method = build_method(request.method, backbone, feat_dim, request.method_params, conditioning)
    head = build_augself_head(feat_dim, request.augself, request.lam) if request.uses_augself else None
    info = {"backbone_name": ssl.backbone, "width": ssl.width, "cifar_stem": bool(cifar_stem),
            "image_size": int(image_size), "feat_dim": int(feat_dim)}
    return PretrainModel(ssl_method, head, request.lam, request.ss_only), backbone, info


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
