"""The study's report: ``reports/study/`` from the ledger (:mod:`pipeline.study.ledger`).

* ``differences.csv``: every variant − baseline Δ of the same method, strength and seed, paired on
  the same test images and episodes (:func:`pipeline.report.paired.paired_differences`: per-seed
  paired bootstrap, and across seeds a t-interval and a hierarchical bootstrap), one row per
  strength × method × variant × λ × metric;
* the figures of :mod:`pipeline.study.figures` (forest per task, Δ against λ, against strength);
* ``README.md``: what was run (models done out of planned), what the numbers show (written from them
  whichever way they fall), the main comparison, the probe, accuracies, cost, every difference.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.study.figures import PRIMARY, STRENGTHS, TASKS, forest_by_task, headline, lambda_figure, strength_figure
from pipeline.study.ledger import LEDGER, read_ledger
from pipeline.study.plan import Study


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


_TASKS = {"linear/cfmnist/hue/top1": "hue (24)", "linear/cfmnist/color/top1": "colour (6)",
          "linear/cfmnist/class/top1": "garment", "linear/digits/class/top1": "digits",
          "fewshot/cfmnist/hue/5way5shot": "hue 5-w 5-s"}
SPEED = "pretrain/images_per_s"


def _per_model_table(runs: pd.DataFrame, columns: dict[str, str], head: list[str]) -> list[str]:
    """Mean ± sd over seeds of ``columns``, one row per strength × method × variant × λ (R² to 3 digits)."""
    cols = [c for c in columns if c in runs]
    sub = runs.dropna(subset=cols, how="all") if cols else runs.iloc[:0]
    if sub.empty:
        return []
    lines = head + ["| strength | method | variant | λ | seeds | " + " | ".join(columns[c] for c in cols) + " |",
                    "|---|---|---|---:|---:|" + "---:|" * len(cols)]
    for (strength, method, variant, lam), g in sub.groupby(["strength", "method", "variant", "lambda"]):
        cells = []
        for c in cols:
            v = g[c].dropna()
            d = 3 if c.endswith("/r2") else 1
            cells.append("" if v.empty else f"{v.mean():.{d}f}" + (f" ± {v.std(ddof=1):.{d}f}" if len(v) > 1 else ""))
        lines.append(f"| {strength} | {method} | {variant} | {lam:g} | {g[cols[0]].notna().sum()} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def _means_table(runs: pd.DataFrame) -> list[str]:
    return _per_model_table(runs, _TASKS, ["## Accuracy per model (mean ± sd over seeds; the sd where ≥ 2 seeds ran)",
                                           ""])


BENCH = {"augself": Path("bench/results/pretrain-cpu-study.json"),
         "cassle": Path("bench/results/pretrain-cpu-study-cassle.json")}


def _bench_cost(paths: dict[str, Path] = BENCH) -> list[str]:
    """The step-time cost of each variant from `bench/bench_pretrain.py` on the study's configuration:
    baseline and variant timed in one process, interleaved rounds, median and IQR (the real measure)."""
    rows = []
    for variant, path in paths.items():
        if not Path(path).exists():
            continue
        import json

        bench = json.loads(Path(path).read_text())
        key = "augself" if variant == "augself" else "cassle"
        for r in bench.get("methods", []):
            over, iqr = r.get(f"{key}_overhead_pct"), r.get(f"{key}_overhead_pct_iqr") or [float("nan")] * 2
            speed = r.get("images_per_s_lambda1" if key == "augself" else "images_per_s_cassle")
            if over is None:
                continue
            rows.append(f"| {r['method']} | {variant} | {r['images_per_s_lambda0']:.0f} | {speed:.0f} | "
                        f"{over:+.1f} % [{iqr[0]:+.1f}, {iqr[1]:+.1f}] | {bench.get('device_name', '')}, "
                        f"{bench.get('threads', '')} threads, {bench.get('clock', '')} clock |")
    if not rows:
        return []
    return ["Step time measured by `bench/bench_pretrain.py` on the study's configuration (baseline and variant "
            "in one process, interleaved rounds, median with the interquartile range over rounds; "
            f"{', '.join(f'`{p}`' for p in paths.values())}):", "",
            "| method | variant | baseline images/s | variant images/s | step-time overhead [IQR] | machine |",
            "|---|---|---:|---:|---|---|", *rows, ""]


def _cost_table(runs: pd.DataFrame) -> list[str]:
    """Pretraining throughput per method × variant as trained (strong colour), and the benchmark's cost."""
    if SPEED not in runs:
        return []
    sub = runs[runs["strength"] == "strong"].dropna(subset=[SPEED])
    lines = ["## Cost: pretraining images/s", "", *_bench_cost(),
             "As trained (one number per model, logged by the run itself): these are **not** a measure of a "
             "variant's cost. The default slice ran alone on 2 threads (on session 4's CPU), the rest in "
             "`make study`'s two DVC queue workers of one thread each beside whatever else the 2-core machine "
             "ran at the time (the other worker, tests), so a ratio to the baseline mixes the variant's cost "
             "with the load; the benchmark above times both in one process.", "",
             "| method | variant | models | images/s (mean) | vs baseline |", "|---|---|---:|---:|---:|"]
    for method, m in sub.groupby("method", sort=False):
        base = m.loc[m["variant"] == "baseline", SPEED].mean()
        for variant, g in m.groupby("variant"):
            ratio = g[SPEED].mean() / base if base == base and base > 0 else float("nan")
            lines.append(f"| {method} | {variant} | {len(g)} | {g[SPEED].mean():.0f} | "
                         f"{'' if ratio != ratio else f'{ratio:.2f}×'} |")
    return lines + [""]


