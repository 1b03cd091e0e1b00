"""Tests of pipeline.report: numbers against a direct pandas computation, robustness, and the page in a browser."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from pipeline.report import build_report, curve_key
from pipeline.report.plots import loss_figure
from pipeline.report.schema import find_curve, validate_runs
from pipeline.request import RunRequest

METHODS = ("simclr", "byol")
AUG_LAMBDAS = (0.5, 1.0)
SEEDS = (0, 1, 2)
LINEAR = ["linear/cfmnist/class/top1", "linear/cfmnist/color/top1"]
FEWSHOT = ["fewshot/cfmnist/class/5way1shot", "fewshot/cfmnist/class/5way5shot"]
PROBE = ["probe/crop/r2", "probe/color/r2", "probe/flip/acc"]
PRETRAIN = ["pretrain/loss_ssl", "pretrain/loss_augself/crop", "pretrain/loss_augself/color",
            "pretrain/images_per_s"]
CONTEXT = {"commit": "0123abc", "generated_at": "2025-01-01T00:00:00Z", "command": "dvc exp run -S augself.lambda=0.5",
           "params": {"augself.lambda": 1.0, "ssl.epochs": 5, "ssl.methods": "['simclr', 'byol']"},
           "notes": "synthetic runs for the tests"}


def synthetic_runs(methods=METHODS, lambdas=AUG_LAMBDAS, seeds=SEEDS, rng_seed=0) -> pd.DataFrame:
    """Runs with distinct, random metric values (AugSelf better on colour, as in the paper)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    configs = [(m, "baseline", 0.0) for m in methods] + [(m, "augself", lam) for m in methods for lam in lambdas]
    for method, variant, lam in configs:
        for seed in seeds:
            lift = 3.0 * lam if variant == "augself" else 0.0
            row = {"run_id": f"{method}{variant}{lam}{seed}".replace(".", ""), "method": method, "variant": variant,
                   "lambda": lam, "seed": seed, "group": "cafe1234", "commit": "0123abc",
                   "dvc_exp": f"exp-{lam}" if lam else "", "start_time": f"2025-01-01T0{seed}:00:00Z"}
            row.update({c: 60 + lift + rng.normal(0, 1) for c in LINEAR})
            row.update({c: 50 + lift + rng.normal(0, 2) for c in FEWSHOT})
            row.update({c + "_ci95": abs(rng.normal(0.8, 0.1)) for c in FEWSHOT})
            row.update({"probe/crop/r2": 0.3 + 0.2 * lam + rng.normal(0, 0.02),
                        "probe/color/r2": 0.2 + 0.3 * lam + rng.normal(0, 0.02),
                        "probe/flip/acc": 55 + rng.normal(0, 1)})
            row.update({"pretrain/loss_ssl": 4 + rng.normal(0, 0.1), "pretrain/images_per_s": 900 + rng.normal(0, 20)})
            if variant == "augself":
                row.update({"pretrain/loss_augself/crop": 0.05, "pretrain/loss_augself/color": 0.04})
            rows.append(row)
    return pd.DataFrame(rows)


def synthetic_curves(runs: pd.DataFrame, steps: int = 12, by_key: bool = False) -> dict[str, pd.DataFrame]:
    curves = {}
    for _, r in runs.iterrows():
        step = np.arange(1, steps + 1)
        frame = pd.DataFrame({"step": step, "epoch": step / 4,
                              "pretrain/loss_ssl": 5 * np.exp(-step / 6) + 0.05 * r["seed"]})
        total = frame["pretrain/loss_ssl"].copy()
        if r["variant"] == "augself":
            for aug in ("crop", "color"):
                frame[f"pretrain/loss_augself/{aug}"] = 0.3 * np.exp(-step / 4) + 0.01 * r["seed"]
                total += r["lambda"] * frame[f"pretrain/loss_augself/{aug}"]
        frame["pretrain/loss_total"] = total
        key = curve_key(r["method"], r["variant"], r["lambda"], r["seed"]) if by_key else r["run_id"]
        curves[key] = frame
    return curves


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    runs = synthetic_runs()
    paths = build_report(runs, synthetic_curves(runs), out, CONTEXT)
    return runs, out, paths


