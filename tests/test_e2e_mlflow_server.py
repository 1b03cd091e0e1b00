"""End-to-end: a tiny project logging to a real `mlflow server`.

Each end-to-end file is its own unit under
`pytest -n 2 --dist loadfile` (the Makefile's test command): the two workers run different files
side by side, and a module-scoped project is built once per file.
"""

from __future__ import annotations

import pytest

from tests.e2e import MlflowServer, by_variant_lambda, make_project, mlflow_runs, run

pytestmark = pytest.mark.slow


def test_real_mlflow_server(tmp_path):
    project = make_project(tmp_path / "p")
    (tmp_path / "server").mkdir()
    with MlflowServer(tmp_path / "server") as server:
        run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=server.uri)
        run(["dvc", "exp", "run", "-S", "augself.lambda=0.5"], project, MLFLOW_TRACKING_URI=server.uri)
        runs = by_variant_lambda(mlflow_runs(server.uri))
    assert set(runs) == {("baseline", 0.0), ("augself", 1.0), ("augself", 0.5), ("cassle", 0.0)}
    commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    for (variant, lam), rs in runs.items():
        assert len(rs) == 1 and "fewshot/cfmnist/color/5way1shot" in rs[0].data.metrics
        # what the runs table shows (issue 27): the name, Source = the stage's entry point, the clone's commit
        tags = rs[0].data.tags
        assert rs[0].info.run_name == f"simclr-{variant} λ={lam:g} seed 0"
        assert tags["mlflow.source.name"] == "stages.pretrain" and tags["mlflow.source.git.commit"] == commit
        assert tags["mlflow.user"]
        names = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
                 for d in rs[0].inputs.dataset_inputs}
        assert names == {("cfmnist/train", "pretraining"), ("cfmnist/train+test", "evaluation")}, names
    assert not (project / "mlflow.db").exists()