def _headline_table(diff: pd.DataFrame) -> list[str]:
    """Method × variant rows, task columns: the main comparison at a glance."""
    rows = headline(diff)
    if rows.empty:
        return []
    tasks = [t for t in TASKS if t in set(rows["metric"])]
    lines = ["## The main comparison: variant − baseline at strong colour (λ = 1)", "",
             "Δ in points, paired on the same test images / episodes, 95 % interval; **bold**: the interval "
             "excludes 0. Seeds: the seeds that pair up (a 1-seed interval is evaluation noise only).", "",
             "| method | variant | seeds | " + " | ".join(TASKS[t] for t in tasks) + " |",
             "|---|---|---|" + "---|" * len(tasks)]
    for (method, variant), g in rows.groupby(["method", "variant"], sort=False):
        cells = []
        for t in tasks:
            r = g[g["metric"] == t]
            if r.empty:
                cells.append("")
                continue
            text = _fmt_interval(r.iloc[0])
            cells.append(f"**{text}**" if r.iloc[0]["distinguishable"] else text)
        lines.append(f"| {method} | {variant} | {g['seeds'].iloc[0]} | " + " | ".join(cells) + " |")
    return lines + [""]


def _primary_test(diff: pd.DataFrame) -> list[str]:
    """The design's primary test: AugSelf − baseline on `hue`, one per method, with Holm over them."""
    from pipeline.stats import holm

    rows = headline(diff)
    t = rows[(rows["variant"] == "augself") & (rows["metric"] == PRIMARY)] if not rows.empty else rows
    if t.empty:
        return []
    ps = [None if pd.isna(p) else float(p) for p in t["t_p"]]
    adjusted = holm(ps)
    lines = ["## The primary test (docs/study.md): AugSelf λ = 1 − baseline on `hue`, one test per method", "",
             "Hierarchical bootstrap interval (seeds, then test images; the call “≠ 0”), the t-interval over "
             "seeds, the t-test's p and Holm's adjustment over the methods tested. With one seed there is no "
             "test across seeds (the interval is then evaluation noise only). With 2–3 seeds the bootstrap "
             "can draw only those seeds, so it understates the seed-to-seed spread; the t-interval and "
             "Holm's p are the conservative reading, and where they disagree with “≠ 0” the claim is "
             "not settled.", "",
             "| method | seeds | Δ | 95 % interval | t over seeds | p | Holm p | ≠ 0 |", "|---|---|---:|---|---|---:|---:|---|"]
    for (_, r), p, h in zip(t.iterrows(), ps, adjusted):
        tint = "" if pd.isna(r["t_low"]) else f"[{r['t_low']:+.2f}, {r['t_high']:+.2f}]"
        lines.append(f"| {r['method']} | {r['seeds']} | {r['delta']:+.2f} | [{r['low']:+.2f}, {r['high']:+.2f}] | "
                     f"{tint} | {'' if p is None else f'{p:.3f}'} | {'' if h is None else f'{h:.3f}'} | "
                     f"{'**yes**' if r['distinguishable'] else 'no'} |")
    return lines + [""]


def _direction(r) -> str:
    if not r["distinguishable"]:
        return "not distinguishable from 0"
    return "higher than the baseline" if r["delta"] > 0 else "lower than the baseline"


