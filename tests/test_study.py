"""The study's plan, ledger and report (pipeline/study/), and the premise's probes."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.params import load_params
from pipeline.study import ledger as ledger_mod
from pipeline.study.plan import ModelKey, dvc_queue_command, experiments_for, load_study, parse_shard, shard_models
from pipeline.study.premise import knn_probe, ridge_probe, strength_overrides
from pipeline.study.report import build

BLOCKS = """
name: t
seeds: [0, 1]
blocks:
  - {name: core, methods: [simclr, moco], variants: [baseline, augself, cassle], lambda: [1.0], color_strength: [strong]}
  - {name: lambda, methods: [simclr], variants: [augself], lambda: [0.5, 1.0], color_strength: [strong]}
  - {name: strength, methods: [simclr], variants: [baseline, augself], lambda: [1.0], color_strength: [weak]}
"""


def study(tmp_path, text=BLOCKS):
    p = tmp_path / "study.yaml"
    p.write_text(text)
    return load_study(p)


def test_committed_study_plans_34_models_in_17_experiments_seed_0_of_every_block_first():
    s = load_study("study.yaml")
    models = s.models()
    assert len(models) == len(set(models)) == 34
    assert {k.variant for k in models if k.lam} == {"augself"}       # λ only for AugSelf
    exps = experiments_for(models)
    assert sorted(k for e in exps for k in e.models()) == models     # every model in exactly one experiment
    assert len(exps) == 17 and all(len(e.methods) == 1 for e in exps)   # one method per experiment
    order = s.queue_order(exps)
    assert [e.seed for e in order] == [0] * 9 + [1] * 4 + [2] * 4         # every block at seed 0 first
    assert [s.priority(e.models()) for e in order[:9]] == [0] * 4 + [2] * 3 + [3] * 2   # core, λ, strength
    assert order[0].name == "study-strong-lam1-s0-ba-au-ca-simclr"


def test_models_are_deduplicated_and_baselines_ride_with_the_default_lambda(tmp_path):
    s = study(tmp_path)
    models = s.models()
    # core 2 methods x 3 variants x 2 seeds, + simclr augself λ 0.5 x 2 seeds, + weak simclr b/a x 2 seeds
    assert len(models) == 12 + 2 + 4
    exps = experiments_for(models)
    assert sorted(k for e in exps for k in e.models()) == sorted(models)
    lam_half = [e for e in exps if e.lam == 0.5]
    assert all(e.variants == ("augself",) and e.methods == ("simclr",) for e in lam_half)
    core = [e for e in exps if e.strength == "strong" and e.lam == 1.0]
    assert {(e.methods, e.variants) for e in core} == {(("simclr",), ("baseline", "augself", "cassle")),
                                                       (("moco",), ("baseline", "augself", "cassle"))}
    assert ModelKey("moco", "augself", 1.0, "strong", 1).baseline == ModelKey("moco", "baseline", 0.0, "strong", 1)


def test_a_block_may_run_fewer_seeds_than_the_study(tmp_path):
    s = study(tmp_path, BLOCKS.replace("color_strength: [weak]}", "color_strength: [weak], seeds: [0]}"))
    weak = [k for k in s.models() if k.strength == "weak"]
    assert sorted((k.variant, k.seed) for k in weak) == [("augself", 0), ("baseline", 0)]
    assert s.block_of(ModelKey("simclr", "baseline", 0.0, "weak", 0)) == ["strength"]
    with pytest.raises(ConfigError, match=r"blocks\[2\]\.seeds"):
        study(tmp_path, BLOCKS.replace("color_strength: [weak]}", "color_strength: [weak], seeds: []}"))
    with pytest.raises(ConfigError, match=r"unknown keys \['seed'\]"):
        study(tmp_path, BLOCKS.replace("color_strength: [weak]}", "color_strength: [weak], seed: [0]}"))


def test_missing_models_split_into_matrix_shaped_experiments(tmp_path):
    s = study(tmp_path)
    missing = [k for k in s.models() if not (k.method == "moco" and k.variant == "cassle")]
    exps = experiments_for(missing)
    assert sorted(k for e in exps for k in e.models()) == sorted(missing)
    shapes = {(e.methods, e.variants) for e in exps if e.strength == "strong" and e.lam == 1.0}
    assert shapes == {(("simclr",), ("baseline", "augself", "cassle")), (("moco",), ("baseline", "augself"))}


def test_queue_command_is_what_dvc_parses():
    e = experiments_for([ModelKey("simclr", "augself", 0.5, "weak", 3)])[0]
    cmd = dvc_queue_command(e, {"ssl.epochs": 5})
    assert cmd[:4] == ["dvc", "exp", "run", "--queue"]
    sets = dict(a.split("=", 1) for a in cmd[cmd.index("-S") :: 1] if "=" in a)
    assert sets == {"ssl.epochs": "5", "seed": "3", "ssl.methods": "[simclr]", "variants": "[augself]",
                    "augment.color_strength": "weak", "augself.lambda": "0.5"}
    # the overrides make valid params
    load_params("params.yaml", e.overrides({"ssl.epochs": 5}))


@pytest.mark.parametrize("text, match", [
    (BLOCKS.replace("cassle]", "simclr]"), r"variants"),
    (BLOCKS.replace("lambda: [0.5, 1.0]", "lambda: [0, 1.0]"), r"lambda: 0 is the baseline"),
    (BLOCKS.replace("color_strength: [weak]", "color_strength: [huge]"), r"color_strength"),
    (BLOCKS.replace("seeds: [0, 1]", "seeds: []"), r"seeds"),
    (BLOCKS + "extra: 1\n", r"unknown keys"),
])
def test_bad_study_files_are_refused_naming_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        study(tmp_path, text)


def _write_model(ledger, key, metrics, items):
    ledger.mkdir(parents=True, exist_ok=True)
    rec = {"key": {"method": key.method, "variant": key.variant, "lambda": key.lam, "strength": key.strength,
                   "seed": key.seed}, "run_id": key.name, "group": "g", "commit": "c", "metrics": metrics}
    (ledger / f"{key.name}.json").write_text(json.dumps(rec))
    np.savez_compressed(ledger / f"{key.name}.npz", **items)


def test_report_pairs_each_variant_with_its_own_seeds_baseline(tmp_path):
    """The study report's Δ is the mean over seeds of the paired per-image difference, computed here
    directly from the ledger's arrays (not through the report code)."""
    rng = np.random.default_rng(0)
    ledger = tmp_path / "runs"
    col = "linear/cfmnist/hue/top1"
    per_seed = []
    for seed in (0, 1, 2):
        base = (rng.random(400) < 0.5).astype(np.float32) * 100
        aug = np.where(rng.random(400) < 0.2, 100.0, base).astype(np.float32)     # AugSelf fixes some errors
        per_seed.append(aug.mean() - base.mean())
        for key, arr in ((ModelKey("simclr", "baseline", 0.0, "strong", seed), base),
                         (ModelKey("simclr", "augself", 1.0, "strong", seed), aug)):
            _write_model(ledger, key, {col: float(arr.mean()), "pretrain/loss_ssl": 1.0}, {col: arr})
    s = study(tmp_path, BLOCKS.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    readme = build(s, tmp_path / "out", ledger)
    import pandas as pd

    diff = pd.read_csv(tmp_path / "out" / "differences.csv")
    row = diff[(diff.metric == col) & (diff.variant == "augself")].iloc[0]
    assert str(row["seeds"]).split() == ["0", "1", "2"]
    assert row["delta"] == pytest.approx(np.mean(per_seed), abs=1e-3)
    assert row["low"] > 0 and row["distinguishable"]
    text = readme.read_text()
    assert f"Models finished: **6 of {len(s.models())}**" in text and "simclr-cassle-strong-seed0" in text


def test_ridge_and_knn_probes_read_what_the_features_hold():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 600)
    centres = rng.normal(size=(4, 8)) * 3
    x = centres[y] + rng.normal(size=(600, 8))
    noise = rng.normal(size=(600, 8))
    assert ridge_probe(x[:400], y[:400], x[400:], y[400:], seed=0)["top1"] > 90
    assert ridge_probe(noise[:400], y[:400], noise[400:], y[400:], seed=0)["top1"] < 40
    assert knn_probe(x[:400], y[:400], x[400:], y[400:]) > 90


