"""Augmentation-awareness probe: how much of ω_diff a linear map recovers from frozen features.

Not one of the paper's tables, but the quantity its analysis is about: AugSelf trains a head φ to
predict ω_diff from ``[f(v1), f(v2)]``, so the backbone features of an AugSelf model should keep
more augmentation information than the baseline's.  The probe measures it on frozen features:

1. ``params.images`` source images (a seeded random subset) are augmented twice with the
   pretraining view pipeline (:class:`pipeline.augment.BatchAugment`, one seeded CPU generator);
2. the frozen backbone (eval mode) embeds both views: ``f1, f2``;
3. the targets are :func:`pipeline.augself.augself_targets` of the two ω (the AugSelf targets,
   each view's own flip flag for the mirrored crop centre);
4. the pairs are split (seeded) into a train part and a held-out part of ``params.test_fraction``;
   inputs are standardised with the train part's statistics;
5. each augmentation is probed as its record says (:mod:`pipeline.augmentations`, ``probe``):
   ``ridge`` (crop, colour, blur, solarize): ridge regression (penalty ``params.ridge``, unpenalised intercept) from
   ``[f1, f2]`` to ω_diff, reported as held-out R² (1 − SS_res/SS_tot per target dimension, averaged
   over the dimensions that vary; a dimension that is constant, e.g. the hue of a zero hue strength,
   is left out);
   flip: ω_diff is 1[flip1 = flip2], the XOR of two per-view bits, which no linear function of
   ``[f1, f2]`` can represent even when each feature vector encodes its own flip perfectly; the
   probe therefore adds the element-wise product ``f1 ⊙ f2`` to the inputs (a flip encoded as a
   sign s(v) then gives s1·s2 linearly) and fits an L2 logistic regression (weight ``params.ridge``),
   reported as held-out accuracy (%) next to the majority-class rate (``chance``).
   rotation: ω_diff is the class (k1 − k2) mod 4 of the relative rotation, again a function of two
   per-view quantities that no linear map of ``[f1, f2]`` represents, so it is probed like flip: a
   4-class L2 logistic regression on ``[f1, f2, f1 ⊙ f2]``, held-out accuracy (%) and ``chance``.

R² near 0 means "no linear trace of this augmentation"; it can be negative on the held-out part.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from pipeline import augmentations as registry
from pipeline.evaluate.features import embed
from pipeline.evaluate.linear import DEFAULT_TOL, accuracy, fit_logistic
from pipeline.params import ProbeParams

__all__ = ["standardise", "ridge_r2", "logistic_accuracy", "augmentation_probe", "format_probe_result", "evaluate"]


def standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every column by the train part's mean and std (constant columns: scale 1)."""
    mean = train_x.mean(0)
    std = train_x.std(0, unbiased=False)
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    return [(t - mean) / std for t in (train_x, *others)]


def _f64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).to(torch.float64)


def ridge_r2(train_x, train_y, test_x, test_y, ridge: float) -> dict:
    """Held-out R² of a ridge regression from standardised ``x`` to ``y``.

    Inputs: ``(n, d)`` features and ``(n,)`` or ``(n, k)`` targets (numpy or torch, any device).
    The map is ``(y − ȳ_train) ≈ standardise(x) · β`` with ``β = (XᵀX + ridge·I)⁻¹ Xᵀ(y − ȳ_train)``
    (``sklearn.linear_model.Ridge(alpha=ridge)`` on standardised inputs), solved in float64.
    Returns ``{"r2": mean over varying target dimensions (None if none varies),
    "r2_per_dim": [R² or None for a constant dimension]}``.
    """
    xtr, ytr, xte, yte = (_f64(a) for a in (train_x, train_y, test_x, test_y))
    if ytr.ndim == 1:
        ytr, yte = ytr[:, None], yte[:, None]
    if xtr.ndim != 2 or len(xtr) != len(ytr) or len(xte) != len(yte) or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"ridge_r2: inconsistent shapes x {tuple(xtr.shape)}/{tuple(xte.shape)}, "
                         f"y {tuple(ytr.shape)}/{tuple(yte.shape)}")
    if ridge < 0:
        raise ValueError(f"ridge_r2: ridge must be >= 0, got {ridge} (eval.probe.ridge)")
    xtr, xte = standardise(xtr, xte)
    y_mean = ytr.mean(0)
    gram = xtr.T @ xtr + ridge * torch.eye(xtr.shape[1], dtype=xtr.dtype, device=xtr.device)
    beta = torch.linalg.lstsq(gram, xtr.T @ (ytr - y_mean)).solution if ridge == 0 else \
        torch.linalg.solve(gram, xtr.T @ (ytr - y_mean))
    pred = xte @ beta + y_mean
    ss_res = (yte - pred).pow(2).sum(0)
    ss_tot = (yte - yte.mean(0)).pow(2).sum(0)
    varies = ss_tot > 1e-12 * len(yte)
    per_dim = [float(1.0 - r / t) if v else None for r, t, v in zip(ss_res.tolist(), ss_tot.tolist(), varies.tolist())]
    valid = [r for r in per_dim if r is not None]
    return {"r2": float(np.mean(valid)) if valid else None, "r2_per_dim": per_dim}


