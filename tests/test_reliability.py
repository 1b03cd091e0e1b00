"""Stage-level failure behaviour: exit codes and messages for bad input, bad checkpoints and NaN losses.

Runs the stage entry points the way DVC does (``python -m stages.X`` in a tiny project copy).  Every
refusal (exit code 2) must leave the project byte-identical: :func:`refused` snapshots the tree
(paths, sha256, mtimes; ``tests.e2e.tree_snapshot``) before the stage and compares after it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import set_dotted
from tests.e2e import assert_tree_unchanged, make_project, run, tree_snapshot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project with cfmnist prepared and simclr-baseline pretrained."""
    p = make_project(tmp_path_factory.mktemp("reliability"), {"ssl.methods": ["simclr", "simsiam"]})
    run(["dvc", "repro", "prepare@cfmnist", "pretrain@simclr-baseline"], p)
    return p


def stage(project: Path, *args: str, params: dict | None = None, **env) -> "subprocess.CompletedProcess":
    argv = [sys.executable, "-m", *args]
    if params:
        data = set_dotted(yaml.safe_load((project / "params.yaml").read_text()), params)
        path = project.parent / f"{project.name}-override.yaml"    # outside the project: it is not an output
        path.write_text(yaml.safe_dump(data))
        argv += ["--params", str(path)]
    return run(argv, project, check=False, **env)


def refused(project: Path, *args: str, params: dict | None = None) -> "subprocess.CompletedProcess":
    """:func:`stage`, asserting exit code 2 and a project tree that the refusal left exactly as it was.

    ``PYTHONDONTWRITEBYTECODE`` keeps Python's bytecode cache (not a pipeline output) out of the comparison.
    """
    before = tree_snapshot(project)
    out = stage(project, *args, params=params, PYTHONDONTWRITEBYTECODE="1")
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert_tree_unchanged(before, project, " ".join(args))
    return out


def test_nan_loss_stops_with_step_and_term_keeps_checkpoint_and_exits_3(project, tmp_path):
    out_dir = project / "models" / "simsiam-augself"
    out = stage(project, "stages.pretrain", "simsiam", "augself", AUGSELF_INJECT_NAN="3:augself/crop")
    assert out.returncode == 3, out.stderr[-2000:]
    assert "step 3" in out.stderr and "augself/crop" in out.stderr
    assert "Traceback" not in out.stderr
    assert (out_dir / "checkpoint.pt").exists() and not (out_dir / "final.pt").exists()
    import pipeline.checkpoint as ckpt_io

    assert ckpt_io.load(out_dir / "checkpoint.pt")["step"] == 2
    shutil.rmtree(out_dir)


def test_fewshot_k_larger_than_classes_is_refused_before_pretraining(project):
    out = stage(project, "stages.pretrain", "simsiam", "baseline", params={"eval.fewshot.shots": [1, 500]})
    assert out.returncode == 2
    assert "eval.fewshot" in out.stderr and "500" in out.stderr and "smallest class" in out.stderr
    assert not (project / "models" / "simsiam-baseline" / "checkpoint.pt").exists()


def test_checkpoint_of_another_method_is_refused_by_evaluation(project):
    wrong = project / "models" / "simsiam-baseline"
    wrong.mkdir(parents=True, exist_ok=True)
    shutil.copy(project / "models" / "simclr-baseline" / "final.pt", wrong / "final.pt")
    out = refused(project, "stages.evaluate", "features", "simsiam-baseline")
    assert "final.pt" in out.stderr and "method='simclr'" in out.stderr and "expected 'simsiam'" in out.stderr
    shutil.rmtree(wrong)


def test_checkpoint_of_another_backbone_is_refused_by_evaluation(project):
    out = refused(project, "stages.evaluate", "probe", "simclr-baseline", params={"ssl.backbone": "resnet18"})
    assert "backbone_name='resnet_small'" in out.stderr and "expected 'resnet18'" in out.stderr


def test_corrupt_checkpoint_is_named(project, tmp_path):
    bad = project / "models" / "simsiam-augself"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "final.pt").write_bytes(b"not a checkpoint")
    out = refused(project, "stages.evaluate", "features", "simsiam-augself")
    assert str(Path("models/simsiam-augself/final.pt")) in out.stderr and "cannot be read" in out.stderr
    shutil.rmtree(bad)


def test_missing_prepared_data_names_the_fix(project):
    out = stage(project, "stages.pretrain", "simclr", "augself", params={"data.prepared": "data/elsewhere"})
    assert out.returncode == 2
    assert "data/elsewhere" in out.stderr and "dvc repro prepare@cfmnist" in out.stderr


@pytest.mark.parametrize("variant, params", [("baseline", {"eval.fewshot.shots": [1, 500]}),
                                             ("augself", {"data.prepared": "data/elsewhere"})],
                         ids=["fewshot-k", "missing-prepared-data"])
def test_pretrain_refusals_leave_the_workspace_unchanged(project, variant, params):
    """The two pretrain refusals above, with the tree snapshot: today they leave an empty model directory."""
    method = "simsiam" if variant == "baseline" else "simclr"
    leftover = project / "models" / f"{method}-{variant}"
    shutil.rmtree(leftover, ignore_errors=True)          # what the tests above left (no fixture output)
    try:
        refused(project, "stages.pretrain", method, variant, params=params)
    finally:
        shutil.rmtree(leftover, ignore_errors=True)
