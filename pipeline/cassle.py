"""CASSLE (Przewięźlikowski et al., arXiv 2306.06082): the projector conditioned on each view's own ω.

AugSelf makes the backbone keep augmentation information by asking it to *predict* how two views
differ.  CASSLE instead *tells* the projector how each view was augmented: an MLP embeds the view's
augmentation parameters ω and the embedding joins the backbone features at the projector's input.
To solve the SSL task the projector can then undo the augmentation, so the backbone no longer has
to discard what the augmentation changed.  Only pretraining changes: evaluation reads the backbone
alone (``final.pt`` holds only the backbone), the projector and the ω embedding are dropped.

What this module owns, and the choices made (read from the paper, the README and ``cond_utils.py``
/ ``trainers_cond.py`` of github.com/gmum/CASSLE; ``docs/architecture.md`` has the contract):

* **The ω → vector encoding** (:func:`omega_vector`).  Each view is conditioned on its *own
  absolute* ω, not on a difference between the views.  The blocks named in ``cassle.conditions``
  are concatenated in alphabetical order of their names, whatever order the list gives, so a block
  list fixes the layout.  Each block is part of its augmentation's record
  (:func:`pipeline.augmentations.cassle_blocks`: size, the ω keys it reads, its encoding):

  ============ ===== ===========================================================================
  block        size  value (per view, from :class:`pipeline.augment.BatchAugment`'s ω)
  ============ ===== ===========================================================================
  blur         1     ``ω["blur"]``: σ / σ_max, 0 where blur was not applied.  Theirs is raw σ; the
                     first Linear → BatchNorm of the embedding makes the scale irrelevant.
  color        4     ``ω["color"]``: the AugSelf colour factors in [−0.5, 0.5], 0 where jitter
                     was not applied (theirs are the same four numbers).
  color_diff   3     ``ω["color_diff"]``: per-channel mean of the image before minus after the
                     jitter, 0 where not applied (theirs: the same, in [0, 1] RGB).
  crop         4     ``(centre_y, centre_x, h, w)`` of the source box in [0, 1], with ``centre_x``
                     mirrored to ``1 − centre_x`` for a horizontally flipped view (theirs), so
                     the box is described in the frame the view is seen in.
  flip         1     ``ω["flip"]`` (0/1).
  grayscale    1     ``ω["grayscale"]`` (0/1).
  ============ ===== ===========================================================================

  A block whose ω key is missing raises a ``KeyError`` naming the block, the key and the fix,
  on the first batch (ω is only known once the augmentation has run).  The default
  ``cassle.conditions`` is their ImageNet-100 command's set (``--aug-cond crop color color_diff
  blur grayscale``, 13 numbers); flip is not in their command (their best internal run very likely added it): add it to the list to try.
* **The ω embedding** (:func:`omega_embedding`): their ``--aug-treatment mlp --aug-nn-depth 6
  --aug-nn-width 64``, i.e. :func:`pipeline.models.mlp` with ``depth`` Linear layers: ``depth − 1``
  times ``Linear(no bias) → BatchNorm → ReLU``, then ``Linear → BatchNorm`` (no final ReLU).
* **The injection** (:class:`ConditionedProjector`): ``proj-cat`` (their default) concatenates
  the ``width``-d embedding to the backbone features, so the projector's first layer is wider by
  ``width``; ``proj-add`` / ``proj-mul`` make the embedding as wide as the features
  (``feat_dim`` outputs) and add it to / multiply it with them, the projector keeping its width.
  Nothing else about the projector changes (hidden width, depth, last BN of each method).
* **Which networks are conditioned.**  Only the projector: the predictor of SimSiam / BYOL reads
  the (conditioned) projection and is not conditioned itself (theirs: ``AugProjector``; their
  ``AugSSPredictor``, which conditions a predictor too behind a separate ``--ss-aug-inj-type``
  switch, is not part of the CASSLE recipe and is not built here).  Momentum methods (MoCo,
  BYOL): the target projector is the EMA copy of the whole :class:`ConditionedProjector`, ω
  embedding included, and it receives the *target view's own* ω, as their momentum branch does.
* **No AugSelf loss.**  Their code can add the AugSelf loss to CASSLE, but CASSLE itself is run
  without it, so ``Params.lambda_for("cassle")`` is 0 and no AugSelf head is built.
* **Hyper-parameters** as the baseline (their IN-100 runs use the baseline's optimiser).

Where the encoded vector is built: :class:`pipeline.train.PretrainModel` calls
:func:`omega_vector` on each view's ω and passes the two vectors to the method's ``forward(v1, v2,
cond1, cond2)``, whose :meth:`pipeline.methods.base.SSLMethod.project` hands them to this module's
projector.  So the four methods stay one file each and know nothing of the encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline import augmentations as registry
from pipeline.config import ConfigError, check_choice, check_subset
from pipeline.models import mlp
from pipeline.params import CASSLE_INJECTIONS, CassleParams

__all__ = ["Conditioning", "ConditionedProjector", "omega_vector", "omega_embedding", "condition_dim"]


def _ordered(blocks: Sequence[str]) -> list[str]:
    blocks, allowed = list(blocks), registry.cassle_blocks()
    if not blocks:
        raise ConfigError(f"cassle.conditions: empty; allowed values: {', '.join(allowed)}")
    check_subset("cassle.conditions", blocks, allowed)
    return sorted(set(blocks))


def condition_dim(blocks: Sequence[str]) -> int:
    """Length of the encoded ω vector for ``blocks``."""
    sizes = registry.cassle_blocks()
    return sum(sizes[b].size for b in _ordered(blocks))


def _get(omega: Mapping[str, torch.Tensor], key: str, block: str) -> torch.Tensor:
    if key not in omega:
        raise KeyError(f"CASSLE: block {block!r} of cassle.conditions needs omega[{key!r}], which the "
                       f"augmentation did not return (it returned: {', '.join(sorted(omega))}); remove "
                       f"{block!r} from cassle.conditions or use an augmentation that returns it")
    return omega[key]


def _block(omega: Mapping[str, torch.Tensor], block: str, spec: registry.Block) -> torch.Tensor:
    """One block as a ``(B, spec.size)`` float tensor: its record's encoding of the ω keys it reads."""
    read = {key: _get(omega, key, block) for key in spec.reads}
    value = spec.encode(read) if spec.encode is not None else read[block]
    value = value.float()
    if value.dim() == 1:
        value = value.unsqueeze(1)
    if value.dim() != 2 or value.shape[1] != spec.size:
        raise ValueError(f"CASSLE: omega for block {block!r} has shape {tuple(value.shape)}, expected "
                         f"(B, {spec.size})")
    return value