def logistic_accuracy(train_x, train_y, test_x, test_y, wd: float, tol: float = DEFAULT_TOL) -> dict:
    """Held-out accuracy (%) of an L2 logistic regression on standardised ``x`` (labels 0/1 or class
    indices), with ``chance`` = the held-out rate of the train part's majority class.  Solved by the
    linear probe's trust-region Newton to a relative gradient of ``tol`` (1e-9: the minimiser's
    answer; ``tests/test_evaluate.py`` shows 1e-13 changes no prediction).  The ridge maps are
    closed-form linear solves (exact up to float64 rounding), so they have no tolerance."""
    xtr, xte = standardise(_f64(train_x), _f64(test_x))
    ytr = torch.as_tensor(np.asarray(train_y)).to(xtr.device).round().long().flatten()
    yte = torch.as_tensor(np.asarray(test_y)).to(xtr.device).round().long().flatten()
    num_classes = int(max(ytr.max().item(), yte.max().item())) + 1
    fit = fit_logistic(xtr, ytr, num_classes, wd, tol=tol)
    majority = torch.bincount(ytr, minlength=num_classes).argmax()
    return {"acc": accuracy(fit.predict(xte), yte), "chance": 100.0 * (yte == majority).double().mean().item()}


def augmentation_probe(backbone: nn.Module, images: np.ndarray, augment, augmentations: list[str],
                       params: ProbeParams, seed: int, batch_size: int,
                       device: str | torch.device = "cpu") -> dict:
    """Probe frozen ``backbone`` features for each augmentation in ``augmentations``.

    ``images``: uint8 ``(N, H, W, 3)`` (e.g. the pretraining test split); ``augment``: a
    ``BatchAugment`` built with the pretraining ``augment`` params and the model's input size.
    Returns ``{"crop": {"r2": …, "r2_per_dim": […]}, "color": {…}, "flip": {"acc": …, "chance": …},
    "n_train": …, "n_test": …}`` (blur and solarize like crop, rotation like flip, when asked for).
    """
    from pipeline.augself import augself_targets   # imported here: the probe is its only user in evaluate/

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"augmentation_probe: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if not augmentations:
        raise ValueError("augmentation_probe: no augmentation to probe; pass e.g. ['crop', 'color', 'flip']")
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    count = min(params.images, len(images))
    chosen = np.sort(rng.choice(len(images), size=count, replace=False))
    n_test = int(round(params.test_fraction * count))
    if n_test < 2 or count - n_test < 2:
        raise ValueError(f"augmentation_probe: {count} images split with eval.probe.test_fraction="
                         f"{params.test_fraction} leaves {count - n_test} train / {n_test} test pairs; "
                         f"use more images (eval.probe.images) or a test_fraction nearer 0.5")

    generator = torch.Generator().manual_seed(int(seed))
    was_training = backbone.training
    backbone.to(device).eval()
    feats1, feats2, omegas1, omegas2 = [], [], [], []
    try:
        for start in range(0, count, batch_size):
            batch = torch.from_numpy(images[chosen[start:start + batch_size]]).to(device)
            # Embed and copy each view's outputs before drawing the next: BatchAugment may reuse
            # its buffers between calls.
            for feats, omegas in ((feats1, omegas1), (feats2, omegas2)):
                views, omega = augment(batch, generator)
                feats.append(embed(backbone, views).to("cpu", copy=True))
                omegas.append({k: v.detach().to("cpu", copy=True) for k, v in omega.items()})
    finally:
        backbone.train(was_training)

    def cat(parts):   # per-batch ω dicts → one dict; the batch-wide colour order is not per sample
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "color_order"}

    f1, f2 = torch.cat(feats1).double(), torch.cat(feats2).double()
    targets = augself_targets(cat(omegas1), cat(omegas2), list(augmentations), official_flip_mirror=False)
    order = torch.from_numpy(rng.permutation(count))
    test, train = order[:n_test], order[n_test:]

    results: dict = {}
    for aug in augmentations:
        target = targets[aug].detach().cpu().double()
        target = target.reshape(count, -1)
        if registry.get(aug).probe == "pairwise":      # a classifier on [f1, f2, f1 ⊙ f2]; else ridge R²
            x = torch.cat([f1, f2, f1 * f2], 1)
            results[aug] = logistic_accuracy(x[train], target[train], x[test], target[test], params.ridge)
        else:
            x = torch.cat([f1, f2], 1)
            results[aug] = ridge_r2(x[train], target[train], x[test], target[test], params.ridge)
    results["n_train"], results["n_test"] = len(train), len(test)
    return results


