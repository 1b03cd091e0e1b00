"""CASSLE (pipeline.cassle) and the variant wiring: the ω encoding, the conditioned projector in all
four methods (each view's own ω, paired with its own sample, in the online and the momentum branch),
gradients, the EMA copy of the ω-MLP, λ = 0, the params, the training hash, a short run, and the
AugSelf-only ablation (augself.ss_only)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.augment import BatchAugment, view_generator
from pipeline.augmentations import cassle_blocks
from pipeline.cassle import ConditionedProjector, Conditioning, condition_dim, omega_vector
from pipeline.config import ConfigError, from_dict
from pipeline.methods import build_method
from pipeline.models import build_backbone, load_backbone
from pipeline.params import METHODS, CassleParams, Params
from pipeline.train import FINAL, build_pretrain_model, pretrain, training_hash
from tests.test_methods import tiny_params as tiny_method_params
from tests.test_train import SIZE, tiny_images
from tests.test_train import tiny_params as tiny_train_params

pytestmark = pytest.mark.usefixtures("one_thread")

MOMENTUM = {"moco": "key_projector", "byol": "target_projector"}


def omega_batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """Two real views of n random images and their ω (the augmentation's own output)."""
    aug = BatchAugment(Params().augment, SIZE, channels_last=False)   # docs/reliability.md: oneDNN, width 4
    g = view_generator(seed, 0, 0)
    x = torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    v1, w1 = aug(x, g)
    v2, w2 = aug(x, g)
    return v1, v2, w1, w2


def cassle_method(name: str, injection: str = "proj-cat", seed: int = 0):
    torch.manual_seed(seed)
    backbone, feat_dim = build_backbone("resnet_small", SIZE, width=4)
    cond = Conditioning(("blur", "color", "crop", "flip", "grayscale"), injection, depth=3, width=8)
    return build_method(name, backbone, feat_dim, tiny_method_params(name), cond), cond


# ----------------------------------------------------------------------------------- encoding
def test_omega_vector_by_hand_alphabetical_and_crop_mirrored():
    omega = {"crop": torch.tensor([[0.1, 0.2, 0.4, 0.5], [0.0, 0.0, 1.0, 1.0]]),
             "flip": torch.tensor([1.0, 0.0]), "color": torch.tensor([[0.1, -0.2, 0.3, -0.4], [0.0] * 4]),
             "blur": torch.tensor([0.5, 0.0]), "grayscale": torch.tensor([0.0, 1.0])}
    got = omega_vector(omega, ["grayscale", "crop", "blur", "color", "flip"])   # any order given
    # blur | color (4) | crop: (cy, cx, h, w), cx = 1 − (0.2 + 0.25) for the flipped first view | flip | gray
    expect = torch.tensor([[0.5, 0.1, -0.2, 0.3, -0.4, 0.3, 0.55, 0.4, 0.5, 1.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 0.0, 1.0]])
    torch.testing.assert_close(got, expect)
    assert condition_dim(["crop", "blur"]) == 5 and got.shape[1] == condition_dim(list(omega))
    # the blocks of the augmentation records, alphabetical, with the sizes above
    assert {b: s.size for b, s in cassle_blocks().items()} == {"blur": 1, "color": 4, "color_diff": 3, "crop": 4,
                                                                "flip": 1, "grayscale": 1}
    assert list(cassle_blocks()) == sorted(cassle_blocks())


def test_every_default_block_is_returned_by_the_augmentation():
    *_, w1, _ = omega_batch()
    vec = omega_vector(w1, CassleParams().conditions)
    assert vec.shape == (8, condition_dim(CassleParams().conditions)) and torch.isfinite(vec).all()


def test_missing_omega_key_names_the_block():
    *_, w1, _ = omega_batch()
    w1 = {k: v for k, v in w1.items() if k != "flip"}
    no_diff = {k: v for k, v in w1.items() if k != "color_diff"}
    with pytest.raises(KeyError, match=r"color_diff.*cassle.conditions"):
        omega_vector({**no_diff, "flip": torch.zeros(8)}, ["color", "color_diff"])
    with pytest.raises(KeyError, match=r"'crop'.*omega\['flip'\]"):     # the crop block mirrors with flip
        omega_vector(w1, ["crop"])


# ----------------------------------------------------------------------------------- projector
@pytest.mark.parametrize("injection, first_in", [("proj-cat", "feat+width"), ("proj-add", "feat"), ("proj-mul", "feat")])
def test_injection_widths(injection, first_in):
    method, cond = cassle_method("simclr", injection)
    proj = method.projector
    assert isinstance(proj, ConditionedProjector)
    first = proj.projector[0]
    assert first.in_features == (method.feat_dim + cond.width if first_in == "feat+width" else method.feat_dim)
    assert proj.embedding[0].in_features == cond.in_dim
    # depth 3: (Linear(no bias)–BN–ReLU) × 2, Linear–BN (no final ReLU)
    kinds = [type(m).__name__ for m in proj.embedding]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in proj.embedding if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("name", METHODS)
def test_each_view_gets_its_own_omega_in_online_and_momentum_branch(name):
    """Every projector call (online, and the momentum copy for MoCo/BYOL) receives the ω vector of
    the view whose features it projects: recorded with forward pre-hooks."""
    method, cond = cassle_method(name)
    v1, v2, w1, w2 = omega_batch()
    c1, c2 = cond.encode(w1), cond.encode(w2)
    calls = []
    hook = lambda m, args: calls.append((m, args[0].detach().clone(), args[1]))  # noqa: E731
    projectors = [method.projector] + ([getattr(method, MOMENTUM[name])] if name in MOMENTUM else [])
    for p in projectors:
        p.register_forward_pre_hook(hook)
    method.train()
    method(v1, v2, c1, c2)
    assert len(calls) == 2 * len(projectors)
    with torch.no_grad():
        feats = {id(method.projector): (method.backbone(v1), method.backbone(v2))}
        if name in MOMENTUM:
            target_bb = method.key_backbone if name == "moco" else method.target_backbone
            feats[id(projectors[1])] = (target_bb(v1), target_bb(v2))
    for module, f, c in calls:
        f1, f2 = feats[id(module)]
        own = c1 if torch.allclose(f, f1) else c2
        assert torch.allclose(f, f1) != torch.allclose(f, f2)   # views differ
        assert c is own, (name, "a projector received the other view's ω")


@pytest.mark.parametrize("name", METHODS)
def test_omega_pairs_with_its_own_sample_and_zeros_differ(name):
    """Projection of sample i depends on (f_i, ω_i) only: permuting both together permutes the output,
    permuting ω alone changes it, and so does conditioning on zeros; the shuffled pairing changes the loss."""
    method, cond = cassle_method(name)
    v1, v2, w1, w2 = omega_batch()
    c1, c2 = cond.encode(w1), cond.encode(w2)
    method.train()
    method(v1, v2, c1, c2).loss.backward()          # one train pass so BN running stats are not trivial
    method.eval()                                   # per-sample projections (BN uses running stats)
    perm = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])     # not a cyclic shift: a shifted pairing commutes with one
    with torch.no_grad():
        f = method.backbone(v1)
        z = method.project(f, c1)
        torch.testing.assert_close(method.project(f[perm], c1[perm]), z[perm])
        assert not torch.allclose(method.project(f, c1[perm]), z, atol=1e-4)
        assert not torch.allclose(method.project(f, torch.zeros_like(c1)), z, atol=1e-4)
        loss = method(v1, v2, c1, c2).loss
        shuffled = method(v1, v2, c1[perm], c2[perm]).loss
        swapped = method(v1, v2, c2, c1).loss
    assert abs(float(loss - shuffled)) > 1e-5 and abs(float(loss - swapped)) > 1e-5


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_the_omega_mlp_and_the_backbone(name):
    method, cond = cassle_method(name)
    v1, v2, w1, w2 = omega_batch()
    method.train()
    method(v1, v2, cond.encode(w1), cond.encode(w2)).loss.backward()
    for part in (method.projector.embedding, method.backbone):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert method.projector.embedding[0].weight.grad.abs().sum() > 0     # the first layer reads ω itself