def omega_vector(omega: Mapping[str, torch.Tensor], blocks: Sequence[str]) -> torch.Tensor:
    """Encode one view's ω as ``(B, condition_dim(blocks))`` float32: the blocks in alphabetical order."""
    specs = registry.cassle_blocks()
    return torch.cat([_block(omega, b, specs[b]) for b in _ordered(blocks)], dim=1)


def omega_embedding(in_dim: int, width: int, out_dim: int, depth: int) -> nn.Sequential:
    """Their ω MLP: ``depth − 1`` × (Linear(no bias) → BN → ReLU), then Linear → BN."""
    return mlp(in_dim, width, out_dim, num_layers=depth, last_bn=True)


class ConditionedProjector(nn.Module):
    """``projector(inject(f, embedding(cond)))`` for one view; ``cond`` is :func:`omega_vector`'s output."""

    def __init__(self, embedding: nn.Module, projector: nn.Module, injection: str):
        super().__init__()
        check_choice("cassle.injection", injection, CASSLE_INJECTIONS)
        self.embedding = embedding
        self.projector = projector
        self.injection = injection

    def extra_repr(self) -> str:
        return f"injection={self.injection!r}"

    def forward(self, f: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond.dim() != 2 or cond.shape[0] != f.shape[0]:
            raise ValueError(f"CASSLE: the ω vector must be (B, n) with the features' batch {f.shape[0]}, "
                             f"got {tuple(cond.shape)}")
        e = self.embedding(cond.to(f.device))
        if self.injection == "proj-cat":
            x = torch.cat([f, e.to(f.dtype)], dim=1)
        elif self.injection == "proj-add":
            x = f + e
        else:  # proj-mul
            x = f * e
        return self.projector(x)


@dataclass(frozen=True)
class Conditioning:
    """How a method's projector is conditioned (built from the ``cassle`` section)."""
    blocks: tuple[str, ...]
    injection: str = "proj-cat"
    depth: int = 6
    width: int = 64

    @classmethod
    def from_params(cls, p: CassleParams) -> "Conditioning":
        return cls(tuple(_ordered(p.conditions)), p.injection, p.depth, p.width)

    @property
    def in_dim(self) -> int:
        return condition_dim(self.blocks)

    def encode(self, omega: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return omega_vector(omega, self.blocks)

    def projector(self, feat_dim: int, make_projector: Callable[[int], nn.Module]) -> ConditionedProjector:
        """Wrap the projector ``make_projector(in_dim)`` (a method's own head) with the ω embedding.

        ``proj-cat`` builds the projector ``width`` inputs wider; the others keep ``feat_dim``.
        """
        cat = self.injection == "proj-cat"
        embedding = omega_embedding(self.in_dim, self.width, self.width if cat else feat_dim, self.depth)
        return ConditionedProjector(embedding, make_projector(feat_dim + (self.width if cat else 0)),
                                    self.injection)
