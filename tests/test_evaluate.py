"""Transfer evaluation: frozen features, the official linear probe, few-shot episodes, the
augmentation-awareness probe.  CPU only, tiny shapes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from torchvision.transforms.v2 import functional as TF

from pipeline.evaluate.features import extract_features
from pipeline.evaluate.fewshot import (_generator, fewshot_eval, format_fewshot_result, ovr_logistic_fit,
                                       sample_episodes, summarise_accuracies)
from pipeline.evaluate import linear
from pipeline.evaluate.linear import (accuracy, fit_logistic, format_linear_result, linear_probe,
                                      regularisation_path, stratified_split)
from pipeline.evaluate.probe import format_probe_result, logistic_accuracy, ridge_r2
from pipeline.params import LinearParams, ProbeParams

pytestmark = pytest.mark.usefixtures("one_thread")




def clusters(n, d, classes, separation, seed, relu=True):
    """Gaussian class clusters, optionally through a ReLU (non-negative, unnormalised, like pooled features)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * separation
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(size=(n, d))
    return (np.maximum(2 * x, 0) if relu else x).astype(np.float32), y


# ----------------------------------------------------------------------------------------- features

class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1)


def test_extract_features_eval_mode_normalisation_and_batching():
    torch.manual_seed(0)
    net = TinyNet()
    net.bn.running_mean.uniform_(-1, 1)      # eval mode must use these, not batch statistics
    net.bn.running_var.uniform_(0.5, 2)
    net.train()
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)

    feats = extract_features(net, images, mean, std, batch_size=3)
    assert feats.dtype == np.float32 and feats.shape == (10, 8)
    assert net.training, "the caller's train/eval mode is restored"

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net.eval()(x).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(extract_features(net, images, mean, std, batch_size=10), feats, rtol=1e-5, atol=1e-6)


def test_extract_features_resizes_only_when_size_differs():
    net = TinyNet().eval()
    images = np.random.default_rng(1).integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    same = extract_features(net, images, (0.5,) * 3, (0.5,) * 3, 4, size=12)
    np.testing.assert_array_equal(same, extract_features(net, images, (0.5,) * 3, (0.5,) * 3, 4))
    resized = extract_features(net, images, (0.5,) * 3, (0.5,) * 3, 4, size=6)
    x = TF.resize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, [6, 6], antialias=True)
    with torch.no_grad():
        expected = net((x.clamp(0, 1) - 0.5) / 0.5).numpy()
    np.testing.assert_allclose(resized, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(net, images.astype(np.float32), (0.5,) * 3, (0.5,) * 3, 4)


# ------------------------------------------------------------------------------------------- linear

def sklearn_same_objective(x, y, wd):
    """scikit-learn minimises C·ΣCE + ½‖θ‖² with an unpenalised intercept; the official objective
    ΣCE + w(‖W‖² + ‖b‖²) is C = 1/(2w) with the intercept as a penalised constant feature."""
    xa = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], 1)
    model = LogisticRegression(C=1.0 / (2.0 * wd), fit_intercept=False, tol=1e-10, max_iter=10000).fit(xa, y)
    return model.coef_[:, :-1].T, model.coef_[:, -1], model


@pytest.mark.parametrize("wd", [1e-2, 1.0, 100.0])
def test_fit_logistic_matches_sklearn_on_the_official_objective(wd):
    x, y = clusters(400, 12, 4, 0.5, seed=0)
    fit = fit_logistic(torch.from_numpy(x).double(), torch.from_numpy(y), 4, wd)
    weight, bias, _ = sklearn_same_objective(x, y, wd)
    assert fit.converged
    np.testing.assert_allclose(fit.weight.numpy(), weight, atol=1e-4 * max(1, np.abs(weight).max()))
    np.testing.assert_allclose(fit.bias.numpy(), bias, atol=1e-4 * max(1, np.abs(bias).max()))


def test_regularisation_path_warm_start_reaches_the_cold_start_optimum():
    x, y = clusters(300, 10, 3, 0.6, seed=1)
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    wds = [1e3, 10.0, 0.1]
    path = regularisation_path(xt, yt, 3, wds)
    assert [f.wd for f in path] == wds
    for fit in path:
        cold = fit_logistic(xt, yt, 3, fit.wd)
        torch.testing.assert_close(fit.weight, cold.weight, atol=1e-5, rtol=1e-4)
    assert path[0].weight.abs().max() < path[2].weight.abs().max()  # more L2, smaller weights


