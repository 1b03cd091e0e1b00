"""The pretraining loop (pipeline.train) on tiny CPU configs: learning, resume, checkpoints, DDP."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.checkpoint as ckpt_io
from pipeline.augment import BatchAugment, view_generator
from pipeline.config import ConfigError
from pipeline.models import load_backbone
from pipeline.params import METHODS, MethodParams, Params
from pipeline.request import RunRequest
from pipeline.fingerprint import training_hash
from pipeline.recipe import build_pretrain_model, lr_factor
from pipeline.train import (CHECKPOINT, FINAL, LOSSES, METRICS, NAN_ENV, TIMING, NonFiniteLossError,
                            checkpoint_resumable, pretrain)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


def tiny_params(**ssl_overrides) -> Params:
    """resnet_small width 4 on 16 px, batch 16, small heads, one thread: a step takes milliseconds."""
    p = Params()
    small = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=16, queue_size=64)
    methods = {m: dataclasses.replace(getattr(p.ssl, m), **small) for m in METHODS}
    # channels_last=False: oneDNN's channels-last 1x1-conv weight gradient crashes for width 4 on AMD
    # EPYC CPUs (torch 2.14.1; docs/reliability.md)
    ssl = dict(methods=list(METHODS), width=4, batch_size=16, epochs=2, lr=1.6, log_every=2,
               checkpoint_every=100, threads=1, channels_last=False, **methods)
    ssl.update(ssl_overrides)
    return dataclasses.replace(p, ssl=dataclasses.replace(p.ssl, **ssl),
                               augself=dataclasses.replace(p.augself, hidden_dim=32, augmentations=["crop", "color"]))


def tiny_images(n: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random blobs (not white noise), so crops and colour changes are learnable."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(n, 4, 4, 3)).astype(np.uint8)
    return np.ascontiguousarray(low.repeat(SIZE // 4, axis=1).repeat(SIZE // 4, axis=2))


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- learning
def mild(params: Params) -> Params:
    """Gentle views, so that two dozen steps of a width-4 network measurably learn."""
    aug = dataclasses.replace(params.augment, crop_scale=(0.6, 1.0), brightness=0.2, contrast=0.2,
                              saturation=0.2, hue=0.05, grayscale_p=0.0)
    # no grayscale, so CASSLE is not given a grayscale flag (a condition whose op is off is refused)
    cassle = dataclasses.replace(params.cassle, conditions=[c for c in params.cassle.conditions if c != "grayscale"])
    return dataclasses.replace(params, augment=aug, cassle=cassle)


@torch.no_grad()
def objective_on_fixed_views(params: Params, method: str, variant: str, images: np.ndarray,
                             state: dict | None, init_buffers: dict) -> torch.Tensor:
    """Loss terms of a model (initial: ``state`` None) on one fixed pair of views of a fixed batch.

    MoCo's queue is reset to the initial one, so both models are scored against the same negatives
    (along the run the queue fills with real keys, which raises MoCo's loss whatever is learnt).
    """
    torch.manual_seed(params.seed)                      # pretrain() initialises the same way
    model, _, _ = build_pretrain_model(RunRequest.resolve(params, method, variant), SIZE)
    if state is not None:
        model.method.load_state_dict({**state["model"], **init_buffers})
        if model.head is not None:
            model.head.load_state_dict(state["head"])
    model.train()
    augment = BatchAugment(params.augment, SIZE)
    g = view_generator(12345, 0, 0)
    x = torch.from_numpy(images[:16])
    v1, w1 = augment(x, g)
    v2, w2 = augment(x, g)
    return model(v1, v2, w1, w2)[1]


@pytest.mark.parametrize("variant", ["baseline", "augself"])
@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_reduce_the_loss(tmp_path, method, variant):
    """24 steps on 32 fixed images lower the objective on a fixed pair of views (SSL and total)."""
    params = mild(tiny_params(epochs=12, log_every=6))
    images = tiny_images()
    torch.manual_seed(params.seed)
    initial = build_pretrain_model(RunRequest.resolve(params, method, variant), SIZE)[0].method.state_dict()
    init_buffers = {k: v.clone() for k, v in initial.items() if k.startswith("queue")}
    before = objective_on_fixed_views(params, method, variant, images, None, init_buffers)
    logs: list[dict] = []
    res = pretrain(params, method, variant, images, tmp_path, on_log=lambda s, m: logs.append(m),
                   device="cpu", progress=False)
    assert res.finished and res.step == res.total_steps == 24 and len(logs) == 4
    after = objective_on_fixed_views(params, method, variant, images, ckpt_io.load(tmp_path / CHECKPOINT),
                                     init_buffers)
    assert torch.isfinite(before).all() and torch.isfinite(after).all()
    assert (after < before).all(), (method, variant, before.tolist(), after.tolist())   # every term
    if variant == "augself":
        assert after.numel() == 4 and {"pretrain/loss_augself/crop", "pretrain/loss_augself/color"} <= logs[0].keys()
        for m in logs:   # λ = 1 and unit weights: total = ssl + crop + colour
            expect = m["pretrain/loss_ssl"] + m["pretrain/loss_augself/crop"] + m["pretrain/loss_augself/color"]
            assert m["pretrain/loss_total"] == pytest.approx(expect, rel=1e-5)
    else:
        assert after.numel() == 2 and not any(k.startswith("pretrain/loss_augself") for k in logs[0])


def test_lambda_zero_builds_no_head():
    params = tiny_params()
    model, _, _ = build_pretrain_model(RunRequest.resolve(params, "simclr", "baseline"), SIZE)
    assert model.head is None and model.term_names == ["ssl", "total"]
    zero = dataclasses.replace(params, augself=dataclasses.replace(params.augself, lambda_=0.0))
    model0, _, _ = build_pretrain_model(RunRequest.resolve(zero, "simclr", "augself"), SIZE)
    assert model0.head is None
    with_head, _, _ = build_pretrain_model(RunRequest.resolve(params, "simclr", "augself"), SIZE)
    assert with_head.head is not None
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(with_head) > n(model) == n(model0)


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)
    assert 0 < lr_factor(9, 10, 2) < 0.05


# ---------------------------------------------------------------------------- outputs and resume
def test_outputs_and_finished_checkpoint_is_not_retrained(tmp_path, capsys):
    params = tiny_params(epochs=2)
    res = pretrain(params, "simsiam", "augself", tiny_images(), tmp_path, device="cpu", progress=False)
    assert res.final == tmp_path / FINAL and res.total_steps == 4
    backbone, meta = load_backbone(tmp_path / FINAL)
    assert meta["method"] == "simsiam" and meta["variant"] == "augself" and meta["lambda"] == 1.0
    assert meta["image_size"] == SIZE
    assert meta["params_hash"] == training_hash(RunRequest.resolve(params, "simsiam", "augself"))
    assert meta["mean"] == list(params.augment.mean) and meta["cifar_stem"] is True
    metrics = json.loads((tmp_path / METRICS).read_text())
    timing = json.loads((tmp_path / TIMING).read_text())
    assert {**metrics, **timing} == pytest.approx(res.metrics)
    assert {"pretrain/loss_ssl", "pretrain/loss_augself/crop", "pretrain/loss_augself/color",
            "pretrain/loss_total"} <= metrics.keys()
    assert timing.keys() == {"pretrain/images_per_s", "pretrain/wall_time_s"} and timing["pretrain/images_per_s"] > 0
    header, *rows = (tmp_path / LOSSES).read_text().splitlines()
    assert header.split(",")[:3] == ["step", "epoch", "pretrain/loss_ssl"] and len(rows) == 2
    assert checkpoint_resumable(RunRequest.resolve(params, "simsiam", "augself"), tmp_path)

    before = backbone.state_dict()
    (tmp_path / FINAL).unlink()
    calls = []
    again = pretrain(params, "simsiam", "augself", tiny_images(), tmp_path, on_log=lambda s, m: calls.append(s),
                     device="cpu", progress=False)
    assert calls == [] and again.resumed_from == 4 and again.finished
    assert "rewriting the outputs only" in capsys.readouterr().err
    assert state_equal(load_backbone(tmp_path / FINAL)[0].state_dict(), before)
    assert again.metrics["pretrain/loss_total"] == pytest.approx(res.metrics["pretrain/loss_total"])


@pytest.mark.parametrize("method", METHODS)
def test_resume_is_exact(tmp_path, method, capsys):
    """2k steps in one go == k steps, stop, resume, k more (parameters, buffers, optimiser state)."""
    params = tiny_params(epochs=3, log_every=2, checkpoint_every=2, warmup_epochs=1.0)   # 6 steps
    images = tiny_images()
    whole = pretrain(params, method, "augself", images, tmp_path / "whole", device="cpu", progress=False)
    part = pretrain(params, method, "augself", images, tmp_path / "split", device="cpu", progress=False,
                    max_steps=3)
    assert not part.finished and part.step == 3 and part.final is None
    assert not (tmp_path / "split" / FINAL).exists()
    rest = pretrain(params, method, "augself", images, tmp_path / "split", device="cpu", progress=False)
    assert "resuming from" in capsys.readouterr().err and rest.resumed_from == 3 and rest.finished
    a = ckpt_io.load(tmp_path / "whole" / CHECKPOINT)
    b = ckpt_io.load(tmp_path / "split" / CHECKPOINT)
    assert a["step"] == b["step"] == 6
    assert state_equal(a["model"], b["model"]) and state_equal(a["head"], b["head"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert whole.metrics["pretrain/loss_total"] == rest.metrics["pretrain/loss_total"]
    assert loss_rows(tmp_path / "whole") == loss_rows(tmp_path / "split")


def loss_rows(out_dir: Path) -> list[dict]:
    """losses.csv without the timing columns."""
    with open(out_dir / LOSSES) as f:
        return [{k: v for k, v in r.items() if k != "pretrain/images_per_s"} for r in csv.DictReader(f)]


def test_training_hash_covers_what_changes_training():
    def hash_of(params: Params, variant: str = "augself") -> str:
        return training_hash(RunRequest.resolve(params, "simclr", variant))

    p = tiny_params()
    h = hash_of(p)
    assert hash_of(dataclasses.replace(p, ssl=dataclasses.replace(p.ssl, log_every=7, checkpoint_every=3,
                                                                  threads=2))) == h
    assert hash_of(dataclasses.replace(p, ssl=dataclasses.replace(p.ssl, lr=0.1))) != h
    assert hash_of(dataclasses.replace(p, seed=1)) != h
    other_moco = dataclasses.replace(p.ssl, moco=MethodParams(queue_size=32))
    assert hash_of(dataclasses.replace(p, ssl=other_moco)) == h
    new_lambda = dataclasses.replace(p, augself=dataclasses.replace(p.augself, lambda_=0.5))
    assert hash_of(new_lambda) != h
    assert hash_of(new_lambda, "baseline") == hash_of(p, "baseline")


def test_hash_mismatch_starts_fresh(tmp_path, capsys):
    params = tiny_params(epochs=2)
    pretrain(params, "simclr", "baseline", tiny_images(), tmp_path, device="cpu", progress=False, max_steps=2)
    changed = dataclasses.replace(params, seed=1)
    assert not checkpoint_resumable(RunRequest.resolve(changed, "simclr", "baseline"), tmp_path)
    res = pretrain(changed, "simclr", "baseline", tiny_images(), tmp_path, device="cpu", progress=False)
    err = capsys.readouterr().err
    assert "not resuming it, starting fresh" in err and "resuming from" not in err
    assert res.resumed_from == 0 and res.step == 4
    assert (ckpt_io.load(tmp_path / CHECKPOINT)["params_hash"]
            == training_hash(RunRequest.resolve(changed, "simclr", "baseline")))


def test_checkpoint_of_other_training_code_is_not_reused(tmp_path, monkeypatch):
    """A finished run is not reused once the training code changed (a bug fix must retrain)."""
    import pipeline.fingerprint as fingerprint

    params = tiny_params(epochs=1)
    pretrain(params, "simclr", "baseline", tiny_images(), tmp_path, device="cpu", progress=False)
    assert checkpoint_resumable(RunRequest.resolve(params, "simclr", "baseline"), tmp_path)
    monkeypatch.setattr(fingerprint, "training_code_fingerprint", lambda: "edited-code")
    assert not checkpoint_resumable(RunRequest.resolve(params, "simclr", "baseline"), tmp_path)


# ---------------------------------------------------------------------------- failure handling
def test_save_atomic_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    ckpt_io.save_atomic({"x": torch.ones(3)}, path)
    good = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")
    monkeypatch.setattr(ckpt_io.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_atomic({"x": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]     # no temp file left behind


def test_failure_during_checkpoint_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    params = tiny_params(epochs=2, checkpoint_every=2)
    pretrain(params, "byol", "augself", tiny_images(), tmp_path, device="cpu", progress=False, max_steps=2)
    good = (tmp_path / CHECKPOINT).read_bytes()
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(ckpt_io.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        pretrain(params, "byol", "augself", tiny_images(), tmp_path, device="cpu", progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert ckpt_io.load(tmp_path / CHECKPOINT)["step"] == 2


@pytest.mark.parametrize("term", ["ssl", "augself/crop"])
def test_nan_loss_stops_with_step_and_term_and_keeps_checkpoint(tmp_path, term):
    # Checkpoints at steps 2 and 4, losses read back every 4 steps: the NaN of step 3 is found when
    # step 4 wants to save, which must not happen.
    params = tiny_params(epochs=3, checkpoint_every=2, log_every=4)
    with pytest.raises(NonFiniteLossError, match=rf"step 3: term '{term}'") as info:
        pretrain(params, "simclr", "augself", tiny_images(), tmp_path, device="cpu", progress=False,
                 inject_nan=f"3:{term}")
    assert info.value.step == 3 and info.value.term == term and "left untouched" in str(info.value)
    state = ckpt_io.load(tmp_path / CHECKPOINT)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / FINAL).exists()


def test_nan_hook_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(NAN_ENV, "1:augself/color")
    with pytest.raises(NonFiniteLossError, match=r"step 1: term 'augself/color'.*no checkpoint"):
        pretrain(tiny_params(), "simclr", "augself", tiny_images(), tmp_path, device="cpu", progress=False)
    assert not (tmp_path / CHECKPOINT).exists()


def test_bad_inputs_are_refused_before_compute(tmp_path, monkeypatch):
    params = tiny_params()
    with pytest.raises(ValueError, match="uint8"):
        pretrain(params, "simclr", "baseline", tiny_images().astype(np.float32), tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="ssl.batch_size"):
        pretrain(params, "simclr", "baseline", tiny_images(8), tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="swav"):
        pretrain(params, "swav", "baseline", tiny_images(), tmp_path, device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"ssl.batch_size: 16 .*world size 3"):
        pretrain(params, "simclr", "baseline", tiny_images(), tmp_path, device="cpu")
    assert not torch.distributed.is_initialized() and not any(tmp_path.iterdir())


def test_request_is_checked_once_against_ssl_methods_and_variants(tmp_path):
    params = dataclasses.replace(tiny_params(methods=["simclr"]), variants=["baseline", "augself"])
    with pytest.raises(ConfigError, match=r"ssl.methods: unknown value 'byol'; allowed values: simclr"):
        pretrain(params, "byol", "baseline", tiny_images(), tmp_path, device="cpu")
    with pytest.raises(ConfigError, match=r"variants: unknown value 'cassle'; allowed values: baseline, augself"):
        pretrain(params, "simclr", "cassle", tiny_images(), tmp_path, device="cpu")
    assert not any(tmp_path.iterdir())


def test_progress_off_a_terminal_is_one_line_per_epoch(tmp_path, capsys):
    """Under a pipe (pytest captures stderr: not a tty) the bar is silent and each epoch prints one line."""
    pretrain(tiny_params(epochs=2), "simclr", "augself", tiny_images(), tmp_path, device="cpu", progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if " epoch " in ln]
    assert len(lines) == 2, lines
    for epoch, line in enumerate(lines, 1):
        assert re.fullmatch(rf"\[pretrain\] simclr-augself epoch {epoch}/2  ssl \d+\.\d{{4}}  augself/crop \S+  "
                            rf"augself/color \S+  total \S+  \d+ img/s  elapsed \d:\d\d:\d\d  ETA \d:\d\d:\d\d", line), line
    assert lines[-1].endswith("ETA 0:00:00")
    pretrain(tiny_params(epochs=2), "simclr", "augself", tiny_images(), tmp_path / "quiet", device="cpu", progress=False)
    assert " epoch " not in capsys.readouterr().err


# ---------------------------------------------------------------------------- DDP
def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_train import tiny_params, tiny_images
        from pipeline.train import pretrain
        res = pretrain(tiny_params(epochs=2, batch_size=16, checkpoint_every=2), "simclr", "augself",
                       tiny_images(), {str(tmp_path / "out")!r}, device="cpu", progress=False)
        assert res.finished and res.step == 4, res
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    backbone, meta = load_backbone(out / FINAL)
    assert meta["method"] == "simclr" and meta["variant"] == "augself"
    state = ckpt_io.load(out / CHECKPOINT)
    assert state["world_size"] == 2 and state["step"] == 4 and len(state["rng"]) == 2
    rows = (out / LOSSES).read_text().splitlines()
    assert len(rows) == 1 + 2                          # header + log points 2 and 4, written once (rank 0)
    assert "per rank" in proc.stderr                   # gloo: SyncBatchNorm unavailable, said so


_NARROW_CHANNELS_LAST_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_train import tiny_params, tiny_images
from pipeline.train import pretrain
torch.set_num_threads(1)
res = pretrain(tiny_params(channels_last=True, methods=["simclr"], epochs=1, width=int(sys.argv[3])),
               "simclr", "baseline", tiny_images(64), sys.argv[2], device="cpu", progress=False)
assert res.finished
print("trained")
"""


@pytest.mark.parametrize("width", [4, 6])
def test_a_narrow_network_trains_on_the_cpu_with_channels_last_on(tmp_path, width):
    """oneDNN's channels-last backward segfaults (width 4) or aborts (width 6) on this CPU; the pipeline
    trains such a network in the contiguous layout instead, with the default ``ssl.channels_last: true``.
    A subprocess, so that a crash is a red test instead of a dead test run."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _NARROW_CHANNELS_LAST_SCRIPT, str(ROOT), str(tmp_path), str(width)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "trained" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_progress_speed_after_a_mid_epoch_resume_counts_only_the_steps_it_ran(monkeypatch, capsys):
    """Resumed at step 5 of an 8-step epoch: the first line's images/s is 3 steps' images over their time,
    not a whole epoch's (the lines after a resume had claimed ≈ 3x the real speed)."""
    from types import SimpleNamespace

    from pipeline import progress

    clock = iter([0.0, 3.0, 11.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    run = SimpleNamespace(main=True, total_steps=24, step=5, steps_per_epoch=8, stop_at=24,
                          request=SimpleNamespace(method="simclr", variant="baseline"),
                          params=SimpleNamespace(ssl=SimpleNamespace(batch_size=16, epochs=3)),
                          log=SimpleNamespace(epoch_means=lambda epoch: {"pretrain/loss_ssl": 1.0}))
    bar = progress.Progress(run, enabled=True)
    for step in (8, 16):
        run.step = step
        bar.epoch_done(run, {})
    bar.close()
    speeds = re.findall(r"(\d+) img/s", capsys.readouterr().err)
    assert speeds == ["16", "16"], speeds
