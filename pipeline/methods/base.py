"""The interface every SSL method implements, and the momentum-encoder machinery two of them share.

A method is an ``nn.Module`` that owns the backbone and its heads and turns two views of a batch
into a loss:

    out = method(v1, v2)            # MethodOutput(loss, f1, f2)
    out = method(v1, v2, c1, c2)    # CASSLE: each view's encoded ω conditions the projector
    (out.loss + lam * augself_head(out.f1, out.f2, ...)).backward()
    optimizer.step()
    method.on_step_end(progress)    # momentum encoders, EMA ramps

``f1`` / ``f2`` are the pooled features of the *online* backbone for each view, with gradient:
they are what the AugSelf head reads (official code: ``ss_objective(ss_predictor, y1, y2, ...)``).

Conditioning (CASSLE, :mod:`pipeline.cassle`): a method built with a
:class:`~pipeline.cassle.Conditioning` gets its projector from :meth:`SSLMethod.make_projector`
wrapped in a :class:`~pipeline.cassle.ConditionedProjector` (the ω embedding and a first layer wider
by its width), and every projection goes through :meth:`SSLMethod.project` with the view's own
``cond`` vector, for the online and the momentum projector alike.  Without conditioning both are the
plain projector and ``cond`` must be None, so the four methods share one code path.

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

from pipeline.cassle import Conditioning
from pipeline.models import mlp


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

    def __init__(self, backbone: nn.Module, feat_dim: int, conditioning: Conditioning | None = None):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = int(feat_dim)
        self.conditioning = conditioning

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, cond1: torch.Tensor | None = None,
                cond2: torch.Tensor | None = None) -> MethodOutput:  # pragma: no cover - abstract
        """The SSL loss of the two views; ``cond1`` / ``cond2``: each view's encoded ω (CASSLE only)."""
        raise NotImplementedError

    def make_projector(self, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool) -> nn.Module:
        """The method's projector ``mlp(feat_dim, hidden_dim, out_dim, num_layers, last_bn)``; conditioned
        on ω (:class:`pipeline.cassle.ConditionedProjector`) when the method was built with conditioning."""
        def make(in_dim: int) -> nn.Module:
            return mlp(in_dim, hidden_dim, out_dim, num_layers=num_layers, last_bn=last_bn)
        if self.conditioning is None:
            return make(self.feat_dim)
        return self.conditioning.projector(self.feat_dim, make)

    def project(self, f: torch.Tensor, cond: torch.Tensor | None, projector: nn.Module | None = None) -> torch.Tensor:
        """``projector(f)`` (default ``self.projector``), given the view's ω vector when conditioned.

        Refuses a missing ``cond`` for a conditioned method and a ``cond`` for an unconditioned one,
        so a wiring mistake cannot silently train the other variant.
        """
        projector = self.projector if projector is None else projector
        if self.conditioning is None:
            if cond is not None:
                raise ValueError(f"{type(self).__name__}: got an ω condition, but the method was built without "
                                 "conditioning (only the cassle variant conditions the projector)")
            return projector(f)
        if cond is None:
            raise ValueError(f"{type(self).__name__}: the projector is conditioned on ω (cassle) but no condition "
                             "was given; pass each view's pipeline.cassle.omega_vector as cond1 / cond2")
        return projector(f, cond)

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
