"""DVC the way its users expect it, in a temporary git project with a tiny config and real DVC:

* a refused ``dvc exp run -S <bad value>`` leaves the workspace as it was (``git status``, ``dvc status``),
  because every params refusal happens in the ``validate`` stage, before DVC touches any stage's outputs;
* valid params re-run nothing downstream because of ``validate`` (its output keeps the same bytes);
* ``dvc push`` / ``dvc pull`` through the default remote (a directory beside the repository) give a
  second clone the same models;
* a re-run that reproduces leaves the machine-local run id out of git and run.json byte-identical;
* the final backbones are DVC ``artifacts`` of type model.

One project, reproduced once (prepare + one pretraining); each refusal then costs one DVC start-up and
the validate stage.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.params import METHODS, VARIANTS
from tests.e2e import ROOT, make_project, run

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def state(project: Path) -> tuple[str, str]:
    git = run(["git", "status", "--porcelain"], project).stdout
    dvc = run(["dvc", "status"], project).stdout
    return git, dvc


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    p = make_project(tmp_path_factory.mktemp("dvcconv"))
    run(["dvc", "repro", "prepare@cfmnist", "pretrain@simclr-baseline"], p)
    run(["git", "add", "-A"], p)
    run([*GIT, "commit", "-qm", "reproduced"], p)
    return p


# The bad values of tests/test_params.py and tests/test_reliability.py, one per kind of check (schema
# choice, range, type, cross-key, unknown key, list item, data on disk, registry), as `dvc exp run -S`.
REFUSED = [
    ("ssl.methods=[simclr,swav]", "ssl.methods"),
    ("augself.lambda=-0.5", "augself.lambda"),
    ("augself.lambda=high", "expected a number"),
    ("data.pretrain=cifar10", "data.pretrain: 'cifar10' is not listed under data.datasets"),
    ("+augself.lamda=0.5", "augself.lamda: unknown key"),
    ("augment.crop_scale=[0.5,0.2]", "augment.crop_scale[1]"),
    ("eval.fewshot.shots=[5000]", "eval.fewshot"),
    ("+data.datasets.mnist3d.tasks=[class]", "mnist3d"),
]


@pytest.mark.parametrize("override, message", REFUSED, ids=[o for o, _ in REFUSED])
def test_refused_exp_run_leaves_git_and_dvc_status_as_they_were(project, override, message):
    before = state(project)
    out = run(["dvc", "exp", "run", "-S", override], project, check=False)
    assert out.returncode != 0
    log = out.stdout + out.stderr
    assert "error: " in log and message in log, log[-3000:]
    assert "No such file or directory" not in log
    # DVC's -S writes the override into params.yaml and leaves it there when the run fails: that edit is
    # DVC's, not the pipeline's. Everything else must be untouched.
    assert run(["git", "status", "--porcelain"], project).stdout == " M params.yaml\n" + before[0]
    run(["git", "checkout", "--", "params.yaml"], project)
    assert state(project) == before
    model = project / "models" / "simclr-baseline"
    assert (model / "final.pt").exists() and (model / "metrics.json").exists()


def test_valid_params_rerun_validate_but_nothing_downstream_because_of_it(project):
    before = state(project)
    out = run(["dvc", "exp", "run", "-S", "eval.fewshot.episodes=21", "pretrain@simclr-baseline"], project)
    assert "Running stage 'validate'" in out.stdout
    assert "Stage 'pretrain@simclr-baseline' didn't change, skipping" in out.stdout
    run(["git", "checkout", "--", "params.yaml", "dvc.lock"], project)
    assert state(project) == before


def test_push_and_pull_share_the_models_through_the_default_remote(project):
    remote = project.parent / "augself-dvc-remote"                  # .dvc/config: beside the repository
    listed = run(["dvc", "remote", "list"], project).stdout.split()
    assert listed[:2] == ["local", str(remote)]
    run(["dvc", "push"], project)
    assert remote.is_dir() and any(remote.rglob("*"))
    clone = project.parent / "clone-of-project"                       # beside the same remote
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "models" / "simclr-baseline" / "final.pt").exists()
    run(["dvc", "pull", "prepare@cfmnist", "pretrain@simclr-baseline"], clone)   # the stages reproduced
    f = "final.pt"              # checkpoint.pt is the workspace's resume file, not an output (dvc.yaml)
    assert (clone / "models/simclr-baseline" / f).read_bytes() == (project / "models/simclr-baseline" / f).read_bytes()
    assert run(["git", "status", "--porcelain"], clone).stdout == ""
    status = run(["dvc", "status", "pretrain@simclr-baseline"], clone).stdout
    assert "changed" not in status and "deleted" not in status, status


def test_a_rerun_keeps_run_ids_out_of_git_and_run_json_identical(project):
    """A retraining (checkpoint removed, so not resumed) makes a new MLflow run: none of that is in git,
    and since it reproduces the same model, git shows nothing at all (issue 17): the wall time and the
    images/s live in checkpoint.pt / timing.* (working files, not DVC outputs) and in MLflow."""
    model = "models/simclr-baseline"
    old_id = (project / model / "mlflow_run_id").read_text()
    (project / model / "checkpoint.pt").unlink()
    run(["dvc", "repro", "-f", "-s", "pretrain@simclr-baseline"], project)
    assert (project / model / "mlflow_run_id").read_text() != old_id          # it did re-run
    changed = {line[3:] for line in run(["git", "status", "--porcelain"], project).stdout.splitlines()}
    print("changed after a retraining:", sorted(changed))
    assert changed == set(), changed
    assert "mlflow_run_id" not in run(["git", "ls-files", model], project).stdout


def test_final_backbones_are_dvc_model_artifacts():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in dvc["stages"].values() for o in s.get("outs", [])}
    for method in METHODS:
        for variant in VARIANTS:
            art = dvc["artifacts"][f"{method}-{variant}"]
            assert art["type"] == "model" and art["path"] == f"models/{method}-{variant}/final.pt"
    pattern = {o for o in outs if o.endswith("final.pt")}
    assert pattern == {"models/${item.method}-${item.variant}/final.pt"}     # one matrix stage trains them all


# -- what a fresh clone holds (issue 27) ---------------------------------------------------------------
HEADLINE = re.compile(r"^((pretrain|linear|fewshot|probe)/|(\w+/)?Δ\w+/)[\w/.-]+$")   # Δ…: reports/metrics.json


def _committed(pattern: str) -> list[Path]:
    """The committed files a dvc.yaml path with ``${item.method}-${item.variant}`` stands for."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    rx = re.compile("^" + re.escape(pattern).replace(re.escape("${item.method}-${item.variant}"), r"[^/]+") + "$")
    return [ROOT / f for f in files if rx.match(f)]