def _findings(diff: pd.DataFrame) -> list[str]:
    """What the numbers show, one sentence per claim, written from the rows whichever way they fall."""
    rows = headline(diff)
    if rows.empty:
        return []
    lines = ["## What the numbers show", ""]
    aug = rows[rows["variant"] == "augself"]
    for task in TASKS:
        t = aug[aug["metric"] == task]
        if t.empty:
            continue
        up = int(((t["delta"] > 0) & t["distinguishable"]).sum())
        down = int(((t["delta"] < 0) & t["distinguishable"]).sum())
        per = "; ".join(f"{r['method']} {_fmt_interval(r)} (seeds {r['seeds']})" for _, r in t.iterrows())
        lines.append(f"* **{TASKS[task]}**, AugSelf λ = 1 − baseline, of {len(t)} method(s): higher in {up}, "
                     f"lower in {down}, not distinguishable in {len(t) - up - down}: {per}.")
    cas = rows[rows["variant"] == "cassle"]
    if not cas.empty:
        lines.append("* **CASSLE** − baseline (SimCLR): " + "; ".join(
            f"{TASKS[r['metric']]} {_fmt_interval(r)}, {_direction(r)}"
            for task in TASKS for _, r in cas[cas["metric"] == task].iterrows()) + ".")
    lam = diff[(diff["method"] == "simclr") & (diff["strength"] == "strong") & (diff["variant"] == "augself")]
    if lam["lambda"].nunique() > 1:
        for task in (PRIMARY, "linear/cfmnist/class/top1"):
            t = lam[lam["metric"] == task].sort_values("lambda")
            if not t.empty:
                lines.append(f"* λ (SimCLR, strong), {TASKS[task]}: " + "; ".join(
                    f"λ = {r['lambda']:g}: {_fmt_interval(r)}" for _, r in t.iterrows()) + ".")
    st = diff[(diff["method"] == "simclr") & (diff["variant"] == "augself") & (diff["lambda"] == 1.0)]
    if st["strength"].nunique() > 1:
        for task in (PRIMARY, "linear/cfmnist/class/top1"):
            t = st[st["metric"] == task]
            if not t.empty:
                lines.append(f"* colour strength (SimCLR, λ = 1), {TASKS[task]}: " + "; ".join(
                    f"{s}: {_fmt_interval(t[t['strength'] == s].iloc[0])}"
                    for s in STRENGTHS if s in set(t["strength"])) + ".")
    return lines + [""]


_PROBES = {"probe/crop/r2": "crop R²", "probe/color/r2": "colour R²", "probe/flip/acc": "flip acc. (%)"}


def _probe_table(runs: pd.DataFrame) -> list[str]:
    """How much of each view pair's ω difference a ridge / logistic map recovers from frozen features."""
    return _per_model_table(runs, _PROBES, [
        "## The augmentation probe (what the features keep of ω1 − ω2)", "",
        "Held-out R² of a ridge map (crop, colour) and accuracy of a logistic one (flip: same or not) from "
        "frozen features of two views to their augmentation difference; mean ± sd over seeds.", ""])


def _full_table(diff: pd.DataFrame) -> list[str]:
    lines = ["<details><summary>Every paired difference (strength × method × variant × λ × task)</summary>", "",
             "| strength | method | variant | λ | metric | seeds | Δ [95 %] | interval | ≠ 0 |",
             "|---|---|---|---:|---|---:|---|---|---|"]
    for _, r in diff.iterrows():
        lines.append(f"| {r['strength']} | {r['method']} | {r['variant']} | {r['lambda']:g} | {r['label']} | "
                     f"{r['seeds']} | {_fmt_interval(r)} | {r['interval']} | "
                     f"{'**yes**' if r['distinguishable'] else 'no'} |")
    return lines + ["", "</details>", ""]


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
    figures = {"forest.png": False, "lambda.png": False, "strength.png": False}
    if not diff.empty:
        diff.drop(columns=["per_seed"], errors="ignore").to_csv(out_dir / "differences.csv", index=False,
                                                              float_format="%.4f")
        figures["forest.png"] = forest_by_task(diff, out_dir / "forest.png")
        figures["lambda.png"] = lambda_figure(diff, out_dir / "lambda.png")
    figures["strength.png"] = strength_figure(runs, diff, out_dir / "strength.png")
    for name, drawn in figures.items():              # a figure whose data is gone must not outlive it
        if not drawn and (out_dir / name).exists():
            (out_dir / name).unlink()
    lines += _findings(diff)
    if figures["forest.png"]:
        lines += ["![paired differences per task](forest.png)", ""]
    lines += _headline_table(diff)
    lines += _primary_test(diff)
    if figures["strength.png"]:
        lines += ["## Colour strength: the premise and the remedy", "", "![strength](strength.png)", ""]
    if figures["lambda.png"]:
        lines += ["## λ", "", "![lambda](lambda.png)", ""]
    lines += _probe_table(runs)
    lines += _means_table(runs)
    lines += _cost_table(runs)
    if not diff.empty:
        lines += _full_table(diff)
    if missing:
        lines += ["## Not yet run", "", ", ".join(f"`{m}`" for m in missing), ""]
    if notes:
        lines += ["## Notes", "", *[f"* {n}" for n in notes], ""]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    runs.drop(columns=[c for c in runs.columns if c.startswith("monitor/")], errors="ignore").to_csv(
        out_dir / "runs.csv", index=False, float_format="%.4f")
    return out_dir / "README.md"
