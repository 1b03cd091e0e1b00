"""SimCLR (Chen et al., 2020): contrast each view against the other view and every other image.

Official AugSelf (``pretrain.py::simclr`` / ``trainers.py::simclr``): projector
``mlp(feat_dim, feat_dim, 128, num_layers=2, last_bn=False)``, temperature 0.2, the NT-Xent loss
below averaged over the 2B anchors.  Here the hidden width is ``proj_hidden_dim`` (equal to the
official one when it is set to the backbone's feat_dim, 512 for ResNet-18) and the output
``proj_dim``.  Uses ``proj_hidden_dim``, ``proj_dim``, ``temperature`` of the method params.

Under DDP the embeddings of all ranks are gathered *with gradient* so each anchor's negatives are the
global batch (2·world_size·B − 2 of them), exactly as one process on the whole batch would see; the
official code (ignite, ``idist``) contrasts within each rank's local batch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.methods.base import MethodOutput, SSLMethod
from pipeline.params import MethodParams


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, global_batch: bool = False) -> torch.Tensor:
    """Normalised-temperature cross-entropy over the 2B embeddings ``[z1; z2]`` (each ``(B, D)``).

    For anchor i the positive is the other view of the same image and the negatives are the other
    2B − 2 embeddings (self-similarity excluded); the loss is the mean over all 2B anchors of
    ``−log softmax(sim_i / T)[positive]`` with cosine similarity ``sim``.  Inputs need not be
    normalised.  With ``global_batch`` and an initialised process group, the keys (positives and
    negatives) are the embeddings of all ranks and the anchors this rank's, so the per-rank losses
    average (as DDP averages gradients) to the single-process loss on the concatenated batch.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent: expected two (B, D) tensors of the same shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    q1 = F.normalize(z1.float(), dim=1)
    q2 = F.normalize(z2.float(), dim=1)
    b = q1.shape[0]
    if global_batch:
        k1, k2 = distributed.gather_with_grad(q1), distributed.gather_with_grad(q2)
        offset = distributed.rank() * b
    else:
        k1, k2, offset = q1, q2, 0
    n = k1.shape[0]
    queries = torch.cat([q1, q2])                       # (2B, D) local anchors
    keys = torch.cat([k1, k2])                          # (2N, D) global keys
    logits = queries @ keys.T / temperature             # (2B, 2N)
    local = torch.arange(b, device=logits.device) + offset
    self_idx = torch.cat([local, local + n])            # column of each anchor itself
    pos_idx = torch.cat([local + n, local])             # column of its other view
    rows = torch.arange(2 * b, device=logits.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


class SimCLR(SSLMethod):
    name = "simclr"

    def __init__(self, backbone, feat_dim: int, params: MethodParams, conditioning=None):
        super().__init__(backbone, feat_dim, conditioning)
        self.temperature = params.temperature
        self.projector = self.make_projector(params.proj_hidden_dim, params.proj_dim, params.proj_layers,
                                             last_bn=False)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, cond1=None, cond2=None) -> MethodOutput:
        f1, f2 = self.backbone(v1), self.backbone(v2)
        loss = nt_xent(self.project(f1, cond1), self.project(f2, cond2), self.temperature, global_batch=True)
        return MethodOutput(loss=loss, f1=f1, f2=f2)