def test_strength_overrides_scale_the_jitter_and_grayscale():
    p = load_params("params.yaml", {"augment.color_strength": "default"})
    none = strength_overrides(p, "none")
    assert none["augment.jitter_p"] == 0.0 and none["augment.grayscale_p"] == 0.0
    # every strength is a valid configuration (no colour: no colour target, no colour CASSLE block)
    for strength in ("none", "weak", "default", "strong"):
        load_params("params.yaml", {"augment.color_strength": "default", **strength_overrides(p, strength)})
    strong = strength_overrides(p, "strong")
    assert strong["augment.brightness"] == pytest.approx(2 * p.augment.brightness)
    assert strong["augment.hue"] == pytest.approx(min(0.5, 2 * p.augment.hue))
    assert strong["augment.grayscale_p"] == pytest.approx(2 * p.augment.grayscale_p)


def test_a_model_is_exported_only_once_its_probe_has_logged_too(tmp_path, monkeypatch):
    """The probe stage can finish after linear and few-shot: a model exported before it would enter the
    committed ledger without its probe, and the ledger is never rewritten."""
    import pandas as pd

    import pipeline.results as results

    s = load_study("study.yaml")
    key = ModelKey("moco", "baseline", 0.0, "strong", 0)
    p = ledger_mod.params_of(key, s)
    need = ledger_mod.expected_metrics(p)
    probes = [c for c in need if c.startswith("probe/")]
    assert probes == ["probe/crop/r2", "probe/flip/acc", "probe/color/r2"]
    row = {"run_id": "r1", "method": "moco", "variant": "baseline", "lambda": 0.0, "seed": 0,
           **{c: 50.0 for c in need if c not in probes}}
    store = {"runs": pd.DataFrame([row])}
    monkeypatch.setattr(results, "runs_from_mlflow", lambda params: (store["runs"], {}))
    scores = {c: np.zeros(3) for c in need if c.startswith(("linear/", "fewshot/"))}
    monkeypatch.setattr(results, "collect_items", lambda params, runs: {"r1": scores})
    monkeypatch.setattr(ledger_mod, "items_from_experiment_refs", lambda key, group: {})
    ledger = tmp_path / "runs"
    assert ledger_mod.export_finished(s, [key], ledger) == []            # linear and few-shot only: waits
    store["runs"] = pd.DataFrame([{**row, **{c: 0.5 for c in probes}, "time/linear_s": 12.5}])
    assert ledger_mod.export_finished(s, [key], ledger) == [key.name]
    exported = json.loads((ledger / f"{key.name}.json").read_text())["metrics"]
    assert exported["probe/flip/acc"] == 0.5 and exported["time/linear_s"] == 12.5    # the cost table reads it
    # finished, but no per-item scores anywhere: not exported (the paired statistics need them)
    other = ModelKey("moco", "augself", 1.0, "strong", 0)
    store["runs"] = pd.DataFrame([{**row, **{c: 0.5 for c in probes}, "variant": "augself", "lambda": 1.0}])
    scores.clear()
    assert ledger_mod.export_finished(s, [other], ledger) == []


def test_dvc_queue_status_is_read_so_a_rerun_never_queues_a_running_experiment_twice():
    from pipeline.study.plan import parse_queue_status

    text = """Task     Name                                  Created    Status
6a7a742  study-strong-lam1-s0-ba-au-moco       03:51 AM   Running
775e241  study-strong-lam0.25-s0-au-simclr     03:51 AM   Queued
1ed8921  study-weak-lam1-s0-ba-au-simclr       03:51 AM   Success
e6e5ccc  study-strong-lam1-s1-ba-au-ca-simclr  03:52 AM   Failed

Worker status: 2 active, 0 idle
"""
    assert parse_queue_status(text) == ({"study-strong-lam1-s0-ba-au-moco": "Running",
                                         "study-strong-lam0.25-s0-au-simclr": "Queued"}, 2)
    assert parse_queue_status("No experiment tasks in the queue.\n") == ({}, 0)
    between_tasks = text.replace("2 active, 0 idle", "1 active, 1 idle")      # a worker between two tasks lives
    assert parse_queue_status(between_tasks)[1] == 2