@pytest.mark.parametrize("name", sorted(MOMENTUM))
def test_momentum_target_is_an_ema_copy_including_the_omega_mlp(name):
    method, cond = cassle_method(name)
    target = getattr(method, MOMENTUM[name])
    assert isinstance(target, ConditionedProjector) and target is not method.projector
    assert all(not p.requires_grad for p in target.embedding.parameters())
    assert not any(p is q for p in target.parameters() for q in method.ssl_parameters())
    v1, v2, w1, w2 = omega_batch()
    method.train()
    method(v1, v2, cond.encode(w1), cond.encode(w2)).loss.backward()
    opt = torch.optim.SGD(method.ssl_parameters(), lr=0.5)
    before = target.embedding[0].weight.clone()
    opt.step()
    online = method.projector.embedding[0].weight.detach()
    assert not torch.equal(online, before)
    progress = 0.3
    m = method.momentum if name == "moco" else method.momentum_at(progress)
    method.on_step_end(progress)
    torch.testing.assert_close(target.embedding[0].weight, m * before + (1 - m) * online)


def test_unconditioned_method_refuses_a_condition_and_conditioned_needs_one():
    method, cond = cassle_method("simclr")
    v1, v2, w1, w2 = omega_batch()
    with pytest.raises(ValueError, match="no condition"):
        method(v1, v2)
    torch.manual_seed(0)
    backbone, d = build_backbone("resnet_small", SIZE, width=4)
    plain = build_method("simclr", backbone, d, tiny_method_params("simclr"))
    with pytest.raises(ValueError, match="without conditioning"):
        plain(v1, v2, cond.encode(w1), cond.encode(w2))


