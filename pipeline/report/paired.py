"""Paired differences: each non-baseline variant against the baseline of the same method and seed.

Input: the validated runs table and, per run id, per-item scores in % keyed by metric column
(``pipeline.results.collect_items``: per test image correctness of the linear probe, per episode
few-shot accuracy).  For every method, variant ≠ baseline, λ and metric with per-item scores on both
sides, the seeds present on both sides are paired and :func:`pipeline.stats.across_seeds` gives the
per-seed Δ with its paired-bootstrap 95 % interval (evaluation noise over the same test images /
episodes), and, when ≥ 2 seeds pair up, the mean of the per-seed Δ with its t-interval over seeds.

The **decision** (``distinguishable``) is the test the study's design names (docs/study.md, DESIGN.md
"Differences and decisions"): the one-sample t-test of the per-seed Δ over seeds, two-sided, with
Holm's correction across the methods that share the variant, λ and metric (``holm_p`` < 0.05).  The
row's ``low`` / ``high`` are then the t-interval (uncorrected, the interval of that test).  The
hierarchical bootstrap over seeds and items (``boot_low`` / ``boot_high``) is kept as a
*descriptive* column only: with 2–3 seeds it can draw only those seeds and is several times
narrower than the t-interval, so it must not decide.

**One seed carries no decision.**  Its ``low`` / ``high`` are the paired bootstrap over the items of
that seed (evaluation noise only) and ``distinguishable`` is empty: one pretraining run cannot tell a
method effect from a seed (docs/reliability.md: the same seed retrained on another CPU moved SimCLR's
`hue` Δ from +2.64 to −1.00, both one-seed intervals excluding 0).

Items are paired by position: the arrays must have the same length on both sides (the same test
set, the same episodes), else the pair is skipped with a note.  The variants are taken from the runs
(baseline, augself, and any other such as cassle).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from pipeline.report.schema import MetricSpec, lambda_label
from pipeline.report.tables import Table
from pipeline.stats import across_seeds, holm

ALPHA = 0.05
ONE_SEED = "paired bootstrap over items (1 seed: evaluation noise only)"
T_OVER_SEEDS = "t over seeds"
DESCRIPTIVE = "descriptive (bootstrap over seeds and items)"
NO_DECISION = "none (1 seed)"
COLUMNS = ["method", "variant", "lambda", "metric", "label", "seeds", "n_seeds", "delta", "low", "high", "interval",
           "t_p", "holm_p", "distinguishable", "boot_low", "boot_high", "per_seed"]


def decided(row) -> bool:
    """True when the row carries a decision and it says Δ ≠ 0 (False for one seed: no decision)."""
    v = row["distinguishable"]
    return isinstance(v, (bool, np.bool_)) and bool(v)


def decision_text(row) -> str:
    """'higher' / 'lower' / 'not distinguishable' (t over seeds, Holm), or 'none (1 seed)'."""
    if int(row["n_seeds"]) < 2:
        return NO_DECISION
    if not decided(row):
        return "not distinguishable"
    return "higher" if row["delta"] > 0 else "lower"


def paired_differences(runs: pd.DataFrame, items: Mapping[str, Mapping[str, np.ndarray]],
                       specs: list[MetricSpec], notes: list[str]) -> pd.DataFrame:
    """One row per method × variant × λ × metric with paired per-item data (see the module doc)."""
    rows = []
    by_run = {str(r): items.get(str(r), {}) for r in runs["run_id"]}
    for spec in specs:
        for method in dict.fromkeys(runs["method"]):
            base = runs[(runs["method"] == method) & (runs["variant"] == "baseline")]
            base_by_seed = {int(r.seed): by_run[str(r.run_id)].get(spec.column) for r in base.itertuples()}
            others = runs[(runs["method"] == method) & (runs["variant"] != "baseline")]
            for (variant, lam), group in others.groupby(["variant", "lambda"], sort=False):
                pairs, seeds = [], []
                for r in group.sort_values("seed").itertuples():
                    a, b = by_run[str(r.run_id)].get(spec.column), base_by_seed.get(int(r.seed))
                    if a is None or b is None:
                        continue
                    if len(a) != len(b):
                        notes.append(f"{spec.column}: {method}-{variant} seed {r.seed} has {len(a)} items, its "
                                     f"baseline {len(b)}: not paired")
                        continue
                    pairs.append((a, b))
                    seeds.append(int(r.seed))
                if not pairs:
                    continue
                res = across_seeds(pairs)
                one = res["t"] is None
                main = res["per_seed"][0] if one else res["t"]
                boot = res["per_seed"][0] if one else res["hierarchical"]
                rows.append({
                    "method": method, "variant": variant, "lambda": float(lam), "metric": spec.column,
                    "label": spec.label, "seeds": " ".join(map(str, seeds)), "n_seeds": len(seeds),
                    "delta": main.estimate, "low": main.low, "high": main.high,
                    "interval": ONE_SEED if one else T_OVER_SEEDS,
                    "t_p": np.nan if res["t_p"] is None else res["t_p"], "holm_p": np.nan,
                    "distinguishable": None,
                    "boot_low": np.nan if one else boot.low, "boot_high": np.nan if one else boot.high,
                    "per_seed": "; ".join(f"s{s}: {p.estimate:+.2f} [{p.low:+.2f}, {p.high:+.2f}]"
                                          for s, p in zip(seeds, res["per_seed"])),
                })
    out = pd.DataFrame(rows, columns=COLUMNS)
    if out.empty:
        return out
    out["distinguishable"] = out["distinguishable"].astype(object)
    # Holm across the methods of each variant × λ × metric: the family of per-method tests of one question.
    for _, fam in out[out["n_seeds"] >= 2].groupby(["variant", "lambda", "metric"], sort=False):
        adjusted = holm([float(p) for p in fam["t_p"]])
        for i, h in zip(fam.index, adjusted):
            out.at[i, "holm_p"] = h
            out.at[i, "distinguishable"] = bool(h < ALPHA)
    return out


CAPTION = ("Δ = variant − baseline of the same method and seed, on the same test images / episodes "
           "(percentage points). With ≥ 2 seeds the 95 % interval is the t-interval over seeds "
           "(mean ± t·sd/√S of the per-seed Δ) and the decision is the design's test: the t-test over seeds, "
           "two-sided, Holm-corrected across the methods of the same variant, λ and metric (“higher” / "
           "“lower”: Holm p < 0.05). The hierarchical bootstrap over seeds and items is descriptive only (with "
           "few seeds it is much narrower than the t-interval). **With one seed the interval is the paired "
           "bootstrap over the test images / episodes of that seed: evaluation noise only. It cannot tell a "
           "method effect from a seed, so a one-seed row carries no decision** (docs/reliability.md: the "
           "same seed retrained on another CPU moved SimCLR's hue Δ from +2.64 to −1.00). Also in differences.csv.")


def paired_table(paired: pd.DataFrame) -> Table:
    """The paired differences as a report table (one row per method × variant × λ × metric)."""
    table = Table("Paired differences to the baseline (95 % intervals)", CAPTION,
                  ["method", "variant", "λ", "metric", "seeds", "Δ", "95 % interval", "interval is", "p (t)",
                   "Holm p", "decision", DESCRIPTIVE, "per seed (Δ [evaluation-noise interval])"],
                  align_right_from=5)
    for _, r in paired.iterrows():
        one = int(r["n_seeds"]) < 2
        table.add([r["method"], r["variant"], lambda_label(r["lambda"]), r["label"], r["seeds"],
                   f"{r['delta']:+.2f}", f"[{r['low']:+.2f}, {r['high']:+.2f}]",
                   "evaluation noise (1 seed)" if one else "t over seeds",
                   "–" if one else f"{r['t_p']:.3f}", "–" if one else f"{r['holm_p']:.3f}",
                   decision_text(r),
                   "–" if one else f"[{r['boot_low']:+.2f}, {r['boot_high']:+.2f}]", r["per_seed"]],
                  highlight=decided(r))
    return table
