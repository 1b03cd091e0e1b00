"""Per-model overhead (issue 23 item 2): what a study experiment no longer pays."""

from __future__ import annotations

import subprocess
import sys

from pipeline.study.plan import ModelKey, dvc_queue_command, experiments_for
from tests.e2e import ROOT, env


def test_validate_and_report_stages_import_no_torch():
    # Every stage process pays its imports (seconds on the 2-core CPU); these two stages use no tensor.
    code = ("import sys, stages.validate, stages.report; "
            "heavy = sorted(m for m in ('torch', 'torchvision', 'PIL') if m in sys.modules); "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_study_experiments_run_the_evaluations_not_the_report():
    e = experiments_for([ModelKey("simclr", "augself", 1.0, "strong", 0)])[0]
    cmd = dvc_queue_command(e)
    targets = [a for a in cmd[cmd.index("-n") + 2:] if a != "-S" and "=" not in a]
    from pipeline.evaluate import tasks

    assert targets == list(tasks.names()) and targets[:3] == ["linear", "fewshot", "probe"]


def test_report_leaves_out_the_timing_keys_of_training():
    from pipeline.run_state import TIMING_KEYS
    from pipeline.workflow import REPORT_LEAVES_OUT

    assert tuple(REPORT_LEAVES_OUT) == tuple(TIMING_KEYS)


def test_training_code_is_untouched_by_the_lazy_imports():
    # pipeline.checkpoint is training code (its source is in every final.pt's params hash): it keeps its
    # own top-level torch import, and the stages reach write_json through pipeline.cli's lazy wrapper.
    from pipeline.fingerprint import TRAINING_CODE

    assert "checkpoint.py" in TRAINING_CODE
    import pipeline.cli as cli

    assert cli.write_json.__module__ == "pipeline.cli"


def test_every_function_the_overhead_bench_profiles_exists_where_it_says():
    """bench/bench_overhead.py splits a stage's profile by (file, function); a function moved by a refactor
    (issue 25 split train.py) would silently report 0 s."""
    import ast

    from bench.bench_overhead import PROFILED

    for label, (path, name) in PROFILED.items():
        tree = ast.parse((ROOT / path).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert name in defined, f"PROFILED[{label!r}]: no function {name} in {path}"
