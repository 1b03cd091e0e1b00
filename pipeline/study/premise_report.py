"""The premise per method (issue 24 item 2; docs/study.md, "Confirmatory study: design steps").

Built by ``python -m stages.study report --study study-premise.yaml`` from the shared ledger
(:mod:`pipeline.study.ledger`), reading only the models that study plans (baselines, seed 0):

* **the premise per method**, under the study's own protocol (the official linear protocol of the
  ``linear`` stage, not the ridge probe of :mod:`pipeline.study.premise`): the baseline's ``hue`` top-1
  at colour strength ``none`` / ``default`` / ``strong`` at params.yaml's schedule, the gap
  none − strong, and whether the premise holds (gap ≥ :data:`PREMISE_GAP` points, the rule of
  docs/study.md step 1), beside the garment top-1 at each strength;
* **the schedule per method**: the garment kNN top-1 of the kNN monitor (``monitor/class/knn_top1``) at
  the end of the strong baseline at params.yaml's schedule and along the long arm (a block with
  ``epochs:``), and the schedule :func:`choose_epochs` picks by the rule fixed in docs/study.md before
  any run (:data:`SCHEDULE_GAIN` points);
* ``premise.csv`` / ``schedule.csv`` (the tables' numbers), ``schedule.png`` (the long arm's garment and
  hue kNN curves per method, the short schedule's end as a marker) and ``README.md``.

Nothing is decided from a model that is not in the ledger: a missing cell is shown as missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.study.figures import METHOD_ORDER
from pipeline.study.ledger import LEDGER, read_curves, read_ledger
from pipeline.study.plan import Study

PREMISE_GAP = 5.0          # points of hue linear top-1, none − strong: the first study's rule (docs/study.md step 1)
SCHEDULE_GAIN = 3.0        # points of garment kNN top-1: "still climbing" (docs/study.md, design steps)
PREMISE_STRENGTHS = ("none", "default", "strong")
HUE, GARMENT = "linear/cfmnist/hue/top1", "linear/cfmnist/class/top1"
GARMENT_KNN, HUE_KNN = "monitor/class/knn_top1", "monitor/hue/knn_top1"
ARM_SEED = 0               # the premise and the schedule arm are seed 0's; other seeds: the premise at a schedule


def choose_epochs(short_epochs: int, short_final: float, curve: pd.DataFrame, gain: float = SCHEDULE_GAIN,
                  every: int = 5, linear_gain: float | None = None) -> tuple[int, bool]:
    """(epochs, still climbing) by the rule of docs/study.md ("Confirmatory study: design steps").

    ``short_final``: garment kNN top-1 at the end of the model trained at ``short_epochs`` (its own, fully
    annealed schedule); ``curve``: the long arm's kNN points (columns ``epoch``, :data:`GARMENT_KNN`), its
    last point the long arm's end; ``linear_gain``: the long arm's garment linear top-1 minus the short
    model's (official protocol), when both exist.  Keep ``short_epochs`` when the long arm ends less than
    ``gain`` points above it on the kNN and (where known) on the linear garment task.  Otherwise the smallest multiple of ``every`` beyond ``short_epochs`` after which
    the long arm gains less than ``gain`` over the rest (read at that epoch of the *long* cosine schedule,
    which lies below what a schedule ending there reaches: the choice errs long), else the long arm's
    length.  ``still climbing``: the long arm itself gains ≥ ``gain`` over its last ``every`` epochs.
    """
    pts = curve[["epoch", GARMENT_KNN]].dropna().sort_values("epoch")
    if pts.empty:
        raise ValueError("choose_epochs: the long arm has no garment kNN point (monitor/class/knn_top1)")
    long_epochs, end = int(round(pts["epoch"].iloc[-1])), float(pts[GARMENT_KNN].iloc[-1])
    at = {int(round(e)): float(v) for e, v in zip(pts["epoch"], pts[GARMENT_KNN])}
    last = at.get(long_epochs - every)
    climbing = last is not None and end - last >= gain
    if end - short_final < gain and (linear_gain is None or np.isnan(linear_gain) or linear_gain < gain):
        return short_epochs, climbing
    for e in range(short_epochs + every, long_epochs, every):
        if e in at and end - at[e] < gain:
            return e, climbing
    return long_epochs, climbing


def _judge_premise(row: dict) -> None:
    """The gap none − strong of a row's `hue` top-1 and whether the premise holds there (≥ PREMISE_GAP)."""
    row["gap"] = row["hue_none"] - row["hue_strong"]
    row["holds"] = None if np.isnan(row["gap"]) else bool(row["gap"] >= PREMISE_GAP)