def test_a_worker_too_busy_to_answer_dvc_queue_status_still_counts_as_alive(monkeypatch, tmp_path):
    """`dvc queue status` counts the workers that answer celery's 1-s broadcast; a busy one can miss it (session
    12: the runner started a duplicate worker, three experiments on two cores).  The process table counts it, so
    no worker is added and nothing of the live workspaces is salvaged, deleted or killed."""
    import hashlib
    import subprocess
    import sys
    from types import SimpleNamespace

    import pipeline.study.queue as queue

    monkeypatch.chdir(tmp_path)
    workspace = Path(queue.EXPERIMENT_WORKSPACES) / "tmplive"
    workspace.mkdir(parents=True)
    celery = str((Path(queue.EXPERIMENT_WORKSPACES) / "celery").resolve())
    node = f"dvc-exp-{hashlib.sha256(celery.encode()).hexdigest()[:6]}-2@localhost"
    other = "dvc-exp-000000-1@localhost"                                     # another repository's worker
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "exp", "queue-worker", n])
             for n in (node, other)]
    try:
        calls = []

        def run(cmd, **kw):
            calls.append(cmd)
            return SimpleNamespace(stdout="Task  Name  Created  Status\n1  a  01:00 AM  Running\n"
                                          "2  b  01:00 AM  Queued\n\nWorker status: 0 active, 0 idle\n")

        monkeypatch.setattr(queue.subprocess, "run", run)
        assert queue.worker_processes() == [procs[0].pid]
        assert queue.queue_status()[1] == 1
        queue.keep_workers(1)
        queue.clear_stale_tasks()
        assert [c[:3] for c in calls if c[:3] != ["dvc", "queue", "status"]] == []
        assert workspace.exists()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_report_says_what_the_numbers_show_whichever_way_they_fall(tmp_path):
    """SimCLR's and BYOL's AugSelf are made better on hue and MoCo's worse (3 seeds each): the findings
    count them by the design's test (t over seeds, Holm), the headline table bolds them; SimSiam has one
    seed only, and however large its Δ it gets its evaluation-noise interval and no decision; the λ
    figure disappears when the λ slice leaves the ledger."""
    rng = np.random.default_rng(1)
    ledger = tmp_path / "runs"
    col = "linear/cfmnist/hue/top1"
    effect = {("simclr", 1.0): 0.3, ("simclr", 0.5): 0.0, ("moco", 1.0): -0.3, ("byol", 1.0): 0.3,
              ("simsiam", 1.0): 0.3}
    for seed in (0, 1, 2):
        for method in ("simclr", "moco", "byol", "simsiam"):
            if method == "simsiam" and seed > 0:
                continue
            base = (rng.random(500) < 0.5).astype(np.float32) * 100
            _write_model(ledger, ModelKey(method, "baseline", 0.0, "strong", seed),
                         {col: float(base.mean())}, {col: base})
            for (m, lam), e in effect.items():
                if m != method:
                    continue
                flip = rng.random(500) < abs(e)
                aug = np.where(flip, 100.0 if e > 0 else 0.0, base).astype(np.float32)
                _write_model(ledger, ModelKey(method, "augself", lam, "strong", seed),
                             {col: float(aug.mean())}, {col: aug})
    # the report reads the models its study plans (the ledger is shared by every study): all four, 3 seeds
    s = study(tmp_path, BLOCKS.replace("seeds: [0, 1]", "seeds: [0, 1, 2]").replace(
        "methods: [simclr, moco], variants: [baseline, augself, cassle]",
        "methods: [simclr, simsiam, moco, byol], variants: [baseline, augself, cassle]"))
    text = build(s, tmp_path / "out", ledger).read_text()
    assert ("**hue, 24-way linear**, AugSelf λ = 1 − baseline, of 4 method(s): higher in 2, lower in 1, "
            "not distinguishable in 0, no decision (1 seed) in 1") in text
    table = [line for line in text.splitlines() if line.startswith(("| simclr | augself", "| moco | augself"))]
    assert len(table) == 2 and all("**" in line for line in table)
    one = [line for line in text.splitlines() if line.startswith("| simsiam | augself")]
    assert len(one) == 1 and "**" not in one[0] and "(1 seed)" in one[0]
    primary = text.split("## The primary test")[1].split("\n## ")[0]
    assert "| simsiam | 0 |" in primary and "none (1 seed)" in primary and "**higher**" in primary
    import pandas as pd

    diff = pd.read_csv(tmp_path / "out" / "differences.csv")
    ss = diff[(diff.method == "simsiam") & (diff.metric == col)].iloc[0]
    assert ss["low"] > 0 and pd.isna(ss["distinguishable"]) and pd.isna(ss["holm_p"])   # excludes 0, no decision
    assert "* λ (SimCLR, strong), hue, 24-way linear: λ = 0.5:" in text
    for fig in ("forest.png", "lambda.png"):
        assert (tmp_path / "out" / fig).stat().st_size > 10_000
    for f in ledger.glob("simclr-augself-lam0.5-*"):
        f.unlink()
    text = build(s, tmp_path / "out", ledger).read_text()
    assert not (tmp_path / "out" / "lambda.png").exists() and "lambda.png" not in text


