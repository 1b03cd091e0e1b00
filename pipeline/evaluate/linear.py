"""The paper's linear evaluation: multinomial logistic regression on frozen features.

The protocol (``transfer_linear_eval.py`` of github.com/hankook/AugSelf; DESIGN.md "The official
evaluation protocol"):

* features are frozen and **unnormalised** (no standardisation, no L2 normalisation);
* the classifier is ``nn.Linear(d, C)`` trained with full-batch L-BFGS (strong Wolfe line search) on
  ``Σ_i CE(W x_i + b, y_i) + w·(‖W‖² + ‖b‖²)``: cross-entropy with *sum* reduction and an L2 weight
  ``w`` on **all** classifier parameters, bias included;
* ``w`` is swept over ``logspace(wd_min_exp, wd_max_exp, wd_steps)`` (paper: 45 values in [1e-6, 1e5]),
  each fit scored on a validation split carved from the training set; the best ``w`` (ties: the
  smallest ``w``, as the official ascending loop with a strict ``<`` picks) is refitted on
  train + val, warm-started from its validation fit, and its test accuracy reported (top-1, or the
  mean per-class accuracy for the datasets the paper marks).

How we solve the 45 fits fast, and why it is the same answer
-----------------------------------------------------------
Every fit is an L2-regularised multinomial logistic regression with ``w > 0``: a strictly convex
problem with one minimiser, whatever the solver or its starting point.  We therefore

1. minimise the objective divided by ``n`` (same minimiser; a gradient tolerance then means the same
   thing for every dataset size), with the closed-form gradient ``Xᵀ(softmax(Z) − Y)/n + 2w/n·θ``
   written straight into ``.grad`` (no autograd graph), with ``torch.optim.LBFGS`` (strong Wolfe), the
   optimiser of the official code; the features are stored once, transposed, and the logits
   computed class-major (``_LogisticObjective``), which halves the memory each evaluation reads;
2. walk the **regularisation path from the largest w to the smallest**, warm-starting each fit at the
   previous solution (a continuation, as glmnet does).  At ``w = 1e5`` the solution is ≈ 0 (our first
   start), and consecutive ``w`` differ by a factor 1.78, so each fit starts close to its optimum and
   needs a few tens of evaluations instead of hundreds.  The official loop also reuses one
   ``nn.Linear`` across ``w`` (an ascending warm start from a random init); with a unique minimiser
   the direction of the walk changes the cost, and the answer only within the tolerance (below);
3. stop each fit when ``max|∇(objective/n)| ≤ tol`` or after ``max_iter`` L-BFGS iterations.  The
   default ``tol = 1e-4`` is scikit-learn's default gradient tolerance on the same mean objective.
   The official settings (``tolerance_grad=1e-10, tolerance_change=0``, 5000 iterations) run to the
   limit of float32 arithmetic, which stalls the strong-Wolfe line search around ``max|∇| ≈ 1e-4``
   anyway (a decrease below the float32 resolution of the loss is invisible).  We solve in
   **float64** (features are cast once; cheap at these sizes, also on a datacentre GPU), where the
   tolerance is always reachable.  ``tests/test_evaluate.py`` compares with scikit-learn at a tight
   tolerance; ``bench/bench_linear.py`` compares the whole sweep (test accuracy, validation accuracy
   per w) with scikit-learn at its default tolerance.  ``eval.linear.tol`` sets the tolerance.

   What the tolerance means for the weakly regularised tail of the sweep: there the objective is
   flat, and a warm start from the next larger ``w`` already meets the tolerance (the regulariser's
   gradient changes by ``2Δw/n·θ``, below 1e-4 for small ``w`` and large ``n``), so those fits stop
   at once and their validation accuracies form a plateau.  The official ascending loop has the same
   plateau (its first fit, at ``w = 1e-6``, stops at the float32 stall and the next ones start
   there), and scikit-learn's cold starts stop wherever the tolerance is first met on their way.  So
   at 1e-4 the reported accuracy depends on the solver by a few tenths of a point: on the committed
   SimCLR+AugSelf features (cfmnist/class) this solver gives 69.62 %, its previous version (same
   algorithm, different floating-point order) 68.98 %, and the sweep solved to 1e-6 (10× the cost)
   69.46 %.  Set a smaller ``eval.linear.tol`` for final numbers where that matters.

Why not one joint L-BFGS over the 45 stacked problems: the sum of independent objectives has the
same minimiser, but a joint L-BFGS shares one step length and mixes curvature pairs across problems
whose conditioning differs by 11 orders of magnitude in ``w``, and its stopping test is on the total
gradient, so the small-``w`` fits would stop unconverged.  A batched L-BFGS with per-problem line
searches would be exact, but costs 45 problem-evaluations per step until the slowest fit converges,
while the warm-started path costs only what each fit needs (on a CPU, the FLOPs are the bill).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.params import LinearParams

__all__ = ["LogisticFit", "fit_logistic", "regularisation_path", "stratified_split", "accuracy",
           "linear_probe", "format_linear_result"]


@dataclass
class LogisticFit:
    """A fitted multinomial logistic regression: ``logits = x @ weight + bias``."""
    weight: torch.Tensor      # (d, C)
    bias: torch.Tensor        # (C,)
    wd: float                 # the L2 weight w of the objective Σ CE + w(‖W‖² + ‖b‖²)
    evaluations: int          # objective/gradient evaluations used
    grad_max: float           # max |∇(objective / n)| at the returned point
    converged: bool           # grad_max <= tol

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)


class _LogisticObjective:
    """The mean official objective on one dataset, prepared once and shared by every fit on it.

    The features are stored **once**, transposed, with the constant-1 row of the bias appended:
    ``xt`` is ``(d + 1, n)`` and the parameters are ``θ = [W; b]ᵀ`` of shape ``(C, d + 1)``, so the
    logits are computed class-major, ``Z = θ @ xt`` ``(C, n)``, and the gradient is
    ``(softmax(Z) − Y) @ xtᵀ / n + reg·θ``.  Both products read the same ``(d + 1) × n`` buffer;
    keeping a second, row-major copy for one of them doubles the memory each evaluation streams
    through the cache, which made the evaluation twice as slow on the 2-core CPU
    (``docs/performance.md``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int):
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ValueError(f"fit_logistic: expected x (n, d) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
        self.n, self.d = x.shape
        self.num_classes = num_classes
        self.xt = torch.cat([x.t(), x.new_ones(1, self.n)]).contiguous()            # (d + 1, n)
        self.labels = y.unsqueeze(0)                                                   # (1, n)
        self.onehot = x.new_zeros(num_classes, self.n).scatter_(0, self.labels, 1.0)  # (C, n)

    def fit(self, wd: float, init: LogisticFit | None, max_iter: int, tol: float,
            history_size: int) -> LogisticFit:
        n = self.n
        if init is None:
            theta = self.xt.new_zeros(self.num_classes, self.d + 1)
        else:
            theta = torch.cat([init.weight.t(), init.bias.unsqueeze(1)], 1).to(self.xt.dtype).contiguous()
        theta.grad = torch.zeros_like(theta)
        reg = 2.0 * wd / n
        evaluations = 0

        def closure() -> torch.Tensor:
            nonlocal evaluations
            evaluations += 1
            logits = theta @ self.xt                                           # (C, n)
            lse = torch.logsumexp(logits, 0, keepdim=True)
            loss = (lse.sum() - logits.gather(0, self.labels).sum()) / n + 0.5 * reg * theta.pow(2).sum()
            residual = logits.sub_(lse).exp_().sub_(self.onehot).div_(n)      # ∂(CE/n)/∂logits, one exp pass
            torch.addmm(theta, residual, self.xt.t(), beta=reg, out=theta.grad)   # (P − Y) Xᵀ/n + reg·θ
            return loss

        optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                                      tolerance_change=0.0, history_size=history_size,
                                      line_search_fn="strong_wolfe")
        with torch.no_grad():
            optimiser.step(closure)
            closure()                                    # the gradient at the returned point
            evaluations -= 1
            grad_max = theta.grad.abs().max().item()
        return LogisticFit(theta[:, :-1].t().contiguous(), theta[:, -1].clone(), float(wd), evaluations,
                           grad_max, grad_max <= tol)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float,
                 init: LogisticFit | None = None, max_iter: int = 5000, tol: float = 1e-4,
                 history_size: int = 100) -> LogisticFit:
    """Minimise ``(Σ_i CE(W x_i + b, y_i) + wd·(‖W‖² + ‖b‖²)) / n`` with L-BFGS (strong Wolfe).

    ``x`` float ``(n, d)`` and ``y`` long ``(n,)`` on the same device; ``init`` warm-starts (zeros
    otherwise).  ``max_iter`` bounds the L-BFGS iterations as in the official code (torch also caps
    the objective evaluations at 1.25·max_iter); ``history_size`` is torch's (and the official) default.
    Internally ``θ = [W; b]`` acts on ``[x, 1]``: the bias is penalised like the weights, as in
    the official objective, and each evaluation is two matrix products over one copy of the features.
    """
    return _LogisticObjective(x, y, num_classes).fit(wd, init, max_iter, tol, history_size)


