"""One record per augmentation: what the rest of the library knows about it, in one place.

An augmentation is a view op of :mod:`pipeline.augment` (the op samples, applies and encodes its ω)
plus the record below, which every other reader takes its knowledge from:

=================== ==================================================================================
field               read by
=================== ==================================================================================
``name``            the op's name in ``augment.order`` and its ω key; an AugSelf target's and probe's name
``key``             the ``augment.*`` field that is its probability (refusals name it; None: always on)
``probability``     :meth:`pipeline.params.AugmentParams.probability`: the effective probability
                    (0: the op changes no view, so a target or condition on it would be a constant)
``colour``          scaled by ``augment.color_strength``; off at ``none`` (:mod:`pipeline.study.premise`)
``omega``           the per-sample ω keys the op returns and their widths (1: a ``(B,)`` tensor)
``off``             the ω value of a view the op did not change (what an optional op that is off returns)
``target``          the AugSelf target (:mod:`pipeline.augself`): head outputs, loss, builder from (ω1, ω2)
``probe``           the probe kind (:mod:`pipeline.evaluate.probe`): ``ridge`` (R²) or ``pairwise``
                    (a classifier on ``[f1, f2, f1 ⊙ f2]``, accuracy); which are probed: :func:`probed`
``cassle``          the CASSLE condition blocks (:mod:`pipeline.cassle`), concatenated alphabetically
=================== ==================================================================================

The records are listed in the order the library lists augmentations (the AugSelf targets in
``allowed values``, the probe, the report's loss and probe columns); :func:`pipeline_order` is the
official order the ops run in (``augment.order``'s default, hankook/AugSelf ``datasets.py``), which is
also the layout of the optional ops' random draws and of ω.  ``docs/architecture.md`` ("How to add an
augmentation") says what else a new one needs.

Validation (:mod:`pipeline.params`) reads this module and never imports torch; the builders below
import it when they are called (they run on tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:                                   # pragma: no cover
    import torch

    from pipeline.params import AugmentParams

__all__ = ["Augmentation", "Target", "Block", "PROBE_METRICS", "get", "records", "names",
           "pipeline_order", "target_names", "cassle_blocks", "block_owner", "probed", "register", "unregister",
           "registered", "crop_centre"]

Omega = Mapping[str, "torch.Tensor"]
LOSSES = ("regression", "binary", "classification")   # MSE on tanh(φ) | BCE on the logit φ | CE over the logits
PROBE_METRICS = {"ridge": "r2", "pairwise": "acc"}      # probe kind → the metric it reports (probe/<aug>/<metric>)


@dataclass(frozen=True)
class Target:
    """An AugSelf target: ``size`` head outputs, its ``loss``, and ``build(ω1, ω2, official_flip_mirror)``
    → the target of the ordered pair (view 1, view 2): ``(B, size)`` float, or ``(B,)`` class indices
    for ``classification``.  The swapped order's target follows from the loss (:func:`pipeline.augself._swapped`)."""
    size: int
    loss: str
    build: Callable[[Omega, Omega, bool], Any]


@dataclass(frozen=True)
class Block:
    """A CASSLE condition block: ``size`` numbers per view, read from the ω keys ``reads`` (default: its
    own name) by ``encode(ω)`` (default: ``ω[name]`` as it is)."""
    name: str
    size: int
    reads: tuple[str, ...] = ()
    encode: Callable[[Omega], Any] | None = None

    def __post_init__(self):
        if not self.reads:
            object.__setattr__(self, "reads", (self.name,))


