"""MLflow tracking against a real (SQLite) store in a temporary folder."""

from __future__ import annotations

import dataclasses

from pipeline.params import Params
from pipeline.request import RunRequest
from pipeline.tracking import RUN_ID_FILE, Tracker
from pipeline.workflow import _log_to_model_run


def test_evaluation_moves_the_model_run_to_the_current_config_group(tmp_path, monkeypatch):
    """Changing only eval.* re-runs the evaluation of the same model: its run must then belong to the
    new configuration's group, or the report (which reads one group) loses that seed."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    trained = Params()
    tracker = Tracker(trained)
    run_id = tracker.start_model_run(RunRequest.resolve(trained, "simclr", "baseline"))
    assert run_id
    (tmp_path / "models" / "simclr-baseline").mkdir(parents=True)
    (tmp_path / "models" / "simclr-baseline" / RUN_ID_FILE).write_text(run_id)

    tighter = dataclasses.replace(trained, eval=dataclasses.replace(
        trained.eval, linear=dataclasses.replace(trained.eval.linear, tol=1e-6)))
    assert tighter.group_hash() != trained.group_hash()
    _log_to_model_run(tighter, tmp_path / "models", "simclr-baseline", {"linear/cfmnist/class/top1": 70.0})

    run = tracker.client.get_run(run_id)
    assert run.data.tags["group"] == tighter.group_hash()
    assert run.data.metrics["linear/cfmnist/class/top1"] == 70.0
    assert run.data.tags["method"] == "simclr" and run.data.tags["variant"] == "baseline"


# -- what the MLflow UI shows: experiment kind, parent runs, inputs, models, system metrics ------------
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.data.prepared import write_meta, write_split
from pipeline.workflow import run_pretraining
from tests.test_train import tiny_images, tiny_params

ROOT = Path(__file__).resolve().parents[1]


def write_prepared(root: Path, name: str = "cfmnist", n: int = 32) -> Path:
    """A prepared dataset in the pipeline's format (16-px blobs, 2 classes), meta.json with sha256."""
    (root / name).mkdir(parents=True)
    for split in ("train", "test"):
        write_split(root / name, split, tiny_images(n, seed=len(split)), {"class": np.arange(n) % 2})
    write_meta(root / name, {"name": name, "source": "test", "image_size": 16, "pretrain_splits": ["train"],
                             "tasks": {"class": {"num_classes": 2, "class_names": ["a", "b"]}},
                             "splits": {"train": n, "test": n}, "params": {}})
    return root


