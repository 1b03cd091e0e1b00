"""MoCo v2 (Chen et al., 2020): contrast queries against a momentum encoder's keys and a key queue.

* Query encoder: backbone + projector ``mlp(feat_dim, proj_hidden_dim, proj_dim, num_layers=2,
  last_bn=False)`` (official AugSelf: ``feat_dim → feat_dim → 128`` with BN in the hidden layer).
* Key encoder: frozen copies of both, updated after each optimiser step by
  ``θ_k ← m·θ_k + (1 − m)·θ_q`` (``momentum``, official 0.999).  Its BatchNorms run in train mode
  on each key batch, as in the official code.
* Loss: InfoNCE with temperature T over ``[q·k⁺, q·queue]``, made symmetric:
  ``½ (InfoNCE(q1, k2) + InfoNCE(q2, k1))``.  Deviation: the official AugSelf MoCo is one-sided
  (queries from view 1, keys from view 2; the AugSelf head then reads the *momentum* backbone's
  features of view 2).  Here both views go through the online and the key encoder and ``f1``, ``f2``
  are both online features, like the other methods; this doubles the signal per image.
* Queue: ``queue_size`` L2-normalised embeddings (a buffer, initialised with normalised Gaussian
  noise as in the reference code) and a pointer buffer, both in ``state_dict`` so a resumed run
  continues exactly.  After the loss of a training-mode forward, the new entries
  ``[k1 of all ranks; k2 of all ranks]`` are written at the pointer (wrapping around) — MoCo v2's
  behaviour.  ``official_queue=True`` enqueues the (detached) online queries ``[q1; q2]`` instead,
  as the official AugSelf code does (``queue[ptr:ptr+n] = all_gather(z1)``).  The loss of a step
  always uses the queue as it was before that step's entries were added.
* DDP: new entries are gathered from all ranks before enqueueing, so every rank holds the same
  queue.  MoCo's shuffling BN is not implemented: like the official AugSelf code, which relies on
  SyncBatchNorm (``idist.auto_model(sync_bn=True)``), we let the training loop convert BatchNorms to
  SyncBatchNorm under DDP; on one device the key encoder's BN statistics are those of the key batch.

CASSLE (``conditioning``): the key projector is the momentum copy of the whole conditioned projector,
ω embedding included, and each key is computed with its own view's ω (``k1`` with ``cond1``).

Uses ``proj_hidden_dim``, ``proj_dim``, ``temperature``, ``queue_size``, ``momentum``,
``official_queue`` of the method params.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.methods.base import MethodOutput, SSLMethod, ema_update, momentum_copy
from pipeline.params import MethodParams


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: ``−mean_i log softmax([q_i·k_i, q_i·queue_1, …, q_i·queue_K] / T)[0]``.

    ``q``, ``k``: ``(B, D)`` L2-normalised queries and their positive keys; ``queue``: ``(K, D)``
    negatives.  No gradient flows into ``k`` or ``queue``.
    """
    q = q.float()
    l_pos = (q * k.detach().float()).sum(dim=1, keepdim=True)
    l_neg = q @ queue.detach().float().T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


class MoCo(SSLMethod):
    name = "moco"

    def __init__(self, backbone, feat_dim: int, params: MethodParams, conditioning=None):
        super().__init__(backbone, feat_dim, conditioning)
        self.temperature = params.temperature
        self.momentum = params.momentum
        self.official_queue = params.official_queue
        self.projector = self.make_projector(params.proj_hidden_dim, params.proj_dim, params.proj_layers,
                                             last_bn=False)
        self.key_backbone = momentum_copy(self.backbone)
        self.key_projector = momentum_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(params.queue_size, params.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, cond1=None, cond2=None) -> MethodOutput:
        f1, f2 = self.backbone(v1), self.backbone(v2)
        q1 = F.normalize(self.project(f1, cond1).float(), dim=1)
        q2 = F.normalize(self.project(f2, cond2).float(), dim=1)
        with torch.no_grad():   # each key gets its own view's ω (CASSLE): the key projector is a conditioned copy
            k1 = F.normalize(self.project(self.key_backbone(v1), cond1, self.key_projector).float(), dim=1)
            k2 = F.normalize(self.project(self.key_backbone(v2), cond2, self.key_projector).float(), dim=1)
        queue = self.queue.clone()  # the enqueue below must not touch the tensor autograd saved
        loss = 0.5 * (info_nce(q1, k2, queue, self.temperature) + info_nce(q2, k1, queue, self.temperature))
        if self.training:
            a, b = (q1, q2) if self.official_queue else (k1, k2)
            self.enqueue(torch.cat([distributed.gather(a), distributed.gather(b)]))
        return MethodOutput(loss=loss, f1=f1, f2=f2)

    @torch.no_grad()
    def enqueue(self, entries: torch.Tensor) -> None:
        """Write ``entries`` (n, D) at the pointer, wrapping around; the pointer advances by n.

        If n exceeds the queue size only the last ``queue_size`` entries are kept (at the positions
        they would have reached).  No host synchronisation.
        """
        size, n = self.queue.shape[0], entries.shape[0]
        kept = entries[-size:].detach().to(self.queue.dtype)
        start = self.queue_ptr + (n - kept.shape[0])
        idx = (start + torch.arange(kept.shape[0], device=self.queue.device)) % size
        self.queue.index_copy_(0, idx, kept)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def on_step_end(self, progress: float) -> None:
        ema_update(self.key_backbone, self.backbone, self.momentum)
        ema_update(self.key_projector, self.projector, self.momentum)
