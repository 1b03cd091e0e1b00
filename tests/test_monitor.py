"""The kNN monitor (pipeline.monitor) and its place in the loop: numbers, no effect on training, resume,
byte-identical DVC files, and the report's monitor figure."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import pipeline.checkpoint as ckpt_io
from pipeline.data import Split
from pipeline.monitor import KnnMonitor, MonitorData, knn_predict
from pipeline.report.plots import monitor_figure
from pipeline.train import CHECKPOINT, LOSSES, MONITOR, TIMING_CSV, pretrain
from tests.test_train import ROOT, SIZE, state_equal, tiny_images, tiny_params


def tiny_monitor(n_bank: int = 24, n_query: int = 12) -> MonitorData:
    """Bank and queries from other blobs than the training images, two label sets."""
    def split(n: int, seed: int) -> Split:
        rng = np.random.default_rng(seed)
        return Split(tiny_images(n, seed), {"class": rng.integers(0, 3, n), "color": rng.integers(0, 2, n)}, {})
    return MonitorData.from_splits(split(n_bank + 8, 1), split(n_query + 4, 2), ["class", "color"], seed=0,
                                   bank_size=n_bank, query_size=n_query)


# ---------------------------------------------------------------------------- the numbers
def test_knn_predict_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    query = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    knn, nn1 = knn_predict(query, bank, labels, n_classes=4, k=10, temperature=0.1)
    for q in range(7):
        sim = (bank @ query[q]).numpy()
        order = np.argsort(-sim)
        votes = np.zeros(4)
        for j in order[:10]:
            votes[labels[j]] += np.exp(sim[j] / 0.1)
        assert knn[q] == votes.argmax() and nn1[q] == labels[order[0]]
    knn1, _ = knn_predict(query, bank, labels, n_classes=4, k=1)
    assert torch.equal(knn1, nn1)                       # k = 1 is the 1-NN
    assert knn_predict(query, bank, labels, 4, k=500)[0].shape == (7,)   # k capped at the bank size


def test_subsets_are_fixed_and_drawn_from_their_own_generator():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a, b = tiny_monitor(), tiny_monitor()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert np.array_equal(a.bank_images, b.bank_images) and np.array_equal(a.query_labels["class"], b.query_labels["class"])
    assert len(a.bank_images) == 24 and len(a.query_images) == 12 and a.tasks == ["class", "color"]
    split = Split(tiny_images(40), {"class": np.arange(40) % 3}, {})
    other = MonitorData.from_splits(split, split, ["class"], seed=1, bank_size=24, query_size=12)
    seed0 = MonitorData.from_splits(split, split, ["class"], seed=0, bank_size=24, query_size=12)
    assert not np.array_equal(other.bank_images, seed0.bank_images)
    with pytest.raises(ValueError, match=r"task\(s\) \['fine'\].*data.datasets"):
        MonitorData.from_splits(split, split, ["fine"], seed=0)


def test_evaluate_is_frozen_and_leaves_batchnorm_and_rng_alone():
    from pipeline.models import build_backbone

    backbone, _ = build_backbone("resnet_small", SIZE, 4, True)
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = torch.get_rng_state()
    out = KnnMonitor(tiny_monitor(), (0.5,) * 3, (0.5,) * 3, 8, torch.device("cpu")).evaluate(backbone)
    assert set(out) == {f"monitor/{t}/{m}" for t in ("class", "color") for m in ("knn_top1", "nn1_top1")}
    assert all(0.0 <= v <= 100.0 for v in out.values())
    assert state_equal(backbone.state_dict(), before)   # running means/vars and num_batches_tracked too
    assert backbone.training and all(m.training for m in backbone.modules())
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------------------- in the loop
def test_monitor_does_not_change_training_resumes_its_curve_and_files_are_byte_identical(tmp_path):
    """On vs off: same weights and losses.csv; two runs: byte-identical losses.csv and monitor.csv;
    stop + resume: the same monitor curve, from the checkpoint's history."""
    params = tiny_params(epochs=3, log_every=2, checkpoint_every=2, monitor_every=2)   # 2 steps per epoch
    images, monitor = tiny_images(), tiny_monitor()
    logged = []
    kw = dict(device="cpu", progress=False)
    pretrain(params, "simclr", "augself", images, tmp_path / "on", monitor=monitor,
             on_log=lambda s, m: logged.append((s, sorted(k for k in m if k.startswith("monitor/")))), **kw)
    pretrain(params, "simclr", "augself", images, tmp_path / "again", monitor=monitor, **kw)
    pretrain(params, "simclr", "augself", images, tmp_path / "off", **kw)
    pretrain(params, "simclr", "augself", images, tmp_path / "split", monitor=monitor, max_steps=5, **kw)
    assert [r["step"] for r in ckpt_io.load(tmp_path / "split" / CHECKPOINT)["monitor"]] == [4]   # kept for resume
    pretrain(params, "simclr", "augself", images, tmp_path / "split", monitor=monitor, **kw)

    on, off = ckpt_io.load(tmp_path / "on" / CHECKPOINT), ckpt_io.load(tmp_path / "off" / CHECKPOINT)
    assert state_equal(on["model"], off["model"]) and state_equal(on["head"], off["head"])
    assert (tmp_path / "on" / LOSSES).read_bytes() == (tmp_path / "off" / LOSSES).read_bytes()
    assert (tmp_path / "off" / MONITOR).read_bytes() == b"step,epoch\r\n"      # a DVC out exists, empty
    for name in (LOSSES, MONITOR):
        assert (tmp_path / "on" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
        assert (tmp_path / "on" / name).read_bytes() == (tmp_path / "split" / name).read_bytes(), name
    curve = pd.read_csv(tmp_path / "on" / MONITOR)
    assert curve["step"].tolist() == [4, 6] and curve["epoch"].tolist() == [1, 2]   # every 2nd epoch + the last
    assert "monitor/class/knn_top1" in curve and "monitor/color/nn1_top1" in curve
    monitor_logs = [(s, keys) for s, keys in logged if keys]
    assert [s for s, _ in monitor_logs] == [4, 6] and len(monitor_logs[0][1]) == 4
    assert "images_per_s" not in (tmp_path / "on" / LOSSES).read_text()
    timing = pd.read_csv(tmp_path / "on" / TIMING_CSV)
    assert timing["step"].tolist() == [2, 4, 6] and (timing["pretrain/images_per_s"] > 0).all()


def test_monitor_every_zero_is_off(tmp_path):
    params = tiny_params(epochs=1, monitor_every=0)
    res = pretrain(params, "simclr", "baseline", tiny_images(), tmp_path, device="cpu", progress=False,
                   monitor=tiny_monitor())
    assert (tmp_path / MONITOR).read_bytes() == b"step,epoch\r\n" and "pretrain/monitor_s" not in res.metrics


def test_monitor_every_is_validated():
    from pipeline.config import ConfigError
    from pipeline.params import load_params

    with pytest.raises(ConfigError, match="ssl.monitor_every"):
        load_params(ROOT / "params.yaml", {"ssl.monitor_every": -1})


# ---------------------------------------------------------------------------- the report
def test_monitor_figure_draws_tasks_by_methods_and_skips_without_curves():
    runs = pd.DataFrame([{"run_id": f"{m}{v}{s}", "method": m, "variant": v, "lambda": 1.0 if v == "augself" else 0.0,
                          "seed": s} for m in ("simclr", "byol") for v in ("baseline", "augself") for s in (0, 1)])
    curves = {r: pd.DataFrame({"step": [10, 20, 30], "monitor/class/knn_top1": [20.0, 40.0 + i, 50.0],
                               "monitor/class/nn1_top1": [15.0, 30.0, 45.0], "monitor/color/knn_top1": [30, 60, 90],
                               "pretrain/loss_ssl": [3.0, 2.0, 1.0]})
              for i, r in enumerate(runs["run_id"])}
    fig, notes = monitor_figure(runs, curves, "kNN")
    assert fig is not None and notes == []
    axes = fig.get_axes()
    assert len(axes) == 2 * 2                                   # tasks (class, color) x methods
    assert {a.get_title() for a in axes} == {"simclr: class", "simclr: color", "byol: class", "byol: color"}
    simclr_class = next(a for a in axes if a.get_title() == "simclr: class")
    assert len(simclr_class.get_lines()) == 4                   # 2 variants x (kNN, 1-NN)
    ys = sorted(tuple(line.get_ydata()) for line in simclr_class.get_lines())
    assert (20.0, 40.5, 50.0) in ys                              # mean over the two seeds (40 + 0, 40 + 1)
    none, notes = monitor_figure(runs, {r: c.drop(columns=[k for k in c if k.startswith("monitor/")])
                                        for r, c in curves.items()}, "kNN")
    assert none is None and "no run has monitor" in notes[0]