def test_the_decision_is_the_t_test_over_seeds_with_holm_not_the_bootstrap(tmp_path):
    """Two seeds that agree closely but not exactly: the hierarchical bootstrap (which can redraw only
    those two seeds) excludes 0, the t-test over 2 seeds (1 degree of freedom) does not; the decision
    must follow the t-test, and Holm's p must be the step-down adjustment over the methods."""
    from scipy import stats

    from pipeline.stats import holm

    rng = np.random.default_rng(3)
    ledger = tmp_path / "runs"
    col = "linear/cfmnist/hue/top1"
    per_seed = {}
    for method, flips in (("simclr", (0.02, 0.06)), ("moco", (0.03, 0.05))):
        for seed, f in zip((0, 1), flips):
            base = (rng.random(4000) < 0.5).astype(np.float32) * 100
            aug = np.where(rng.random(4000) < f, 100.0, base).astype(np.float32)
            per_seed.setdefault(method, []).append(float(aug.mean() - base.mean()))
            _write_model(ledger, ModelKey(method, "baseline", 0.0, "strong", seed), {col: 1.0}, {col: base})
            _write_model(ledger, ModelKey(method, "augself", 1.0, "strong", seed), {col: 1.0}, {col: aug})
    build(study(tmp_path), tmp_path / "out", ledger)
    import pandas as pd

    diff = pd.read_csv(tmp_path / "out" / "differences.csv").set_index("method")
    ps = {m: stats.ttest_1samp(d, 0.0).pvalue for m, d in per_seed.items()}
    adjusted = dict(zip(ps, holm(list(ps.values()))))
    for method in ("simclr", "moco"):
        r = diff.loc[method]
        assert r["boot_low"] > 0                                   # the bootstrap alone would call it
        assert r["t_p"] == pytest.approx(ps[method], abs=1e-4)      # the CSV has 4 decimals
        assert r["holm_p"] == pytest.approx(adjusted[method], abs=1e-4)
        assert bool(r["distinguishable"]) == (adjusted[method] < 0.05)
        assert r["low"] < 0 < r["high"] and not bool(r["distinguishable"])   # t-interval, 1 df: no decision


def test_per_item_scores_are_read_from_the_dvc_experiment_commit_of_the_same_model(tmp_path):
    """When MLflow's artifacts are gone, the experiment commit under refs/exps/ holds the npz files; the
    model is found by what defines it (run.json: method, variant, λ, seed, config group)."""
    repo = tmp_path / "repo"
    (repo / "models" / "moco-baseline").mkdir(parents=True)
    (repo / "metrics" / "moco-baseline").mkdir(parents=True)
    info = {"group": "g1", "lambda": 0.0, "method": "moco", "seed": 1, "variant": "baseline"}
    (repo / "models" / "moco-baseline" / "run.json").write_text(json.dumps(info))
    pred, label = np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])
    np.savez(repo / "metrics" / "moco-baseline" / "linear_predictions.npz",
             **{"cfmnist/hue/pred": pred, "cfmnist/hue/label": label})
    np.savez(repo / "metrics" / "moco-baseline" / "fewshot_episodes.npz", **{"cfmnist/hue/5way5shot/acc": [0.4, 0.6]})
    commit_as_experiment_ref(repo, "refs/exps/ab/cdef/study-x")

    items = ledger_mod.items_from_experiment_refs(ModelKey("moco", "baseline", 0.0, "strong", 1), "g1", repo)
    assert items["linear/cfmnist/hue/top1"].tolist() == [100.0, 0.0, 100.0, 0.0]
    assert items["fewshot/cfmnist/hue/5way5shot"].tolist() == pytest.approx([40.0, 60.0])
    assert ledger_mod.items_from_experiment_refs(ModelKey("moco", "baseline", 0.0, "strong", 2), "g1", repo) == {}
    assert ledger_mod.items_from_experiment_refs(ModelKey("moco", "baseline", 0.0, "strong", 1), "g2", repo) == {}


