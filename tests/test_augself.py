"""AugSelf targets, head and losses (CPU, tiny shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.augment import BatchAugment
from pipeline.augmentations import get as record
from pipeline.augself import AugSelfHead, augself_targets, build_augself_head, weighted_total
from pipeline.config import ConfigError
from pipeline.params import AugmentParams, AugSelfParams

ALL = ["crop", "flip", "color", "blur"]
NEW = ["rotation", "solarize"]


def omega(crop, flip, color=None, blur=None, rotation=None, solarize=None) -> dict[str, torch.Tensor]:
    n = len(crop)
    return {
        "crop": torch.tensor(crop, dtype=torch.float32),
        "flip": torch.tensor(flip, dtype=torch.float32),
        "color": torch.tensor(color if color is not None else [[0.0] * 4] * n, dtype=torch.float32),
        "blur": torch.tensor(blur if blur is not None else [0.0] * n, dtype=torch.float32),
        "rotation": torch.tensor(rotation if rotation is not None else [0.0] * n, dtype=torch.float32),
        "solarize": torch.tensor(solarize if solarize is not None else [1.0] * n, dtype=torch.float32),
    }


# Sample 0: view 1 flipped, view 2 not.  Sample 1: neither flipped.  Sample 2: both flipped.
OMEGA1 = omega(crop=[[0.1, 0.2, 0.5, 0.4], [0.0, 0.0, 1.0, 1.0], [0.3, 0.1, 0.2, 0.6]], flip=[1, 0, 1],
               color=[[0.1, -0.2, 0.3, 0.4], [0, 0, 0, 0], [-0.5, 0.5, 0.0, 0.1]], blur=[0.5, 0.0, 1.0],
               rotation=[1, 0, 3], solarize=[0.25, 1.0, 0.5])
OMEGA2 = omega(crop=[[0.3, 0.5, 0.4, 0.2], [0.2, 0.3, 0.6, 0.4], [0.0, 0.4, 0.8, 0.5]], flip=[0, 0, 1],
               color=[[0.0, 0.0, 0.0, 0.0], [0.2, 0.1, -0.1, -0.3], [0.5, 0.5, 0.5, 0.5]], blur=[0.25, 0.75, 0.0],
               rotation=[3, 2, 0], solarize=[1.0, 0.75, 0.1])


# --------------------------------------------------------------------------- targets
def test_crop_target_mirrors_each_views_centre_with_its_own_flag():
    t = augself_targets(OMEGA1, OMEGA2, ["crop"])["crop"]
    # sample 0: centres (0.35, 0.4) → x mirrored to 0.6 (view 1 flipped); (0.5, 0.6) unflipped
    # sample 1: (0.5, 0.5) and (0.5, 0.5); sample 2: both flipped: 1 − 0.4 and 1 − 0.65
    expected = torch.tensor([[0.35 - 0.5, 0.6 - 0.6, 0.5 - 0.4, 0.4 - 0.2],
                             [0.5 - 0.5, 0.5 - 0.5, 1.0 - 0.6, 1.0 - 0.4],
                             [0.4 - 0.4, 0.6 - 0.35, 0.2 - 0.8, 0.6 - 0.5]])
    torch.testing.assert_close(t, expected)


def test_official_flip_mirror_uses_view_1_flag_for_both_centres():
    t = augself_targets(OMEGA1, OMEGA2, ["crop"], official_flip_mirror=True)["crop"]
    # sample 0: view 2's centre x (0.6) is mirrored too, with view 1's flag: 0.6 − (1 − 0.6)
    assert t[0, 1].item() == pytest.approx(0.6 - 0.4)
    own = augself_targets(OMEGA1, OMEGA2, ["crop"])["crop"]
    torch.testing.assert_close(t[1:], own[1:])                 # same flags: the two agree
    torch.testing.assert_close(t[:, [0, 2, 3]], own[:, [0, 2, 3]])
    # the official swapped order mirrors both with view 2's flag (unflipped): 0.6 − 0.4, not the negation
    swapped = augself_targets(OMEGA2, OMEGA1, ["crop"], official_flip_mirror=True)["crop"]
    assert swapped[0, 1].item() == pytest.approx(0.2) and t[0, 1].item() == pytest.approx(0.2)


def test_own_flag_targets_of_the_swapped_order_are_negated_and_flip_is_symmetric():
    t12 = augself_targets(OMEGA1, OMEGA2, ALL)
    t21 = augself_targets(OMEGA2, OMEGA1, ALL)
    for a in ("crop", "color", "blur"):
        torch.testing.assert_close(t21[a], -t12[a])
    torch.testing.assert_close(t21["flip"], t12["flip"])


def test_flip_color_blur_targets_and_shapes():
    t = augself_targets(OMEGA1, OMEGA2, ALL)
    assert {a: tuple(v.shape) for a, v in t.items()} == {a: (3, record(a).target.size) for a in ALL}
    torch.testing.assert_close(t["flip"], torch.tensor([[0.0], [1.0], [1.0]]))
    torch.testing.assert_close(t["color"], OMEGA1["color"] - OMEGA2["color"])
    torch.testing.assert_close(t["blur"], torch.tensor([[0.25], [-0.75], [1.0]]))
    assert list(augself_targets(OMEGA1, OMEGA2, ["color"])) == ["color"]


def test_rotation_and_solarize_targets_follow_the_official_extract_diff():
    t = augself_targets(OMEGA1, OMEGA2, NEW)
    # rotation: (k1 − k2 + 4) mod 4 = (1 − 3 + 4) % 4, (0 − 2 + 4) % 4, (3 − 0 + 4) % 4
    assert t["rotation"].dtype == torch.long and t["rotation"].tolist() == [2, 2, 3]
    torch.testing.assert_close(t["solarize"], torch.tensor([[-0.75], [0.25], [0.4]]))
    swapped = augself_targets(OMEGA2, OMEGA1, NEW)
    assert swapped["rotation"].tolist() == [2, 2, 1]         # the inverse rotation, (4 − t) mod 4
    torch.testing.assert_close(swapped["solarize"], -t["solarize"])


def test_rotation_and_solarize_targets_from_batch_augment():
    aug = BatchAugment(AugmentParams(rotation_p=0.5, solarize_p=0.5), 8)
    x = torch.rand(400, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    (_, o1), (_, o2) = aug(x, g), aug(x, g)
    t = augself_targets(o1, o2, NEW)
    assert set(t["rotation"].tolist()) == {0, 1, 2, 3}
    # both unrotated → class 0; P(class 0) = P(k1 = k2) = (1/2 + 1/8)² + 3·(1/8)² ≈ 0.44
    assert 0.34 < (t["rotation"] == 0).float().mean().item() < 0.54
    both_off = (o1["solarize"] == 1) & (o2["solarize"] == 1)
    assert 0.15 < both_off.float().mean() < 0.35 and bool((t["solarize"][both_off] == 0).all())
    assert t["solarize"].abs().max() <= 1.0


def test_targets_from_batch_augment_are_in_range():
    aug = BatchAugment(AugmentParams(blur_p=0.5), 8)
    x = torch.rand(64, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    (_, o1), (_, o2) = aug(x, g), aug(x, g)
    t = augself_targets(o1, o2, ALL)
    for a in ("crop", "color", "blur"):
        assert t[a].abs().max() <= 1.0 and t[a].abs().max() > 0.05, a
    assert set(t["flip"].flatten().tolist()) == {0.0, 1.0}


def test_unknown_or_empty_augmentations_are_refused():
    with pytest.raises(ConfigError, match="cutout"):
        augself_targets(OMEGA1, OMEGA2, ["crop", "cutout"])
    with pytest.raises(ConfigError, match="empty"):
        AugSelfHead(8, [])


# --------------------------------------------------------------------------- head and losses
def make_head(augs=ALL, **kw) -> AugSelfHead:
    torch.manual_seed(0)
    return AugSelfHead(6, augs, hidden_dim=16, **kw)


def features(n=3, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_head_is_the_official_mlp():
    head = make_head()
    assert list(head.heads) == ALL
    for a, mlp in head.heads.items():
        kinds = [type(m) for m in mlp]
        assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
        assert mlp[0].in_features == 12 and mlp[0].bias is None and mlp[3].bias is None
        assert mlp[6].out_features == record(a).target.size and mlp[6].bias is not None


def test_losses_equal_a_direct_symmetric_computation():
    head = make_head()
    f1, f2 = features()
    t = augself_targets(OMEGA1, OMEGA2, ALL)
    losses = head(f1, f2, t)
    z = torch.cat([torch.cat([f1, f2], 1), torch.cat([f2, f1], 1)], 0)
    for a in ("crop", "color", "blur"):
        direct = ((torch.tanh(head.heads[a](z)) - torch.cat([t[a], -t[a]])) ** 2).mean()
        torch.testing.assert_close(losses[a], direct)
    logits = head.heads["flip"](z)
    y = torch.cat([t["flip"], t["flip"]])
    direct = -(y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(losses["flip"], direct)


def test_swapping_the_views_and_their_targets_gives_the_same_losses():
    head = make_head()
    f1, f2 = features()
    t12 = augself_targets(OMEGA1, OMEGA2, ALL)
    t21 = augself_targets(OMEGA2, OMEGA1, ALL)
    a, b = head(f1, f2, t12), head(f2, f1, t21)
    for k in ALL:
        torch.testing.assert_close(a[k], b[k])
    # and the loss does depend on the targets' sign (it is not symmetric by accident)
    c = head(f1, f2, t21)
    assert not torch.allclose(a["crop"], c["crop"])


def test_loss_from_omega_builds_both_orders_and_honours_the_official_switch():
    f1, f2 = features()
    for official in (False, True):
        head = make_head(official_flip_mirror=official)
        got = head.loss_from_omega(f1, f2, OMEGA1, OMEGA2)
        want = head(f1, f2, augself_targets(OMEGA1, OMEGA2, ALL, official),
                    augself_targets(OMEGA2, OMEGA1, ALL, official))
        for k in ALL:
            torch.testing.assert_close(got[k], want[k])
    own = make_head().loss_from_omega(f1, f2, OMEGA1, OMEGA2)["crop"]
    off = make_head(official_flip_mirror=True).loss_from_omega(f1, f2, OMEGA1, OMEGA2)["crop"]
    assert not torch.allclose(own, off)


def test_gradients_reach_the_features_and_the_head():
    head = make_head()
    f1, f2 = (f.requires_grad_() for f in features(n=4))
    o1 = {k: v.repeat(2, *[1] * (v.ndim - 1))[:4] for k, v in OMEGA1.items()}
    o2 = {k: v.repeat(2, *[1] * (v.ndim - 1))[:4] for k, v in OMEGA2.items()}
    total = head.weighted_total(head.loss_from_omega(f1, f2, o1, o2))
    total.backward()
    for f in (f1, f2):
        assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


def test_weighted_total_and_head_weights():
    losses = {"crop": torch.tensor(2.0), "color": torch.tensor(3.0)}
    assert weighted_total(losses).item() == 5.0
    assert weighted_total(losses, {"crop": 0.5}).item() == 4.0
    head = make_head(["crop", "color"], weights={"crop": 0.5, "color": 2.0})
    assert head.weighted_total(losses).item() == pytest.approx(7.0)
    with pytest.raises(ValueError):
        weighted_total({})
    with pytest.raises(ConfigError, match="augself.weights"):
        make_head(["crop"], weights={"crop": -1.0})


def test_bad_inputs_to_the_head_raise():
    head = make_head(["crop"])
    f1, f2 = features()
    with pytest.raises(ValueError, match="targets lack"):
        head(f1, f2, {})
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        head(f1, f2[:, :5], augself_targets(OMEGA1, OMEGA2, ["crop"]))


def test_rotation_head_is_4_way_cross_entropy_and_solarize_is_mse_on_tanh():
    head = make_head(ALL + NEW)
    assert head.heads["rotation"][6].out_features == 4 and head.heads["solarize"][6].out_features == 1
    f1, f2 = features()
    t12, t21 = augself_targets(OMEGA1, OMEGA2, NEW), augself_targets(OMEGA2, OMEGA1, NEW)
    losses = head(f1, f2, {**augself_targets(OMEGA1, OMEGA2, ALL), **t12})
    z = torch.cat([torch.cat([f1, f2], 1), torch.cat([f2, f1], 1)], 0)
    logits = head.heads["rotation"](z)
    direct = -F.log_softmax(logits, 1).gather(1, torch.cat([t12["rotation"], t21["rotation"]])[:, None]).mean()
    torch.testing.assert_close(losses["rotation"], direct)
    pred = torch.tanh(head.heads["solarize"](z))
    torch.testing.assert_close(losses["solarize"], ((pred - torch.cat([t12["solarize"], t21["solarize"]])) ** 2).mean())
    got = head.loss_from_omega(f1, f2, OMEGA1, OMEGA2)
    for a in NEW:
        torch.testing.assert_close(got[a], losses[a])
    with pytest.raises(ValueError, match="class indices"):
        head(f1, f2, {**augself_targets(OMEGA1, OMEGA2, ALL), **t12, "rotation": torch.zeros(3, 4)})


def test_augself_target_for_an_augmentation_that_is_off_is_refused():
    from pipeline.params import Params
    for aug, key in (("rotation", "augment.rotation_p"), ("solarize", "augment.solarize_p"),
                     ("blur", "augment.blur_p"), ("flip", "augment.flip_p")):
        with pytest.raises(ConfigError, match=rf"augself.augmentations.*{aug!r}.*{key} = 0"):
            Params(augment=AugmentParams(flip_p=0.0), augself=AugSelfParams(augmentations=["crop", aug]))
    with pytest.raises(ConfigError, match="augment.jitter_p"):
        Params(augment=AugmentParams(jitter_p=0.0), augself=AugSelfParams(augmentations=["color"]))
    ok = Params(augment=AugmentParams(rotation_p=0.5, solarize_p=0.5),
                augself=AugSelfParams(augmentations=["crop", "rotation", "solarize"]))
    assert ok.augself.augmentations == ["crop", "rotation", "solarize"]


def test_lambda_zero_builds_no_head():
    params = AugSelfParams(augmentations=["crop", "flip"], weights={"flip": 0.5}, hidden_dim=8)
    assert build_augself_head(6, params, 0.0) is None
    head = build_augself_head(6, params, 1.0)
    assert isinstance(head, AugSelfHead) and list(head.heads) == ["crop", "flip"]
    assert head.weights == {"crop": 1.0, "flip": 0.5} and head.heads["crop"][0].out_features == 8
    with pytest.raises(ConfigError, match="augself.lambda"):
        build_augself_head(6, params, -0.1)


def test_losses_are_float32_under_bf16_autocast():
    head = make_head()
    f1, f2 = features(n=4)
    o1 = {k: v.repeat(2, *[1] * (v.ndim - 1))[:4] for k, v in OMEGA1.items()}
    o2 = {k: v.repeat(2, *[1] * (v.ndim - 1))[:4] for k, v in OMEGA2.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = head.loss_from_omega(f1, f2, o1, o2)
    reference = head.loss_from_omega(f1, f2, o1, o2)
    for a in ALL:
        assert losses[a].dtype == torch.float32
        assert losses[a].item() == pytest.approx(reference[a].item(), rel=0.05)


def test_pretraining_with_rotation_and_solarize_targets_logs_their_losses(tmp_path):
    """The training loop end to end with the two new heads: finite losses, logged under their names."""
    import dataclasses

    from pipeline.train import pretrain
    from tests.test_train import tiny_images, tiny_params

    p = tiny_params(epochs=1, log_every=1)
    p = dataclasses.replace(p, augment=dataclasses.replace(p.augment, rotation_p=0.5, solarize_p=0.5),
                            augself=dataclasses.replace(p.augself, augmentations=["crop", "rotation", "solarize"]))
    logs: list[dict] = []
    res = pretrain(p, "simclr", "augself", tiny_images(16), tmp_path, on_log=lambda s, m: logs.append(m),
                   device="cpu", progress=False)
    assert res.finished and logs
    for m in logs:
        assert {f"pretrain/loss_augself/{a}" for a in ("crop", "rotation", "solarize")} <= m.keys()
        # an untrained 4-way head starts near ln 4 (uniform logits); MSE on tanh below 4
        assert 0.5 < m["pretrain/loss_augself/rotation"] < 3.0 and 0 <= m["pretrain/loss_augself/solarize"] < 4