@dataclass(frozen=True)
class Augmentation:
    name: str
    key: str | None                                              # augment.<key>: its probability; None: always on
    omega: tuple[tuple[str, int], ...]                           # ω keys it returns, width (1: (B,))
    off: float | None = 0.0                                      # ω of a view it did not change (None: never off)
    effective: Callable[[AugmentParams], float] | None = None    # probability when not augment.<key> itself
    off_when: str = ""                                           # other ways it is off, for refusals
    colour: bool = False                                         # scaled by augment.color_strength
    target: Target | None = None                                 # AugSelf
    probe: str | None = None                                     # ridge | pairwise (None: not probed)
    probe_always: bool = False                                   # probed even when off (its metric is NaN then)
    cassle: tuple[Block, ...] = ()

    def __post_init__(self):
        if self.target is not None and self.target.loss not in LOSSES:
            raise ValueError(f"augmentation {self.name!r}: target loss {self.target.loss!r} is not one of {LOSSES}")
        if self.probe is not None and self.probe not in PROBE_METRICS:
            raise ValueError(f"augmentation {self.name!r}: probe {self.probe!r} is not one of {tuple(PROBE_METRICS)}")

    def probability(self, augment: AugmentParams) -> float:
        """The probability that the op changes a view under ``augment`` (1 for an op that is always on)."""
        if self.effective is not None:
            return self.effective(augment)
        return 1.0 if self.key is None else getattr(augment, self.key)