def _markdown_rows(text: str, first_cell: str) -> list[list[str]]:
    """Cells of the Markdown table rows starting with ``first_cell``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_writes_every_artefact(full_report):
    _, out, paths = full_report
    names = {p.name for p in paths}
    assert {"results.csv", "lambda.csv", "README.md", "index.html"} <= names
    for family in ("linear", "fewshot", "probe"):
        assert {f"fig_bars_{family}.png", f"fig_bars_{family}.svg", f"fig_lambda_{family}.png"} <= names
    assert {"fig_loss_curves.png", "fig_loss_curves.svg"} <= names
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
        assert p.parent == (out / "figures" if p.name.startswith("fig_") else out), p
    readme = (out / "README.md").read_text()
    for p in paths:
        if p.name.startswith("fig_"):
            assert f"(figures/{p.name})" in readme, p.name   # the Markdown's links resolve
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths if p.suffix == ".png")


def test_csv_equals_pandas_aggregation(full_report):
    runs, out, _ = full_report
    csv = pd.read_csv(out / "results.csv")
    keys = ["method", "variant", "lambda"]
    assert len(csv) == len(runs.groupby(keys)) == len(METHODS) * (1 + len(AUG_LAMBDAS))
    expected = runs.groupby(keys)
    for metric in LINEAR + FEWSHOT + PROBE + ["pretrain/loss_ssl", "fewshot/cfmnist/class/5way1shot_ci95"]:
        want = expected[metric].agg(["mean", "std", "count"])
        got = csv.set_index(keys)[[f"{metric}/mean", f"{metric}/std", f"{metric}/n"]]
        got = got.loc[want.index]
        np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=1e-12)
    assert (csv["n_runs"] == len(SEEDS)).all()
    # the AugSelf loss terms exist only for AugSelf runs: n counts them, the baseline rows are empty
    base = csv[csv["variant"] == "baseline"]
    assert (base["pretrain/loss_augself/crop/n"] == 0).all() and base["pretrain/loss_augself/crop/mean"].isna().all()


def test_lambda_csv_is_the_mean_against_lambda_with_the_baseline_at_zero(full_report):
    runs, out, _ = full_report
    tidy = pd.read_csv(out / "lambda.csv")
    metric = "linear/cfmnist/color/top1"
    for method in METHODS:
        curve = tidy[(tidy["method"] == method) & (tidy["metric"] == metric)].set_index("lambda")["value"]
        want = runs[runs["method"] == method].groupby("lambda")[metric].mean()
        assert sorted(curve.index) == sorted(want.index) and 0.0 in curve.index
        np.testing.assert_allclose(curve.loc[want.index].to_numpy(), want.to_numpy(), rtol=1e-12)


def test_markdown_difference_rows(full_report):
    runs, out, _ = full_report
    text = (out / "README.md").read_text()
    table = text.split("## Linear evaluation")[1].split("\n## ")[0]
    header = _markdown_rows(table, "method")[0]
    col = header.index("cfmnist/class")
    metric = "linear/cfmnist/class/top1"
    for method in METHODS:
        rows = _markdown_rows(table, f"**{method}**")
        labels = [r[1] for r in rows]
        assert labels == ["**Δ AugSelf − baseline**", "**Δ best λ (per column)**"], labels
        base = runs[(runs.method == method) & (runs.variant == "baseline")][metric]
        by_lam = {lam: runs[(runs.method == method) & (runs["lambda"] == lam)][metric] for lam in AUG_LAMBDAS}
        for row, lam in ((rows[0], 1.0), (rows[1], max(by_lam, key=lambda k: by_lam[k].mean()))):
            aug = by_lam[lam]
            delta = aug.mean() - base.mean()
            se = np.sqrt(aug.var() / len(aug) + base.var() / len(base))
            m = re.fullmatch(r"\*\*([+-]\d+\.\d\d) ± (\d+\.\d\d)( \(λ=([\d.]+)\))?\*\*", row[col])
            assert m, row[col]
            assert float(m[1]) == pytest.approx(delta, abs=0.006) and float(m[2]) == pytest.approx(se, abs=0.006)
            assert m[1][0] == ("+" if delta >= 0 else "-")
            if row is rows[1]:
                assert float(m[4]) == lam
        assert rows[0][2] == "**1 (default)**"
    # configuration rows: mean ± std with 3 seeds, few-shot with the episode CI
    simclr_base = [r for r in _markdown_rows(table, "simclr") if r[1] == "baseline"][0]
    b = runs[(runs.method == "simclr") & (runs.variant == "baseline")][metric]
    assert simclr_base[col] == f"{b.mean():.2f} ± {b.std():.2f}" and simclr_base[3] == "3"
    assert re.search(r"\d+\.\d\d ± \d+\.\d\d \(CI ±\d+\.\d\d\)", text.split("## Few-shot")[1])


def test_html_is_self_contained_with_tables(full_report):
    runs, out, _ = full_report
    page = (out / "index.html").read_text()
    assert page.count("<table>") >= 5  # linear, few-shot, probe, pretrain, runs (+ params)
    assert page.count('class="delta"') == 3 * 2 * len(METHODS)  # 3 downstream tables × 2 Δ rows × methods
    assert page.count('src="data:image/png;base64,') == 7
    assert not re.search(r'(src|href)="(?!data:|#)', page), "external resource or link in index.html"
    assert "<details>" in page and "augself.lambda" in page
    # nothing machine- or time-local: a rerun that reproduces the runs rewrites the page byte for byte
    assert "0123abc" not in page and "2025-01-01" not in page
    for run_id in runs["run_id"]:                   # run ids are in MLflow, not in the committed page
        assert run_id not in page
    assert "synthetic runs for the tests" in page


def test_single_seed_single_lambda_and_missing_metrics(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "fig_bars_fewshot.png").write_bytes(b"stale figure of a metric that no longer exists")
    (tmp_path / "fig_loss_curves.png").write_bytes(b"a figure where the report kept them before figures/")
    runs = synthetic_runs(methods=("simsiam",), lambdas=(0.5,), seeds=(0,))
    runs = runs.drop(columns=FEWSHOT + [c + "_ci95" for c in FEWSHOT])
    runs.loc[runs.variant == "augself", "probe/crop/r2"] = np.nan
    runs["probe/blur/r2"] = np.nan
    paths = build_report(runs, {}, tmp_path, {**CONTEXT, "notes": None})
    names = {p.name for p in paths}
    assert "fig_bars_fewshot.png" not in names and "fig_loss_curves.png" not in names
    assert not (tmp_path / "figures" / "fig_bars_fewshot.png").exists()
    assert not (tmp_path / "fig_loss_curves.png").exists()
    assert "fig_lambda_linear.png" in names
    text = (tmp_path / "README.md").read_text()
    assert "no fewshot metric" in text and "`probe/blur/r2` has no value" in text
    assert "no AugSelf run at the default λ = 1" in text and "no run has a curve" in text
    row = _markdown_rows(text.split("## Linear")[1], "**simsiam**")[0]
    assert row[1] == "**Δ AugSelf − baseline**" and row[2] == "**0.5**"
    assert "±" not in row[4]  # one seed: no spread
    csv = pd.read_csv(tmp_path / "results.csv")
    assert csv["linear/cfmnist/class/top1/std"].isna().all() and (csv["linear/cfmnist/class/top1/n"] == 1).all()
    probe = text.split("## Augmentation")[1]
    probe_cells = [r for r in _markdown_rows(probe, "simsiam") if r[1] == "augself"][0]
    assert probe_cells[_markdown_rows(probe, "method")[0].index("crop R²")] == "–"


def test_a_one_seed_row_shows_its_interval_and_no_decision(tmp_path):
    """The default report has one seed: its paired Δ must show the evaluation-noise interval and carry no
    decision anywhere (README, index.html, differences.csv, forest plot), even where that interval
    excludes 0, and say why (one run cannot tell a method effect from a seed)."""
    rng = np.random.default_rng(5)
    runs = synthetic_runs(methods=("simclr",), lambdas=(1.0,), seeds=(0,))
    labels = rng.integers(0, 5, 2000)
    items = {}
    for r in runs.itertuples():
        acc = 0.8 if r.variant == "augself" else 0.6                 # a 20-point one-seed Δ
        items[r.run_id] = {"linear/cfmnist/class/top1": 100.0 * (rng.random(2000) < acc)}
    build_report(runs, {}, tmp_path, CONTEXT, items=items)
    diff = pd.read_csv(tmp_path / "differences.csv")
    assert len(diff) == 1
    row = diff.iloc[0]
    assert row["low"] > 0 and row["n_seeds"] == 1                         # the interval excludes 0 ...
    assert pd.isna(row["distinguishable"]) and pd.isna(row["holm_p"])    # ... and decides nothing
    assert row["interval"].startswith("paired bootstrap over items (1 seed")
    text = (tmp_path / "README.md").read_text()
    table = text.split("## Paired differences")[1].split("\n## ")[0]
    cells = _markdown_rows(table, "simclr")[0]
    header = _markdown_rows(table, "method")[0]
    assert cells[header.index("decision")] == "none (1 seed)"
    assert cells[header.index("95 % interval")] == f"[{row['low']:+.2f}, {row['high']:+.2f}]"
    assert not any(line.startswith("| **simclr**") for line in table.splitlines())   # not highlighted
    assert "cannot tell a method effect from a seed" in table
    page = (tmp_path / "index.html").read_text()
    section = page.split("Paired differences to the baseline")[1]
    assert 'class="delta"' not in section.split("</table>")[0] and "none (1 seed)" in section


def test_curves_found_by_run_id_or_fallback_key():
    runs, _ = validate_runs(synthetic_runs(methods=("moco",), lambdas=(1.0,), seeds=(0, 1)))
    for by_key in (False, True):
        curves = synthetic_curves(runs, by_key=by_key)
        assert all(find_curve(curves, run) is not None for _, run in runs.iterrows())
        fig, notes = loss_figure(runs, curves, "losses")
        assert fig is not None and notes == []
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles == ["moco: SSL loss", "moco: AugSelf crop loss", "moco: AugSelf color loss", "moco: total loss"]
    curves = synthetic_curves(runs)
    missing = curves.pop(runs["run_id"][0])
    fig, notes = loss_figure(runs, curves, "losses")
    assert fig is not None and notes == [f"no loss curve for run {runs['run_id'][0]} (moco, baseline, λ=0, seed 0)"]
    fig, notes = loss_figure(runs, {"someone-else": missing}, "losses")
    assert fig is None and "no run has a curve" in notes[0]


def test_duplicate_runs_keep_latest(tmp_path):
    runs = synthetic_runs(methods=("simclr",), lambdas=(1.0,), seeds=(0, 1))
    rerun = runs.iloc[[0]].assign(run_id="rerun", start_time="2030-01-01T00:00:00Z")
    rerun["linear/cfmnist/class/top1"] = 99.0
    clean, notes = validate_runs(pd.concat([rerun, runs]))
    assert len(clean) == len(runs) and "rerun" in set(clean["run_id"])
    assert notes and runs["run_id"].iloc[0] in notes[0]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.drop(columns=["seed"]), "missing column"),
    (lambda r: r.assign(variant="augself2"), "unknown value"),
    (lambda r: r.assign(**{"lambda": 0.5}), "baseline run"),
    (lambda r: r.assign(group=[f"g{i % 2}" for i in range(len(r))]), "config groups"),
    (lambda r: r.assign(**{"linear/cfmnist/class/top1": "high"}), "must be numbers"),
    (lambda r: r.iloc[0:0], "no runs"),
])
def test_bad_input_is_refused_clearly(tmp_path, change, message):
    runs = change(synthetic_runs(methods=("simclr",), lambdas=(1.0,), seeds=(0,)))
    with pytest.raises(ValueError, match=message):
        build_report(runs, {}, tmp_path, CONTEXT)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
MARK_LOADED = """<script>window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
  document.body.setAttribute("data-tables", String(document.querySelectorAll("table").length));
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; CI installs it)")
def test_page_renders_in_headless_chromium(full_report, tmp_path):
    _, out, _ = full_report
    page = (out / "index.html").read_text()
    probe = tmp_path / "index.html"  # a copy with a load probe; the report itself carries no script
    probe.write_text(page.replace("</body>", MARK_LOADED + "</body>"))
    url = probe.as_uri()

    def chromium(*args: str) -> subprocess.CompletedProcess:
        profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=90)

    shot = tmp_path / "page.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1400,3000")
    assert shot.exists() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    dom = chromium("--dump-dom", "--virtual-time-budget=5000").stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the load handler did not run: " + dom[:500]
    assert loaded[1] == loaded[2] == "7"
    assert int(re.search(r'data-tables="(\d+)"', dom)[1]) >= 6
    assert "Δ AugSelf − baseline" in dom