def tracked_params(tmp_path: Path, **ssl):
    params = tiny_params(epochs=1, **ssl)
    entry = dataclasses.replace(params.data.datasets["cfmnist"], tasks=["class"])
    data = dataclasses.replace(params.data, prepared=str(write_prepared(tmp_path / "prepared")),
                               datasets={"cfmnist": entry})
    fewshot = dataclasses.replace(params.eval.fewshot, ways=2, shots=[1], queries=5)
    return dataclasses.replace(params, data=data, eval=dataclasses.replace(params.eval, fewshot=fewshot))


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_experiment_kind_is_set_on_creation_and_on_an_existing_experiment(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    old = client.create_experiment("old")                       # as the pipeline created it before
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    for name in ("old", "fresh"):
        params = dataclasses.replace(Params(), tracking=dataclasses.replace(Params().tracking, experiment=name))
        exp_id = Tracker(params).experiment_id()
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_model_runs_nest_under_one_parent_run_per_configuration_group(store):
    a = Params()
    b = dataclasses.replace(a, seed=1)                                     # same group, another seed
    c = dataclasses.replace(a, ssl=dataclasses.replace(a.ssl, epochs=7))   # another group
    ids = {name: Tracker(p).start_model_run(RunRequest.resolve(p, "simclr", "augself")) for name, p in (("a", a), ("b", b), ("c", c))}
    client = Tracker(a).client
    parent = {k: client.get_run(v).data.tags["mlflow.parentRunId"] for k, v in ids.items()}
    assert parent["a"] == parent["b"] != parent["c"]
    group_run = client.get_run(parent["a"])
    assert group_run.data.tags[tracking.GROUP_RUN_TAG] == a.group_hash()
    assert "group" not in group_run.data.tags                   # the report's tags.group query sees models only
    assert group_run.data.params["ssl.epochs"] == str(a.ssl.epochs) and "seed" not in group_run.data.params
    exp = client.get_experiment_by_name("augself").experiment_id
    in_group = client.search_runs([exp], filter_string=f"tags.group = '{a.group_hash()}'")
    assert sorted(r.info.run_id for r in in_group) == sorted([ids["a"], ids["b"]])

    # an eval.* change re-evaluates the model: it moves to the new group and under the new group's parent
    tracker = Tracker(c)
    tracker.move_to_group(ids["a"], c.group_hash())
    assert client.get_run(ids["a"]).data.tags["mlflow.parentRunId"] == parent["c"]


def test_pretraining_logs_dataset_backbone_model_and_evaluation_metrics(tmp_path, store, monkeypatch):
    """A pretraining run's inputs (the dataset and its digest), its LoggedModel (pt2, no pickles) whose
    metrics are the evaluation results, and the model loading by its models:/ URI without this project."""
    # The monitor logs after its first interval: a 1 s interval outlasted this ~1 s run on CI (no sample).
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    monkeypatch.chdir(tmp_path)
    params = tracked_params(tmp_path)
    run_pretraining(params, "simclr", "augself", tmp_path / "models", device="cpu")
    model_dir = tmp_path / "models" / "simclr-augself"
    run_id = (model_dir / tracking.RUN_ID_FILE).read_text()
    assert json.loads((model_dir / tracking.RUN_INFO_FILE).read_text()) == {
        "method": "simclr", "variant": "augself", "lambda": 1.0, "seed": 0, "group": params.group_hash()}

    _log_to_model_run(params, tmp_path / "models", "simclr-augself",
                      {"linear/cfmnist/class/top1": 61.5, "fewshot/cfmnist/class/5way1shot": 40.0})
    tracker = Tracker(params)
    run = tracker.client.get_run(run_id)
    meta = json.loads((tmp_path / "prepared" / "cfmnist" / "meta.json").read_text())
    digest = tracking.dataset_digest(meta["sha256"])                      # train + test: evaluation
    pretrain_digest = tracking.dataset_digest({"train.npz": meta["sha256"]["train.npz"]})
    contexts = {(d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
                for d in run.inputs.dataset_inputs}
    assert contexts == {("cfmnist/train", pretrain_digest, "pretraining"), ("cfmnist/train+test", digest, "evaluation")}
    profiles = [json.loads(d.dataset.profile)["sha256"] for d in run.inputs.dataset_inputs]
    assert meta["sha256"] in profiles
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)

    model_id = run.data.tags[tracking.MODEL_ID_TAG]
    model = tracker.client.get_logged_model(model_id)
    assert model.source_run_id == run_id and model.name == "simclr-augself"
    linked = {m.key: (m.value, m.dataset_name, m.dataset_digest) for m in model.metrics}
    assert linked["linear/cfmnist/class/top1"] == (61.5, "cfmnist/train+test", digest)   # the input it was measured on
    files = {p.name for p in Path(model.artifact_location.removeprefix("file://")).rglob("*") if p.is_file()}
    assert "model.pt2" in files and not files & {"model.pth", "data.pkl", "pickle_module_info.txt"}

    # The README's two lines, in a process that cannot import this project: the weights are the backbone's.
    code = (f"import mlflow, torch\nbackbone = mlflow.pytorch.load_model('models:/{model_id}')\n"
            f"x = torch.load('{tmp_path / 'x.pt'}', weights_only=True)\n"
            f"torch.save(backbone(x), '{tmp_path / 'y.pt'}')\n")
    from pipeline.models import load_backbone

    reference, _ = load_backbone(model_dir / "final.pt")
    x = torch.randn(3, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    blocked = "import sys\nfor m in ('pipeline', 'stages', 'tests'): sys.modules[m] = None  # not importable\n"
    out = subprocess.run([sys.executable, "-c", blocked + code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt", weights_only=True), reference(x), atol=1e-5)


def test_system_metrics_are_off_without_psutil(store, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "psutil" else real(name))
    tracker = Tracker(Params())
    run_id = tracker.start_model_run(RunRequest.resolve(Params(), "simclr", "baseline"))
    assert not tracker.start_system_metrics(run_id) and tracker._monitor is None
    tracker.end_run(run_id)


def test_report_names_the_default_store_relative_to_the_project(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.display_uri(tracking.tracking_uri()) == "sqlite:///mlflow.db"
    assert tracking.display_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_queued_stage_keeps_its_artifacts_in_the_project_even_with_the_store_uri_exported(tmp_path, monkeypatch):
    """stages.study queries MLflow before it starts the DVC queue, and mlflow.set_tracking_uri exports
    MLFLOW_TRACKING_URI to every worker.  With the local store the artifacts must still go to the project's
    mlartifacts/, not ./mlruns of the experiment's temporary copy (deleted when it ends: the per-image
    scores of two study models were lost that way)."""
    project = tmp_path / "project"
    temp_copy = project / ".dvc" / "tmp" / "exps" / "tmpabc"
    temp_copy.mkdir(parents=True)
    (temp_copy / "dvc.yaml").write_text("stages: {}\n")
    (project / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(temp_copy)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    tracker = Tracker(Params())
    run_id = tracker.start_model_run(RunRequest.resolve(Params(), "simclr", "baseline"))
    uri = tracker.client.get_run(run_id).info.artifact_uri
    assert uri.removeprefix("file://").startswith(str(project / "mlartifacts")), uri
    assert tracking.is_server_uri("http://127.0.0.1:5000") and not tracking.is_server_uri("sqlite:///x.db")


def test_run_params_are_the_ones_the_run_trained_with():
    """Baseline vs AugSelf differ in MLflow's params (compare view "show diff only"), not only in tags."""
    params = Params()
    base = tracking.run_params(RunRequest.resolve(params, "simclr", "baseline"))
    aug = tracking.run_params(RunRequest.resolve(params, "simclr", "augself"))
    assert base["augself.lambda"] == base["lambda"] == "0.0"
    assert aug["augself.lambda"] == aug["lambda"] == repr(params.augself.lambda_)
    assert (base["method"], base["variant"], aug["variant"]) == ("simclr", "baseline", "augself")
    assert not any(k.startswith(("cassle.", "augself.augmentations")) for k in base)
    assert not any(k.startswith("cassle.") for k in aug) and "augself.augmentations" in aug
    diff = {k for k in set(base) | set(aug) if base.get(k) != aug.get(k)}
    assert {"augself.lambda", "lambda", "variant"} <= diff


def test_runs_have_a_readable_name_and_the_source_and_user_columns(store, tmp_path, monkeypatch):
    """The runs table's Run Name, Source and User: ``simclr-augself λ=1 seed 0``, the entry point as a
    module, the user, and the git commit and branch of the clone (MlflowClient.create_run adds none)."""
    repo = tmp_path / "clone"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "exp-branch"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    commit = tracking.git_commit(repo)
    monkeypatch.chdir(repo)
    main = type(sys)("__main__")
    main.__spec__ = type("Spec", (), {"name": "stages.pretrain"})()
    monkeypatch.setitem(sys.modules, "__main__", main)           # as under `python -m stages.pretrain`
    params = Params()
    tracker = Tracker(params)
    run = tracker.client.get_run(tracker.start_model_run(RunRequest.resolve(params, "simclr", "augself")))
    assert run.info.run_name == f"simclr-augself λ={params.augself.lambda_:g} seed {params.seed}"
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "stages.pretrain" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and tags["mlflow.source.git.commit"] == commit == tags["commit"]
    assert tags["mlflow.source.git.branch"] == "exp-branch"
    parent = tracker.client.get_run(tags["mlflow.parentRunId"]).data.tags
    assert parent["mlflow.source.name"] == "stages.pretrain" and parent["mlflow.user"] == tags["mlflow.user"]
    baseline = RunRequest.resolve(params, "simclr", "baseline")
    assert tracking.run_name(baseline) == f"simclr-baseline λ=0 seed {params.seed}"


def test_a_copied_project_reads_and_writes_its_own_artifacts(tmp_path, monkeypatch):
    """MLflow stores artifact locations as absolute URIs (mlflow/mlflow#3144): a project copied (or moved)
    with its mlflow.db and mlartifacts/ must read its runs' artifacts and LoggedModels from the copy, and
    write new ones there, not into the clone it came from."""
    from mlflow.tracking import MlflowClient

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (old / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(old))
    tracker = Tracker(Params())
    run_id = tracker.start_model_run(RunRequest.resolve(Params(), "simclr", "baseline"))
    (tmp_path / "losses.csv").write_text("step,loss\n0,1.5\n")
    tracker.log_artifact(run_id, tmp_path / "losses.csv")
    assert (old / "mlartifacts").is_dir() and not tracker.failed
    old.rename(new)                                                  # cp -r / mv of the whole project

    monkeypatch.setenv("DVC_ROOT", str(new))
    tracker = Tracker(Params())
    second = tracker.start_model_run(RunRequest.resolve(Params(), "simclr", "augself"))           # the next stage in the copy re-points it
    tracker.log_artifact(second, tmp_path / "losses.csv")
    assert (new / "mlartifacts" / second / "artifacts" / "losses.csv").exists() and not old.exists()
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_run(run_id).info.artifact_uri.startswith((new / "mlartifacts").as_uri())
    got = client.download_artifacts(run_id, "losses.csv", str(tmp_path / "dl"))
    assert Path(got).read_text() == "step,loss\n0,1.5\n"
    assert tracking.relocate_artifacts("augself") is None            # done once; the CLI now says so

    # python -m pipeline.tracking relocate, for a copy whose store is only opened with `mlflow ui`
    new.rename(old)
    out = subprocess.run([sys.executable, "-m", "pipeline.tracking", "relocate", "augself"], cwd=old,
                         env={**os.environ, "DVC_ROOT": str(old), "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f"moved from {new}/mlartifacts" in out.stdout, out.stdout + out.stderr
    assert MlflowClient(f"sqlite:///{old / 'mlflow.db'}").get_run(second).info.artifact_uri.startswith(
        (old / "mlartifacts").as_uri())