def test_the_study_runner_tops_the_queue_back_up_to_its_workers(monkeypatch):
    """A DVC queue worker can exit while tasks still wait (seen in session 5: one of two workers left
    after a re-queue); `dvc queue start -j N` brings the pool back to N, and nothing is started when
    nothing waits or the pool is full."""
    import pipeline.study.queue as queue

    calls = []
    monkeypatch.setattr(queue.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    state = {"status": ({"a": "Running", "b": "Queued"}, 1)}
    monkeypatch.setattr(queue, "queue_status", lambda: state["status"])
    queue.keep_workers(2)
    assert calls == [["dvc", "queue", "start", "-j", "2"]]
    for status in (({"a": "Running", "b": "Queued"}, 2), ({"a": "Running"}, 1)):
        state["status"] = status
        queue.keep_workers(2)
    assert len(calls) == 1


def test_the_study_runner_clears_running_tasks_that_no_worker_runs(monkeypatch, tmp_path):
    """After the machine stopped, `dvc queue status` still listed two tasks as Running with 0 workers; the
    rerun skipped them as running and would have waited on them. They are killed (cleared) only when no
    worker is alive: with a live worker a Running task is real and is left alone."""
    import pipeline.study.queue as queue

    monkeypatch.chdir(tmp_path)          # it salvages ./.dvc/tmp/exps first (tests/test_checkpoint_pool.py)
    calls = []
    monkeypatch.setattr(queue.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    state = {"status": ({"a": "Running", "b": "Queued", "c": "Running"}, 1)}
    monkeypatch.setattr(queue, "queue_status", lambda: state["status"])
    queue.clear_stale_tasks()
    assert calls == []
    state["status"] = ({"a": "Running", "b": "Queued", "c": "Running"}, 0)
    queue.clear_stale_tasks()
    assert calls == [["dvc", "queue", "kill", "-f", "a", "c"]]


def test_the_cost_section_reads_the_benchmark_of_the_study_configuration(tmp_path):
    from pipeline.study.report import bench_cost

    path = tmp_path / "b.json"
    path.write_text(json.dumps({"device_name": "cpu", "threads": 2, "clock": "wall", "methods": [
        {"method": "moco", "images_per_s_lambda0": 500.0, "images_per_s_lambda1": 480.0,
         "augself_overhead_pct": 4.2, "augself_overhead_pct_iqr": [1.0, 7.5]}]}))
    lines = bench_cost({"augself": path, "cassle": tmp_path / "missing.json"})
    assert "| moco | augself | 500 | 480 | +4.2 % [+1.0, +7.5] | cpu, 2 threads, wall clock |" in lines
    assert bench_cost({"augself": tmp_path / "missing.json"}) == []


def test_each_evaluation_step_logs_its_seconds_and_the_cost_table_reads_them_from_the_ledger(tmp_path, monkeypatch):
    """Issue 23 item 5: an evaluation step logs ``time/<step>_s`` into the model's run (not into the
    committed metric files); the ledger copies it; the study's cost table shows per variant the
    pretraining images/s and each step's seconds, and "not recorded" where a model predates them."""
    import pandas as pd

    import pipeline.workflow as wf
    from pipeline.study.report import cost_table, cost_per_variant

    logged = []

    class Recorder:
        def __init__(self, params):
            pass

        def log_metrics(self, run_id, metrics, **kw):
            logged.append((run_id, metrics))

    (tmp_path / "models" / "simclr-baseline").mkdir(parents=True)
    (tmp_path / "models" / "simclr-baseline" / wf.RUN_ID_FILE).write_text("run-7")
    monkeypatch.setattr(wf, "Tracker", Recorder)
    monkeypatch.setattr(wf, "run_task", lambda task, params, model, **dirs: {f"{task}/x/y/top1": 50.0})
    out = wf.run_evaluation_step("linear", None, "simclr-baseline", tmp_path / "models", tmp_path / "f", tmp_path / "m")
    assert out == {"linear/x/y/top1": 50.0}
    assert len(logged) == 1 and logged[0][0] == "run-7" and list(logged[0][1]) == ["time/linear_s"]
    assert 0 <= logged[0][1]["time/linear_s"] < 5

    ledger = tmp_path / "runs"
    col = "linear/cfmnist/hue/top1"
    speed = {("baseline", 0): 200.0, ("baseline", 1): 300.0, ("augself", 0): 150.0}
    for (variant, seed), ips in speed.items():
        m = {col: 50.0, "pretrain/images_per_s": ips, "pretrain/wall_time_s": 10000 / ips, "pretrain/monitor_s": 3.0}
        if seed == 1:                                   # only the newer model recorded its evaluation
            m.update({"time/features_s": 4.0, "time/linear_s": 30.0, "time/fewshot_s": 12.0, "time/probe_s": 6.0})
        lam = 1.0 if variant == "augself" else 0.0
        _write_model(ledger, ModelKey("moco", variant, lam, "strong", seed), m, {col: np.zeros(4, np.float32)})
    from pipeline.study.ledger import read_ledger

    runs, _ = read_ledger(ledger)
    table = cost_per_variant(runs).set_index("variant")
    assert table.loc["baseline", "pretrain/images_per_s/mean"] == pytest.approx(250.0)
    assert table.loc["baseline", "time/linear_s/mean"] == pytest.approx(30.0)
    assert table.loc["baseline", "time/linear_s/n"] == 1 and table.loc["augself", "time/linear_s/n"] == 0
    text = "\n".join(cost_table(runs))
    assert "| strong | moco | baseline | 0 | 2 | 250 [200–300] | 42 [33–50] | 3 [3–3] | 4 | 30 | 12 | 6 |" in text
    assert "| strong | moco | augself | 1 | 1 | 150 | 67 | 3 | not recorded | not recorded | not recorded | not recorded |" in text
    assert "no model in this ledger recorded them" not in text
    # evaluation 4 + 30 + 12 + 6 = 52 s against 10000 / 300 s of pretraining: 61 % (the model without them left out)
    assert "over the 1 models that recorded every step: 0.01 worker-hours, 52 s per model on average, 61 %" in text
    old = runs.drop(columns=[c for c in runs if c.startswith("time/")])
    assert "no model in this ledger recorded them" in "\n".join(cost_table(old))


def test_machine_shards_split_the_plan_into_whole_experiments_that_do_not_move_as_models_finish():
    """`--shard i/n`: every planned model on exactly one machine, a whole experiment per machine, and
    the same split whatever is already done (so no model is trained by two machines)."""
    models = load_study("study.yaml").models()
    for n in (1, 2, 3):
        shards = [shard_models(models, (i, n)) for i in range(1, n + 1)]
        assert sorted(k for s in shards for k in s) == sorted(models), n           # a partition
        assert all(shards), f"{n} machines: one gets nothing"
        for s in shards:                                                            # whole experiments
            names = {k.name for k in s}
            for e in experiments_for(s):
                assert {k.name for k in e.models()} <= names
    half = shard_models(models, (1, 2))
    assert shard_models(models, (1, 2)) == half                                     # deterministic
    with pytest.raises(ConfigError, match=r"--shard: '3/2' needs 1 ≤ i ≤ n"):
        parse_shard("3/2")
    with pytest.raises(ConfigError, match=r"--shard: 'a' is not 'i/n'"):
        parse_shard("a")
    assert parse_shard("2/3") == (2, 3)


def test_every_ledger_model_keeps_its_name_and_config_group_so_it_stays_done():
    """Issue 24's `none` strength and per-block schedules must not move any existing model: each record of the
    committed ledger is planned by study.yaml under its file's name, and params.yaml with the study's overrides
    still gives the config group the model was trained and exported under (the group hashes every augment.*
    and ssl.* value, so a changed default or a new key would show here)."""
    s = load_study("study.yaml")
    planned = {k.name: k for k in s.models()}
    records = sorted(ledger_mod.LEDGER.glob("*.json"))
    assert len(records) >= 34
    for f in records:
        r = json.loads(f.read_text())
        k = r["key"]
        if set(k) - {"method", "variant", "lambda", "strength", "seed"}:
            continue                                   # a model of a later study (with its own schedule)
        key = ModelKey(k["method"], k["variant"], float(k["lambda"]), k["strength"], int(k["seed"]))
        if key.name not in planned:
            continue                                   # the premise study's own models (e.g. colour `none`)
        assert key.name == f.stem
        assert ledger_mod.params_of(key, s).group_hash() == r["group"], f.stem
    assert all(name in ledger_mod.done() for name in planned)


PREMISE = """
name: p
seeds: [0]
report: premise
blocks:
  - {name: premise, methods: [simclr, moco], variants: [baseline], lambda: [1.0], color_strength: [none, strong]}
  - {name: schedule, methods: [simclr, moco], variants: [baseline], lambda: [1.0], color_strength: [strong],
     epochs: 20, minutes_per_model: 25}
"""


def test_a_block_schedule_is_in_the_key_the_name_and_the_experiment(tmp_path):
    s = study(tmp_path, PREMISE)
    models = s.models()
    assert [k.name for k in models if k.method == "simclr"] == [
        "simclr-baseline-none-seed0", "simclr-baseline-strong-seed0", "simclr-baseline-strong-ep20-seed0"]
    long = ModelKey("simclr", "baseline", 0.0, "strong", 0, 20)
    assert s.block_of(long) == ["schedule"] and s.minutes(long) == 25 and s.minutes(models[0]) == s.minutes_per_model
    exps = experiments_for(models)
    assert sorted(k for e in exps for k in e.models()) == sorted(models)
    arm = [e for e in exps if e.epochs]
    assert [e.name for e in arm] == ["study-strong-ep20-lam1-s0-ba-simclr", "study-strong-ep20-lam1-s0-ba-moco"]
    assert "ssl.epochs=20" in dvc_queue_command(arm[0])
    short = [e for e in exps if e.strength == "strong" and not e.epochs]
    assert all("ssl.epochs" not in e.overrides() for e in short)
    p = ledger_mod.params_of(long, s)
    assert p.ssl.epochs == 20 and p.group_hash() != ledger_mod.params_of(ModelKey("simclr", "baseline", 0.0, "strong", 0), s).group_hash()
    none = ledger_mod.params_of(models[0], s)
    assert none.augment.color_strength == "none" and none.augment.jitter_strengths() == (0.0, 0.0, 0.0, 0.0)
    # colour is off at `none`: its probe has nothing to recover (it logs NaN) and is not waited for
    assert "probe/color/r2" not in ledger_mod.expected_metrics(none)
    assert s.report == "premise" and s.report_dir == "reports/study"
    for bad, key in (("epochs: 20,", "epochs: 0,"), ("epochs: 20,", "epochs: 2.5,"), ("epochs: 20,", "lr: -1,"),
                     ("minutes_per_model: 25", "minutes_per_model: 0")):
        with pytest.raises(ConfigError, match=r"blocks\[1\]\.(epochs|lr|minutes_per_model)"):
            study(tmp_path, PREMISE.replace(bad, key))
    with pytest.raises(ConfigError, match="report"):
        study(tmp_path, PREMISE.replace("report: premise", "report: nonsense"))
    with pytest.raises(ConfigError, match="augment.color_strength is 'none'"):
        load_params("params.yaml", {"augment.color_strength": "none", "variants": ["baseline", "augself"]})


def test_committed_premise_study_reuses_the_first_studys_strong_baselines():
    s = load_study("study-premise.yaml")
    models = s.models()
    assert len(models) == 24 and {k.variant for k in models} == {"baseline"} and {k.seed for k in models} == {0, 3}
    assert {k.strength for k in models} == {"none", "default", "strong"}
    assert {k.epochs for k in models} == {0, 10, 15, 20}
    # the premise at the confirmatory schedule (seed 3): its strong baselines are the confirmatory study's own
    confirm = {k.name for k in load_study("study-confirm.yaml").models()}
    at = [k for k in models if k.seed == 3]
    assert len(at) == 8 and {k.name for k in at if k.strength == "strong"} <= confirm
    done = ledger_mod.done()
    for method in ("simclr", "simsiam", "moco", "byol"):
        assert f"{method}-baseline-strong-seed0" in done           # the first study's, same key: not retrained
        assert f"{method}-baseline-strong-ep20-seed0" in {k.name for k in models}
    assert s.report == "premise" and s.report_dir == "reports/study-premise"


def test_export_records_the_schedule_and_the_knn_curve(tmp_path, monkeypatch):
    """A model of a block with its own schedule is exported under its own name with ``epochs`` in its key
    and its kNN monitor curve (from the run's MLflow metric history), which the premise report plots; a
    `none` model is exported without a colour probe (its ω is constant: the probe logs NaN)."""
    import pandas as pd

    import pipeline.results as results

    s = study(tmp_path, PREMISE)
    key = ModelKey("moco", "baseline", 0.0, "strong", 0, 20)
    need = ledger_mod.expected_metrics(ledger_mod.params_of(key, s))
    row = {"run_id": "r1", "method": "moco", "variant": "baseline", "lambda": 0.0, "seed": 0,
           "pretrain/steps": 780.0, "pretrain/epochs": 20.0, **{c: 50.0 for c in need}}
    curve = pd.DataFrame({"step": [5, 39, 78, 780], "pretrain/loss_total": [1.0, 0.9, 0.8, 0.5],
                          "monitor/class/knn_top1": [np.nan, 30.0, 35.0, 60.0]})
    monkeypatch.setattr(results, "runs_from_mlflow", lambda params: (pd.DataFrame([row]), {"r1": curve}))
    monkeypatch.setattr(results, "collect_items",
                        lambda params, runs: {"r1": {c: np.zeros(3) for c in need if c.startswith(("linear/", "fewshot/"))}})
    ledger = tmp_path / "runs"
    assert ledger_mod.export_finished(s, [key], ledger) == ["moco-baseline-strong-ep20-seed0"]
    rec = json.loads((ledger / "moco-baseline-strong-ep20-seed0.json").read_text())
    assert rec["key"]["epochs"] == 20 and "lr" not in rec["key"]
    assert [(r["epoch"], r["monitor/class/knn_top1"]) for r in rec["monitor"]] == [(1.0, 30.0), (2.0, 35.0), (20.0, 60.0)]
    runs, _ = ledger_mod.read_ledger(ledger)
    assert runs["epochs"].tolist() == [20]
    none = ModelKey("moco", "baseline", 0.0, "none", 0)
    need_none = ledger_mod.expected_metrics(ledger_mod.params_of(none, s))
    row_none = {**row, **{c: 50.0 for c in need_none}, "probe/color/r2": np.nan}
    monkeypatch.setattr(results, "runs_from_mlflow", lambda params: (pd.DataFrame([row_none]), {}))
    assert ledger_mod.export_finished(s, [none], ledger) == ["moco-baseline-none-seed0"]


def _premise_record(ledger, key, metrics, curve=None):
    ledger.mkdir(parents=True, exist_ok=True)
    k = {"method": key.method, "variant": key.variant, "lambda": key.lam, "strength": key.strength, "seed": key.seed,
         **({"epochs": key.epochs} if key.epochs else {})}
    rec = {"key": k, "run_id": key.name, "group": "g", "commit": "c", "metrics": metrics,
           **({"monitor": curve} if curve else {})}
    (ledger / f"{key.name}.json").write_text(json.dumps(rec))


def test_premise_report_per_method_and_the_schedule_rule(tmp_path):
    """Two fake methods: SimCLR loses 20 hue points to strong jitter (premise holds) and its long arm gains
    1 garment kNN point and 1 linear garment point over its 5-epoch model (keep 5); MoCo loses 2 (does not hold) and climbs: its long arm
    ends 15 points above the 5-epoch model and is within 3 points of its end from epoch 15 on (choose 15).  The first study's report, on the same shared ledger, must
    not count these models."""
    from pipeline.study.premise_report import build as build_premise, choose_epochs

    import pandas as pd

    ledger = tmp_path / "runs"
    hue, garment, knn = "linear/cfmnist/hue/top1", "linear/cfmnist/class/top1", "monitor/class/knn_top1"
    for method, (h_none, h_strong), (k5, curve) in (
            ("simclr", (90.0, 70.0), (60.0, {5: 55.0, 10: 58.0, 15: 60.5, 20: 61.0})),
            ("moco", (80.0, 78.0), (30.0, {5: 25.0, 10: 33.0, 15: 43.0, 20: 45.0}))):
        _premise_record(ledger, ModelKey(method, "baseline", 0.0, "none", 0), {hue: h_none, garment: 40.0, knn: 20.0})
        _premise_record(ledger, ModelKey(method, "baseline", 0.0, "strong", 0), {hue: h_strong, garment: 70.0, knn: k5})
        rows = [{"step": 39 * e, "epoch": float(e), knn: v, "monitor/hue/knn_top1": 50.0 - e} for e, v in curve.items()]
        _premise_record(ledger, ModelKey(method, "baseline", 0.0, "strong", 0, 20),
                        {hue: h_strong - 5, garment: 71.0 if method == "simclr" else 75.0, knn: curve[20]}, rows)
        # the premise at the chosen schedule, on another seed: its strong model is no schedule arm
        for strength, h in (("none", h_none + 1), ("strong", h_strong - 10)):
            _premise_record(ledger, ModelKey(method, "baseline", 0.0, strength, 3, 15), {hue: h, garment: 50.0},
                            [{"step": 1, "epoch": 1.0, knn: 99.0}])
    s = study(tmp_path, PREMISE + "  - {name: at-schedule, methods: [simclr, moco], variants: [baseline], "
                                  "lambda: [1.0], color_strength: [none, strong], seeds: [3], epochs: 15}\n")
    text = build_premise(s, tmp_path / "out", ledger, short_epochs=5).read_text()
    assert "models finished: **10 of 10** planned" in text
    assert "| simclr | 15 | 3 | 91.0 | 60.0 | 31.0 | holds |" in text
    assert "| moco | 15 | 3 | 81.0 | 68.0 | 13.0 | holds |" in text
    assert "| simclr | 90.0 | – | 70.0 | 20.0 | holds |" in text
    assert "| moco | 80.0 | – | 78.0 | 2.0 | does not hold |" in text
    lines = {l.split(" | ")[0]: l for l in text.splitlines() if l.startswith(("| simclr | 60.0", "| moco | 30.0"))}
    assert "| 1.0 | 5 epochs | no |" in lines["| simclr"]
    assert "| 15.0 | 15 epochs | no |" in lines["| moco"]
    sched = pd.read_csv(tmp_path / "out" / "schedule.csv")
    assert sched.set_index("method")["choice"].to_dict() == {"simclr": 5, "moco": 15}
    assert (tmp_path / "out" / "schedule.png").stat().st_size > 10_000
    # the rule on its own: a curve still 3+ points up over its last 5 epochs is "still climbing"
    c = pd.DataFrame({"epoch": [5, 10, 15, 20], knn: [10.0, 20.0, 30.0, 40.0]})
    assert choose_epochs(5, 12.0, c) == (20, True)
    assert choose_epochs(5, 38.0, c) == (5, True)
    assert choose_epochs(5, 20.0, c.assign(**{knn: [10.0, 30.0, 38.0, 40.0]})) == (15, False)
    assert choose_epochs(5, 38.0, c, linear_gain=4.0) == (20, True)      # flat on kNN, still rising on linear
    # the first study's report on the same ledger reads only its own models: none of these
    text = build(study(tmp_path), tmp_path / "study", ledger).read_text()
    assert "Models finished: **2 of" in text                  # the two strong seed-0 baselines it plans
def test_a_model_in_any_experiment_commit_this_clone_holds_is_done_and_recognised_by_what_defines_it(tmp_path):
    """A spread study (README "A study over several machines") skips a model an experiment commit in
    refs/exps/ holds (trained here, or pulled from the remote another machine pushed to), matched by its
    run.json: the same method, variant, λ, seed *and* config group (colour strength, params.yaml)."""
    from pipeline.study.plan import Block, Study
    from pipeline.study.share import models_in_experiments

    study = Study("t", [0, 1], [Block("b", ["simclr"], ["baseline"], [1.0], ["strong", "weak"])])
    s0, s0_weak, s1 = (ModelKey("simclr", "baseline", 0.0, "strong", 0), ModelKey("simclr", "baseline", 0.0, "weak", 0),
                       ModelKey("simclr", "baseline", 0.0, "strong", 1))
    group = ledger_mod.params_of(s0, study).group_hash()
    repo = tmp_path / "repo"
    (repo / "models" / "simclr-baseline").mkdir(parents=True)
    info = {"group": group, "lambda": 0.0, "method": "simclr", "seed": 0, "variant": "baseline"}
    (repo / "models" / "simclr-baseline" / "run.json").write_text(json.dumps(info))
    commit_as_experiment_ref(repo, "refs/exps/ab/cdef/study-strong-lam1-s0-ba-simclr")

    found = models_in_experiments(study, [s0, s0_weak, s1], repo)
    assert found == {s0.name: "refs/exps/ab/cdef/study-strong-lam1-s0-ba-simclr"}


def commit_as_experiment_ref(repo, ref: str) -> None:
    """Commit ``repo``'s files as a DVC experiment ref (``refs/exps/…``) and leave them out of its worktree,
    as a pulled or finished experiment is: only the ref holds them."""
    import subprocess

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "exp"], cwd=repo, check=True)
    subprocess.run(["git", "update-ref", ref, "HEAD"], cwd=repo, check=True)
    subprocess.run(["git", "checkout", "-q", "--orphan", "empty"], cwd=repo, check=True)   # not in the worktree
    subprocess.run(["git", "rm", "-rqf", "."], cwd=repo, check=True)