def test_block_preconditioner_holds_the_hessian_diagonal_blocks_and_inverts_them_on_the_iterates_subspace():
    x, y = clusters(50, 7, 4, 0.5, seed=3)
    obj = linear._LogisticObjective(torch.from_numpy(x).double(), torch.from_numpy(y), 4)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 8, dtype=torch.float64, generator=g)
    _, _, prob = obj.loss_grad(theta, 0.3)
    pre = obj.preconditioner(prob, 0.3)
    for a in range(4):                              # block a = the Hessian restricted to class a's row
        e = torch.zeros(4, 8, dtype=torch.float64)
        v = torch.randn(8, dtype=torch.float64, generator=g)
        e[a] = v
        torch.testing.assert_close(pre.matvec(e)[a], obj.hvp(prob, e, 0.3)[a])
    v = torch.randn(4, 8, dtype=torch.float64, generator=g)
    v -= v.mean(0, keepdim=True)                    # rows summing to zero: where θ and ∇f live
    torch.testing.assert_close(pre.solve(pre.matvec(v)), v)            # P₀ M⁻¹ M v = v there
    w = torch.randn(4, 8, dtype=torch.float64, generator=g)
    torch.testing.assert_close(pre.solve(w).sum(0), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)


def test_coupled_preconditioner_is_the_whole_hessian_on_the_iterates_subspace():
    """Every class pair coupled: on the sum-zero subspace ``solve`` inverts H + reg·I exactly (the
    per-class blocks only approximate it: their solve of H v is not v)."""
    x, y = clusters(60, 5, 4, 0.5, seed=3)
    obj = linear._LogisticObjective(torch.from_numpy(x).double(), torch.from_numpy(y), 4)
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(4, 6, dtype=torch.float64, generator=g)
    reg = 1e-3
    _, _, prob = obj.loss_grad(theta, reg)
    coupled = obj.coupled_preconditioner(prob, reg)
    v = torch.randn(4, 6, dtype=torch.float64, generator=g)
    v -= v.mean(0, keepdim=True)
    torch.testing.assert_close(coupled.solve(obj.hvp(prob, v, reg)), v)
    blocks = obj.preconditioner(prob, reg)
    assert not torch.allclose(blocks.solve(obj.hvp(prob, v, reg)), v, atol=1e-3)


def test_coupled_path_reaches_the_same_minimisers_with_fewer_hessian_products(monkeypatch):
    """A path that switches to the coupled preconditioner after its first fit (the switch threshold
    set to 0) reaches the minimisers of the block-preconditioned path, with fewer products at the
    weakly regularised end; the trust region there is measured by CG's recurrences."""
    x, y = clusters(1500, 24, 12, 0.35, seed=6)
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    wds = [10.0, 1e-2, 1e-4, 1e-5, 1e-6]
    blocks = regularisation_path(xt, yt, 12, wds)
    monkeypatch.setattr(linear, "_COUPLE_SHARE", 0.0)
    coupled = regularisation_path(xt, yt, 12, wds)
    for a, b in zip(blocks, coupled):
        assert a.converged and b.converged
        torch.testing.assert_close(a.weight, b.weight, atol=1e-4, rtol=1e-4)
    tail = lambda path: sum(f.hvps for f in path[2:])  # noqa: E731
    assert tail(coupled) < 0.5 * tail(blocks), (tail(coupled), tail(blocks))


def test_warm_started_fit_reaches_the_next_solution_in_a_few_newton_steps():
    """The first step from a warm start is a full Newton step: with liblinear's initial radius ‖∇f‖
    (tiny at a warm start) this fit took 19 iterations, 14 of them growing the radius."""
    x, y = clusters(3000, 32, 10, 0.35, seed=4)
    obj = linear._LogisticObjective(torch.from_numpy(x).double(), torch.from_numpy(y), 10)
    start = obj.fit(0.0316, None, 100, 1e-9)
    nxt = obj.fit(0.0178, start, 100, 1e-9)
    assert nxt.stop == "converged" and nxt.iterations <= 6, (nxt.stop, nxt.iterations)


