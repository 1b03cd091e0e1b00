"""BYOL (Grill et al., 2020): predict a slowly moving target network's projection of the other view.

* Online: backbone + projector ``mlp(feat_dim, proj_hidden_dim, proj_dim, 2, last_bn=False)`` +
  predictor ``mlp(proj_dim, pred_hidden_dim, proj_dim, 2, last_bn=False)`` (official AugSelf:
  4096 hidden, 256 out for both).
* Target: frozen copies of backbone and projector, updated after each optimiser step by EMA with
  ``τ = 1 − (1 − τ_base)·(cos(π·progress) + 1)/2`` (τ_base = ``momentum``, official 0.996), so τ
  ramps from τ_base to 1 over training.  The official code evaluates the ramp per epoch
  (``progress = (epoch − 1)/max_epochs``); we evaluate it per step with the loop's ``progress``.
* Loss: symmetric normalised MSE ``‖p̄1 − sg(z̄'2)‖² + ‖p̄2 − sg(z̄'1)‖²`` (batch means), i.e.
  ``4 − 2(cos₁ + cos₂)``.  The official code minimises ``−2(cos₁ + cos₂)``: the same gradients, a
  loss 4 lower.

CASSLE (``conditioning``): the target projector is the EMA copy of the whole conditioned projector,
ω embedding included, and each target gets its own view's ω; the predictor is not conditioned.

Uses ``proj_hidden_dim``, ``proj_dim``, ``pred_hidden_dim``, ``momentum`` of the method params.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.methods.base import MethodOutput, SSLMethod, cosine_momentum, ema_update, momentum_copy
from pipeline.models import mlp
from pipeline.params import MethodParams


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``mean_i ‖p_i/‖p_i‖ − z_i/‖z_i‖‖²`` = ``2 − 2·mean cos``, with the gradient stopped at ``z``."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return (p - z).square().sum(dim=-1).mean()


class BYOL(SSLMethod):
    name = "byol"

    def __init__(self, backbone, feat_dim: int, params: MethodParams, conditioning=None):
        super().__init__(backbone, feat_dim, conditioning)
        self.base_momentum = params.momentum
        self.projector = self.make_projector(params.proj_hidden_dim, params.proj_dim, params.proj_layers,
                                             last_bn=False)
        self.predictor = mlp(params.proj_dim, params.pred_hidden_dim, params.proj_dim, num_layers=2, last_bn=False)
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, cond1=None, cond2=None) -> MethodOutput:
        f1, f2 = self.backbone(v1), self.backbone(v2)
        p1 = self.predictor(self.project(f1, cond1))       # the predictor itself is not conditioned
        p2 = self.predictor(self.project(f2, cond2))
        with torch.no_grad():   # each target gets its own view's ω (CASSLE): the target projector is a conditioned copy
            t1 = self.project(self.target_backbone(v1), cond1, self.target_projector)
            t2 = self.project(self.target_backbone(v2), cond2, self.target_projector)
        loss = normalized_mse(p1, t2) + normalized_mse(p2, t1)
        return MethodOutput(loss=loss, f1=f1, f2=f2)

    def momentum_at(self, progress: float) -> float:
        return cosine_momentum(self.base_momentum, progress)

    def on_step_end(self, progress: float) -> None:
        tau = self.momentum_at(progress)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)