# ----------------------------------------------------------------------------------- variant
def test_cassle_variant_has_lambda_zero_no_head_and_a_conditioned_projector():
    params = tiny_train_params()
    assert params.lambda_for("cassle") == 0.0 and params.lambda_for("augself") == params.augself.lambda_
    model, _, _ = build_pretrain_model(params, "moco", "cassle", SIZE)
    assert model.head is None and model.term_names == ["ssl", "total"]
    assert isinstance(model.method.projector, ConditionedProjector)
    assert model.method.conditioning.blocks == tuple(sorted(params.cassle.conditions))
    for variant in ("baseline", "augself"):
        other, _, _ = build_pretrain_model(params, "moco", variant, SIZE)
        assert other.method.conditioning is None and not isinstance(other.method.projector, ConditionedProjector)
    v1, v2, w1, w2 = omega_batch(16)
    total, terms = model(v1, v2, w1, w2)
    assert torch.isfinite(total) and terms.shape == (2,)
    model, _, _ = build_pretrain_model(params, "simclr", "cassle", SIZE)   # stateless loss: calls compare
    with torch.no_grad():
        total, _ = model(v1, v2, w1, w2)            # PretrainModel encodes each view's ω itself
        c1, c2 = model.method.conditioning.encode(w1), model.method.conditioning.encode(w2)
        torch.testing.assert_close(total, model.method(v1, v2, c1, c2).loss)
        assert abs(float(total - model.method(v1, v2, c2, c1).loss)) > 1e-4


def test_training_hash_covers_cassle_only_for_the_cassle_variant():
    p = tiny_train_params()
    wider = dataclasses.replace(p, cassle=dataclasses.replace(p.cassle, width=32))
    h = {v: training_hash(p, "simclr", v) for v in ("baseline", "augself", "cassle")}
    assert len(set(h.values())) == 3
    assert training_hash(wider, "simclr", "cassle") != h["cassle"]
    assert training_hash(wider, "simclr", "baseline") == h["baseline"]
    assert training_hash(wider, "simclr", "augself") == h["augself"]


