"""Stage-level failure behaviour: exit codes and messages for bad input, bad checkpoints and NaN losses.

Runs the stage entry points the way DVC does (``python -m stages.X`` in a tiny project copy).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import set_dotted
from tests.e2e import make_project, run

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
        path = project / "override.yaml"
        path.write_text(yaml.safe_dump(data))
        argv += ["--params", str(path)]
    return run(argv, project, check=False, **env)


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
    out = stage(project, "stages.pretrain", "simsiam", "baseline",
                params={"eval.fewshot.shots": [1, 500]})
    assert out.returncode == 2
    assert "eval.fewshot" in out.stderr and "500" in out.stderr and "smallest class" in out.stderr
    assert not (project / "models" / "simsiam-baseline" / "checkpoint.pt").exists()


def test_checkpoint_of_another_method_is_refused_by_evaluation(project):
    wrong = project / "models" / "simsiam-baseline"
    wrong.mkdir(parents=True, exist_ok=True)
    shutil.copy(project / "models" / "simclr-baseline" / "final.pt", wrong / "final.pt")
    out = stage(project, "stages.evaluate", "features", "simsiam-baseline")
    assert out.returncode == 2
    assert "final.pt" in out.stderr and "method='simclr'" in out.stderr and "expected 'simsiam'" in out.stderr
    shutil.rmtree(wrong)


def test_checkpoint_of_another_backbone_is_refused_by_evaluation(project):
    out = stage(project, "stages.evaluate", "probe", "simclr-baseline", params={"ssl.backbone": "resnet18"})
    assert out.returncode == 2
    assert "backbone_name='resnet_small'" in out.stderr and "expected 'resnet18'" in out.stderr


def test_corrupt_checkpoint_is_named(project, tmp_path):
    bad = project / "models" / "simsiam-augself"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "final.pt").write_bytes(b"not a checkpoint")
    out = stage(project, "stages.evaluate", "features", "simsiam-augself")
    assert out.returncode == 2
    assert str(Path("models/simsiam-augself/final.pt")) in out.stderr and "cannot be read" in out.stderr
    shutil.rmtree(bad)


def test_missing_prepared_data_names_the_fix(project):
    out = stage(project, "stages.pretrain", "simclr", "augself", params={"data.prepared": "data/elsewhere"})
    assert out.returncode == 2
    assert "data/elsewhere" in out.stderr and "dvc repro prepare@cfmnist" in out.stderr
