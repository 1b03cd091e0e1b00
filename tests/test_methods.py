"""SSL methods (pipeline.methods): losses against direct reference computations, momentum encoders,
the MoCo queue, learning on a tiny batch, and SimCLR's DDP gradient equivalence (2 CPU processes)."""

from __future__ import annotations

import copy
import math
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline import distributed
from pipeline.methods import METHODS, SSLMethod, build_method
from pipeline.methods.base import cosine_momentum, ema_update
from pipeline.methods.byol import normalized_mse
from pipeline.methods.moco import info_nce
from pipeline.methods.simclr import nt_xent
from pipeline.methods.simsiam import negative_cosine
from pipeline.models import build_backbone
from pipeline.params import METHODS as METHOD_NAMES
from pipeline.params import MethodParams, SSLParams

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16          # image side of the tiny test batches




def tiny_params(name: str, **kw) -> MethodParams:
    """The method's default params from SSLParams, shrunk to test size."""
    base = SSLParams().method(name)
    small = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8, queue_size=64)
    small.update(kw)
    return replace(base, **small)


def tiny_method(name: str, seed: int = 0, width: int = 4, **kw) -> SSLMethod:
    torch.manual_seed(seed)
    backbone, feat_dim = build_backbone("resnet_small", SIZE, width=width)
    return build_method(name, backbone, feat_dim, tiny_params(name, **kw))


def two_views(n: int = 16, seed: int = 0, noise: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    return (x + noise * torch.randn(x.shape, generator=g), x + noise * torch.randn(x.shape, generator=g))


# ----------------------------------------------------------------------------------- registry
def test_registry_matches_params_schema():
    assert set(METHODS) == set(METHOD_NAMES)
    for name, cls in METHODS.items():
        assert cls.name == name and issubclass(cls, SSLMethod)


def test_build_method_unknown_name():
    backbone, d = build_backbone("resnet_small", SIZE, width=4)
    with pytest.raises(ValueError, match="simclr"):
        build_method("swav", backbone, d, MethodParams())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_forward_returns_loss_and_online_features(name):
    method = tiny_method(name)
    v1, v2 = two_views(8)
    out = method(v1, v2)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.f1.shape == out.f2.shape == (8, method.feat_dim)
    torch.testing.assert_close(out.f1, method.backbone(v1))        # the online backbone's features
    assert out.f1.requires_grad and out.f2.requires_grad           # the AugSelf head trains through them


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_bf16_autocast_and_channels_last(name):
    """The loop runs methods under autocast and in channels_last: losses stay float32 and finite,
    and the momentum update and the queue accept what that produces."""
    method = tiny_method(name).to(memory_format=torch.channels_last)
    v1, v2 = (v.to(memory_format=torch.channels_last) for v in two_views(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(v1, v2)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    method.on_step_end(0.5)
    if name == "moco":
        assert method.queue.dtype == torch.float32 and int(method.queue_ptr) == 16


# ----------------------------------------------------------------------------------- SimCLR
def test_nt_xent_identical_orthogonal_embeddings_by_hand():
    # z1 = z2 = two orthonormal vectors: for every anchor the positive has similarity 1 and the two
    # negatives 0, so each term is -log(e^{1/T} / (e^{1/T} + 2)) = log(1 + 2 e^{-1/T}).
    z = torch.eye(2)
    t = 0.5
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-6)
    # scale invariance: inputs are normalised inside
    assert nt_xent(3 * z, 0.5 * z, t).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-6)


def test_nt_xent_matches_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    t = 0.2
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + n // 2) % n
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(n) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denom)
    assert nt_xent(z1, z2, t).item() == pytest.approx(total / n, rel=1e-5)


# ----------------------------------------------------------------------------------- SimSiam
def test_negative_cosine_bounds_and_stop_gradient():
    p = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], requires_grad=True)
    z = p.detach().clone().mul(3).requires_grad_()
    assert negative_cosine(p, z).item() == pytest.approx(-1.0)
    assert negative_cosine(p, -z).item() == pytest.approx(1.0)
    ortho = torch.tensor([[-2.0, 1.0, 0.0], [0.0, 1.0, -1.0]])
    assert negative_cosine(p, ortho).item() == pytest.approx(0.0, abs=1e-7)
    negative_cosine(p, z).backward()
    assert z.grad is None and p.grad is not None


def test_simsiam_loss_is_symmetric_negative_cosine():
    method = tiny_method("simsiam")
    v1, v2 = two_views(8)
    out = method(v1, v2)
    with torch.no_grad():
        z1, z2 = method.projector(method.backbone(v1)), method.projector(method.backbone(v2))
        p1, p2 = method.predictor(z1), method.predictor(z2)
        ref = -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert {id(p) for p in method.fixed_lr_parameters()} == {id(p) for p in method.predictor.parameters()}


