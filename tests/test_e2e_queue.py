"""End-to-end: λ experiments queued with `dvc exp run --queue`, run by two workers at once.

Each end-to-end file is its own unit under
`pytest -n 2 --dist loadfile` (the Makefile's test command): the two workers run different files
side by side, and a module-scoped project is built once per file.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e import by_variant_lambda, make_project, mlflow_runs, run, sqlite_uri

pytestmark = pytest.mark.slow


def test_queued_lambdas_in_parallel_reach_sqlite_store_once_each(tmp_path):
    p = make_project(tmp_path)
    run(["dvc", "repro"], p)
    run(["git", "add", "-A"], p)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "baseline results"], p)
    lambdas = [0.25, 2.0]          # two workers (-j 2), one experiment each: both write to SQLite at once
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
