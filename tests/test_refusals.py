"""Stage refusals leave the workspace byte-identical (issue #15, item 5).

Every refusal that ``tests/test_params.py`` exercises is run here through a stage entry point, the
way DVC runs it (``python -m stages.<name> ... --params <file>``), in a temporary copy of the
project (``tests.e2e.make_project``), never in the repository itself.  The project is given the
outputs a used workspace has (a prepared dataset, a model directory with a checkpoint, metrics, a
report, an MLflow store), the tree is snapshotted (paths, sha256, mtimes, directories included),
and after the refusal it must be the same: exit code 2, one ``error:`` line naming the key, no
traceback, and nothing created, deleted, rewritten or touched.  The bad params file lives outside
the project.  ``PYTHONDONTWRITEBYTECODE`` keeps Python's own bytecode cache out of the comparison.

The refusals of ``tests/test_reliability.py`` (checkpoints of another method or backbone, a corrupt
checkpoint, missing prepared data, few-shot K) need a prepared dataset and a trained model; that
module snapshots its project around each of them in the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import set_dotted
from tests.e2e import assert_tree_unchanged, make_project, run, tree_snapshot
from tests.test_params import BAD_VALUES

pytestmark = pytest.mark.slow

# What a workspace in use holds; a refusal must not delete or rewrite any of it.
USED_WORKSPACE = {
    "data/prepared/cfmnist/meta.json": b'{"name": "cfmnist"}\n',
    "data/prepared/cfmnist/train.npz": b"prepared images",
    "models/simclr-augself/checkpoint.pt": b"a checkpoint in progress",
    "models/simclr-augself/losses.csv": b"step,epoch\n1,0\n",
    "metrics/simclr-augself/linear.json": b"{}\n",
    "reports/index.html": b"<html></html>\n",
    "mlflow.db": b"sqlite store",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    p = make_project(tmp_path_factory.mktemp("refusals"))
    for rel, data in USED_WORKSPACE.items():
        (p / rel).parent.mkdir(parents=True, exist_ok=True)
        (p / rel).write_bytes(data)
    return p


def refused(project: Path, tmp_path: Path, argv: list[str], overrides: dict) -> str:
    """Run a stage with ``overrides`` applied to the project's params; assert exit 2 and an unchanged tree."""
    data = set_dotted(yaml.safe_load((project / "params.yaml").read_text()), overrides)
    bad = tmp_path / "bad-params.yaml"
    bad.write_text(yaml.safe_dump(data))
    before = tree_snapshot(project)
    out = run([sys.executable, "-m", *argv, "--params", str(bad)], project, check=False, PYTHONDONTWRITEBYTECODE="1")
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert_tree_unchanged(before, project, f"{' '.join(argv)} with {overrides}")
    return out.stderr


@pytest.mark.parametrize("key, value, expected", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_value_refused_by_the_pretrain_stage_leaves_the_workspace_unchanged(project, tmp_path, key, value,
                                                                               expected):
    err = refused(project, tmp_path, ["stages.pretrain", "simclr", "augself"], {key: value})
    for text in expected:
        assert text in err, (text, err)


def test_unknown_key_refused_by_the_pretrain_stage_leaves_the_workspace_unchanged(project, tmp_path):
    err = refused(project, tmp_path, ["stages.pretrain", "simclr", "augself"], {"augself.lamda": 0.5})
    assert "augself.lamda: unknown key" in err and "lambda" in err


def test_unknown_dataset_refused_by_the_prepare_stage_leaves_the_workspace_unchanged(project, tmp_path):
    """A dataset the registry does not know: exit 2 naming it and the known names (was tests/test_params.py)."""
    err = refused(project, tmp_path, ["stages.prepare", "mnist3d"],
                  {"data.datasets": {"cfmnist": {"tasks": ["class"]}, "mnist3d": {"tasks": ["class"]}}})
    assert "mnist3d" in err and "cfmnist" in err


def test_unknown_method_refused_by_the_pretrain_stage_leaves_the_workspace_unchanged(project, tmp_path):
    """One clear line naming ssl.methods and the bad name (was tests/test_params.py, run in the repository)."""
    err = refused(project, tmp_path, ["stages.pretrain", "simclr", "augself"], {"ssl.methods": ["simclr", "dino"]})
    assert "ssl.methods" in err and "'dino'" in err