def test_preconditioning_cuts_the_hessian_products_of_a_weakly_regularised_path():
    x, y = clusters(2000, 48, 10, 0.35, seed=5)
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    wds = [10.0, 0.1, 1e-3, 1e-5]
    with_pre = regularisation_path(xt, yt, 10, wds)
    original = linear._LogisticObjective.preconditioner
    try:
        linear._LogisticObjective.preconditioner = lambda self, prob, reg: None
        without = regularisation_path(xt, yt, 10, wds)
    finally:
        linear._LogisticObjective.preconditioner = original
    for a, b in zip(with_pre, without):                                 # the same minimisers
        torch.testing.assert_close(a.weight, b.weight, atol=1e-4, rtol=1e-4)
    used, plain = sum(f.hvps for f in with_pre), sum(f.hvps for f in without)
    assert used < 0.6 * plain, (used, plain)


def test_linear_probe_agrees_with_sklearn_at_the_selected_regularisation():
    x, y = clusters(900, 16, 5, 0.35, seed=2)
    params = LinearParams(wd_steps=12)
    result = linear_probe(x[:600], y[:600], x[600:], y[600:], params, seed=0)
    assert result["metric"] == "top1" and result["acc"] == result["top1"]
    assert len(result["val_acc_per_wd"]) == 12 and result["best_wd"] in result["wds"]
    assert not result["not_converged"]
    _, _, model = sklearn_same_objective(x[:600], y[:600], result["best_wd"])
    sk_acc = 100 * model.score(np.concatenate([x[600:], np.ones((300, 1))], 1), y[600:])
    assert abs(result["top1"] - sk_acc) <= 0.5
    assert 40 < result["top1"] < 100            # a non-trivial problem
    text = format_linear_result(result, "toy")
    assert f"{result['top1']:.2f} %" in text and "toy" in text


def reference_protocol(x_train, y_train, x_test, y_test, params, seed):
    """The protocol solved independently: scikit-learn lbfgs at tol 1e-10 on the official objective
    for each w (cold starts), strict > on val in ascending w, refit on train + val."""
    tr, va = stratified_split(y_train, params.val_fraction, seed)
    wds = np.logspace(params.wd_min_exp, params.wd_max_exp, params.wd_steps)
    ones = lambda a: np.c_[a.astype(np.float64), np.ones(len(a))]  # noqa: E731
    best, best_acc = 0, -1.0
    for i, wd in enumerate(wds):
        model = LogisticRegression(C=1 / (2 * wd), fit_intercept=False, tol=1e-10, max_iter=20000)
        acc = model.fit(ones(x_train[tr]), y_train[tr]).score(ones(x_train[va]), y_train[va])
        if acc > best_acc:
            best, best_acc = i, acc
    model = LogisticRegression(C=1 / (2 * wds[best]), fit_intercept=False, tol=1e-10, max_iter=20000)
    return wds[best], 100 * model.fit(ones(x_train), y_train).score(ones(x_test), y_test)


@pytest.mark.parametrize("classes,separation,relu", [(10, 0.6, True), (10, 4.0, False), (60, 2.5, False),
                                                     (60, 5.0, False)],
                         ids=["10-classes", "10-separable", "60-classes", "60-separable"])
def test_linear_probe_is_the_protocol_answer_whatever_the_path_or_tolerance(classes, separation, relu):
    """The chosen w and the test accuracy are those of a tight float64 reference, and do not move
    when the tolerance is tightened 100× or the path is walked ascending (the official order)."""
    per_class = 12 if classes == 10 else 6
    x, y = clusters((per_class + 4) * classes, 6, classes, separation, seed=classes, relu=relu)
    n = per_class * classes
    params = LinearParams(wd_steps=12 if classes == 10 else 8)
    ours = linear_probe(x[:n], y[:n], x[n:], y[n:], params, seed=0)
    assert not ours["not_converged"]
    assert set(ours["solver"]["stops"]) <= {"converged", "certified", "screened"}
    ref_wd, ref_acc = reference_protocol(x[:n], y[:n], x[n:], y[n:], params, seed=0)
    assert ours["best_wd"] == pytest.approx(ref_wd, rel=1e-9)
    assert abs(ours["top1"] - ref_acc) <= 0.05
    tighter = linear_probe(x[:n], y[:n], x[n:], y[n:], replace(params, tol=params.tol / 100), seed=0)
    assert tighter["best_wd"] == ours["best_wd"] and tighter["best_val_acc"] == ours["best_val_acc"]
    for a, b, stop in zip(tighter["val_acc_per_wd"], ours["val_acc_per_wd"], ours["solver"]["stops"]):
        assert a == b or stop == "screened"     # a screened fit's val accuracy is only bounded
    np.testing.assert_array_equal(tighter["test_pred"], ours["test_pred"])
    x_tr, y_tr = torch.from_numpy(x[:n]).double(), torch.from_numpy(y[:n])
    wds = ours["wds"]
    down = regularisation_path(x_tr, y_tr, classes, wds)
    up = regularisation_path(x_tr, y_tr, classes, wds, descending=False)
    x_all = torch.from_numpy(x).double()
    for a, b in zip(down, up):     # every fit of the sweep, not only the chosen one
        assert a.converged and b.converged
        np.testing.assert_array_equal(a.predict(x_all).numpy(), b.predict(x_all).numpy())


