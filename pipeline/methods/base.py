"""The interface every SSL method implements, and the momentum-encoder machinery two of them share.

A method is an ``nn.Module`` that owns the backbone and its heads and turns two views of a batch
into a loss:

    out = method(v1, v2)            # MethodOutput(loss, f1, f2)
    (out.loss + lam * augself_head(out.f1, out.f2, ...)).backward()
    optimizer.step()
    method.on_step_end(progress)    # momentum encoders, EMA ramps

``f1`` / ``f2`` are the pooled features of the *online* backbone for each view, with gradient:
they are what the AugSelf head reads (official code: ``ss_objective(ss_predictor, y1, y2, ...)``).

Everything a resumed run needs (momentum encoders, MoCo's queue and pointer) is a parameter or a
buffer, so ``state_dict()`` / ``load_state_dict()`` restore a method exactly.  Momentum encoders
have ``requires_grad=False``; :meth:`SSLMethod.ssl_parameters` lists only what the optimiser owns.

The loss is computed in float32 (embeddings are cast up before normalisation), so it is safe under
bf16 / fp16 autocast.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
import torch.nn as nn


@dataclass
class MethodOutput:
    """``loss``: scalar SSL loss; ``f1``, ``f2``: online backbone features ``(B, feat_dim)`` of each view."""
    loss: torch.Tensor
    f1: torch.Tensor
    f2: torch.Tensor


class SSLMethod(nn.Module):
    """Base class: holds ``backbone`` and ``feat_dim``; subclasses add heads and define the loss."""

    #: registry key (``pipeline.params.METHODS``)
    name: ClassVar[str] = ""

    def __init__(self, backbone: nn.Module, feat_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = int(feat_dim)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_step_end(self, progress: float) -> None:
        """Called after every optimiser step; ``progress`` in [0, 1] is the fraction of training done.

        The default does nothing (SimCLR, SimSiam); momentum methods update their target networks.
        """

    def ssl_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the optimiser updates (momentum encoders excluded)."""
        return (p for p in self.parameters() if p.requires_grad)

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """Parameters the official code trains at a constant learning rate (no cosine decay).

        Empty by default; SimSiam returns its predictor (official ``pretrain.py`` puts it in a second
        optimiser without a scheduler, as the SimSiam paper prescribes).  They are also part of
        :meth:`ssl_parameters`; a loop that honours this puts them in their own param group.
        """
        return []


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` (a momentum / target network): no gradients, same mode."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``θ_target ← m·θ_target + (1 − m)·θ_online`` for every parameter (buffers are left alone).

    As in the official code (and BYOL / MoCo), BatchNorm running statistics of the target are not
    averaged: the target computes its own in its train-mode forward passes.
    """
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"ema_update: target has {len(t_params)} parameters, online {len(o_params)}; "
                         "the target must be a copy of the online network")
    if momentum == 1.0:
        return
    torch._foreach_lerp_(t_params, [p.detach() for p in o_params], 1.0 - momentum)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule: ``τ = 1 − (1 − τ_base)·(cos(π·progress) + 1)/2``; τ_base at 0, 1 at the end."""
    progress = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