def regularisation_path(x: torch.Tensor, y: torch.Tensor, num_classes: int, wds: list[float],
                        max_iter: int = 5000, tol: float = 1e-4) -> list[LogisticFit]:
    """One fit per L2 weight, in the order of ``wds``, computed from the largest to the smallest
    weight, each warm-started at the previous solution (see the module docstring)."""
    objective = _LogisticObjective(x, y, num_classes)
    order = sorted(range(len(wds)), key=lambda i: -wds[i])
    fits: list[LogisticFit | None] = [None] * len(wds)
    previous = None
    for i in order:
        previous = fits[i] = objective.fit(wds[i], previous, max_iter, tol, history_size=100)
    return fits  # type: ignore[return-value]


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``round(val_fraction · n_c)`` random examples of each class go to val,
    at least one example of each class stays in train.  Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(int(round(val_fraction * len(idx))), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def accuracy(pred: torch.Tensor, y: torch.Tensor, class_average: bool = False) -> float:
    """Top-1 accuracy in %, or the mean over the classes present in ``y`` of per-class accuracy
    (the official ``class-avg`` metric)."""
    correct = (pred == y).to(torch.float64)
    if not class_average:
        return 100.0 * correct.mean().item()
    classes, inverse = torch.unique(y, return_inverse=True)
    per_class = torch.zeros(len(classes), dtype=torch.float64, device=y.device).index_add_(0, inverse, correct)
    counts = torch.bincount(inverse, minlength=len(classes)).to(torch.float64)
    return 100.0 * (per_class / counts).mean().item()


def _as_tensors(x, y, device, name):
    x = torch.as_tensor(np.asarray(x), device=device).to(torch.float64)
    y = torch.as_tensor(np.asarray(y).astype(np.int64), device=device)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"linear_probe: {name} features must be (n, d) and labels (n,), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if len(y) and y.min().item() < 0:
        raise ValueError(f"linear_probe: {name} labels must be non-negative class indices")
    if not torch.isfinite(x).all():
        raise ValueError(f"linear_probe: {name} features contain NaN or inf; check the backbone checkpoint")
    return x, y


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 params: LinearParams, seed: int, class_average: bool = False,
                 device: str | torch.device = "cpu") -> dict:
    """The official linear evaluation on frozen features (see the module docstring).

    Returns a JSON-able dict: ``acc`` (the reported number, %: top-1, or mean per-class accuracy when
    ``class_average``), ``metric`` (``"top1"`` / ``"class_avg"``), ``top1`` and ``class_avg`` (both
    always), ``best_wd``, ``best_val_acc``, ``wds`` and ``val_acc_per_wd`` (the sweep, ascending w),
    ``not_converged`` (w values whose fit stopped above ``tol``), sizes, evaluation counts and seconds.
    The fits run in float64 on ``device``, each to ``params.tol``.
    """
    start = time.perf_counter()
    device = torch.device(device)
    x_all, y_all = _as_tensors(train_x, train_y, device, "train")
    x_test, y_test = _as_tensors(test_x, test_y, device, "test")
    if x_all.shape[1] != x_test.shape[1]:
        raise ValueError(f"linear_probe: train features have d={x_all.shape[1]}, test d={x_test.shape[1]}")
    if len(torch.unique(y_all)) < 2:
        raise ValueError("linear_probe: the training labels hold fewer than 2 classes")
    num_classes = int(max(y_all.max().item(), y_test.max().item() if len(y_test) else 0)) + 1

    train_idx, val_idx = stratified_split(y_all.cpu().numpy(), params.val_fraction, seed)
    if len(val_idx) == 0:
        raise ValueError(f"linear_probe: eval.linear.val_fraction={params.val_fraction} leaves no "
                         f"validation example ({len(y_all)} training examples); raise it")
    tr = torch.as_tensor(train_idx, device=device)
    va = torch.as_tensor(val_idx, device=device)
    x_tr, y_tr, x_val, y_val = x_all[tr], y_all[tr], x_all[va], y_all[va]

    wds = torch.logspace(params.wd_min_exp, params.wd_max_exp, params.wd_steps, dtype=torch.float64).tolist()
    fits = regularisation_path(x_tr, y_tr, num_classes, wds, max_iter=params.max_iter, tol=params.tol)
    val_accs = [accuracy(f.predict(x_val), y_val, class_average) for f in fits]
    best = max(range(len(wds)), key=lambda i: (val_accs[i], -wds[i]))   # ties: smallest w

    final = fit_logistic(x_all, y_all, num_classes, wds[best], init=fits[best],
                         max_iter=params.max_iter, tol=params.tol)
    pred = final.predict(x_test)
    top1, class_avg = accuracy(pred, y_test, False), accuracy(pred, y_test, True)
    return {
        "metric": "class_avg" if class_average else "top1",
        "acc": class_avg if class_average else top1,
        "top1": top1,
        "class_avg": class_avg,
        "best_wd": wds[best],
        "best_val_acc": val_accs[best],
        "wds": wds,
        "val_acc_per_wd": val_accs,
        "not_converged": [f.wd for f in fits + [final] if not f.converged],
        "tol": params.tol,
        "evaluations": sum(f.evaluations for f in fits) + final.evaluations,
        "n_train": len(train_idx), "n_val": len(val_idx), "n_test": int(len(y_test)),
        "feat_dim": int(x_all.shape[1]), "num_classes": num_classes,
        "seconds": time.perf_counter() - start,
    }


def format_linear_result(result: dict, title: str = "linear probe") -> str:
    """A short plain-text table of one :func:`linear_probe` result."""
    name = "class-avg acc" if result["metric"] == "class_avg" else "top-1 acc"
    rows = [
        (name, f"{result['acc']:.2f} %"),
        ("best w (L2)", f"{result['best_wd']:.3g}"),
        ("val acc at best w", f"{result['best_val_acc']:.2f} %"),
        ("w swept", f"{len(result['wds'])} in [{min(result['wds']):.0e}, {max(result['wds']):.0e}]"),
        ("train / val / test", f"{result['n_train']} / {result['n_val']} / {result['n_test']}"),
        ("features x classes", f"{result['feat_dim']} x {result['num_classes']}"),
        ("fits not converged", str(len(result["not_converged"]))),
        ("time", f"{result['seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, "-" * max(len(title), width + 14)] + [f"{k:<{width}}  {v}" for k, v in rows])
