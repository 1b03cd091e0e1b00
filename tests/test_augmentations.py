"""One record per augmentation (issue 25 item 2): adding one is its op plus its record, a checked property.

A toy augmentation ``tint`` (a per-channel colour offset δ ~ U(−0.1, 0.1)³ added to the view) is defined
here only: its op (a :class:`pipeline.augment._Op`) and its record (:class:`pipeline.augmentations.
Augmentation`).  Registered for one test, it reaches params validation, the view pipeline and its ω,
the AugSelf target and head, CASSLE's ω vector, the probe and the training loop, with no other file
edited; unregistered, every reader refuses it again.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import augment, augmentations
from pipeline.augmentations import Augmentation, Block, Target
from pipeline.config import ConfigError
from pipeline.params import AugmentParams, AugSelfParams, CassleParams, Params

TINT_RANGE = 0.1


class _Tint(augment._Op):
    """Add δ_c ~ U(−0.1, 0.1) to each channel c of the view (clamped); ω ``tint`` = δ / 0.1 in [−1, 1]³."""

    name = "tint"
    optional = True                          # a new op draws after the frozen core block, only when on
    columns = (("delta", 3),)

    def sample(self, u, ctx):
        return {"tint": (2 * u["delta"] - 1) * TINT_RANGE}

    def apply_(self, x, d, plan):
        return x.add_(d["tint"].view(-1, 3, 1, 1)).clamp_(0, 1)

    def omega(self, d, ctx):
        return {"tint": d["tint"] / TINT_RANGE}


def _tint_difference(o1, o2, official):
    return o1["tint"] - o2["tint"]


TINT = Augmentation("tint", key=None, omega=(("tint", 3),), target=Target(3, "regression", _tint_difference),
                    probe="ridge", cassle=(Block("tint", 3),))


@pytest.fixture
def tint(monkeypatch):
    """The toy op and its record, registered for one test (both removed afterwards)."""
    monkeypatch.setitem(augment._OP_CLASSES, "tint", _Tint)
    with augmentations.registered(TINT):
        yield TINT
    assert "tint" not in augmentations.names()


def _omega_pair(params: Params, n: int = 12):
    x = torch.randint(0, 256, (n, 16, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    aug = augment.BatchAugment(params.augment, 8)
    g = augment.view_generator(0, 0, 0)
    return aug(x, g), aug(x, g)


def test_the_toy_is_refused_without_its_record():
    with pytest.raises(ConfigError, match="augself.augmentations: unknown value 'tint'"):
        AugSelfParams(augmentations=["crop", "tint"])
    with pytest.raises(ConfigError, match="cassle.conditions: unknown value 'tint'"):
        CassleParams(conditions=["crop", "tint"])
    with pytest.raises(ConfigError, match="augment.order: unknown value 'tint'"):
        AugmentParams(order=[*augmentations.pipeline_order(), "tint"])


def test_a_toy_augmentation_reaches_every_reader_through_its_record(tint, one_thread):
    from pipeline.augself import AugSelfHead, augself_targets
    from pipeline.cassle import condition_dim, omega_vector
    from pipeline.study.ledger import expected_metrics
    from pipeline.augmentations import probed

    # params validation: the op is in augment.order's default, the target and the block are allowed
    p = Params(augself=AugSelfParams(augmentations=["crop", "tint"]), cassle=CassleParams(conditions=["tint", "crop"]))
    assert p.augment.order[-1] == "tint" and p.augment.probability("tint") == 1.0
    with pytest.raises(ConfigError, match=r"augment.order: .* must list every op exactly once"):
        AugmentParams(order=[o for o in augmentations.pipeline_order() if o != "tint"])

    # the view pipeline runs the op and returns its ω
    (v1, o1), (v2, o2) = _omega_pair(p)
    assert o1["tint"].shape == (12, 3) and o1["tint"].dtype == torch.float32
    assert 0 < o1["tint"].abs().max() <= 1 and not torch.equal(o1["tint"], o2["tint"])

    # AugSelf: the target, the head's width and its loss
    t = augself_targets(o1, o2, ["crop", "tint"])
    torch.testing.assert_close(t["tint"], o1["tint"] - o2["tint"], rtol=0, atol=0)
    torch.manual_seed(0)
    head = AugSelfHead(6, ["crop", "tint"], hidden_dim=8)
    assert head.heads["tint"][-1].out_features == 3
    losses = head.loss_from_omega(torch.randn(12, 6), torch.randn(12, 6), o1, o2)
    assert set(losses) == {"crop", "tint"} and torch.isfinite(losses["tint"])

    # CASSLE: the block's width, in alphabetical place (crop, tint)
    assert condition_dim(["tint", "crop"]) == 4 + 3
    vec = omega_vector(o1, p.cassle.conditions)
    assert vec.shape == (12, 7) and torch.equal(vec[:, 4:], o1["tint"])

    # the probe measures it (ridge R²), and the study's ledger waits for its metric
    assert probed(p.augment) == ["crop", "flip", "color", "tint"]
    assert "probe/tint/r2" in expected_metrics(p)


def test_a_toy_augmentation_trains_as_an_augself_target_and_a_cassle_block(tint, one_thread, tmp_path):
    from pipeline.train import pretrain
    from tests.test_train import tiny_images, tiny_params

    p = tiny_params(epochs=1, log_every=1)
    p = dataclasses.replace(p, augself=dataclasses.replace(p.augself, augmentations=["crop", "tint"]),
                            cassle=dataclasses.replace(p.cassle, conditions=["crop", "tint"], depth=2, width=8))
    logs: list[dict] = []
    res = pretrain(p, "simclr", "augself", tiny_images(16), tmp_path / "augself", on_log=lambda s, m: logs.append(m),
                   device="cpu", progress=False)
    assert res.finished and all(torch.isfinite(torch.tensor(m["pretrain/loss_augself/tint"])) for m in logs)
    assert pretrain(p, "simclr", "cassle", tiny_images(16), tmp_path / "cassle", device="cpu", progress=False).finished


def test_a_toy_augmentation_that_is_off_is_refused_naming_its_key(tint):
    augmentations.unregister("tint")                         # the same record, switched by augment.blur_p
    augmentations.register(dataclasses.replace(TINT, key="blur_p"))
    off = AugmentParams(blur_p=0.0)
    with pytest.raises(ConfigError, match=r"augself.augmentations: 'tint' is listed but its augmentation is off "
                                          r"\(augment.blur_p = 0\)"):
        Params(augment=off, augself=AugSelfParams(augmentations=["crop", "tint"]))
    with pytest.raises(ConfigError, match=r"cassle.conditions: 'tint' is listed but its augmentation is off"):
        Params(augment=off, variants=["baseline", "cassle"], cassle=CassleParams(conditions=["tint"]))
    assert augmentations.probed(off) == ["crop", "flip", "color"]      # not probed while off


def test_records_are_consistent_with_the_ops():
    """Every record has an op, its ω keys and widths are what the op returns, and an op that is off returns
    its record's ``off`` value; the CASSLE blocks read keys the ω has."""
    assert sorted(augment._OP_CLASSES) == sorted(augmentations.names())
    every = AugmentParams(blur_p=0.5, solarize_p=0.5, rotation_p=0.5)
    (_, omega), _ = _omega_pair(Params(augment=every))
    declared = {k: w for a in augmentations.records() for k, w in a.omega}
    assert {k: (1 if v.dim() == 1 else v.shape[1]) for k, v in omega.items() if k != "color_order"} == declared
    nothing = AugmentParams(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    (_, omega), _ = _omega_pair(Params(augment=nothing, variants=["baseline"]))
    for a in augmentations.records():
        if a.probability(nothing) == 0:
            for key, _ in a.omega:
                assert bool((omega[key] == a.off).all()), (a.name, key)
    for name, block in augmentations.cassle_blocks().items():
        assert set(block.reads) <= set(declared), name


def test_registry_refuses_a_second_record_of_a_name_or_a_block():
    with pytest.raises(ValueError, match="registered already"):
        augmentations.register(dataclasses.replace(TINT, name="crop"))
    with pytest.raises(ValueError, match=r"CASSLE block\(s\) \['flip'\] belong to another augmentation"):
        augmentations.register(dataclasses.replace(TINT, cassle=(Block("flip", 1),)))
    assert "tint" not in augmentations.names()
    with pytest.raises(ValueError, match="target loss"):
        Augmentation("x", key=None, omega=(), target=Target(1, "hinge", _tint_difference))