# ----------------------------------------------------------------------------------- MoCo
def test_info_nce_matches_naive_computation():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    k = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    queue = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    t = 0.2
    total = 0.0
    for i in range(3):
        logits = [float(q[i] @ k[i]) / t] + [float(q[i] @ queue[j]) / t for j in range(5)]
        total += -(logits[0] - math.log(sum(math.exp(v) for v in logits)))
    assert info_nce(q, k, queue, t).item() == pytest.approx(total / 3, rel=1e-5)
    # a hand-made case: positive aligned, negatives orthogonal → log(1 + K e^{-1/T})
    e = torch.eye(4)
    assert info_nce(e[:1], e[:1], e[1:], 0.5).item() == pytest.approx(math.log(1 + 3 * math.exp(-2)), rel=1e-6)


def _keys(method, v):
    with torch.no_grad():
        return F.normalize(method.key_projector(method.key_backbone(v)), dim=1)


def _queries(method, v):
    with torch.no_grad():
        return F.normalize(method.projector(method.backbone(v)), dim=1)


@pytest.mark.parametrize("official", [False, True])
def test_moco_loss_uses_old_queue_then_enqueues_in_order(official):
    method = tiny_method("moco", queue_size=6, official_queue=official)
    v1, v2 = two_views(2)
    queue0 = method.queue.clone()
    out = method(v1, v2)
    k1, k2 = _keys(method, v1), _keys(method, v2)
    q1, q2 = _queries(method, v1), _queries(method, v2)
    ref = 0.5 * (info_nce(q1, k2, queue0, 0.2) + info_nce(q2, k1, queue0, 0.2))
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    new1 = torch.cat([q1, q2] if official else [k1, k2])          # [view-1 entries; view-2 entries]
    torch.testing.assert_close(method.queue[:4], new1)
    torch.testing.assert_close(method.queue[4:], queue0[4:])      # untouched
    assert int(method.queue_ptr) == 4
    # the second batch wraps around: positions 4, 5, 0, 1
    w1, w2 = two_views(2, seed=1)
    method(w1, w2)
    new2 = torch.cat([_queries(method, w1), _queries(method, w2)] if official
                     else [_keys(method, w1), _keys(method, w2)])
    torch.testing.assert_close(method.queue[[4, 5, 0, 1]], new2)
    torch.testing.assert_close(method.queue[2:4], new1[2:4])
    assert int(method.queue_ptr) == 2


def test_moco_eval_forward_leaves_queue_alone():
    method = tiny_method("moco").eval()
    before = method.queue.clone()
    method(*two_views(4))
    assert torch.equal(method.queue, before) and int(method.queue_ptr) == 0


def test_moco_enqueue_more_entries_than_queue_keeps_the_last():
    method = tiny_method("moco", queue_size=4)
    method.queue_ptr.fill_(1)
    entries = torch.arange(6 * 16, dtype=torch.float32).view(6, 16)
    method.enqueue(entries)
    # the 6 entries would land at 1,2,3,0,1,2: the last 4 (rows 2..5) survive at 3,0,1,2
    torch.testing.assert_close(method.queue[[3, 0, 1, 2]], entries[2:])
    assert int(method.queue_ptr) == (1 + 6) % 4


def test_moco_state_dict_resumes_exactly():
    a = tiny_method("moco", queue_size=8)
    opt = torch.optim.SGD(a.ssl_parameters(), lr=0.1)
    for s in range(2):
        opt.zero_grad()
        a(*two_views(4, seed=s)).loss.backward()
        opt.step()
        a.on_step_end(s / 2)
    assert {"queue", "queue_ptr"} <= set(a.state_dict())
    assert any(k.startswith("key_backbone.") for k in a.state_dict())
    b = tiny_method("moco", seed=5, queue_size=8)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.queue, a.queue) and int(b.queue_ptr) == int(a.queue_ptr) == 0
    v = two_views(4, seed=9)
    torch.testing.assert_close(b(*v).loss, a(*v).loss, rtol=0, atol=0)
    assert torch.equal(b.queue, a.queue)


# ----------------------------------------------------------------------------------- BYOL
def test_byol_momentum_schedule():
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 0.5) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.996, 0.25) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    method = tiny_method("byol", momentum=0.99)
    assert method.momentum_at(0.0) == pytest.approx(0.99) and method.momentum_at(1.0) == 1.0


def test_normalized_mse_is_two_minus_two_cosine():
    g = torch.Generator().manual_seed(2)
    p, z = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    ref = 2 - 2 * F.cosine_similarity(p, z).mean()
    torch.testing.assert_close(normalized_mse(p, z), ref)
    assert normalized_mse(p, 4 * p).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name,online,target", [("byol", ["backbone", "projector"],
                                                 ["target_backbone", "target_projector"]),
                                                ("moco", ["backbone", "projector"],
                                                 ["key_backbone", "key_projector"])])