def format_probe_result(result: dict, title: str = "augmentation probe") -> str:
    """A short plain-text table of one :func:`augmentation_probe` result."""
    lines = [title, "-" * max(len(title), 36), f"{'augmentation':<12}  {'metric':<8}  {'value':>7}  {'chance':>7}"]
    for aug, r in result.items():
        if not isinstance(r, dict):
            continue
        if "acc" in r:
            lines.append(f"{aug:<12}  {'acc (%)':<8}  {r['acc']:7.2f}  {r['chance']:7.2f}")
        else:
            value = "n/a" if r["r2"] is None else f"{r['r2']:.3f}"
            lines.append(f"{aug:<12}  {'R²':<8}  {value:>7}  {'0':>7}")
    lines.append(f"pairs: {result.get('n_train', '?')} train / {result.get('n_test', '?')} held out")
    return "\n".join(lines)


def evaluate(ctx) -> "Evaluation":
    """The ``probe`` task (:mod:`pipeline.evaluate.tasks`): every augmentation the views use (so baseline and
    AugSelf are probed on the same targets, :func:`pipeline.augmentations.probed`), on view pairs of the
    pretraining dataset's test split through the model's frozen backbone."""
    import time

    from pipeline.augment import BatchAugment
    from pipeline.evaluate.linear import SOLVER
    from pipeline.evaluate.tasks import Evaluation

    params, model = ctx.params, ctx.model
    backbone, meta = ctx.backbone()
    images = ctx.load_split(params.data.pretrain, "test").images
    augment = BatchAugment(params.augment, meta["image_size"])
    augmentations = registry.probed(params.augment)
    t0 = time.perf_counter()
    res = augmentation_probe(backbone, images, augment, augmentations, params.eval.probe,
                             seed=params.seed, batch_size=params.eval.batch_size, device=ctx.device)
    metrics = {}
    for aug, r in res.items():
        if isinstance(r, dict):
            key = "acc" if "acc" in r else "r2"
            metrics[f"probe/{aug}/{key}"] = float("nan") if r[key] is None else float(r[key])
    print(format_probe_result(res, title=f"{model}: augmentation probe"))
    ctx.said(f"{model}: ridge maps to {', '.join(augmentations)} from "
             f"{params.eval.probe.images} view pairs of {params.data.pretrain}", t0)
    return Evaluation(metrics, {"solver": {"ridge": "closed form (float64 linear solve, exact)",
                                           "flip": {"name": SOLVER, "tol": DEFAULT_TOL, "wd": params.eval.probe.ridge}}},
                      datasets=[params.data.pretrain])