def test_the_study_runner_calls_the_dvc_and_python_of_its_own_interpreter(monkeypatch, tmp_path):
    """`.venv/bin/python -m stages.study run` from a shell without the environment activated failed with
    "No such file or directory: 'dvc'" (session 10); the queued stages would also have run PATH's python.
    The runner puts its interpreter's bin directory first on PATH, once."""
    import os
    import shutil
    import sys
    from pathlib import Path

    import stages.study
    from pipeline.study.queue import put_this_interpreter_first_on_path

    assert stages.study.put_this_interpreter_first_on_path is put_this_interpreter_first_on_path   # what its main calls first
    monkeypatch.setenv("PATH", str(tmp_path))          # nothing on it: no dvc, no python
    put_this_interpreter_first_on_path()
    put_this_interpreter_first_on_path()
    bindir = str(Path(sys.executable).parent)
    assert os.environ["PATH"].split(os.pathsep) == [bindir, str(tmp_path)]
    assert shutil.which("dvc") == os.path.join(bindir, "dvc")


def test_the_study_runner_reads_the_queue_once_a_look(monkeypatch):
    """`dvc queue status` costs ≈ 3.6 s of CPU on the 2-core machine whose cores the study's workers use; the
    runner read it twice a look (busy? then workers?). One read per look, reused for the workers' top-up."""
    from pipeline.study import runner

    states = iter([({"a": "Running", "b": "Queued"}, 1), ({"b": "Running"}, 2), ({}, 0)])
    reads, topped = [], []

    def status():
        reads.append(1)
        return next(states)

    monkeypatch.setattr(runner, "queue_status", status)
    monkeypatch.setattr(runner, "queue_experiments", lambda *a, **k: None)
    monkeypatch.setattr(runner, "keep_workers", lambda jobs, st=None: topped.append(st))
    monkeypatch.setattr(runner, "export_finished", lambda study, missing: [])
    runner._train(type("S", (), {"overrides": {}})(), [], [], 2, None, set(), poll=0)
    assert len(reads) == 3
    assert topped == [({"a": "Running", "b": "Queued"}, 1), ({"b": "Running"}, 2)]