@pytest.mark.parametrize("relu,separation", [(True, 0.6), (False, 3.0)], ids=["overlapping", "near-separable"])
def test_held_out_certificate_is_sound_against_a_tight_fit(relu, separation):
    """Every val prediction the certificate calls the minimiser's is the prediction of the fit
    solved to a relative gradient of 1e-13 (or its float64 floor); the minimiser's val accuracy lies in the reported bounds;
    a screened w is beaten by a proven lower bound of another w.  The path is stopped early by the
    certificate here, so this tests it where it is used."""
    x, y = clusters(360, 8, 6, separation, seed=5, relu=relu)
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    x_tr, y_tr, x_val, y_val = xt[:240], yt[:240], xt[240:], yt[240:]
    wds = torch.logspace(-4, 3, 10, dtype=torch.float64).tolist()
    path = regularisation_path(x_tr, y_tr, 6, wds, held_out=(x_val, y_val))
    assert any(f.stop in ("certified", "screened") for f in path)
    objective = linear._LogisticObjective(x_tr, y_tr, 6)
    certificate = linear._HeldOutCertificate(x_val, y_val, False)
    checked = 0
    for fit in path:
        tight = fit_logistic(x_tr, y_tr, 6, fit.wd, init=fit, tol=1e-13)   # to 1e-13 or the float64 floor
        if tight.grad_rel > min(1e-9, fit.grad_rel / 100):
            continue                             # no reference much closer to the minimiser than the fit
        theta = torch.cat([fit.weight.t(), fit.bias.unsqueeze(1)], 1)
        _, grad, _ = objective.loss_grad(theta, 2 * fit.wd / len(y_tr))
        distance = (torch.linalg.vector_norm(grad).item() + objective.grad_rounding) / (2 * fit.wd / len(y_tr))
        top = (theta @ certificate.xt).topk(2, dim=0)
        certain = top.values[0] - top.values[1] > certificate.norms * 2 ** 0.5 * distance
        np.testing.assert_array_equal(fit.predict(x_val)[certain].numpy(), tight.predict(x_val)[certain].numpy())
        checked += int(certain.sum())
        lo, hi = fit.held_out_bounds
        assert lo - 1e-9 <= accuracy(tight.predict(x_val), y_val) <= hi + 1e-9
        if fit.stop == "certified":
            assert lo == hi and bool(certain.all())
    assert checked > len(y_val)                  # many predictions were certified, not a vacuous check
    for i, fit in enumerate(path):               # descending path: the fits before are the larger w
        if fit.stop == "screened":
            assert fit.held_out_bounds[1] < max(f.held_out_bounds[0] for f in path[i + 1:])


def test_linear_probe_linear_structure_is_near_perfect_and_random_labels_at_chance():
    x, y = clusters(1000, 20, 4, 3.0, seed=3, relu=False)
    params = LinearParams(wd_steps=8)
    assert linear_probe(x[:700], y[:700], x[700:], y[700:], params, seed=0)["top1"] >= 99.0
    noise_y = np.random.default_rng(4).integers(0, 4, 1000)
    chance = linear_probe(x[:700], noise_y[:700], x[700:], noise_y[700:], params, seed=0)["top1"]
    assert abs(chance - 25.0) < 8.0


