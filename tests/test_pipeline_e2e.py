"""End-to-end: dvc repro, dvc exp run, queued experiments, MLflow (SQLite and a real server), kill/resume.

Each test works in a temporary copy of the repository with the tiny configuration of tests/e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.e2e import MlflowServer, env, free_port, make_project, mlflow_runs, run

pytestmark = pytest.mark.slow


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def sqlite_uri(project: Path) -> str:
    return f"sqlite:///{project / 'mlflow.db'}"


def by_variant_lambda(runs) -> dict[tuple[str, float], list]:
    out: dict = {}
    for r in runs:
        out.setdefault((r.data.tags["variant"], float(r.data.tags["lambda"])), []).append(r)
    return out


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> Path:
    """A tiny project after one full `dvc repro` with the default SQLite store."""
    project = make_project(tmp_path_factory.mktemp("repro"))
    out = run(["dvc", "repro"], project)
    assert {"pretrain@simclr-baseline", "pretrain@simclr-augself", "pretrain@simclr-cassle"} <= stages_run(out.stdout)
    return project


def test_repro_writes_models_metrics_report_and_mlflow_runs(reproduced):
    p = reproduced
    for variant in ("baseline", "augself", "cassle"):
        m = p / "models" / f"simclr-{variant}"
        assert (m / "final.pt").exists() and (m / "checkpoint.pt").exists()
        linear = json.loads((p / "metrics" / f"simclr-{variant}" / "linear.json").read_text())
        assert set(linear) - {"solver"} == {"linear/cfmnist/class/top1", "linear/cfmnist/color/top1"}
        assert linear["solver"]["cfmnist/class"]["name"] == "tron"
        assert (p / "metrics" / f"simclr-{variant}" / "linear_predictions.npz").exists()
        probe = json.loads((p / "metrics" / f"simclr-{variant}" / "probe.json").read_text())
        assert "probe/crop/r2" in probe and "probe/color/r2" in probe
    assert (p / "reports" / "index.html").exists() and (p / "reports" / "results.csv").exists()
    runs = by_variant_lambda(mlflow_runs(sqlite_uri(p)))
    assert set(runs) == {("baseline", 0.0), ("augself", 1.0), ("cassle", 0.0)}
    for (variant, _), rs in runs.items():
        assert len(rs) == 1
        metrics = rs[0].data.metrics
        assert "pretrain/loss_ssl" in metrics and "linear/cfmnist/color/top1" in metrics
        assert "fewshot/cfmnist/class/5way1shot" in metrics and "probe/crop/r2" in metrics
        assert rs[0].data.params["ssl.epochs"] == "2"
        assert rs[0].data.tags["method"] == "simclr" and rs[0].data.tags["group"]
    # Nothing changed: nothing runs.
    again = run(["dvc", "repro"], p)
    assert stages_run(again.stdout) == set()
    shown = run(["dvc", "metrics", "show"], p).stdout
    assert "linear/cfmnist/color/top1" in shown


def test_lambda_experiment_reruns_only_what_lambda_touches(reproduced):
    p = reproduced
    out = run(["dvc", "exp", "run", "-S", "augself.lambda=0.5"], p)
    ran = stages_run(out.stdout)
    assert ran == {"validate", "pretrain@simclr-augself", "features@simclr-augself", "linear@simclr-augself",
                   "fewshot@simclr-augself", "probe@simclr-augself", "report"}, ran
    runs = by_variant_lambda(mlflow_runs(sqlite_uri(p)))
    assert {("baseline", 0.0), ("augself", 1.0), ("augself", 0.5), ("cassle", 0.0)} <= set(runs)
    assert all(len(v) == 1 for v in runs.values())
    lam = (p / "reports" / "results.csv").read_text()
    assert "0.5" in lam and "1.0" in lam


def test_mlflow_down_loses_nothing_and_runs_are_deterministic(reproduced, tmp_path):
    """A tracking server that is down: the pipeline finishes, says so, and the report comes from files.

    The same project and seed gives bit-identical metrics files to the run with MLflow up.
    """
    p = make_project(tmp_path)
    out = run(["dvc", "repro"], p, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    assert "MLflow logging failed" in out.stderr
    assert (p / "reports" / "index.html").exists()
    assert "metrics files" in (p / "reports" / "index.html").read_text()
    for f in sorted((reproduced / "metrics").rglob("*.json")):
        if "augself" in f.parent.name:
            continue  # the λ experiment above replaced the AugSelf model in `reproduced`
        twin = p / f.relative_to(reproduced)
        assert twin.read_bytes() == f.read_bytes(), f
    a = json.loads((reproduced / "models/simclr-baseline/metrics.json").read_text())
    b = json.loads((p / "models/simclr-baseline/metrics.json").read_text())
    assert a == b


def test_queued_lambdas_in_parallel_reach_sqlite_store_once_each(tmp_path):
    p = make_project(tmp_path)
    run(["dvc", "repro"], p)
    run(["git", "add", "-A"], p)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "baseline results"], p)
    lambdas = [0.25, 0.5, 2.0, 4.0]
    for lam in lambdas:
        run(["dvc", "exp", "run", "--queue", "-S", f"augself.lambda={lam}"], p)
    run(["dvc", "queue", "start", "-j", "2"], p)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], p).stdout
        if not re.search(r"Queued|Running", status):
            break
        time.sleep(3)
    assert "Failed" not in status, status + run(["dvc", "queue", "logs", "--help"], p, check=False).stdout
    runs = by_variant_lambda(mlflow_runs(sqlite_uri(p)))
    for lam in lambdas:
        assert len(runs[("augself", lam)]) == 1, (lam, runs.keys())
        assert "linear/cfmnist/class/top1" in runs[("augself", lam)][0].data.metrics
        assert "probe/color/r2" in runs[("augself", lam)][0].data.metrics
        assert runs[("augself", lam)][0].data.tags["dvc_exp"]
    # The committed baseline and CASSLE models are reused by every experiment, not trained again.
    assert len(runs[("baseline", 0.0)]) == 1 and len(runs[("augself", 1.0)]) == 1
    assert len(runs[("cassle", 0.0)]) == 1


def test_real_mlflow_server(tmp_path):
    project = make_project(tmp_path / "p")
    (tmp_path / "server").mkdir()
    with MlflowServer(tmp_path / "server") as server:
        run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=server.uri)
        run(["dvc", "exp", "run", "-S", "augself.lambda=0.5"], project, MLFLOW_TRACKING_URI=server.uri)
        runs = by_variant_lambda(mlflow_runs(server.uri))
    assert set(runs) == {("baseline", 0.0), ("augself", 1.0), ("augself", 0.5), ("cassle", 0.0)}
    for rs in runs.values():
        assert len(rs) == 1 and "fewshot/cfmnist/color/5way1shot" in rs[0].data.metrics
    assert not (project / "mlflow.db").exists()


def test_sigkill_during_pretraining_resumes_to_the_same_model(tmp_path):
    """SIGKILL the `dvc repro` process group once a checkpoint exists; the rerun resumes bit-identically.

    The kill waits for the first checkpoint file to appear (polled with a deadline, not raced against a
    step count), then kills at once; 48 steps with a checkpoint every 2 leave the run far from its end
    when that happens, which the test checks before resuming.
    """
    p = make_project(tmp_path / "killed", {"ssl.epochs": 12})
    run(["dvc", "repro", "prepare@cfmnist"], p)
    ckpt = p / "models" / "simclr-baseline" / "checkpoint.pt"
    proc = subprocess.Popen(["dvc", "repro", "pretrain@simclr-baseline"], cwd=p, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    finished = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not finished, f"pretraining exited before writing a checkpoint:\n{proc.stdout.read().decode()[-3000:]}"
    assert ckpt.exists(), "no checkpoint within 300 s"
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["step"]
    assert 0 < step < 48, f"killed at step {step} of 48: nothing left to resume, make the config longer"
    assert not (p / "models/simclr-baseline/final.pt").exists()
    out = run(["dvc", "repro", "pretrain@simclr-baseline"], p)
    assert re.search(rf"[Rr]esum\w+ .*step {step}\b", out.stdout + out.stderr), out.stdout[-3000:]
    resumed = torch.load(p / "models/simclr-baseline/final.pt", map_location="cpu", weights_only=False)

    q = make_project(tmp_path / "straight", {"ssl.epochs": 12})
    run(["dvc", "repro", "pretrain@simclr-baseline"], q)
    straight = torch.load(q / "models/simclr-baseline/final.pt", map_location="cpu", weights_only=False)
    for k, v in straight["backbone"].items():
        assert torch.equal(v, resumed["backbone"][k]), k
    assert (json.loads((p / "models/simclr-baseline/metrics.json").read_text())
            == json.loads((q / "models/simclr-baseline/metrics.json").read_text()))
