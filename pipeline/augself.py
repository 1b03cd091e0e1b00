"""AugSelf (Lee et al., NeurIPS 2021): targets from (ω1, ω2), the prediction head φ and its losses.

The auxiliary task: from the backbone features of two views of one image, predict how the views'
augmentation parameters differ.  ``L = L_ssl + λ · Σ_a w_a · L_a`` over the augmentations ``a`` in
``augself.augmentations``; this module computes ``{a: L_a}`` and ``Σ_a w_a · L_a``; the training
loop multiplies by λ.  λ = 0 builds no head at all (:func:`build_augself_head` returns None), so
the baseline has no extra parameters, compute or randomness.

Targets (ω as produced by :class:`pipeline.augment.BatchAugment`, see its docstring), each read from its
augmentation's record in :mod:`pipeline.augmentations` (output size, loss, builder):

====== ===== ============================================================== ====================
aug    n_out target for the order (v1, v2)                                   loss
====== ===== ============================================================== ====================
crop   4     (cy1 − cy2, cx1 − cx2, h1 − h2, w1 − w2), centre = top + h/2,   MSE on tanh(φ)
             left + w/2, cx mirrored to 1 − cx in a flipped view
flip   1     1[flip1 = flip2]                                                BCE on the logit φ
color  4     ω1 − ω2 (brightness, contrast, saturation, hue)                 MSE on tanh(φ)
blur   1     ω1 − ω2 (σ / σ_max, 0 when not applied)                         MSE on tanh(φ)
rota-  4     (k1 − k2 + 4) mod 4, the class of the relative rotation (k: the CE over 4 logits
tion         number of 90° turns, 0 when not applied); a (B,) long tensor
solar- 1     ω1 − ω2 (the threshold, 1 when not applied)                     MSE on tanh(φ)
ize
====== ===== ============================================================== ====================

Rotation and solarize are the official ``SSObjective`` targets ``rot`` and ``sol``
(hankook/AugSelf ``transforms.extract_diff``; its ``stl10_rot`` / ``stl10_sol`` pretraining sets):
``rot`` is ``(w1 − w2 + 4) % 4`` with a 4-way head and cross-entropy, ``sol`` is ``w1 − w2`` with
MSE on tanh.  The swapped order's rotation target is ``(4 − t) mod 4`` (the inverse rotation).

Deviation from the official code (github.com/hankook/AugSelf, ``transforms.extract_diff``): it
mirrors *both* views' crop centres with view 1's flip flag (``center2[f1, 1] = 1 - center2[f1, 1]``),
so when only one view is flipped the x-target compares a mirrored centre with an unmirrored one,
and the swapped order (computed by the same function with the views exchanged) uses view 2's flag
for both.  That looks like a slip: we mirror each view's centre with its own flag, which makes the
target the difference of the two views' positions in the frame each view is seen in, and makes the
swapped-order target exactly the negation.  ``official_flip_mirror=True`` reproduces the official
behaviour (in both orders) so the two can be compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import augmentations as registry
from pipeline.config import ConfigError, check_subset
from pipeline.params import AugSelfParams

__all__ = ["augself_targets", "AugSelfHead", "build_augself_head", "weighted_total"]


def _target(aug: str) -> registry.Target:
    """The AugSelf target of ``aug``'s record: ``size`` outputs, ``loss``, ``build``."""
    return registry.get(aug).target


def _check_augmentations(augmentations: Sequence[str]) -> list[str]:
    augmentations = list(augmentations)
    allowed = registry.target_names()
    if not augmentations:
        raise ConfigError(f"augself.augmentations: empty; allowed values: {', '.join(allowed)}")
    check_subset("augself.augmentations", augmentations, allowed)
    if len(set(augmentations)) != len(augmentations):
        raise ConfigError(f"augself.augmentations: {augmentations} lists an augmentation twice")
    return augmentations