def test_linear_probe_class_average_and_bad_input():
    x, y = clusters(300, 8, 3, 1.0, seed=5)
    res = linear_probe(x[:200], y[:200], x[200:], y[200:], LinearParams(wd_steps=4), 0, class_average=True)
    assert res["metric"] == "class_avg" and res["acc"] == res["class_avg"]
    with pytest.raises(ValueError, match="NaN"):
        bad = x.copy()
        bad[0, 0] = np.nan
        linear_probe(bad[:200], y[:200], x[200:], y[200:], LinearParams(wd_steps=2), 0)
    with pytest.raises(ValueError, match="d=8"):
        linear_probe(x[:200], y[:200], x[200:, :4], y[200:], LinearParams(wd_steps=2), 0)


def test_stratified_split_and_accuracy():
    y = np.array([0] * 50 + [1] * 30 + [2] * 20)
    tr, va = stratified_split(y, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 100
    assert np.bincount(y[va]).tolist() == [10, 6, 4]
    np.testing.assert_array_equal(va, stratified_split(y, 0.2, seed=0)[1])
    assert not np.array_equal(va, stratified_split(y, 0.2, seed=1)[1])

    truth = torch.tensor([0, 0, 0, 0, 1, 1])
    pred = torch.tensor([0, 0, 0, 0, 0, 1])
    assert accuracy(pred, truth) == pytest.approx(100 * 5 / 6)
    assert accuracy(pred, truth, class_average=True) == pytest.approx(75.0)


# ----------------------------------------------------------------------------------------- few-shot

def test_summarise_accuracies_is_mean_and_196_std_over_sqrt_n():
    acc = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    out = summarise_accuracies(acc)
    assert out["mean"] == pytest.approx(60.0)
    assert out["ci95"] == pytest.approx(100 * 1.96 * np.sqrt(0.08) / np.sqrt(5))   # population std


def test_sample_episodes_shapes_classes_and_no_duplicates():
    y = np.repeat(np.arange(8), 12)
    y = np.concatenate([y, [8, 8, 8]])          # class 8 is too small for 2 + 10
    support, query = sample_episodes(y, 5, 2, 10, 40, _generator(0, 2))
    assert support.shape == (40, 5, 2) and query.shape == (40, 5, 10)
    idx = torch.cat([support, query], -1)
    labels = torch.from_numpy(y)[idx]
    assert (labels == labels[..., :1]).all(), "all examples of a slot share its class"
    assert (labels[..., 0].sort(1).values.diff(dim=1) > 0).all(), "distinct classes per episode"
    assert (labels != 8).all()
    flat = idx.reshape(40, -1).sort(1).values
    assert (flat.diff(dim=1) > 0).all(), "no example twice in an episode"
    again, _ = sample_episodes(y, 5, 2, 10, 40, _generator(0, 2))
    assert torch.equal(support, again)


def test_sample_episodes_refuses_too_small_classes():
    y = np.repeat(np.arange(6), 10)
    with pytest.raises(ValueError, match=r"5-way 5-shot.*15 queries.*smallest class: 10"):
        sample_episodes(y, 5, 5, 15, 10, _generator(0, 5))


def test_ovr_logistic_matches_sklearn_liblinear_per_episode():
    """Per episode, the official classifier: LogisticRegression(solver='liblinear') one-vs-rest."""
    x, y = clusters(600, 24, 10, 0.3, seed=6)
    feats = torch.from_numpy(x)
    for shots in (1, 5):
        support, query = sample_episodes(y, 5, shots, 8, 6, _generator(1, shots))
        alpha = ovr_logistic_fit(feats[support])
        ours_acc, sk_acc = [], []
        for e in range(6):
            xs, xq = x[support[e].reshape(-1)], x[query[e].reshape(-1)]
            ys, yq = np.repeat(np.arange(5), shots), np.repeat(np.arange(5), 8)
            sk = OneVsRestClassifier(LogisticRegression(solver="liblinear", tol=1e-8)).fit(xs, ys)
            weights = alpha[e].numpy() @ np.concatenate([xs, np.ones((len(xs), 1))], 1)   # (5, d+1)
            sk_weights = np.stack([np.r_[m.coef_[0], m.intercept_[0]] for m in sk.estimators_])
            np.testing.assert_allclose(weights, sk_weights, atol=1e-4, rtol=1e-4)
            ours_acc.append(np.mean((np.c_[xq, np.ones(len(xq))] @ weights.T).argmax(1) == yq))
            sk_acc.append(np.mean(sk.predict(xq) == yq))
        assert abs(np.mean(ours_acc) - np.mean(sk_acc)) < 0.02


def test_fewshot_separable_is_perfect_random_is_chance_and_seeded():
    x, y = clusters(400, 16, 8, 4.0, seed=7, relu=False)
    res = fewshot_eval(x, y, ways=5, shots=[1, 5], queries=5, episodes=50, seed=0)
    assert set(res) == {"5way1shot", "5way5shot"}
    assert res["5way5shot"]["mean"] > 99.0 and res["5way1shot"]["mean"] > 97.0
    noise = np.random.default_rng(8).normal(size=x.shape).astype(np.float32)
    rand = fewshot_eval(noise, y, ways=5, shots=[5], queries=10, episodes=200, seed=0)["5way5shot"]
    assert abs(rand["mean"] - 20.0) < 3.0 and rand["ci95"] > 0
    assert fewshot_eval(noise, y, 5, [5], 10, 200, seed=0) == {"5way5shot": rand}
    assert fewshot_eval(noise, y, 5, [5], 10, 200, seed=1)["5way5shot"] != rand
    text = format_fewshot_result(res, "toy")
    assert "5way1shot" in text and f"{res['5way1shot']['mean']:.2f}" in text


def test_fewshot_episodes_depend_on_labels_and_seed_only_and_tightening_moves_nothing():
    """Pairing needs the same episodes for two models: the digest and the episode count agree for
    different features with the same labels and seed; a tighter Newton tolerance moves no accuracy."""
    x, y = clusters(300, 12, 6, 0.8, seed=12)
    other = np.random.default_rng(13).normal(size=x.shape).astype(np.float32)
    a = fewshot_eval(x, y, 5, [1, 5], 5, 40, seed=3, keep_episodes=True)
    b = fewshot_eval(other, y, 5, [1, 5], 5, 40, seed=3, keep_episodes=True)
    c = fewshot_eval(x, y, 5, [1, 5], 5, 40, seed=4, keep_episodes=True)
    for key in a:
        assert a[key]["episodes_sha256"] == b[key]["episodes_sha256"] != c[key]["episodes_sha256"]
        assert a[key]["episode_acc"].shape == (40,)
        assert a[key]["mean"] == pytest.approx(100 * a[key]["episode_acc"].mean())
    tight = fewshot_eval(x, y, 5, [1, 5], 5, 40, seed=3, keep_episodes=True, tol=1e-14)
    for key in a:
        np.testing.assert_array_equal(tight[key]["episode_acc"], a[key]["episode_acc"])


# -------------------------------------------------------------------------------------------- probe

def test_ridge_r2_linear_structure_noise_and_constant_targets():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(600, 10)) * rng.uniform(0.1, 10, 10) + 3.0     # unstandardised inputs
    y = np.c_[x @ rng.normal(size=10), x[:, :2] @ [1.0, -2.0] + 0.5, np.zeros(600)]
    r = ridge_r2(x[:400], y[:400], x[400:], y[400:], ridge=1.0)
    assert r["r2_per_dim"][0] > 0.999 and r["r2_per_dim"][1] > 0.999 and r["r2_per_dim"][2] is None
    assert r["r2"] == pytest.approx(np.mean(r["r2_per_dim"][:2]))
    noise = ridge_r2(x[:400], rng.normal(size=400), x[400:], rng.normal(size=200), ridge=1.0)
    assert abs(noise["r2"]) < 0.08
    assert ridge_r2(x[:400], y[:400, 2], x[400:], y[400:, 2], 1.0)["r2"] is None


