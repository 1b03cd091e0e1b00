"""Paired statistics of a difference Δ = variant − baseline evaluated on the same items.

AugSelf (or any other variant) and its baseline are scored on the *same* test images (linear probe)
and the *same* episodes (few-shot: the episodes depend on the labels and the seed only).  Pairing
removes the item-to-item variance that both models share, which is most of it.

Two sources of uncertainty are kept apart:

* **evaluation noise** (which test images / episodes happened to be drawn), per seed:
  :func:`paired_bootstrap` resamples the items with replacement, the same resample for both
  models, and gives the percentile interval of Δ (``B`` resamples, fixed bootstrap seed, so the
  report is reproducible);
* **seed-to-seed variance** (which pretraining run one got), across seeds:
  :func:`across_seeds` gives the mean of the per-seed Δ with a Student-t interval over seeds
  (``mean ± t_{0.975, S−1}·sd/√S``, which needs ≥ 2 seeds and ignores evaluation noise beyond what
  shows in the per-seed Δ), and a **hierarchical bootstrap** that resamples seeds, then items within
  each drawn seed, so that its interval carries both sources.

The decision (is Δ distinguishable from zero?) is the design's test, made across seeds only: the
two-sided one-sample t-test of the per-seed Δ (:func:`t_test_p`), Holm-corrected across methods
(:func:`holm`; :mod:`pipeline.report.paired` applies it).  The hierarchical bootstrap is
descriptive: with 2–3 seeds it can only redraw those seeds and is several times narrower than the
t-interval.  One seed carries no decision: its paired bootstrap speaks for evaluation noise only and
cannot tell a method effect from a seed.

The metric of a resample is the mean of per-item scores (top-1 correctness, episode accuracy);
for a class-average metric :func:`paired_bootstrap` takes per-item class labels and averages the
per-class means of each resample (a class missing from a resample is left out of that average).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["BOOTSTRAP_SEED", "BOOTSTRAP_SAMPLES", "Interval", "paired_bootstrap", "across_seeds",
           "t_interval", "t_test_p", "holm"]

BOOTSTRAP_SEED = 20240613
BOOTSTRAP_SAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate of Δ with its ``level`` interval ``[low, high]``."""
    estimate: float
    low: float
    high: float
    method: str

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


def _check_pair(variant, baseline, name):
    a, b = np.asarray(variant, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"{name}: expected two 1-D per-item score arrays of the same non-zero length "
                         f"(the same test images / episodes for both models), got {a.shape} and {b.shape}")
    return a, b


def _metric(scores: np.ndarray, groups: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    """Metric of each resample; ``idx`` ``(B, n)`` item indices."""
    if groups is None:
        return scores[idx].mean(-1)
    classes = np.unique(groups)
    onehot = (groups[idx][..., None] == classes)                      # (B, n, K)
    counts = onehot.sum(1)
    sums = (scores[idx][..., None] * onehot).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.where(counts > 0, sums / counts, np.nan), -1)


def paired_bootstrap(variant, baseline, groups=None, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> Interval:
    """Δ = metric(variant) − metric(baseline) on one seed, with the percentile interval of the paired
    bootstrap over items.  ``variant`` / ``baseline``: per-item scores (e.g. 0/1 correctness, episode
    accuracy), item ``i`` the same test image or episode for both; ``groups``: per-item class labels
    for a class-average metric."""
    a, b = _check_pair(variant, baseline, "paired_bootstrap")
    g = None if groups is None else np.asarray(groups)
    full = np.arange(len(a))[None]
    estimate = float(_metric(a, g, full)[0] - _metric(b, g, full)[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))
    deltas = _metric(a, g, idx) - _metric(b, g, idx)
    low, high = np.quantile(deltas, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), f"paired bootstrap over {len(a)} items, {samples} resamples")


def t_interval(deltas, level: float = LEVEL) -> Interval | None:
    """Mean of per-seed Δ with the Student-t interval over seeds; None for fewer than 2 seeds."""
    d = np.asarray(deltas, dtype=np.float64)
    if len(d) < 2:
        return None
    half = _scipy_stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return Interval(float(d.mean()), float(d.mean() - half), float(d.mean() + half), f"t over {len(d)} seeds")


def t_test_p(deltas) -> float | None:
    """Two-sided p of the one-sample t-test of mean Δ = 0 over seeds; None for fewer than 2 seeds."""
    d = np.asarray(deltas, dtype=np.float64)
    if len(d) < 2:
        return None
    if d.std(ddof=1) == 0:
        return 1.0 if d.mean() == 0 else 0.0
    return float(_scipy_stats.ttest_1samp(d, 0.0).pvalue)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error) of the tests that have a p; None stays None."""
    have = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(have):
        running = max(running, min(1.0, (len(have) - rank) * p))
        out[i] = running
    return out


def across_seeds(pairs: list[tuple[np.ndarray, np.ndarray]], samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> dict:
    """Per-seed paired differences and their combination over seeds.

    ``pairs``: one ``(variant scores, baseline scores)`` per seed (items paired within a seed; the
    number of items may differ between seeds).  Returns ``{"per_seed": [Interval], "t": Interval |
    None, "hierarchical": Interval | None}``; the hierarchical bootstrap draws ``S`` seeds with
    replacement, then for each drawn seed its items with replacement, and takes the mean of the
    per-seed Δ of the resample (None for a single seed: there it equals the per-seed bootstrap).
    """
    if not pairs:
        raise ValueError("across_seeds: no seed to combine")
    checked = [_check_pair(a, b, f"across_seeds (seed #{i})") for i, (a, b) in enumerate(pairs)]
    per_seed = [paired_bootstrap(a, b, samples=samples, seed=seed, level=level) for a, b in checked]
    deltas = [p.estimate for p in per_seed]
    hierarchical = None
    if len(checked) >= 2:
        rng = np.random.default_rng(seed)
        diffs = [a - b for a, b in checked]
        seeds = rng.integers(0, len(diffs), size=(samples, len(diffs)))
        values = np.empty(samples)
        for s in range(samples):
            values[s] = np.mean([diffs[k][rng.integers(0, len(diffs[k]), len(diffs[k]))].mean() for k in seeds[s]])
        low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
        hierarchical = Interval(float(np.mean(deltas)), float(low), float(high),
                                f"hierarchical bootstrap (seeds, then items), {samples} resamples")
    return {"per_seed": per_seed, "t": t_interval(deltas, level), "t_p": t_test_p(deltas),
            "hierarchical": hierarchical}
