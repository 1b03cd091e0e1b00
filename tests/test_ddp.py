"""DDP equals one process (issue #15, item 2): ``pretrain()`` on 2 gloo ranks vs 1 process, all four methods.

Two processes (``torch.multiprocessing`` spawn, as ``tests/test_methods.py`` does; each joins the
group through torchrun's environment variables, so ``pretrain()`` runs exactly as under torchrun)
train every method for 4 steps with λ = 0.37.  One process then trains the same configuration on the
union of the ranks' batches, and the test requires, within float32 tolerance:

* the same logged loss terms at every step (DDP's are averaged over ranks when read back);
* the same parameters (method and AugSelf head) and the same MoCo queue after the last step;
* on every rank the same MoCo queue (the new keys are gathered from all ranks before enqueueing);
* rank shards that are disjoint and, in rank order, the global batch of the single process;
* views that differ between ranks (each rank has its own view generator) and are reproducible:
  redrawn from ``view_generator(seed, epoch, step, rank)`` they are the ones the rank trained on.

Two things differ *by design* between 2 ranks and 1 process, and the test neutralises both:

* **BatchNorm statistics.** ``SyncBatchNorm`` has no CPU kernel, so on gloo every rank normalises
  with the statistics of its own half batch, which one process over the union cannot reproduce.
  Both runs therefore replace every BatchNorm by its per-sample counterpart (GroupNorm with one
  group for ``BatchNorm2d``, LayerNorm for ``BatchNorm1d``; same affine flag), by wrapping
  ``pipeline.train.build_pretrain_model``.  A per-sample normalisation is the same whatever the
  batch is split into, so the comparison is exact up to float summation order, and everything else
  (sharding, view generators, the gathers inside the losses, gradient averaging, the queue) is
  the real code.  (BN per rank is the documented gloo limitation; on CUDA the loop uses SyncBatchNorm.)
* **Views.** A rank draws its views from its own generator ``view_generator(..., rank)``; a single
  process has one.  The single process is given an augmentation that draws chunk ``r`` of its
  batch with rank ``r``'s generator (by replacing ``pipeline.train.BatchAugment`` and
  ``pipeline.train.view_generator``), i.e. exactly the views the two ranks drew.

A cleaner hook than these monkeypatches would be a ``pretrain(..., emulate_ranks=2)`` option or a
public ``draw_views(params, x, seed, epoch, step, world)`` in ``pipeline.train`` that the loop calls.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import pipeline.checkpoint as ckpt_io
import pipeline.train as train
from pipeline.augment import BatchAugment, view_generator
from pipeline.params import METHODS
from tests.test_train import SIZE, tiny_images, tiny_params

WORLD = 2
LAMBDA = 0.37


def ddp_params():
    """4 steps (2 epochs of 32 images, global batch 16 = 8 per rank), a loss read back every step."""
    p = tiny_params(epochs=2, batch_size=16, log_every=1, checkpoint_every=100)
    return dataclasses.replace(p, augself=dataclasses.replace(p.augself, lambda_=LAMBDA,
                                                              weights={"crop": 0.6, "color": 1.7}))


def per_sample_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` (in place) by a normalisation over each sample alone.

    The replacement keeps the affine flag and whether its parameters are trained (a momentum
    encoder's copies stay frozen).
    """
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = (nn.GroupNorm(1, child.num_features, eps=child.eps, affine=child.affine)
                   if isinstance(child, nn.BatchNorm2d) else
                   nn.LayerNorm(child.num_features, eps=child.eps, elementwise_affine=child.affine))
            if child.affine:
                new.requires_grad_(child.weight.requires_grad)
            setattr(module, name, new)
        else:
            per_sample_norm(child)
    return module


def with_per_sample_norm(build):
    def wrapped(*args, **kwargs):
        model, backbone, info = build(*args, **kwargs)
        per_sample_norm(model)                    # in place: `backbone` is the same object, converted too
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        wrapped.models.append(model)
        return model, backbone, info
    wrapped.models, wrapped.__wrapped__ = [], build
    return wrapped


class Recording(BatchAugment):
    """The loop's augmentation, keeping each batch and its views and ω."""

    calls: list = []

    def __call__(self, images, generator):
        views, omega = super().__call__(images, generator)
        Recording.calls.append((images.clone(), views.contiguous().clone(), {k: v.clone() for k, v in omega.items()}))
        return views, omega


class EmulatedRanks(Recording):
    """One process drawing the views the ranks would: chunk r of the batch with rank r's generator."""

    def __call__(self, images, generators):
        outs = [BatchAugment.__call__(self, chunk, g) for chunk, g in zip(images.chunk(WORLD), generators)]
        views = torch.cat([v for v, _ in outs])
        omega = {k: (outs[0][1][k] if k == "color_order" else torch.cat([w[k] for _, w in outs])) for k in outs[0][1]}
        Recording.calls.append((images.clone(), views.contiguous().clone(), {k: v.clone() for k, v in omega.items()}))
        return views, omega


def rank_generators(seed, epoch, step, device="cpu", rank=0):
    return [view_generator(seed, epoch, step, device, r) for r in range(WORLD)]