def augself_targets(omega1: Mapping[str, torch.Tensor], omega2: Mapping[str, torch.Tensor],
                    augmentations: Sequence[str], official_flip_mirror: bool = False) -> dict[str, torch.Tensor]:
    """AugSelf targets for the ordered pair (view 1, view 2), one ``(B, n_out)`` float tensor per augmentation.

    ``crop``: ``(cy1 − cy2, cx1 − cx2, h1 − h2, w1 − w2)`` with centre ``(top + h/2, left + w/2)``
    and the x centre of a horizontally flipped view mirrored to ``1 − cx`` using *that view's own*
    flip flag (default).  ``official_flip_mirror=True`` instead mirrors both views' centres with
    view 1's flag, as the official ``extract_diff`` does (``center2[f1, 1]``); see the module
    docstring.  ``flip``: ``1[flip1 == flip2]``.  ``color``: ``ω1 − ω2`` (4 values).
    ``blur``: ``σ̂1 − σ̂2`` (σ normalised by its range, 0 when not applied).
    ``rotation``: ``(k1 − k2 + 4) mod 4`` as a ``(B,)`` long class index (not ``(B, 4)``: the head's
    4 outputs are logits).  ``solarize``: ``t1 − t2`` (threshold, 1 when not applied).

    The target of the swapped order (view 2, view 1) is ``augself_targets(omega2, omega1, ...)``:
    the negation for the differences and the same for flip, except for the crop x-target under
    ``official_flip_mirror`` where the official code mirrors with the other view's flag.
    """
    augmentations = _check_augmentations(augmentations)
    return {a: _target(a).build(omega1, omega2, official_flip_mirror)
            for a in registry.target_names() if a in augmentations}


