"""GPU claiming for stages that run side by side (pipeline/gpus.py), checked on the CPU.

What is tested is the claiming, with fake GPU ids and real lock files held by real processes; which
GPU torch then computes on is CUDA's business.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline import gpus

IDS = ["GPU-aaaa", "GPU-bbbb"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _release_all():
    yield
    for gpu_id in list(gpus._held):
        gpus.release(gpu_id)


@pytest.fixture
def holders(tmp_path):
    """Start other processes (queue workers' stages) that each claim one GPU and keep it."""
    procs: list[subprocess.Popen] = []

    def hold(gpu_id: str) -> subprocess.Popen:
        code = ("import time; from pathlib import Path; from pipeline import gpus; "
                f"assert gpus.try_claim({gpu_id!r}, Path({str(tmp_path)!r})); print('held', flush=True); "
                "time.sleep(120)")
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_stage_beside_another_claims_the_other_gpu(tmp_path, holders):
    holders(IDS[0])
    assert gpus.claim(IDS, tmp_path, timeout=0) == 1
    assert (tmp_path / f"{IDS[1]}.lock").read_text().strip().startswith("pid ")


def test_every_gpu_claimed_waits_and_times_out_naming_the_lock_directory(tmp_path, holders, capsys):
    holders(IDS[0])
    holders(IDS[1])
    with pytest.raises(TimeoutError, match=f"all 2 GPUs are claimed.*{tmp_path}"):
        gpus.claim(IDS, tmp_path, timeout=0.3, poll=0.05)
    assert "waiting for one to be freed" in capsys.readouterr().err


def test_a_killed_stage_frees_its_gpu_for_a_waiting_one(tmp_path, holders):
    holders(IDS[0])
    second = holders(IDS[1])
    threading.Timer(0.5, second.kill).start()      # SIGKILL: no cleanup code runs; the kernel drops the lock
    assert gpus.claim(IDS, tmp_path, timeout=30, poll=0.05) == 1


def test_stage_device_claims_among_several_gpus_and_not_for_one(tmp_path, holders, monkeypatch):
    import torch

    from pipeline import workflow

    monkeypatch.setenv(gpus.LOCK_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    holders(IDS[0])
    monkeypatch.setattr(gpus, "visible_gpu_ids", lambda: list(IDS))
    assert workflow.default_device() == "cuda:1"          # what every stage asks for its device
    gpus.release(IDS[1])
    monkeypatch.setattr(gpus, "visible_gpu_ids", lambda: ["GPU-only"])
    assert gpus.stage_device() == "cuda"                   # one GPU: nothing to share, no lock taken
    assert not (tmp_path / "GPU-only.lock").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpus.stage_device() == "cpu"