def test_the_study_wall_time_is_the_union_of_every_attempts_run_from_start_to_last_metric(tmp_path):
    """Two models trained side by side count once; a model's earlier, interrupted attempt (same name and group)
    counts up to its last metric, not up to when it was found dead; the gap between sessions and another
    group's run of the same name do not count."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.study.plan import ModelKey
    from pipeline.study.wall_time import study_wall_time, union_ms

    assert union_ms([(30, 40), (0, 10), (5, 20)]) == 30 and union_ms([]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e")
    minute = 60_000

    def run(name, group, start, last, status="FINISHED", end=None):
        r = client.create_run(exp, start_time=start * minute, tags={"group": group, "mlflow.runName": name})
        client.log_batch(r.info.run_id, metrics=[Metric("loss", 1.0, start * minute, 0),
                                                 Metric("time/probe_s", 1.0, last * minute, 0)])
        client.set_terminated(r.info.run_id, status=status, end_time=(end or last) * minute)
        return r.info.run_id

    s = study(tmp_path, "name: w\nseeds: [0]\nblocks:\n  - {name: core, methods: [simclr], variants: [baseline, "
                        "augself], lambda: [1.0], color_strength: [strong]}\n")
    base, aug = sorted(s.models(), key=lambda k: k.variant != "baseline")
    assert isinstance(base, ModelKey)
    ledger = tmp_path / "runs"
    held = {base: run("b", "g", 100, 130), aug: run("a", "g", 110, 140)}       # side by side: 100 → 140
    run("a", "g", 10, 25, status="KILLED", end=90)    # an earlier attempt: 10 → 25 (its end time says 90)
    run("b", "other", 0, 200)                         # another configuration's run of that name
    for key, run_id in held.items():
        _write_model(ledger, key, {}, {"x": np.zeros(1)})
        rec = json.loads((ledger / f"{key.name}.json").read_text())
        (ledger / f"{key.name}.json").write_text(json.dumps({**rec, "run_id": run_id}))
    w = study_wall_time(s, ledger, client)
    assert (w["models"], w["runs"]) == (2, 3)
    assert w["hours"] == pytest.approx((40 + 15) / 60)
