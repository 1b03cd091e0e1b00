"""A model whose DVC experiment was interrupted (its queue worker died with the machine) resumes, when the
experiment is queued again in a new workspace, from the checkpoint the old workspace kept, and ends
bit-identical to a run that was never interrupted (pipeline.checkpoint_pool; the study runner salvages,
the pretrain stage adopts)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint as ckpt_io
from pipeline.checkpoint_pool import POOL_ENV, adopt, entry_name, salvage
from pipeline.workflow import run_pretraining
from tests.test_tracking import tracked_params

MODEL = "simclr-augself"


@pytest.fixture
def params(tmp_path):
    p = tracked_params(tmp_path, checkpoint_every=1)     # 32 images, batch 16, 1 epoch: 2 steps
    return dataclasses.replace(p, tracking=dataclasses.replace(p.tracking, enabled=False))


def pretrain(params, models: Path, **kw):
    run_pretraining(params, "simclr", "augself", models, device="cpu", track=False, **kw)
    return models / MODEL


def test_an_interrupted_experiments_model_resumes_in_a_new_workspace_bit_identical(params, tmp_path, monkeypatch,
                                                                                      capsys, one_thread):
    monkeypatch.delenv(POOL_ENV, raising=False)
    whole = pretrain(params, tmp_path / "whole")
    killed = pretrain(params, tmp_path / "exps" / "tmpkilled" / "models", max_steps=1)
    assert not (killed / "final.pt").exists()

    pool = tmp_path / "pool"
    assert salvage(tmp_path / "exps", pool) == [killed / "checkpoint.pt"]
    capsys.readouterr()
    monkeypatch.setenv(POOL_ENV, str(pool))
    resumed = pretrain(params, tmp_path / "exps" / "tmpnew" / "models")
    err = capsys.readouterr().err
    assert "adopted" in err and "resuming from" in err and "at step 1/2" in err, err
    for name in ("final.pt", "metrics.json", "monitor.csv"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name


def test_without_the_pool_variable_a_run_starts_from_its_own_workspace_only(params, tmp_path, monkeypatch, capsys,
                                                                            one_thread):
    """`dvc repro` / `make repro` never set the variable: a pool on disk changes nothing."""
    monkeypatch.delenv(POOL_ENV, raising=False)
    pretrain(params, tmp_path / "exps" / "tmpkilled" / "models", max_steps=1)
    salvage(tmp_path / "exps", tmp_path / "pool")
    capsys.readouterr()
    pretrain(params, tmp_path / "fresh")
    err = capsys.readouterr().err
    assert "adopted" not in err and "resuming from" not in err


def _fake_checkpoint(path: Path, step: int, phash: str = "h1", world: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_io.save_atomic({"params_hash": phash, "world_size": world, "step": step, "total_steps": 10,
                         "model": {"w": torch.full((2,), float(step))}}, path)
    return path


def test_salvage_keeps_the_furthest_checkpoint_per_key_and_skips_unreadable_files(tmp_path):
    exps, pool = tmp_path / "exps", tmp_path / "pool"
    _fake_checkpoint(exps / "tmpa" / "models" / "m" / "checkpoint.pt", step=5)
    _fake_checkpoint(exps / "tmpb" / "models" / "m" / "checkpoint.pt", step=8)
    _fake_checkpoint(exps / "tmpc" / "models" / "m" / "checkpoint.pt", step=2)
    _fake_checkpoint(exps / "tmpd" / "models" / "m" / "checkpoint.pt", step=3, world=2)
    (exps / "tmpe" / "models" / "m").mkdir(parents=True)
    (exps / "tmpe" / "models" / "m" / "checkpoint.pt").write_bytes(b"truncated")
    salvage(exps, pool)
    assert sorted(p.name for p in pool.iterdir()) == [entry_name("h1", 1), entry_name("h1", 2)]
    assert ckpt_io.load(pool / entry_name("h1", 1))["step"] == 8
    assert ckpt_io.load(pool / entry_name("h1", 2))["step"] == 3
    _fake_checkpoint(exps / "tmpf" / "models" / "m" / "checkpoint.pt", step=9)     # a later salvage moves on
    salvage(exps, pool)
    assert ckpt_io.load(pool / entry_name("h1", 1))["step"] == 9


def test_adopt_never_replaces_a_workspaces_own_checkpoint_and_needs_the_same_key(tmp_path):
    pool = tmp_path / "pool"
    _fake_checkpoint(pool / entry_name("h1", 1), step=7)
    own = _fake_checkpoint(tmp_path / "a" / "checkpoint.pt", step=2)
    assert not adopt("h1", 1, own.parent, pool)
    assert ckpt_io.load(own)["step"] == 2
    assert not adopt("h2", 1, tmp_path / "b", pool) and not adopt("h1", 2, tmp_path / "b", pool)
    (tmp_path / "b").mkdir()
    assert adopt("h1", 1, tmp_path / "b", pool)
    assert ckpt_io.load(tmp_path / "b" / "checkpoint.pt")["step"] == 7
    assert not (pool / entry_name("h1", 1)).exists()        # moved: the pool keeps only what waits to resume


def test_the_runner_salvages_only_when_no_worker_is_alive_and_names_the_pool_to_its_workers(tmp_path, monkeypatch):
    from pipeline.study import queue

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(POOL_ENV, raising=False)
    assert queue.POOL_ENV == POOL_ENV
    _fake_checkpoint(Path(queue.EXPERIMENT_WORKSPACES) / "tmpx" / "models" / "m" / "checkpoint.pt", step=4)
    calls = []
    monkeypatch.setattr(queue.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw.get("env"))))
    status = {"now": ({"a": "Running", "b": "Queued"}, 1)}
    monkeypatch.setattr(queue, "queue_status", lambda: status["now"])
    queue.clear_stale_tasks()                      # a live worker may be writing these: leave them
    pool = (tmp_path / queue.CHECKPOINT_POOL).resolve()
    assert not pool.exists()
    queue.keep_workers(2)
    (cmd, env), = calls
    assert cmd[:3] == ["dvc", "queue", "start"] and env[POOL_ENV] == str(pool)   # the workers it starts know it
    assert POOL_ENV not in os.environ                                          # and this process is unchanged
    assert (Path(queue.EXPERIMENT_WORKSPACES) / "tmpx").exists()
    status["now"] = ({"a": "Running"}, 0)
    queue.clear_stale_tasks()
    assert ckpt_io.load(pool / entry_name("h1", 1))["step"] == 4
    assert not list(Path(queue.EXPERIMENT_WORKSPACES).glob("tmp*"))   # salvaged, then deleted as DVC would have


def test_the_resumed_model_logs_on_into_the_mlflow_run_it_started(tmp_path, monkeypatch, one_thread):
    """One model, one MLflow run: the interrupted run is ended KILLED by the runner, and the model resumed in a
    new workspace reopens it (RUNNING, then FINISHED) instead of leaving it RUNNING beside a second run."""
    from mlflow.tracking import MlflowClient

    from pipeline.study.queue import end_interrupted_runs
    from pipeline.tracking import RUN_ID_FILE

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(POOL_ENV, raising=False)
    params = tracked_params(tmp_path, checkpoint_every=1)
    killed = tmp_path / "exps" / "tmpkilled" / "models"
    run_pretraining(params, "simclr", "augself", killed, device="cpu", track=True, max_steps=1)
    client = MlflowClient()
    run_id = (killed / MODEL / RUN_ID_FILE).read_text()
    client.update_run(run_id, status="RUNNING")            # as a worker killed mid-run leaves it
    assert end_interrupted_runs(tmp_path / "exps") == [run_id]
    killed_run = client.get_run(run_id)
    last_metric = max(m.timestamp for k in killed_run.data.metrics for m in client.get_metric_history(run_id, k))
    assert killed_run.info.status == "KILLED" and killed_run.info.end_time == last_metric   # not when found dead
    assert end_interrupted_runs(tmp_path / "exps") == []   # a second salvage leaves an ended run alone

    salvage(tmp_path / "exps", tmp_path / "pool")
    monkeypatch.setenv(POOL_ENV, str(tmp_path / "pool"))
    resumed = tmp_path / "exps" / "tmpnew" / "models"
    run_pretraining(params, "simclr", "augself", resumed, device="cpu", track=True)
    assert (resumed / MODEL / RUN_ID_FILE).read_text() == run_id
    runs = client.search_runs([client.get_run(run_id).info.experiment_id],
                              filter_string=f"attributes.run_name = '{client.get_run(run_id).info.run_name}'")
    assert [r.info.run_id for r in runs] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_run_id_from_another_store_gets_a_new_run_instead_of_disabling_tracking(tmp_path, monkeypatch):
    import dataclasses as dc

    from pipeline.request import RunRequest
    from pipeline.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = tracked_params(tmp_path)
    params = dc.replace(params, tracking=dc.replace(params.tracking, enabled=True))
    tracker = Tracker(params)
    run_id = tracker.start_model_run(RunRequest.resolve(params, "simclr", "augself"), reuse_run_id="0" * 32)
    assert run_id and run_id != "0" * 32 and not tracker.failed