def test_declared_metrics_hold_only_the_headline_numbers():
    """`dvc metrics show` / `dvc exp show` read every number of a declared metrics file: solver settings,
    stops and episode digests live in the ``*_diagnostics.json`` outputs beside them, not in a metric."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    declared = [next(iter(m)) if isinstance(m, dict) else m for s in dvc["stages"].values() for m in s.get("metrics", [])]
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in dvc["stages"].values() for o in s.get("outs", [])]
    from pipeline.evaluate import tasks

    # pretrain's metrics.json, one <task>.json per evaluation task, the report's reports/metrics.json
    assert len(declared) == 2 + len(tasks.names()) and not any("diagnostics" in m for m in declared)
    assert sum("_diagnostics.json" in o for o in outs) == len(tasks.names())
    seen = 0
    for pattern in declared:
        for path in _committed(pattern):
            data = json.loads(path.read_text())
            bad = {k: v for k, v in data.items() if not HEADLINE.match(k) or isinstance(v, bool)
                   or not isinstance(v, (int, float))}
            assert not bad, f"{path.relative_to(ROOT)} declares non-headline values as metrics: {sorted(bad)[:5]}"
            seen += 1
    assert seen >= 9, seen


def test_committed_outputs_are_exactly_those_of_the_default_params():
    """No file of a model the default ``variants`` do not train (a stale simclr-cassle), and no dvc.lock
    entry for a stage dvc.yaml does not define: a fresh clone's `dvc status` is the whole truth."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    models = {f"{m}-{v}" for m in params["ssl"]["methods"] for v in params["variants"]}
    files = subprocess.run(["git", "ls-files", "models", "metrics", "features"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    assert {f.split("/")[1] for f in files if f.count("/") >= 2} == models
    from pipeline.evaluate import tasks

    matrix = {f"{s}@{m}" for s in ("pretrain", "features", *tasks.names()) for m in models}
    stages = {"validate", "report", *matrix, *(f"prepare@{d}" for d in params["data"]["datasets"])}
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert locked <= stages, sorted(locked - stages)
