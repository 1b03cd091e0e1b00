"""The study's report: ``reports/study/`` from the ledger (:mod:`pipeline.study.ledger`).

* ``differences.csv`` / the forest plot: every variant − baseline Δ of the same method, strength and
  seed, paired on the same test images and episodes (:func:`pipeline.report.paired.paired_differences`:
  per-seed paired bootstrap, and across seeds a t-interval and a hierarchical bootstrap), one row per
  strength × method × variant × λ × metric;
* ``strength.png``: the primary task against colour strength for baseline, AugSelf and CASSLE (the
  premise and the remedy in one picture);
* ``lambda.png``: the primary task and the garment class against λ (SimCLR);
* ``README.md``: what was run (models done out of planned), the tables, and what they show, written
  from the numbers whichever way they fall.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.study.ledger import LEDGER, read_ledger
from pipeline.study.plan import Study

PRIMARY = "linear/cfmnist/hue/top1"
COST = ("linear/cfmnist/class/top1", "linear/digits/class/top1")


def _fmt_interval(r) -> str:
    return f"{r['delta']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"


def differences(runs: pd.DataFrame, items: dict, notes: list[str]) -> pd.DataFrame:
    from pipeline.report import _present_specs
    from pipeline.report.paired import paired_differences

    frames = []
    for strength, sub in runs.groupby("strength"):
        specs = _present_specs(sub, [])
        d = paired_differences(sub, items, specs, notes)
        if not d.empty:
            d.insert(0, "strength", strength)
            frames.append(d)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _curve_figure(runs: pd.DataFrame, x: str, order: list, title: str, metrics: list[str], path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if m in runs]
    if runs.empty or not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for variant, d in runs.groupby("variant"):
            g = d.groupby(x)[metric].agg(["mean", "std", "count"]).reindex([o for o in order if o in set(d[x])])
            if g.empty:
                continue
            pos = [order.index(v) for v in g.index] if x == "strength" else list(g.index)
            ax.errorbar(pos, g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3, label=variant)
        if x == "strength":
            ax.set_xticks(range(len(order)), order)
        ax.set_xlabel(x if x != "lambda" else "λ (0 = baseline)")
        ax.set_title(metric.replace("linear/", "").replace("/top1", ""))
        ax.set_ylabel("linear top-1 (%), mean ± sd over seeds")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


_TASKS = {"linear/cfmnist/hue/top1": "hue (24)", "linear/cfmnist/color/top1": "colour (6)",
          "linear/cfmnist/class/top1": "garment", "linear/digits/class/top1": "digits",
          "fewshot/cfmnist/hue/5way5shot": "hue 5-w 5-s", "probe/color/r2": "ω colour R²"}
SPEED = "pretrain/images_per_s"


def _means_table(runs: pd.DataFrame) -> list[str]:
    """Mean ± sd over seeds of every task, one row per strength × method × variant × λ."""
    cols = [c for c in _TASKS if c in runs]
    if not cols:
        return []
    lines = ["## Accuracy per model (mean ± sd over seeds; the sd where ≥ 2 seeds ran)", "",
             "| strength | method | variant | λ | seeds | " + " | ".join(_TASKS[c] for c in cols) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(cols)]
    for (strength, method, variant, lam), g in runs.groupby(["strength", "method", "variant", "lambda"]):
        cells = []
        for c in cols:
            v = g[c].dropna()
            digits = 3 if c.startswith("probe/") else 1
            cells.append("" if v.empty else f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else ""))
        lines.append(f"| {strength} | {method} | {variant} | {lam:g} | {len(g)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _cost_table(runs: pd.DataFrame) -> list[str]:
    """Pretraining throughput per method × variant (strong colour, every λ), relative to the baseline."""
    if SPEED not in runs:
        return []
    sub = runs[runs["strength"] == "strong"].dropna(subset=[SPEED])
    lines = ["## Cost: pretraining images/s", "",
             "Measured once per model as it was trained: the default slice (SimCLR seed 0) by `dvc repro` "
             "alone on 2 threads, the rest by `make study`'s two DVC queue workers of one thread each on "
             "the 2-core machine (shared), so compare a variant with the baseline of the same method and "
             "seed conditions; the ratio to the baseline is the cost.", "",
             "| method | variant | models | images/s (mean) | vs baseline |", "|---|---|---:|---:|---:|"]
    for method, m in sub.groupby("method", sort=False):
        base = m.loc[m["variant"] == "baseline", SPEED].mean()
        for variant, g in m.groupby("variant"):
            ratio = g[SPEED].mean() / base if base == base and base > 0 else float("nan")
            lines.append(f"| {method} | {variant} | {len(g)} | {g[SPEED].mean():.0f} | "
                         f"{'' if ratio != ratio else f'{ratio:.2f}×'} |")
    return lines + [""]


def build(study: Study, out_dir: Path = Path("reports/study"), ledger: Path = LEDGER) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, items = read_ledger(ledger)
    planned = study.models()
    notes: list[str] = []
    lines = [f"# Study `{study.name}`", "",
             "Design: [docs/study.md](../../docs/study.md) (committed before any AugSelf run). "
             "Premise curves (baseline only): [premise.png](premise.png), [premise.csv](premise.csv).", "",
             f"Models finished: **{len(runs)} of {len(planned)}** planned "
             f"(`make study` trains the rest and rebuilds this page).", ""]
    if runs.empty:
        lines.append("No model of the study has finished yet.")
        (out_dir / "README.md").write_text("\n".join(lines) + "\n")
        return out_dir / "README.md"
    missing = sorted({k.name for k in planned} - set(runs["model"]))
    diff = differences(runs, items, notes)
    if not diff.empty:
        diff.drop(columns=["per_seed"], errors="ignore").to_csv(out_dir / "differences.csv", index=False,
                                                              float_format="%.4f")
        from pipeline.report.plots import forest_figure

        fig = forest_figure(diff.assign(method=diff["strength"] + " · " + diff["method"]),
                            "Variant − baseline, paired (95 % intervals); filled: excludes 0")
        if fig is not None:
            fig.savefig(out_dir / "forest.png", dpi=110)
            lines += ["![paired differences](forest.png)", ""]
        lines += ["## Paired differences to the baseline", "",
                  "Δ in percentage points, variant − baseline of the same method, strength and seed, on the "
                  "same test images / episodes. Interval: hierarchical bootstrap (seeds, then items) when ≥ 2 "
                  "seeds pair up, else the single seed's paired bootstrap (evaluation noise only).", "",
                  "| strength | method | variant | λ | metric | seeds | Δ [95 %] | interval | ≠ 0 |",
                  "|---|---|---|---:|---|---:|---|---|---|"]
        for _, r in diff.iterrows():
            lines.append(f"| {r['strength']} | {r['method']} | {r['variant']} | {r['lambda']:g} | {r['label']} | "
                         f"{r['seeds']} | {_fmt_interval(r)} | {r['interval']} | "
                         f"{'**yes**' if r['distinguishable'] else 'no'} |")
        lines.append("")
        prim = diff[diff["metric"] == PRIMARY]
        if not prim.empty:
            lines += ["## What the numbers show", ""]
            for _, r in prim.iterrows():
                verdict = ("distinguishable from zero" if r["distinguishable"]
                           else "not distinguishable from zero")
                lines.append(f"* {r['strength']}, {r['method']}, {r['variant']} (λ = {r['lambda']:g}) on the "
                             f"augmentation-sensitive `cfmnist/hue`: Δ = {_fmt_interval(r)} over seeds {r['seeds']}, "
                             f"{verdict}.")
            for metric in COST:
                for _, r in diff[diff["metric"] == metric].iterrows():
                    lines.append(f"* cost on `{r['label']}` ({r['strength']}, {r['method']}, {r['variant']}): "
                                 f"Δ = {_fmt_interval(r)}{' (distinguishable)' if r['distinguishable'] else ''}.")
            lines.append("")
    lines += _means_table(runs)
    lines += _cost_table(runs)
    order = ["weak", "default", "strong"]
    if _curve_figure(runs[runs["method"] == "simclr"], "strength", order,
                     "SimCLR: hue and garment class vs colour strength", [PRIMARY, COST[0]], out_dir / "strength.png"):
        lines += ["![strength](strength.png)", ""]
    lam = runs[(runs["method"] == "simclr") & (runs["strength"] == "strong") & runs["variant"].isin(["baseline", "augself"])]
    if lam["lambda"].nunique() > 1 and _curve_figure(lam.assign(variant="simclr"), "lambda",
                                                      sorted(lam["lambda"].unique()), "SimCLR, strong: accuracy vs λ",
                                                      [PRIMARY, COST[0]], out_dir / "lambda.png"):
        lines += ["![lambda](lambda.png)", ""]
    if missing:
        lines += ["## Not yet run", "", ", ".join(f"`{m}`" for m in missing), ""]
    if notes:
        lines += ["## Notes", "", *[f"* {n}" for n in notes], ""]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    runs.drop(columns=[c for c in runs.columns if c.startswith("monitor/")], errors="ignore").to_csv(
        out_dir / "runs.csv", index=False, float_format="%.4f")
    return out_dir / "README.md"