def test_target_networks_follow_the_ema_rule(name, online, target):
    method = tiny_method(name, momentum=0.9)
    with torch.no_grad():                                        # make online and target differ
        for p in method.ssl_parameters():
            p.add_(torch.randn_like(p))
    tgt = [p for t in target for p in getattr(method, t).parameters()]
    onl = [p for o in online for p in getattr(method, o).parameters()]
    assert len(tgt) == len(onl) and all(not p.requires_grad for p in tgt)
    before = [p.clone() for p in tgt]
    progress = 0.3
    m = method.momentum_at(progress) if name == "byol" else 0.9
    method.on_step_end(progress)
    for b, t, o in zip(before, tgt, onl):
        torch.testing.assert_close(t, m * b + (1 - m) * o)
    # at the end of the BYOL ramp the target stops moving
    if name == "byol":
        frozen = [p.clone() for p in tgt]
        method.on_step_end(1.0)
        assert all(torch.equal(f, t) for f, t in zip(frozen, tgt))


def test_ema_update_refuses_mismatched_networks():
    a, b = torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="copy of the online"):
        ema_update(b, a, 0.5)


@pytest.mark.parametrize("name,frozen", [("byol", "target_"), ("moco", "key_")])
def test_momentum_networks_are_frozen_saved_and_not_optimised(name, frozen):
    method = tiny_method(name)
    frozen_params = [p for n, p in method.named_parameters() if n.startswith(frozen)]
    assert frozen_params and not any(p.requires_grad for p in frozen_params)
    assert not {id(p) for p in frozen_params} & {id(p) for p in method.ssl_parameters()}
    assert any(k.startswith(frozen + "backbone.") for k in method.state_dict())
    method(*two_views(4)).loss.backward()
    assert all(p.grad is None for p in frozen_params)


# ----------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_sgd_steps_reduce_the_loss_on_a_fixed_batch(name):
    """Two noisy copies of random images: a few SGD steps must lower the loss on that batch.

    The loss is measured on a copy of the method (train-mode BN, and for MoCo the same queue before
    and after), so the measurement itself changes nothing.
    """
    method = tiny_method(name, momentum=0.9)
    v1, v2 = two_views(16, noise=0.5)
    reference_queue = method.queue.clone() if name == "moco" else None

    def loss_now() -> float:
        probe = copy.deepcopy(method)
        if reference_queue is not None:
            probe.queue.copy_(reference_queue)
        with torch.no_grad():
            return probe(v1, v2).loss.item()

    opt = torch.optim.SGD(method.ssl_parameters(), lr=0.05, momentum=0.9)
    start = loss_now()
    steps = 12
    for s in range(steps):
        opt.zero_grad()
        method(v1, v2).loss.backward()
        opt.step()
        method.on_step_end((s + 1) / steps)
    end = loss_now()
    assert end < start - 0.1, (start, end)


# ----------------------------------------------------------------------------------- distributed
def test_distributed_helpers_without_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.is_dist() and distributed.rank() == 0 and distributed.world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    assert torch.equal(distributed.gather(x), x.detach())
    ctx = distributed.setup_from_env()
    assert ctx.world_size == 1 and not ctx.distributed and not distributed.is_dist()
    distributed.cleanup()                                          # a no-op without a group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _simclr_grads(method, v1, v2):
    method.zero_grad()
    out = method(v1, v2)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world: int, port: int, v1, v2, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # gathers concatenate in rank order
        assert torch.equal(distributed.gather(torch.full((2,), float(rank))), torch.tensor([0., 0., 1., 1.]))
        # BN in eval mode: per-rank batch statistics would differ from the full batch's by design
        # (SyncBatchNorm has no CPU kernel); what is tested is the loss and its global negatives.
        method = tiny_method("simclr", width=2).eval()
        ddp = torch.nn.parallel.DistributedDataParallel(method)
        b = v1.shape[0] // world
        mine = slice(rank * b, (rank + 1) * b)
        loss, grads = _simclr_grads(ddp, v1[mine], v2[mine])
        torch.save((loss, {n.removeprefix("module."): g for n, g in grads.items()}), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_simclr_ddp_gradients_equal_single_process_full_batch(tmp_path):
    v1, v2 = two_views(8, noise=0.2)
    single = tiny_method("simclr", width=2).eval()
    loss, grads = _simclr_grads(single, v1, v2)

    mp.start_processes(_ddp_worker, args=(2, _free_port(), v1, v2, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    per_rank = {r: torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)}
    # the per-rank losses (local anchors, global negatives) average to the full-batch loss
    torch.testing.assert_close((per_rank[0][0] + per_rank[1][0]) / 2, loss, rtol=1e-5, atol=1e-6)
    for rank in (0, 1):
        ddp_grads = per_rank[rank][1]
        assert ddp_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(ddp_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