# ------------------------------------------------- the report's numbers against the runs they came from

def _write_model_results(tmp_path, params, model, run_id, labels, pred, episode_acc):
    """What the linear/fewshot stages leave: metrics json, per-item npz, the MLflow run's metrics and
    artifacts (through the same stage helper)."""
    import json

    from pipeline.evaluate import tasks
    from pipeline.workflow import _log_to_model_run, _write_items

    metrics_dir = tmp_path / "metrics" / model
    metrics = {"linear/cfmnist/class/top1": 100.0 * float(np.mean(pred == labels)),
               "fewshot/cfmnist/class/5way1shot": 100.0 * float(np.mean(episode_acc))}
    metrics_dir.mkdir(parents=True, exist_ok=True)
    (metrics_dir / "linear.json").write_text(json.dumps({k: v for k, v in metrics.items() if k.startswith("linear")}))
    (metrics_dir / "fewshot.json").write_text(json.dumps({k: v for k, v in metrics.items() if k.startswith("fewshot")}))
    linear = _write_items(metrics_dir / tasks.get("linear").items, {"cfmnist/class/pred": pred, "cfmnist/class/label": labels})
    fewshot = _write_items(metrics_dir / tasks.get("fewshot").items, {"cfmnist/class/5way1shot/acc": episode_acc})
    _log_to_model_run(params, tmp_path / "models", model, metrics, artifact=linear)
    from pipeline.tracking import Tracker

    Tracker(params).log_artifact(run_id, fewshot)
    return metrics