def record_rank_run(method: str, record_dir: Path, out_dir: Path) -> None:
    """Train ``method`` on this process's rank (from torchrun's environment), recording batches and views.

    Writes ``record_dir/<method>-rank<RANK>.pt`` (the logs, the recorded calls, the final method and
    head states, and the rank's ``LOCAL_RANK``); ``pretrain()`` itself writes into ``out_dir``
    (rank 0 only).  Used by the spawned ranks here and by the two-node torchrun test.
    """
    torch.set_num_threads(1)
    build = with_per_sample_norm(train.build_pretrain_model)
    train.build_pretrain_model, train.BatchAugment = build, Recording
    Recording.calls, logs = [], []
    train.pretrain(ddp_params(), method, "augself", tiny_images(), out_dir,
                   on_log=lambda s, m: logs.append(m), device="cpu", progress=False)
    model = build.models[-1]
    rank = int(os.environ["RANK"])
    torch.save({"logs": logs, "calls": Recording.calls, "method": model.method.state_dict(),
                "head": model.head.state_dict(), "local_rank": int(os.environ["LOCAL_RANK"])},
               Path(record_dir) / f"{method}-rank{rank}.pt")
    train.build_pretrain_model, train.BatchAugment = build.__wrapped__, BatchAugment


def _rank_worker(rank: int, ports: list[int], out_dir: str) -> None:
    os.environ.update({"CUDA_VISIBLE_DEVICES": "", "WORLD_SIZE": str(WORLD), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"})
    for method, port in zip(METHODS, ports):
        os.environ["MASTER_PORT"] = str(port)
        record_rank_run(method, Path(out_dir), Path(out_dir) / method)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert k not in os.environ, f"{k} is set: run the tests outside torchrun"
    mp.start_processes(_rank_worker, args=([_free_port() for _ in METHODS], str(out)), nprocs=WORLD,
                       join=True, start_method="spawn")
    return out


def single_process_run(method: str, out_dir: Path, monkeypatch) -> dict:
    build = with_per_sample_norm(train.build_pretrain_model)
    monkeypatch.setattr(train, "build_pretrain_model", build)
    monkeypatch.setattr(train, "BatchAugment", EmulatedRanks)
    monkeypatch.setattr(train, "view_generator", rank_generators)
    Recording.calls, logs = [], []
    train.pretrain(ddp_params(), method, "augself", tiny_images(), out_dir, on_log=lambda s, m: logs.append(m),
                   device="cpu", progress=False)
    model = build.models[-1]
    return {"logs": logs, "calls": Recording.calls, "method": model.method.state_dict(),
            "head": model.head.state_dict()}


def assert_states_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} {k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), f"{what} {k}"


@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_ranks_equal_one_process_on_the_union_of_the_batch(ddp_runs, method, tmp_path, monkeypatch,
                                                                    one_thread):
    assert_ranks_equal_one_process(ddp_runs, ddp_runs / method, method, tmp_path, monkeypatch)


def assert_ranks_equal_one_process(record_dir: Path, rank0_out: Path, method: str, tmp_path: Path,
                                   monkeypatch) -> None:
    """The recorded ranks (``record_rank_run``) against one process on the union of their batches.

    ``rank0_out`` is where rank 0's ``pretrain()`` wrote its checkpoint.
    """
    ranks = [torch.load(record_dir / f"{method}-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = single_process_run(method, tmp_path, monkeypatch)
    steps = len(single["logs"])
    assert steps == 4 and len(ranks[0]["logs"]) == steps and ranks[1]["logs"] == []   # rank 0 logs only

    # the loss of every step: DDP's (mean over ranks) == one process over the global batch
    for s, (a, b) in enumerate(zip(ranks[0]["logs"], single["logs"])):
        losses = {k: v for k, v in b.items() if k.startswith("pretrain/loss_")}
        assert {k: a[k] for k in losses} == pytest.approx(losses, rel=1e-4, abs=1e-6), (method, s + 1)

    # parameters (and MoCo's queue) after the last step, on both ranks, and what rank 0 saved
    saved = ckpt_io.load(rank0_out / train.CHECKPOINT)
    assert saved["world_size"] == WORLD and saved["step"] == steps
    for r, state in enumerate(ranks):
        assert_states_close(state["method"], single["method"], f"{method} rank {r} vs one process:")
        assert_states_close(state["head"], single["head"], f"{method} head rank {r} vs one process:")
    assert_states_close(saved["model"], single["method"], f"{method} checkpoint vs one process:")
    if method == "moco":
        assert torch.equal(ranks[0]["method"]["queue"], ranks[1]["method"]["queue"])
        assert torch.equal(ranks[0]["method"]["queue_ptr"], ranks[1]["method"]["queue_ptr"])
        assert int(single["method"]["queue_ptr"]) == steps * 2 * 16 % ddp_params().ssl.moco.queue_size

    # shards: disjoint, and in rank order the single process's global batch; views per rank
    params = ddp_params()
    augment = BatchAugment(params.augment, SIZE)
    for s in range(steps):
        epoch = s // 2
        (x0, _, w0), (x1, _, w1) = ranks[0]["calls"][2 * s], ranks[1]["calls"][2 * s]
        flat0, flat1 = x0.flatten(1), x1.flatten(1)
        assert not (flat0[:, None] == flat1[None]).all(-1).any(), f"step {s + 1}: ranks share an image"
        assert torch.equal(torch.cat([x0, x1]), single["calls"][2 * s][0])
        assert not torch.equal(w0["crop"], w1["crop"]), f"step {s + 1}: both ranks drew the same views"
        for r, state in enumerate(ranks):
            g = view_generator(params.seed, epoch, s, "cpu", r)
            for call in state["calls"][2 * s: 2 * s + 2]:
                x, views, omega = call
                again, again_omega = augment(x, g)
                assert torch.equal(again.contiguous(), views), f"rank {r} step {s + 1}: views not reproducible"
                assert torch.equal(again_omega["crop"], omega["crop"])