def _holds_text(holds) -> str:
    return "–" if holds is None or pd.isna(holds) else ("holds" if holds else "does not hold")


def _fmt(v, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _premise_rows(table: pd.DataFrame, hue: list[str], garment: list[str], keys: tuple[str, ...] | list[str] = ()
                  ) -> list[str]:
    """A premise table in markdown: the method (and ``keys``), the ``hue`` columns, the gap and whether the
    premise holds, the ``garment`` columns (column ``hue_none`` is headed "hue none")."""
    heads = ["method", *keys, *(c.replace("_", " ") for c in hue), "none − strong", "premise",
             *(c.replace("_", " ") for c in garment)]
    align = ["---", *["---:"] * (len(keys) + len(hue) + 1), "---", *["---:"] * len(garment)]
    rows = ["| " + " | ".join(heads) + " |", "|" + "|".join(align) + "|"]
    for _, r in table.iterrows():
        cells = [r["method"], *(str(r[k]) for k in keys), *(_fmt(r[c]) for c in hue), _fmt(r["gap"]),
                 _holds_text(r["holds"]), *(_fmt(r[c]) for c in garment)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def premise_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method: hue / garment linear top-1 at each strength (params.yaml's schedule, seed mean), the gap."""
    short = runs[runs["epochs"].isna()] if "epochs" in runs else runs
    rows = []
    for method in [m for m in METHOD_ORDER if m in set(runs["method"])]:
        row = {"method": method}
        for s in PREMISE_STRENGTHS:
            g = short[(short["method"] == method) & (short["strength"] == s)]
            for col, name in ((HUE, "hue"), (GARMENT, "garment"), (GARMENT_KNN, "garment_knn")):
                row[f"{name}_{s}"] = float(g[col].mean()) if col in g and g[col].notna().any() else float("nan")
        _judge_premise(row)
        rows.append(row)
    return pd.DataFrame(rows)


def premise_at_schedule(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method and (schedule, seed) other than the arm's: the baseline's hue / garment linear top-1 at `none`
    and `strong` on the same seed and schedule (docs/study.md, pre-registration: the premise at each method's
    confirmatory schedule), the gap and whether the premise holds there."""
    if "epochs" not in runs:
        return pd.DataFrame()
    sub = runs[runs["epochs"].notna() & (runs["seed"] != ARM_SEED)]
    rows = []
    for (method, epochs, seed), g in sub.groupby(["method", "epochs", "seed"]):
        cell = {s: g[g["strength"] == s] for s in ("none", "strong")}
        row = {"method": method, "epochs": int(epochs), "seed": int(seed)}
        for s, c in cell.items():
            for col, name in ((HUE, "hue"), (GARMENT, "garment")):
                row[f"{name}_{s}"] = float(c[col].iloc[0]) if not c.empty and col in c else float("nan")
        _judge_premise(row)
        rows.append(row)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return pd.DataFrame(rows).sort_values("method", key=lambda c: c.map(order)) if rows else pd.DataFrame()


def schedule_table(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], short_epochs: int) -> pd.DataFrame:
    """Per method: the strong baseline's garment kNN (and linear) at the short schedule's end and the long
    arm's, the long arm's kNN at each 5th epoch, and the rule's choice."""
    if "epochs" not in runs:
        return pd.DataFrame()
    rows = []
    strong = runs[(runs["strength"] == "strong") & (runs["seed"] == ARM_SEED)]
    for method in [m for m in METHOD_ORDER if m in set(runs["method"])]:
        s = strong[(strong["method"] == method) & strong["epochs"].isna()]
        for _, arm in strong[(strong["method"] == method) & strong["epochs"].notna()].iterrows():
            curve = curves.get(arm["model"])
            row = {"method": method, "long_epochs": int(arm["epochs"]),
                   "knn_short": float(s[GARMENT_KNN].mean()) if not s.empty else float("nan"),
                   "knn_long": float(arm.get(GARMENT_KNN, float("nan"))),
                   "garment_short": float(s[GARMENT].mean()) if not s.empty and GARMENT in s else float("nan"),
                   "garment_long": float(arm.get(GARMENT, float("nan"))),
                   "hue_short": float(s[HUE].mean()) if not s.empty and HUE in s else float("nan"),
                   "hue_long": float(arm.get(HUE, float("nan")))}
            if curve is not None and not s.empty and GARMENT_KNN in curve:
                for e in range(5, int(arm["epochs"]) + 1, 5):
                    v = curve.loc[(curve["epoch"] - e).abs() < 1e-6, GARMENT_KNN]
                    row[f"knn_ep{e}"] = float(v.iloc[0]) if len(v) else float("nan")
                row["choice"], row["still_climbing"] = choose_epochs(
                    short_epochs, row["knn_short"], curve, linear_gain=row["garment_long"] - row["garment_short"])
            else:
                row["choice"], row["still_climbing"] = None, None
            rows.append(row)
    return pd.DataFrame(rows)


def schedule_figure(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], short_epochs: int, path: Path) -> bool:
    """Garment and hue kNN top-1 per epoch of each method's long arm; the short schedule's end as a marker."""
    arms = (runs[(runs["strength"] == "strong") & runs["epochs"].notna() & (runs["seed"] == ARM_SEED)]
            if "epochs" in runs else runs.iloc[:0])
    arms = arms[arms["model"].isin(curves)]
    if arms.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    colours = dict(zip(METHOD_ORDER, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, col, title in ((axes[0], GARMENT_KNN, "garment (10 classes)"), (axes[1], HUE_KNN, "hue (24 classes)")):
        for _, arm in arms.iterrows():
            c = curves[arm["model"]]
            if col not in c:
                continue
            colour = colours.get(arm["method"], "k")
            ax.plot(c["epoch"], c[col], "o-", ms=3, color=colour, label=f"{arm['method']} {int(arm['epochs'])} ep")
            short = runs[(runs["method"] == arm["method"]) & (runs["strength"] == "strong") & runs["epochs"].isna()]
            if col in short and short[col].notna().any():
                ax.plot([short_epochs], [short[col].mean()], "*", ms=12, color=colour,
                        label=f"{arm['method']} {short_epochs} ep (own schedule)")
        ax.set_title(f"kNN top-1, {title}, strong colour")
        ax.set_xlabel("epoch")
        ax.set_ylabel("kNN top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build(study: Study, out_dir: Path = Path("reports/study-premise"), ledger: Path = LEDGER,
          short_epochs: int | None = None) -> Path:
    """README.md, premise.csv, schedule.csv and schedule.png of a baselines-only premise study."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if short_epochs is None:
        from pipeline.params import load_params

        short_epochs = load_params("params.yaml").ssl.epochs
    planned = {k.name for k in study.models()}
    runs, _ = read_ledger(ledger, planned)
    curves = read_curves(ledger, planned)
    lines = [f"# Premise per method: study `{study.name}`", "",
             "Design and rules: [docs/study.md](../../docs/study.md), “Confirmatory study: design steps” (written "
             "before this study's new runs). Baselines only, from the shared ledger `reports/study/runs/`; "
             f"models finished: **{len(runs)} of {len(planned)}** planned "
             "(`python -m stages.study run --study study-premise.yaml` trains the rest and rebuilds this page).", ""]
    if runs.empty:
        lines.append("No model of this study has finished yet.")
        (out_dir / "README.md").write_text("\n".join(lines) + "\n")
        return out_dir / "README.md"
    prem = premise_table(runs)
    prem.to_csv(out_dir / "premise.csv", index=False, float_format="%.2f")
    lines += ["## The premise per method (official linear protocol, seed 0, "
              f"{short_epochs} epochs)", "",
              f"`hue` (24 classes) and garment (10 classes) linear top-1 (%) of the baseline at each colour strength. "
              f"The premise holds for a method when its `hue` top-1 at `strong` is at least {PREMISE_GAP:g} points "
              "below `none` (no colour jitter, no grayscale): the rule of docs/study.md step 1.", "",
              *_premise_rows(prem, ["hue_none", "hue_default", "hue_strong"],
                             ["garment_none", "garment_default", "garment_strong"]), ""]
    sched = schedule_table(runs, curves, short_epochs)
    for f in ("schedule.csv", "schedule.png"):               # a file whose data is gone must not outlive it
        if (out_dir / f).exists():
            (out_dir / f).unlink()
    if not sched.empty:
        sched.to_csv(out_dir / "schedule.csv", index=False, float_format="%.2f")
        eps = sorted(int(c[len("knn_ep"):]) for c in sched.columns if c.startswith("knn_ep"))
        lines += [f"## The schedule per method (strong baseline, seed 0): garment kNN top-1 (%)", "",
                  f"The kNN monitor (`{GARMENT_KNN}`, 1000 fixed test queries) at the end of the {short_epochs}-epoch "
                  "model and along the long arm (its own cosine schedule, so a mid-arm point is not what a schedule "
                  f"ending there reaches). Rule (docs/study.md): keep {short_epochs} epochs when the long arm ends less "
                  f"than {SCHEDULE_GAIN:g} points above the {short_epochs}-epoch model on the garment kNN and on the "
                  f"garment linear top-1; otherwise the smallest multiple "
                  f"of 5 epochs after which the long arm gains less than {SCHEDULE_GAIN:g}; “still climbing”: the long "
                  f"arm gains ≥ {SCHEDULE_GAIN:g} over its own last 5 epochs. Garment and `hue` linear top-1 (official "
                  "protocol) of both models beside it.", "",
                  f"| method | {short_epochs} ep (own) | " + " | ".join(f"long @ {e}" for e in eps)
                  + " | long end | gain | choice | still climbing | garment linear short → long | hue linear short → long |",
                  "|---|---:|" + "---:|" * len(eps) + "---:|---:|---|---|---|---|"]
        for _, r in sched.iterrows():
            choice = "–" if r["choice"] is None or pd.isna(r["choice"]) else f"{int(r['choice'])} epochs"
            climbing = "–" if r["still_climbing"] is None or pd.isna(r["still_climbing"]) else (
                "yes" if r["still_climbing"] else "no")
            lines.append(f"| {r['method']} | {_fmt(r['knn_short'])} | "
                         + " | ".join(_fmt(r.get(f"knn_ep{e}")) for e in eps)
                         + f" | {_fmt(r['knn_long'])} | {_fmt(r['knn_long'] - r['knn_short'])} | {choice} | {climbing} | "
                         f"{_fmt(r['garment_short'])} → {_fmt(r['garment_long'])} | {_fmt(r['hue_short'])} → "
                         f"{_fmt(r['hue_long'])} |")
        lines.append("")
    at = premise_at_schedule(runs)
    if (out_dir / "premise-at-schedule.csv").exists():
        (out_dir / "premise-at-schedule.csv").unlink()
    if not at.empty:
        at.to_csv(out_dir / "premise-at-schedule.csv", index=False, float_format="%.2f")
        lines += ["## The premise at each method's confirmatory schedule", "",
                  "The baseline at `none` and `strong` on the same seed, at the schedule the rule above chose "
                  "(docs/study.md, pre-registration; the `strong` one is the confirmatory study's baseline of "
                  "that seed). It changes nothing in the confirmatory tests.", "",
                  *_premise_rows(at, ["hue_none", "hue_strong"], ["garment_none", "garment_strong"],
                                 keys=["epochs", "seed"]), ""]
    if schedule_figure(runs, curves, short_epochs, out_dir / "schedule.png"):
        lines += ["![kNN curves of the long arm](schedule.png)", ""]
    missing = sorted(planned - set(runs["model"]))
    if missing:
        lines += ["## Not yet run", "", ", ".join(f"`{m}`" for m in missing), ""]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    return out_dir / "README.md"