def test_report_numbers_equal_the_mlflow_runs_and_files_they_were_built_from(tmp_path, monkeypatch):
    """Issue 15 item 3: every number of results.csv, differences.csv and the page recomputed here
    from the raw per-item arrays and metric values (not through the report code), from MLflow (three
    seeds) and from the files with MLflow off (the workspace's seed)."""
    import dataclasses
    import json

    from scipy import stats

    from pipeline.params import Params
    from pipeline.results import collect_items, collect_results
    from pipeline.tracking import RUN_ID_FILE, RUN_INFO_FILE, Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 500).astype(np.int32)
    raw, values = {}, {}
    for seed in (0, 1, 2):
        params = dataclasses.replace(Params(), seed=seed)
        for variant, acc in (("baseline", 0.60), ("augself", 0.66)):
            model = f"simclr-{variant}"
            tracker = Tracker(params)
            request = RunRequest.resolve(params, "simclr", variant)
            run_id = tracker.start_model_run(request)
            tracker.log_metrics(run_id, {"pretrain/loss_ssl": 1.0})
            (tmp_path / "models" / model).mkdir(parents=True, exist_ok=True)
            (tmp_path / "models" / model / RUN_ID_FILE).write_text(run_id)
            (tmp_path / "models" / model / RUN_INFO_FILE).write_text(json.dumps(
                {"method": "simclr", "variant": variant, "lambda": request.lam, "seed": seed,
                 "group": params.group_hash(), "run_id": run_id}))
            pred = np.where(rng.random(500) < acc, labels, (labels + 1) % 5).astype(np.int32)
            episodes = np.clip(rng.normal(acc, 0.1, 60), 0, 1)
            raw[variant, seed] = {"linear/cfmnist/class/top1": 100.0 * (pred == labels),
                                  "fewshot/cfmnist/class/5way1shot": 100.0 * episodes}
            values[variant, seed] = _write_model_results(tmp_path, params, model, run_id, labels, pred, episodes)

    def check(runs, items, seeds, out):
        build_report(runs, {}, out, {**CONTEXT, "params": {"augself.lambda": 1.0}}, items=items)
        csv = pd.read_csv(out / "results.csv").set_index("variant")
        diffs = pd.read_csv(out / "differences.csv").set_index("metric")
        page = (out / "index.html").read_text()
        for metric in ("linear/cfmnist/class/top1", "fewshot/cfmnist/class/5way1shot"):
            for variant in ("baseline", "augself"):
                vals = [values[variant, s][metric] for s in seeds]
                assert csv.loc[variant, f"{metric}/mean"] == pytest.approx(np.mean(vals), rel=1e-12)
                if len(seeds) > 1:
                    assert csv.loc[variant, f"{metric}/std"] == pytest.approx(np.std(vals, ddof=1), rel=1e-9)
            per_seed = [raw["augself", s][metric].mean() - raw["baseline", s][metric].mean() for s in seeds]
            row = diffs.loc[metric]
            assert row["delta"] == pytest.approx(np.mean(per_seed), abs=1e-9)
            assert row["low"] < row["delta"] < row["high"]
            if len(seeds) > 1:     # one method: Holm's p is the t-test's, the decision the t-interval's
                assert row["holm_p"] == pytest.approx(row["t_p"]) and row["interval"] == "t over seeds"
                assert bool(row["distinguishable"]) == (row["low"] > 0 or row["high"] < 0)
            else:                  # one seed: the interval stays, the decision is empty
                assert pd.isna(row["distinguishable"]) and pd.isna(row["holm_p"]) and pd.isna(row["t_p"])
            if len(seeds) > 1:
                half = stats.t.ppf(0.975, len(seeds) - 1) * np.std(per_seed, ddof=1) / np.sqrt(len(seeds))
                assert row["low"] == pytest.approx(np.mean(per_seed) - half, abs=1e-9)   # the t-interval
                assert row["high"] == pytest.approx(np.mean(per_seed) + half, abs=1e-9)
            else:   # one seed: the paired bootstrap's width is ≈ 2·1.96 standard errors of the mean Δ
                d = raw["augself", seeds[0]][metric] - raw["baseline", seeds[0]][metric]
                assert (row["high"] - row["low"]) / (2 * 1.96 * d.std() / np.sqrt(len(d))) == pytest.approx(1, abs=0.15)
            assert f"{row['delta']:+.2f}" in page and f"[{row['low']:+.2f}, {row['high']:+.2f}]" in page
        # The λ curve holds exactly the λ that ran (the tags / run.json), parsed as numbers.
        tidy = pd.read_csv(out / "lambda.csv")
        assert sorted(set(tidy["lambda"].astype(float))) == [0.0, 1.0]

    params = Params()
    runs, _, source = collect_results(params, tmp_path / "models", tmp_path / "metrics", source="mlflow")
    assert source.startswith("MLflow") and len(runs) == 6
    items = collect_items(params, runs, tmp_path / "models", tmp_path / "nowhere")   # artifacts only
    assert len(items) == 6
    check(runs, items, (0, 1, 2), tmp_path / "report-mlflow")

    off = dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, enabled=False))
    runs, _, source = collect_results(off, tmp_path / "models", tmp_path / "metrics")
    assert source.startswith("metrics files") and sorted(runs["seed"]) == [2, 2]
    check(runs, collect_items(off, runs, tmp_path / "models", tmp_path / "metrics"), (2,), tmp_path / "report-files")
