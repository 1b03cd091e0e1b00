"""SimSiam (Chen & He, 2021): predict one view's projection from the other's, with stop-gradient.

Loss ``−½ (cos(p1, sg(z2)) + cos(p2, sg(z1)))``, each cosine averaged over the batch; it lies in
[−1, 1], −1 when predictions and targets align.

Heads: projector ``mlp(feat_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bn=True)``
(2 layers in the official AugSelf STL-10/CIFAR runs, 3 for ImageNet-100 as in the SimSiam paper), predictor ``mlp(proj_dim, pred_hidden_dim, proj_dim,
num_layers=2, last_bn=False)`` (a bottleneck: pred_hidden_dim = proj_dim / 4 in the paper).
The official AugSelf predictor is trained at a constant learning rate, which this
method reports through :meth:`fixed_lr_parameters`.  Uses ``proj_hidden_dim``, ``proj_dim``,
``pred_hidden_dim`` of the method params.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.methods.base import MethodOutput, SSLMethod
from pipeline.models import mlp
from pipeline.params import MethodParams


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``−mean_i cos(p_i, z_i)`` with the gradient stopped at ``z`` (SimSiam's D(p, z))."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


class SimSiam(SSLMethod):
    name = "simsiam"

    def __init__(self, backbone, feat_dim: int, params: MethodParams, conditioning=None):
        super().__init__(backbone, feat_dim, conditioning)
        self.projector = self.make_projector(params.proj_hidden_dim, params.proj_dim, params.proj_layers,
                                             last_bn=True)
        self.predictor = mlp(params.proj_dim, params.pred_hidden_dim, params.proj_dim, num_layers=2, last_bn=False)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, cond1=None, cond2=None) -> MethodOutput:
        f1, f2 = self.backbone(v1), self.backbone(v2)
        z1, z2 = self.project(f1, cond1), self.project(f2, cond2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
        return MethodOutput(loss=loss, f1=f1, f2=f2)

    def fixed_lr_parameters(self) -> list:
        return list(self.predictor.parameters())
