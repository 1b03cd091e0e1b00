"""Paired differences: each non-baseline variant against the baseline of the same method and seed.

Input: the validated runs table and, per run id, per-item scores in % keyed by metric column
(``pipeline.tracking.collect_items``: per test image correctness of the linear probe, per episode
few-shot accuracy).  For every method, variant ≠ baseline, λ and metric with per-item scores on both
sides, the seeds present on both sides are paired and :func:`pipeline.stats.across_seeds` gives

* the per-seed Δ and its paired-bootstrap 95 % interval (evaluation noise),
* the mean of the per-seed Δ with a t-interval over seeds and a hierarchical-bootstrap interval
  (seeds, then items) when ≥ 2 seeds pair up.

``distinguishable`` says whether the interval that carries every source available excludes 0: the
hierarchical one with ≥ 2 seeds, else the single seed's bootstrap (evaluation noise only; the
``interval`` column names which).  Items are paired by position: the arrays must have the same
length on both sides (the same test set, the same episodes), else the pair is skipped with a note.
The variants are taken from the runs (baseline, augself, and any other such as cassle).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from pipeline.report.schema import MetricSpec, lambda_label
from pipeline.report.tables import Table
from pipeline.stats import across_seeds

COLUMNS = ["method", "variant", "lambda", "metric", "label", "seeds", "delta", "low", "high", "interval",
           "t_low", "t_high", "t_p", "per_seed", "distinguishable"]


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
                main = res["hierarchical"] or res["per_seed"][0]
                rows.append({
                    "method": method, "variant": variant, "lambda": float(lam), "metric": spec.column,
                    "label": spec.label, "seeds": " ".join(map(str, seeds)),
                    "delta": main.estimate, "low": main.low, "high": main.high,
                    "interval": "hierarchical bootstrap (seeds + items)" if res["hierarchical"]
                    else "paired bootstrap over items (1 seed: evaluation noise only)",
                    "t_low": res["t"].low if res["t"] else np.nan, "t_high": res["t"].high if res["t"] else np.nan,
                    "t_p": np.nan if res["t_p"] is None else res["t_p"],
                    "per_seed": "; ".join(f"s{s}: {p.estimate:+.2f} [{p.low:+.2f}, {p.high:+.2f}]"
                                          for s, p in zip(seeds, res["per_seed"])),
                    "distinguishable": main.excludes_zero,
                })
    return pd.DataFrame(rows, columns=COLUMNS)


CAPTION = ("Δ = variant − baseline of the same method and seed, on the same test images / episodes "
           "(percentage points). 95 % interval: hierarchical bootstrap (seeds, then items) where ≥ 2 seeds "
           "pair up, else the paired bootstrap over items of the one seed (evaluation noise only); "
           "t over seeds: mean ± t·sd/√S of the per-seed Δ. “yes”: the interval excludes 0. "
           "Also in differences.csv.")


def paired_table(paired: pd.DataFrame) -> Table:
    """The paired differences as a report table (one row per method × variant × λ × metric)."""
    table = Table("Paired differences to the baseline (95 % intervals)", CAPTION,
                  ["method", "variant", "λ", "metric", "seeds", "Δ", "95 % interval", "t over seeds",
                   "per seed (Δ [interval])", "≠ 0"], align_right_from=5)
    for _, r in paired.iterrows():
        t = f"[{r['t_low']:+.2f}, {r['t_high']:+.2f}]" if np.isfinite(r["t_low"]) else "–"
        table.add([r["method"], r["variant"], lambda_label(r["lambda"]), r["label"], r["seeds"],
                   f"{r['delta']:+.2f}", f"[{r['low']:+.2f}, {r['high']:+.2f}]", t, r["per_seed"],
                   "yes" if r["distinguishable"] else "no"], highlight=bool(r["distinguishable"]))
    return table