@pytest.mark.parametrize("bad, match", [
    ({"variants": ["baseline", "swav"]}, r"variants: unknown value 'swav'; allowed values: baseline, augself, cassle"),
    ({"variants": []}, r"variants: empty"),
    ({"variants": ["cassle", "cassle"]}, r"variants: .* twice"),
    ({"cassle": {"conditions": ["crop", "rotation"]}}, r"cassle.conditions: unknown value 'rotation'"),
    ({"cassle": {"conditions": []}}, r"cassle.conditions: empty"),
    ({"cassle": {"injection": "proj-hn"}}, r"cassle.injection: unknown value 'proj-hn'; allowed values: proj-cat"),
    ({"cassle": {"depth": 0}}, r"cassle.depth"),
    ({"baseline": {"lambda": 1.0}}, r"baseline.lambda: unknown key"),
    ({"augself": {"ss_only": True, "lambda": 0.0}}, r"augself.ss_only.*augself.lambda"),
    # a condition whose op is off would feed the projector a constant (blur was in the default at blur_p 0)
    ({"variants": ["baseline", "cassle"], "cassle": {"conditions": ["blur", "crop"]}, "augment": {"blur_p": 0.0}},
     r"cassle.conditions: 'blur' is listed but its augmentation is off \(augment.blur_p = 0\).*remove 'blur'"),
    ({"variants": ["baseline", "cassle"], "cassle": {"conditions": ["crop", "flip"]}, "augment": {"flip_p": 0.0}}, r"cassle.conditions: 'flip'.*augment.flip_p"),
    ({"variants": ["baseline", "cassle"], "cassle": {"conditions": ["crop", "grayscale"]}, "augment": {"grayscale_p": 0.0}},
     r"cassle.conditions: 'grayscale'.*augment.grayscale_p"),
    ({"variants": ["baseline", "cassle"], "cassle": {"conditions": ["color_diff"]}, "augment": {"jitter_p": 0.0}, "augself": {"augmentations": ["crop"]}},
     r"cassle.conditions: 'color_diff'.*augment.jitter_p"),
])
def test_bad_variant_params_are_refused_naming_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Params, bad)


def test_a_condition_whose_op_is_off_is_refused_only_where_cassle_trains():
    """The default conditions read colour: a baseline-only run without colour jitter (the premise study's
    `none` control) must load, and the same run with CASSLE among its variants must not."""
    off = {"augment": {"color_strength": "none"}, "augself": {"augmentations": ["crop"]}}
    from_dict(Params, {**off, "variants": ["baseline"]})
    with pytest.raises(ConfigError, match=r"cassle.conditions: 'color'"):
        from_dict(Params, {**off, "variants": ["baseline", "cassle"]})


def test_cassle_pretraining_runs_and_final_holds_the_backbone_only(tmp_path):
    params = tiny_train_params(epochs=1)
    res = pretrain(params, "byol", "cassle", tiny_images(), tmp_path, device="cpu", progress=False)
    assert res.finished and all(torch.isfinite(torch.tensor(v)) for v in res.metrics.values())
    backbone, meta = load_backbone(tmp_path / FINAL)
    assert meta["variant"] == "cassle" and meta["lambda"] == 0.0
    assert not any("embedding" in k or "projector" in k for k in torch.load(tmp_path / FINAL, weights_only=False)["backbone"])


# ----------------------------------------------------------------------------------- AugSelf only
@pytest.mark.parametrize("name", ["simsiam", "moco"])
def test_ss_only_total_is_the_augself_loss_and_no_ssl_gradient(name):
    base = tiny_train_params()
    params = dataclasses.replace(base, augself=dataclasses.replace(base.augself, ss_only=True, lambda_=0.5))
    v1, v2, w1, w2 = omega_batch(16)
    grads = {}
    for ss_only in (False, True):
        p = dataclasses.replace(params, augself=dataclasses.replace(params.augself, ss_only=ss_only))
        torch.manual_seed(0)
        model, _, _ = build_pretrain_model(p, name, "augself", SIZE)
        model.train()
        total, terms = model(v1, v2, w1, w2)
        total.backward()
        ssl, crop, color = terms[0], terms[1], terms[2]
        expect = 0.5 * (crop + color) + (0.0 if ss_only else ssl)
        torch.testing.assert_close(total, expect)
        torch.testing.assert_close(terms[-1], total.detach())
        assert float(ssl.detach()) != 0.0                                # still computed and logged
        proj_grads = [q.grad for q in model.method.projector.parameters()]
        if ss_only:   # nothing reaches the projector: the SSL loss is not in the total
            assert all(g is None for g in proj_grads)
        else:
            assert all(g is not None for g in proj_grads)
        grads[ss_only] = torch.cat([q.grad.flatten() for q in model.method.backbone.parameters()])
    # The backbone still learns (from the AugSelf head), but not from the SSL term.
    assert grads[True].abs().sum() > 0 and not torch.allclose(grads[True], grads[False])