def _swapped(targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Targets of the order (v2, v1) from those of (v1, v2): −target for differences, same for flip,
    the inverse rotation ``(4 − t) mod 4`` for rotation."""
    def swap(aug: str, t: torch.Tensor) -> torch.Tensor:
        n_out, kind = _target(aug).size, _target(aug).loss
        return t if kind == "binary" else (n_out - t) % n_out if kind == "classification" else -t
    return {a: swap(a, t) for a, t in targets.items()}


def weighted_total(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """``Σ_a w_a · L_a`` over the losses given (``w_a`` defaults to 1.0)."""
    if not losses:
        raise ValueError("weighted_total: no losses given")
    weights = weights or {}
    return sum(float(weights.get(a, 1.0)) * loss for a, loss in losses.items())


class AugSelfHead(nn.Module):
    """φ: one MLP per augmentation over the concatenated backbone features ``[f(v1), f(v2)]``.

    This is the official head (``models.load_ss_predictor``: ``load_mlp(2d, 512, n_out,
    num_layers=3, last_bn=False)``): ``Linear(2d→h, no bias)–BN–ReLU–Linear(h→h, no bias)–BN–ReLU–
    Linear(h→n_out)``.  It reads the pooled *backbone* features (what the downstream evaluation
    uses), not the projector output.  PyTorch's default ``nn.Linear`` initialisation is the official
    ``reset_parameters`` (uniform ±1/√fan_in).

    ``forward(f1, f2, targets)`` returns the unweighted loss of each augmentation, computed
    symmetrically as the official ``SSObjective``: the two orders ``[f1, f2]`` and ``[f2, f1]`` are
    one batch of 2B through each MLP (so BatchNorm sees both), with targets ``targets`` and, for the
    swapped order, ``targets_swapped`` (default: ``−target`` for differences, the same for flip,
    ``(4 − t) mod 4`` for rotation).  Rotation is a 4-way classification: cross-entropy on the logits.
    ``loss_from_omega`` builds both target sets from ω itself, honouring ``official_flip_mirror``.
    Losses are computed in float32 whatever the autocast dtype of the MLPs.
    """

    def __init__(self, feat_dim: int, augmentations: Sequence[str], hidden_dim: int = 512,
                 weights: Mapping[str, float] | None = None, official_flip_mirror: bool = False):
        super().__init__()
        if not isinstance(feat_dim, int) or feat_dim < 1:
            raise ValueError(f"AugSelfHead: feat_dim must be a positive int, got {feat_dim!r}")
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ConfigError(f"augself.hidden_dim: must be a positive int, got {hidden_dim!r}")
        self.augmentations = _check_augmentations(augmentations)
        weights = dict(weights or {})
        check_subset("augself.weights", weights, registry.target_names())
        for a, w in weights.items():
            if w < 0:
                raise ConfigError(f"augself.weights.{a}: value {w!r} is out of range; allowed: [0, inf]")
        self.weights = {a: float(weights.get(a, 1.0)) for a in self.augmentations}
        self.official_flip_mirror = bool(official_flip_mirror)
        self.feat_dim = feat_dim
        self.heads = nn.ModuleDict({a: self._mlp(2 * feat_dim, hidden_dim, _target(a).size)
                                    for a in self.augmentations})

    @staticmethod
    def _mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(n_in, n_hidden, bias=False), nn.BatchNorm1d(n_hidden), nn.ReLU(inplace=True),
            nn.Linear(n_hidden, n_hidden, bias=False), nn.BatchNorm1d(n_hidden), nn.ReLU(inplace=True),
            nn.Linear(n_hidden, n_out),
        )

    def extra_repr(self) -> str:
        return f"weights={self.weights}, official_flip_mirror={self.official_flip_mirror}"

    def forward(self, f1: torch.Tensor, f2: torch.Tensor, targets: Mapping[str, torch.Tensor],
                targets_swapped: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if f1.shape != f2.shape or f1.ndim != 2 or f1.shape[1] != self.feat_dim:
            raise ValueError(f"AugSelfHead: f1 and f2 must both be (B, {self.feat_dim}); "
                             f"got {tuple(f1.shape)} and {tuple(f2.shape)}")
        missing = [a for a in self.augmentations if a not in targets]
        if missing:
            raise ValueError(f"AugSelfHead: targets lack {missing}; build them with "
                             f"augself_targets(omega1, omega2, {self.augmentations})")
        if targets_swapped is None:
            targets_swapped = _swapped({a: targets[a] for a in self.augmentations})
        z = torch.cat([torch.cat([f1, f2], dim=1), torch.cat([f2, f1], dim=1)], dim=0)
        losses = {}
        for a in self.augmentations:
            pred = self.heads[a](z).float()          # losses in float32, also under bf16/fp16 autocast
            kind = _target(a).loss
            target = torch.cat([targets[a], targets_swapped[a]], dim=0)
            expected = pred.shape[:1] if kind == "classification" else pred.shape
            if target.shape != expected:
                want = f"({f1.shape[0]},) class indices" if kind == "classification" else f"({f1.shape[0]}, {_target(a).size})"
                raise ValueError(f"AugSelfHead: target for {a!r} has shape {tuple(targets[a].shape)}, expected {want}")
            if kind == "classification":
                losses[a] = F.cross_entropy(pred, target.long())
            elif kind == "binary":
                losses[a] = F.binary_cross_entropy_with_logits(pred, target.float())
            else:
                losses[a] = F.mse_loss(torch.tanh(pred), target.float())
        return losses

    def loss_from_omega(self, f1: torch.Tensor, f2: torch.Tensor, omega1: Mapping[str, torch.Tensor],
                        omega2: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-augmentation losses with both orders' targets built from ω (the training-loop entry point)."""
        with torch.no_grad():
            t12 = augself_targets(omega1, omega2, self.augmentations, self.official_flip_mirror)
            t21 = augself_targets(omega2, omega1, self.augmentations, self.official_flip_mirror)
        return self(f1, f2, t12, t21)

    def weighted_total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``Σ_a w_a · L_a`` with this head's weights (λ is applied by the caller)."""
        return weighted_total({a: losses[a] for a in self.augmentations}, self.weights)


def build_augself_head(feat_dim: int, augself_params: AugSelfParams, lambda_: float) -> AugSelfHead | None:
    """The head for a model trained with weight ``lambda_``, or None when ``lambda_ == 0`` (the baseline)."""
    if lambda_ < 0:
        raise ConfigError(f"augself.lambda: value {lambda_!r} is out of range; allowed: [0, inf]")
    if lambda_ == 0:
        return None
    return AugSelfHead(feat_dim, augself_params.augmentations, hidden_dim=augself_params.hidden_dim,
                       weights={a: augself_params.weight(a) for a in augself_params.augmentations},
                       official_flip_mirror=augself_params.official_flip_mirror)
