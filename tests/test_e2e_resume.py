"""End-to-end: SIGKILL during pretraining, then `dvc repro` resumes to the bit-identical model.

Each end-to-end file is its own unit under
`pytest -n 2 --dist loadfile` (the Makefile's test command): the two workers run different files
side by side, and a module-scoped project is built once per file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from tests.e2e import env, make_project, run

pytestmark = pytest.mark.slow


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