def test_logistic_accuracy_and_chance():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(400, 5))
    y = (x[:, 0] + 0.1 * x[:, 1] > 0).astype(float)
    r = logistic_accuracy(x[:300], y[:300], x[300:], y[300:], wd=0.1)
    assert r["acc"] > 95 and 30 < r["chance"] < 70
    # The minimiser's answer: a 1000× tighter tolerance changes nothing.
    assert logistic_accuracy(x[:300], y[:300], x[300:], y[300:], wd=0.1, tol=1e-13) == r


class PoolBackbone(nn.Module):
    """Features = the view averaged on a 4x4 grid: keeps where and how the view was cropped/coloured."""
    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


class BlindBackbone(nn.Module):
    """Features independent of the view (noise): nothing about ω is recoverable."""
    def forward(self, x):
        return torch.randn(x.shape[0], 48, generator=torch.Generator().manual_seed(x.shape[0] * 7 + 1))


def test_augmentation_probe_integration():
    augment_mod = pytest.importorskip("pipeline.augment")   # written in parallel; present in the tree
    from pipeline.params import AugmentParams

    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:16, 0:16]
    base = np.stack([xx * 16, yy * 16, (xx + yy) * 8], -1)                    # asymmetric gradients
    images = (base[None] * rng.uniform(0.5, 1.0, (300, 1, 1, 3))).clip(0, 255).astype(np.uint8)
    augment = augment_mod.BatchAugment(AugmentParams(), out_size=16)
    params = ProbeParams(images=300, ridge=1.0, test_fraction=0.5)
    from pipeline.evaluate.probe import augmentation_probe

    seeing = augmentation_probe(PoolBackbone(), images, augment, ["crop", "color", "flip"], params,
                                seed=0, batch_size=128)
    blind = augmentation_probe(BlindBackbone(), images, augment, ["crop", "color", "flip"], params,
                               seed=0, batch_size=128)
    assert seeing["n_train"] == 150 and seeing["n_test"] == 150
    # 150 training pairs for 96 inputs: the blind probe overfits its noise (held-out R² < 0), the
    # seeing one recovers part of ω_diff; flip is near perfect once f1 ⊙ f2 is an input.
    assert seeing["crop"]["r2"] > 0.1 and seeing["color"]["r2"] > 0.15
    assert blind["crop"]["r2"] < 0.0 and blind["color"]["r2"] < 0.0
    assert seeing["flip"]["acc"] > 85 and abs(blind["flip"]["acc"] - 50) < 15
    assert augmentation_probe(PoolBackbone(), images, augment, ["crop"], params, 0, 128) == \
        {k: seeing[k] for k in ("crop", "n_train", "n_test")}
    text = format_probe_result(seeing, "toy")
    assert "crop" in text and f"{seeing['crop']['r2']:.3f}" in text