# ---------------------------------------------------------------------- builders (tensors in, tensors out)
def crop_centre(box: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """(B, 2) centres (y, x) in [0, 1] of ω's crop boxes ``(top, left, h, w)``, x mirrored to 1 − x where
    ``mirror`` is set: the box in the frame a flipped view is seen in.  The one place this is computed
    (the crop record's AugSelf target and CASSLE block read it)."""
    import torch

    cy = box[:, 0] + box[:, 2] / 2
    cx = box[:, 1] + box[:, 3] / 2
    cx = torch.where(mirror.bool(), 1 - cx, cx)
    return torch.stack([cy, cx], dim=1)


def _crop_target(o1: Omega, o2: Omega, official_flip_mirror: bool):
    """``(cy1 − cy2, cx1 − cx2, h1 − h2, w1 − w2)``, each centre mirrored with its own view's flip flag, or
    with view 1's for both under ``official_flip_mirror`` (the official ``extract_diff``; pipeline.augself)."""
    import torch

    f1, f2 = o1["flip"], o2["flip"]
    c1 = crop_centre(o1["crop"], f1)
    c2 = crop_centre(o2["crop"], f1 if official_flip_mirror else f2)
    sizes = o1["crop"][:, 2:] - o2["crop"][:, 2:]
    return torch.cat([c1 - c2, sizes], dim=1)


def _crop_block(omega: Omega):
    """``(centre_y, centre_x, h, w)`` of the view's own box, ``centre_x`` mirrored for a flipped view."""
    import torch

    box = omega["crop"]
    return torch.cat([crop_centre(box, omega["flip"]), box[:, 2:]], dim=1)


def _same(key: str) -> Callable[[Omega, Omega, bool], Any]:
    """``1[ω1 = ω2]`` as (B, 1) float (flip: a binary target)."""
    return lambda o1, o2, official: (o1[key] == o2[key]).float().unsqueeze(1)


def _difference(key: str) -> Callable[[Omega, Omega, bool], Any]:
    """``ω1 − ω2`` as (B, n) (a (B,) ω becomes (B, 1))."""
    def build(o1, o2, official):
        d = o1[key] - o2[key]
        return d.unsqueeze(1) if d.dim() == 1 else d
    return build


def _relative_class(key: str, classes: int) -> Callable[[Omega, Omega, bool], Any]:
    """``(k1 − k2 + n) mod n`` as (B,) long: the class of the relative rotation (official ``rot``)."""
    return lambda o1, o2, official: (o1[key].round().long() - o2[key].round().long() + classes) % classes


# ---------------------------------------------------------------------- the records
_RECORDS: dict[str, Augmentation] = {}
_PIPELINE: list[str] = []


def register(aug: Augmentation, position: int | None = None) -> Augmentation:
    """Add ``aug`` to the registry, at ``position`` of the pipeline order (default: last).  Names and
    CASSLE block names must be new."""
    if aug.name in _RECORDS:
        raise ValueError(f"augmentation {aug.name!r} is registered already")
    taken = {b.name for a in _RECORDS.values() for b in a.cassle}
    clash = sorted(taken & {b.name for b in aug.cassle})
    if clash:
        raise ValueError(f"augmentation {aug.name!r}: CASSLE block(s) {clash} belong to another augmentation")
    _RECORDS[aug.name] = aug
    _PIPELINE.insert(len(_PIPELINE) if position is None else position, aug.name)
    return aug


def unregister(name: str) -> None:
    del _RECORDS[name]
    _PIPELINE.remove(name)


@contextlib.contextmanager
def registered(aug: Augmentation, position: int | None = None) -> Iterator[Augmentation]:
    """``aug`` registered for the duration of the ``with`` block (tests, experiments)."""
    register(aug, position)
    try:
        yield aug
    finally:
        unregister(aug.name)


def get(name: str) -> Augmentation:
    try:
        return _RECORDS[name]
    except KeyError:
        raise KeyError(f"unknown augmentation {name!r}; known: {', '.join(_RECORDS)}") from None


def records() -> tuple[Augmentation, ...]:
    return tuple(_RECORDS.values())


def names() -> tuple[str, ...]:
    return tuple(_RECORDS)


def pipeline_order() -> tuple[str, ...]:
    """The official order the ops run in: ``augment.order``'s default."""
    return tuple(_PIPELINE)


def target_names() -> tuple[str, ...]:
    """The augmentations with an AugSelf target: ``augself.augmentations``' allowed values, in listing order."""
    return tuple(a.name for a in _RECORDS.values() if a.target is not None)


def cassle_blocks() -> dict[str, Block]:
    """Every CASSLE block by name, in the alphabetical order blocks are concatenated in."""
    return dict(sorted((b.name, b) for a in _RECORDS.values() for b in a.cassle))


def block_owner(block: str) -> Augmentation:
    """The augmentation whose op a CASSLE block describes."""
    return next(a for a in _RECORDS.values() if any(b.name == block for b in a.cassle))


def probed(augment: AugmentParams) -> list[str]:
    """The augmentations the probe measures: every one the views use (so baseline and AugSelf are probed on
    the same targets), in listing order."""
    return [a.name for a in _RECORDS.values()
            if a.probe is not None and (a.probe_always or a.probability(augment) > 0)]


for _aug in (
    Augmentation("crop", key=None, omega=(("crop", 4),), off=None,
                 target=Target(4, "regression", _crop_target), probe="ridge",
                 cassle=(Block("crop", 4, reads=("crop", "flip"), encode=_crop_block),)),
    Augmentation("flip", key="flip_p", omega=(("flip", 1),),
                 target=Target(1, "binary", _same("flip")), probe="pairwise", cassle=(Block("flip", 1),)),
    # Probed even at color_strength none (probe/color/r2 is NaN there; the study's ledger does not wait for it).
    Augmentation("color", key="jitter_p", omega=(("color", 4), ("color_applied", 1), ("color_diff", 3)),
                 effective=lambda p: p.jitter_p if any(p.jitter_strengths()) else 0.0,
                 off_when=" or every jitter strength is 0", colour=True,
                 target=Target(4, "regression", _difference("color")), probe="ridge", probe_always=True,
                 cassle=(Block("color", 4), Block("color_diff", 3))),
    Augmentation("grayscale", key="grayscale_p", omega=(("grayscale", 1),),
                 effective=lambda p: p.effective_grayscale_p(), colour=True, cassle=(Block("grayscale", 1),)),
    Augmentation("blur", key="blur_p", omega=(("blur", 1),),
                 target=Target(1, "regression", _difference("blur")), probe="ridge", cassle=(Block("blur", 1),)),
    Augmentation("rotation", key="rotation_p", omega=(("rotation", 1),),
                 target=Target(4, "classification", _relative_class("rotation", 4)), probe="pairwise"),
    Augmentation("solarize", key="solarize_p", omega=(("solarize", 1),), off=1.0,
                 target=Target(1, "regression", _difference("solarize")), probe="ridge"),
):
    register(_aug)
del _aug

# The official order of the ops (hankook/AugSelf datasets.py; solarize as its stl10_sol set, rotation as
# stl10_rot): crop → flip → colour jitter → solarize → grayscale → blur → rotation.
_PIPELINE[:] = ("crop", "flip", "color", "solarize", "grayscale", "blur", "rotation")
assert sorted(_PIPELINE) == sorted(_RECORDS), "the pipeline order must list every augmentation once"