def test_ss_only_needs_the_augself_head():
    base = tiny_train_params()
    params = dataclasses.replace(base, augself=dataclasses.replace(base.augself, ss_only=True))
    model, _, _ = build_pretrain_model(params, "simclr", "baseline", SIZE)   # not the augself variant
    assert not model.ss_only and model.head is None


# ----------------------------------------------------------------------------------- report
def test_report_bars_show_cassle_beside_baseline_and_augself():
    """With CASSLE runs the comparison bars get a third, labelled bar per method (and none without)."""
    import pandas as pd
    from matplotlib.patches import Rectangle

    from pipeline.report.plots import bar_figure
    from pipeline.report.schema import metric_specs, validate_runs
    from pipeline.report.tables import aggregate
    from tests.test_report import LINEAR, synthetic_runs

    def bars(runs):
        runs, _ = validate_runs(runs)
        specs = [s for s in metric_specs(runs) if s.column in LINEAR]
        fig = bar_figure(runs, aggregate(runs, specs), specs, 1.0, "t")
        ax = fig.axes[0]
        heights = [p.get_height() for p in ax.patches if isinstance(p, Rectangle) and p.get_width() > 0]
        return heights, [t.get_text() for t in fig.legends[0].get_texts()]

    runs = synthetic_runs(methods=("simclr", "byol"), lambdas=(1.0,), seeds=(0, 1))
    cassle = runs[runs.variant == "baseline"].assign(variant="cassle", run_id=lambda d: d.run_id + "c")
    cassle[LINEAR] = cassle[LINEAR] + 10.0
    two, labels2 = bars(runs)
    three, labels3 = bars(pd.concat([runs, cassle], ignore_index=True))
    assert len(two) == 4 and len(three) == 6 and "CASSLE" in labels3 and "CASSLE" not in labels2
    means = cassle.groupby("method")[LINEAR[0]].mean()
    assert sorted(three)[-2:] == pytest.approx(sorted(means), rel=1e-9)   # the CASSLE bars are the tallest


@pytest.mark.parametrize("path", ["params.yaml", "presets/cifar10.yaml", "presets/cifar100.yaml", "presets/stl10.yaml"])
def test_params_files_spell_out_variants_and_their_sections(path):
    """dvc.yaml interpolates ${variants} and each pretrain stage declares "${item.variant}": a params
    file (a preset is copied over params.yaml) must write both out; defaults in params.py do not reach DVC."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / path).read_text())
    assert raw.get("variants"), f"{path}: no variants list"
    for variant in raw["variants"]:
        assert variant in raw and isinstance(raw[variant], dict), f"{path}: no '{variant}:' section"
    assert '"${item.variant}"' in (root / "dvc.yaml").read_text()


def test_group_hash_ignores_the_cassle_section_and_the_variant_list():
    """A cassle.* experiment re-runs only the CASSLE models: the baseline and AugSelf runs must stay in
    the report's group, so neither the cassle section nor the variant list is part of it."""
    p = Params()
    changed = dataclasses.replace(p, cassle=dataclasses.replace(p.cassle, width=32), variants=["cassle"])
    assert changed.group_hash() == p.group_hash()
    assert dataclasses.replace(p, ssl=dataclasses.replace(p.ssl, epochs=9)).group_hash() != p.group_hash()


def test_cassle_conditions_with_their_op_on_are_accepted_and_the_default_has_no_constant_block():
    from_dict(Params, {"cassle": {"conditions": ["blur", "crop"]}, "augment": {"blur_p": 0.5}})
    default = from_dict(Params, {})
    assert "blur" not in default.cassle.conditions and default.augment.blur_p == 0