def test_augmentation_probe_rotation_accuracy_and_solarize_r2():
    from pipeline.augment import BatchAugment
    from pipeline.evaluate.probe import augmentation_probe
    from pipeline.params import AugmentParams

    class CornerBackbone(nn.Module):
        """The view's mean colour per quadrant: where the bright corner went tells its rotation."""
        def forward(self, x):
            return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    rng = np.random.default_rng(11)
    images = rng.uniform(0, 60, (400, 16, 16, 3)).astype(np.uint8)
    images[:, :6, :6] = 255
    plain = dict(flip_p=0.0, crop_scale=(0.9, 1.0), jitter_p=0.0, grayscale_p=0.0)
    params = ProbeParams(images=400, ridge=1.0, test_fraction=0.5)
    seeing, blind = {}, {}
    for aug, p in (("rotation", AugmentParams(rotation_p=0.5, **plain)), ("solarize", AugmentParams(solarize_p=0.5, **plain))):
        augment = BatchAugment(p, out_size=16)
        seeing.update(augmentation_probe(CornerBackbone(), images, augment, [aug], params, 0, 128))
        blind.update(augmentation_probe(BlindBackbone(), images, augment, [aug], params, 0, 128))
    # (k1 − k2) mod 4 from [f1, f2, f1 ⊙ f2]; class 0 (same rotation) is the majority, ~44 %
    assert seeing["rotation"]["acc"] > 85 and blind["rotation"]["acc"] < blind["rotation"]["chance"] + 10
    assert 30 < seeing["rotation"]["chance"] < 55
    assert seeing["solarize"]["r2"] > 0.1 and blind["solarize"]["r2"] < 0.0
    assert "rotation" in format_probe_result(seeing, "toy")


def test_probe_covers_every_augmentation_that_is_on():
    from pipeline.params import AugmentParams, Params
    from pipeline.augmentations import probed

    assert probed(Params().augment) == ["crop", "flip", "color"]
    on = Params(augment=AugmentParams(blur_p=0.5, rotation_p=0.5, solarize_p=0.5))
    assert probed(on.augment) == ["crop", "flip", "color", "blur", "rotation", "solarize"]
