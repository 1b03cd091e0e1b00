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

How we solve the 45 fits, and why it is the protocol's answer
-------------------------------------------------------------
Every fit is an L2-regularised multinomial logistic regression with ``w > 0``: a strictly convex
problem with one minimiser, whatever the solver or its starting point.  The reported number must be
the one of that minimiser, so every fit is solved **to a tolerance far below what moves a
prediction**, not to a "good enough" one:

1. the objective divided by ``n`` (same minimiser) is minimised in **float64** with **trust-region
   Newton-CG** (TRON, Lin, Weng & Keerthi 2008, the solver of liblinear): Hessian-vector products
   are two matrix products over one transposed copy of the features (``_LogisticObjective``), the
   inner CG is preconditioned by the Hessian's per-class diagonal blocks (``_BlockPreconditioner``),
   or, at the weakly regularised end once those prove too weak, by the whole class-coupled Hessian
   (``_CoupledPreconditioner``),
   and a warm-started fit begins with a full Newton step;
2. each fit stops when ``‖∇f‖₂ ≤ tol·‖∇f(0)‖₂`` (``eval.linear.tol``, default 1e-9, relative to the
   gradient at θ = 0, which is the same for every w).  Near the minimiser the decrease of ``f``
   falls below float64 resolution, where TRON's ratio test becomes noise; there a step is accepted
   when it lowers the gradient norm, so the tolerance stays reachable (the float64 floor of the
   relative gradient is ≈ 1e-10 on weakly regularised, nearly separable fits: 1e-9 keeps a margin,
   and the tests show that asking for 1e-11 changes no prediction);
3. the path is walked from the largest w to the smallest, each fit warm-started at the previous
   solution or its secant extrapolation in log w (a continuation, as glmnet does; it only changes
   the cost).  ``tests/test_evaluate.py``
   shows that the chosen w and test accuracy do not move when the tolerance is tightened by 100×,
   when the path is walked ascending (the official order), and that they equal scikit-learn's
   lbfgs at tol 1e-12 on 10- and 60-class, separable and non-separable problems.

Stopping at the protocol's answer, not at a gradient (issue 12, item 2)
-----------------------------------------------------------------------
What is reported is a set of predictions, not a gradient, so with a validation (refit: test) set at
hand a fit also stops as soon as its predictions there are provably the minimiser's.  ``f`` is
μ-strongly convex with μ = 2w/n (the L2 term covers weight and bias), so ``‖θ − θ*‖_F ≤ ‖∇f(θ)‖ / μ``
(we add a float64 error bound of the computed gradient); a logit difference of two classes moves by
at most ``√2·‖x̃_i‖·‖θ − θ*‖_F`` between θ and θ* (x̃ = [x, 1]), so a prediction whose top-1 margin
exceeds that is certified (``_HeldOutCertificate``).  Per fit, checked after every accepted step
(one product over the held-out set):

* ``certified``: every val prediction is certified, the fit's val accuracy is exactly the
  minimiser's; for the refit, every test prediction: the reported accuracy is exact;
* ``screened``: the minimiser's val accuracy lies in ``[lo, hi]`` (uncertain predictions counted
  wrong / right); when ``hi`` is below a proven ``lo`` of a w fitted before (larger w on the
  descending path, whose ties lose to this one: strict ``<``; ``≤`` on the ascending path) the w cannot
  be selected, by the minimiser nor by its own early point (whose accuracy is also ≤ hi);
* ``converged``: ``‖∇f‖ ≤ tol·‖∇f(0)‖`` as before (predictions too close to call at the tolerance);
* ``floor``: ``_FLOOR_PATIENCE`` iterations where f is below float64 resolution without halving
  ``‖∇f‖`` (the tiny-w fits used to burn the 500-iteration cap there); not a final answer, listed
  in ``not_converged`` like ``max_iter``.

``solver.stops`` of ``linear_diagnostics.json`` records the stop of every fit; ``solver.answer_certified`` is
true when every fit was certified or screened and the refit certified: then the chosen w and the
reported accuracy are the minimisers' exactly, whatever the tolerance.  ``val_acc_per_wd`` of a
screened w is the accuracy at its early point (only bounded: ``solver.val_acc_bounds``).

Why the previous default was not enough: at ``max|∇| ≤ 1e-4`` (scikit-learn's default) the weakly
regularised tail of the sweep is a plateau where a warm start already meets the tolerance, so fits
stopped at once and the chosen w depended on the path (issue 12: 69.62 % at w = 0.0178 against the
official loop's 69.50 % at w = 0.0562 on the same features).  The official code itself runs float32
L-BFGS, whose line search stalls around ``max|∇| ≈ 1e-4``; ``bench/bench_linear.py`` runs a replica of
it beside scikit-learn and this solver.

Selection: the official loop walks w ascending and keeps a new best only on a strictly larger val
accuracy, so ties go to the smallest w; we apply the same rule to the val accuracies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.params import LinearParams

DEFAULT_TOL = 1e-9         # relative gradient norm at which every fit stops (eval.linear.tol)
DEFAULT_MAX_ITER = 500     # Newton iterations per fit (eval.linear.max_iter); a safety cap
SOLVER = "tron"            # trust-region Newton-CG, float64 (recorded in linear_diagnostics.json)
# How a fit stops (recorded per fit in linear_diagnostics.json): ‖∇f‖ ≤ tol·‖∇f(0)‖; every held-out prediction
# certified equal to the minimiser's; the w provably cannot be selected; the gradient stopped
# decreasing at the float64 floor; the iteration cap.  The first three keep the protocol's answer.
STOPS = ("converged", "certified", "screened", "floor", "max_iter")
_FINAL_STOPS = ("converged", "certified", "screened")
_UNIT_ROUNDOFF = float(torch.finfo(torch.float64).eps) / 2
_FLOOR_PATIENCE = 10       # unresolved Newton iterations without halving ‖∇f‖: the float64 floor

__all__ = ["LogisticFit", "fit_logistic", "regularisation_path", "stratified_split", "accuracy",
           "linear_probe", "format_linear_result", "evaluate"]


@dataclass
class LogisticFit:
    """A fitted multinomial logistic regression: ``logits = x @ weight + bias``."""
    weight: torch.Tensor      # (d, C)
    bias: torch.Tensor        # (C,)
    wd: float                 # the L2 weight w of the objective Σ CE + w(‖W‖² + ‖b‖²)
    iterations: int           # Newton (trust-region) iterations
    hvps: int                 # Hessian-vector products of the inner CG
    grad_rel: float           # ‖∇f‖ / ‖∇f(0)‖ at the returned point (f = objective / n)
    converged: bool           # stopped for a reason that keeps the protocol's answer: tol, certified, screened
    stop: str = "converged"   # how the fit stopped: one of STOPS
    held_out_bounds: tuple[float, float] | None = None   # the minimiser's held-out accuracy lies in here (%)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)


class _LogisticObjective:
    """The mean official objective on one dataset, prepared once and shared by every fit on it.

    The features are stored **once**, transposed, with the constant-1 row of the bias appended:
    ``xt`` is ``(d + 1, n)`` and the parameters are ``θ = [W; b]ᵀ`` of shape ``(C, d + 1)``, so the
    logits are computed class-major, ``Z = θ @ xt`` ``(C, n)``.  With ``P = softmax(Z)`` (per column)
    and ``reg = 2w/n``:

    * objective ``f(θ) = (Σ_i lse(Z_i) − Z_{y_i,i}) / n + ½·reg·‖θ‖²``;
    * gradient ``∇f = (P − Y) @ xtᵀ / n + reg·θ`` (one product);
    * Hessian-vector product ``H·V = (P ⊙ (U − 1ᵀ(P ⊙ U))) @ xtᵀ / n + reg·V`` with ``U = V @ xt``
      (two products; ``P`` is kept from the last gradient).

    Both products read the same ``(d + 1) × n`` buffer (a second, row-major copy doubles the memory
    each evaluation streams through the cache, ``docs/performance.md``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int):
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ValueError(f"fit_logistic: expected x (n, d) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
        self.n, self.d = x.shape
        self.num_classes = num_classes
        self.xt = torch.cat([x.t(), x.new_ones(1, self.n)]).contiguous()            # (d + 1, n)
        self.labels = y.unsqueeze(0)                                                   # (1, n)
        self.onehot = x.new_zeros(num_classes, self.n).scatter_(0, self.labels, 1.0)  # (C, n)
        # The gradient at θ = 0 (the same for every w): the scale of the relative stopping rule.
        zero_residual = self.onehot.neg().add_(1.0 / num_classes).div_(self.n)
        self.grad0_norm = torch.linalg.vector_norm(zero_residual @ self.xt.t()).item()
        # A bound on the float64 error of the computed ∇f (Frobenius): each entry is a sum of n
        # products, |error| ≤ γ_{n+10}·Σ_i |P−Y|·|x̃| / n, and ‖P_i − Y_i‖₂ ≤ √2 (the +10 covers the
        # softmax).  It is added to ‖∇f‖ before the certificate uses it.
        self._reused_preconditioner: _BlockPreconditioner | None = None   # the last fit's, see fit()
        self._fresh_cg = 0
        self._couple = False                   # the next fit builds the coupled preconditioner (fit)
        c, d1 = num_classes, self.d + 1
        # What building the coupled preconditioner costs, in Hessian-vector products (multiply-adds:
        # C(C+1)/2 Gram matrices + the Cholesky of a C(d+1) square, against 2·C·(d+1)·n per product).
        self.coupled_cost = (c * (c + 1) / 2 * d1 * d1 * self.n + (c * d1) ** 3 / 6) / (2 * c * d1 * self.n)
        self.grad_rounding = ((self.n + 10) * _UNIT_ROUNDOFF * 2 ** 0.5
                              * torch.linalg.vector_norm(self.xt, dim=0).mean().item())

    def loss(self, theta: torch.Tensor, reg: float) -> float:
        logits = theta @ self.xt
        lse = torch.logsumexp(logits, 0, keepdim=True)
        return ((lse.sum() - logits.gather(0, self.labels).sum()) / self.n + 0.5 * reg * theta.pow(2).sum()).item()

    def loss_grad(self, theta: torch.Tensor, reg: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(f, ∇f, P) at θ."""
        logits = theta @ self.xt                                                        # (C, n)
        lse = torch.logsumexp(logits, 0, keepdim=True)
        loss = (lse.sum() - logits.gather(0, self.labels).sum()) / self.n + 0.5 * reg * theta.pow(2).sum()
        prob = logits.sub_(lse).exp_()                                                  # softmax, in place
        grad = torch.addmm(theta, (prob - self.onehot).div_(self.n), self.xt.t(), beta=reg)
        return loss.item(), grad, prob

    def hvp(self, prob: torch.Tensor, v: torch.Tensor, reg: float) -> torch.Tensor:
        u = v @ self.xt                                                                 # (C, n)
        u.mul_(prob)
        u.addcmul_(prob, u.sum(0, keepdim=True), value=-1.0)                            # P⊙U − P⊙(1ᵀ(P⊙U))
        return torch.addmm(v, u, self.xt.t(), beta=reg, alpha=1.0 / self.n)

    def preconditioner(self, prob: torch.Tensor, reg: float) -> "_BlockPreconditioner":
        """``M ≈ H`` at the point whose softmax is ``prob``: the Hessian's C diagonal blocks,
        ``M_a = Σ_i p_ia(1 − p_ia) x̃_i x̃_iᵀ / n + reg·I`` ((d+1) × (d+1) each, C products over the
        features), factorised (Cholesky).  Building the blocks is the protocol's largest single cost
        (C·(d+1)²·n multiply-adds, ≈ 130 Hessian-vector products' worth), so a fit reuses the blocks of
        the fit before it on the path with its own ``reg`` (``_BlockPreconditioner.with_reg``) and
        rebuilds them only when they have gone stale (``fit``)."""
        curv = prob * (1.0 - prob)                                                    # (C, n)
        blocks = torch.stack([(self.xt * curv[a]) @ self.xt.t() for a in range(self.num_classes)])
        return _BlockPreconditioner(blocks.div_(self.n), reg)

    def coupled_preconditioner(self, prob: torch.Tensor, reg: float) -> "_CoupledPreconditioner":
        """``M = H`` at the point whose softmax is ``prob``: the whole Hessian of the loss, every class
        pair coupled, ``H_ab = Σ_i (δ_ab p_ia − p_ia p_ib) x̃_i x̃_iᵀ / n`` (C(C+1)/2 Gram matrices,
        ≈ C²(d+1)²n multiply-adds), plus ``reg·I``, factorised once (Cholesky of a C(d+1) square).
        Built only where the per-class blocks have proven too weak (``fit``: a fit that cost more
        Hessian-vector products than this build), i.e. at the weakly regularised end, where
        neighbouring classes (the 24 hue classes) share their uncertain examples and block-Jacobi
        CG runs for hundreds of products per Newton step."""
        c, d1, n = self.num_classes, self.d + 1, self.n
        weighted = (prob.unsqueeze(1) * self.xt.unsqueeze(0)).reshape(c * d1, n)      # rows p_a ⊙ x̃ⱼ
        hessian = torch.empty(c * d1, c * d1, dtype=self.xt.dtype, device=self.xt.device)
        for a in range(c):                     # the upper block row a: −Σ_i p_ia p_ib x̃ x̃ᵀ, b ≥ a
            rows = slice(a * d1, (a + 1) * d1)
            block_row = torch.mm(weighted[rows], weighted[a * d1:].t()).neg_()
            hessian[rows, a * d1:] = block_row
            hessian[a * d1:, rows] = block_row.t()
            # the diagonal block directly from p(1 − p) (no cancellation of p − p² for confident examples)
            hessian[rows, rows] = (self.xt * (prob[a] * (1.0 - prob[a]))) @ self.xt.t()
        return _CoupledPreconditioner(hessian.div_(n), reg, c)

    def extrapolate(self, before: LogisticFit | None, last: LogisticFit | None, wd: float) -> LogisticFit | None:
        """The warm start of the next fit on the path: ``last``, or the secant step along log w from
        ``before`` through ``last`` (the solution path is smooth in log w) when that has the lower
        objective at ``wd``.  Only the cost depends on it: every fit is solved to the same answer."""
        if before is None or last is None or not (before.wd > 0 and last.wd > 0 and wd > 0):
            return last
        t = np.log(wd / last.wd) / np.log(last.wd / before.wd)
        if not 0 < t <= 2:
            return last
        reg = 2.0 * wd / self.n
        pack = lambda f: torch.cat([f.weight.t(), f.bias.unsqueeze(1)], 1).to(self.xt.dtype)  # noqa: E731
        theta_last = pack(last)
        theta = theta_last + t * (theta_last - pack(before))
        if self.loss(theta, reg) >= self.loss(theta_last, reg):
            return last
        return LogisticFit(theta[:, :-1].t().contiguous(), theta[:, -1].clone(), float(wd), 0, 0, float("nan"), False)

    def fit(self, wd: float, init: LogisticFit | None, max_iter: int, tol: float,
            check=None) -> LogisticFit:
        """Trust-region Newton-CG (TRON, Lin, Weng & Keerthi 2008, the solver of liblinear) from
        ``init`` (zeros otherwise), until ``‖∇f‖ ≤ tol·‖∇f(0)‖``, the float64 floor (``_FLOOR_PATIENCE``
        unresolved iterations without halving ‖∇f‖) or ``max_iter`` Newton iterations.

        ``check(θ, distance)``, called at the start and after every accepted step, may stop the fit
        early by returning a stop name (``"certified"``, ``"screened"``); ``distance`` bounds
        ``‖θ − θ*‖_F``: f is μ-strongly convex with μ = reg = 2w/n (the L2 term covers weight and
        bias), so ``‖θ − θ*‖ ≤ ‖∇f(θ)‖ / μ`` (plus the float64 error bound of the computed ∇f)."""
        n = self.n
        reg = 2.0 * wd / n
        if init is None:
            theta = self.xt.new_zeros(self.num_classes, self.d + 1)
        else:
            theta = torch.cat([init.weight.t(), init.bias.unsqueeze(1)], 1).to(self.xt.dtype).contiguous()
        f, grad, prob = self.loss_grad(theta, reg)
        target = tol * self.grad0_norm
        gnorm = torch.linalg.vector_norm(grad).item()
        radius = None
        iterations = hvps = 0
        stop = check(theta, (gnorm + self.grad_rounding) / reg) if check is not None else None
        floor_ref, stalled = gnorm, 0
        precond, fresh, stale = None, False, False
        if stop is None and gnorm > target:
            # The blocks of the fit before this one on the path (its warm start) with this fit's reg,
            # unless there are none or a CG of that fit showed them stale: then built here.  One
            # preconditioner per fit, as before: the trust region is measured in its norm, and
            # changing it mid-fit made the radius meaningless (a 60-class fit from θ = 0 ran to the cap).
            reused = self._reused_preconditioner
            if self._couple and (reused is None or not isinstance(reused, _CoupledPreconditioner)):
                reused = None                  # the blocks proved too weak: build the coupled Hessian here
                precond = self.coupled_preconditioner(prob, reg)
            else:
                precond = reused.with_reg(reg) if reused is not None else self.preconditioner(prob, reg)
            fresh = reused is None
        while stop is None and gnorm > target and iterations < max_iter:
            if radius is None:
                # The first step is an unconstrained inexact Newton step; its length then sets the
                # radius (_update_radius, first=True).  liblinear starts at radius = ‖∇f‖, right from
                # θ = 0 but far too small from a warm start, where ‖∇f‖ is tiny while the solution of
                # the next w is a step of ~0.1 away: 10-15 iterations went into growing the radius ×4
                # at a time (20 of 45 fits, 10k x 128).  A rejected first step shrinks the radius.
                radius = float("inf") if init is not None else gnorm
            # Inexact Newton: preconditioned CG (per-class Hessian blocks, `preconditioner`) until
            # ‖r‖ ≤ 0.05·‖g‖, stopped at the trust-region boundary (M-norm).  Measured on the bench's
            # 10k × 128 ReLU features, 10 classes, whole protocol (Hessian-vector products; Newton
            # iterations): 10 191 / 1 051 with liblinear's radius ‖∇f‖ at warm starts, no
            # preconditioner, forcing 0.1; full first step: 10 191 / 200; + Kronecker preconditioner:
            # 3 851 / 200; + secant warm start (extrapolate): 3 272 / 183; forcing 0.05: 3 171 / 105
            # (0.3: 3 231; 0.02: 3 178; 0.01: 3 394; 0.003: 3 938; a stop in the M-norm of the
            # residual: 3 266).  Per-class blocks instead of the Kronecker factors: 757 / 103 (real
            # features: _BlockPreconditioner); rebuilding them within a fit after a long CG: no gain.
            step, residual, used, snorm = _steihaug_cg(lambda v: self.hvp(prob, v, reg), grad, radius,
                                                       _CG_FORCING * gnorm, precond)
            hvps += used
            if fresh:                 # the CG length that fresh blocks give: the yardstick of staleness
                self._fresh_cg, fresh = used, False
            elif isinstance(precond, _BlockPreconditioner) and used > _STALE_CG_FACTOR * self._fresh_cg + 2:
                stale = True          # reused blocks far from this fit's curvature: the next fit rebuilds
            gs = (grad * step).sum().item()
            predicted = -0.5 * (gs - (step * residual).sum().item())           # −(gᵀs + ½ sᵀHs)
            candidate = theta + step
            f_new, grad_new, prob_new = self.loss_grad(candidate, reg)
            actual = f - f_new
            gnorm_new = torch.linalg.vector_norm(grad_new).item()
            radius = _update_radius(radius, snorm, f, f_new, gs, actual, predicted, first=iterations == 0)
            iterations += 1
            # Near the minimiser the decrease of f falls below its float64 resolution (≈ 1e-16·|f|)
            # and the ratio test turns into noise: there a step is accepted when it lowers ‖∇f‖.
            resolved = predicted > _RESOLUTION * abs(f)
            # A candidate that meets the stopping rule ends the fit whatever its ratio: the answer is
            # defined by ‖∇f‖ (strong convexity bounds the distance to θ* by it), and there a rise of f
            # of a few 1e-15·|f| is the rounding of an n-term sum (seen on 60 classes, n = 360: the
            # step to ‖∇f‖ = 1e-10·‖∇f(0)‖ was refused for a rise of 2e-13·|f|, and 37 noise steps
            # followed to the floor).
            meets = gnorm_new <= target and actual > -1e3 * _UNIT_ROUNDOFF * self.n * abs(f)
            if meets or ((actual > _ETA0 * predicted) if resolved else gnorm_new < gnorm):
                theta, f, grad, prob, gnorm = candidate, f_new, grad_new, prob_new, gnorm_new
                if not resolved:
                    radius = max(radius, 2.0 * snorm)
                if check is not None:
                    stop = check(theta, (gnorm + self.grad_rounding) / reg)
            elif not resolved:
                radius = _SIGMA1 * snorm          # a rejected unresolved step must not be proposed again
            elif radius < 1e-300:
                stop = "floor"
            # Where f is no longer resolved, Newton still shrinks ‖∇f‖ by about the CG forcing (0.1) per
            # iteration; ‖∇f‖ not halving in _FLOOR_PATIENCE such iterations is rounding noise: the
            # float64 floor (it cost up to 500 iterations per tiny-w fit before, for nothing).
            if resolved or gnorm <= 0.5 * floor_ref:
                floor_ref, stalled = gnorm, 0
            else:
                stalled += 1
                if stalled >= _FLOOR_PATIENCE and stop is None:
                    stop = "floor"
        if stop is None:
            stop = "converged" if gnorm <= target else "max_iter"
        if precond is not None:
            self._reused_preconditioner = None if stale else precond
            # A fit that cost more Hessian-vector products than building the whole coupled Hessian:
            # the next fits (smaller w, harder still) use it instead of the per-class blocks, and
            # rebuild it when a fit costs that much again.
            if hvps > _COUPLE_SHARE * self.coupled_cost:
                self._couple = True
                if isinstance(precond, _CoupledPreconditioner):
                    self._reused_preconditioner = None
        return LogisticFit(theta[:, :-1].t().contiguous(), theta[:, -1].clone(), float(wd), iterations, hvps,
                           gnorm / self.grad0_norm, stop in _FINAL_STOPS, stop)


class _HeldOutCertificate:
    """Which predictions on a held-out set are provably those of the minimiser θ*.

    For an example with augmented features x̃ = [x, 1] the logit difference of two classes a, b is
    ``(θ_a − θ_b)·x̃``; between θ and θ* it moves by at most ``‖θ_a − θ_b − θ*_a + θ*_b‖·‖x̃‖ ≤
    √2·‖θ − θ*‖_F·‖x̃‖``.  A prediction whose top-1 margin exceeds that (plus the float64 error of
    the two logits, ≤ 2(d+2)·u·‖θ‖·‖x̃‖) is therefore the minimiser's.  The minimiser's accuracy on
    the set then lies in ``[lo, hi]``: uncertain predictions counted wrong, then right (this holds
    for the class-average metric too, which is monotone in every prediction's correctness)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, class_average: bool):
        self.xt = torch.cat([x.t(), x.new_ones(1, len(x))]).contiguous()          # (d + 1, m)
        self.norms = torch.linalg.vector_norm(self.xt, dim=0)                      # ‖x̃_i‖
        self.y, self.class_average = y, class_average
        self.last: tuple[float, float] | None = None

    def bounds(self, theta: torch.Tensor, distance: float) -> tuple[float, float, bool]:
        """(lo, hi, every prediction certified) at θ with ‖θ − θ*‖_F ≤ distance."""
        top = (theta @ self.xt).topk(2, dim=0)
        margin = top.values[0] - top.values[1]
        rounding = 2 * (self.xt.shape[0] + 1) * _UNIT_ROUNDOFF * torch.linalg.vector_norm(theta).item()
        certain = margin > self.norms * (2 ** 0.5 * distance + rounding)
        pred = top.indices[0]
        lo = accuracy(torch.where(certain, pred, -1), self.y, self.class_average)
        hi = accuracy(torch.where(certain, pred, self.y), self.y, self.class_average)
        self.last = (lo, hi)
        return lo, hi, bool(certain.all())


_CG_FORCING = 0.05                              # CG stops at ‖r‖ ≤ this·‖g‖ (liblinear: 0.1; measured below)
_COUPLE_SHARE = 1 / 3                           # a fit costing this share of a coupled build switches the path to it
_STALE_CG_FACTOR = 2.0                          # a CG this many times longer than with fresh blocks: rebuild them
_RESOLUTION = 1e-15                             # predicted decreases below this·|f| are not resolved
_ETA0, _ETA1, _ETA2 = 1e-4, 0.25, 0.75          # TRON's acceptance / radius thresholds (liblinear)
_SIGMA1, _SIGMA2, _SIGMA3 = 0.25, 0.5, 4.0      # TRON's radius factors (liblinear)


class _BlockPreconditioner:
    """Block-Jacobi over the classes, on the subspace the iterates live in.

    ``M = blockdiag(M_1 … M_C)``.  The objective is unchanged when one vector is added to every
    class's row of θ (softmax), so its loss Hessian is zero along those directions and only the
    L2 term curves them; there ``M`` would overstate the curvature by ``M_a − reg·I``.  θ starts at
    zero or at a previous fit, and every gradient has rows summing to zero, so the minimiser and every
    iterate lie in the subspace ``Σ_a θ_a = 0``: ``solve`` returns ``P₀ M⁻¹ r`` (P₀ subtracts the
    class mean), a symmetric positive definite preconditioner there.  The trust region is measured in
    ``‖s‖_M``.

    Measured (Hessian-vector products over the whole protocol, SimCLR-baseline features, 10 000 × 128):
    ``cfmnist/class`` 5 233 with the Kronecker-factored ``Ā ⊗ S`` (K-FAC's approximation) against 1 060
    with these blocks; ``cfmnist/hue`` (24 classes) 60 362 against 13 753: one shared feature factor
    cannot follow classes whose uncertain examples lie in different parts of feature space."""

    def __init__(self, curvature: torch.Tensor, reg: float):
        self.curvature = curvature                                           # (C, d+1, d+1), without reg
        eye = torch.eye(curvature.shape[1], dtype=curvature.dtype, device=curvature.device)
        self.blocks = curvature + reg * eye
        self.chol = torch.linalg.cholesky(self.blocks)

    def with_reg(self, reg: float) -> "_BlockPreconditioner":
        """The same curvature blocks with another L2 term (one batched Cholesky, no pass over the data)."""
        return _BlockPreconditioner(self.curvature, reg)

    def solve(self, v: torch.Tensor) -> torch.Tensor:       # P₀ M⁻¹ v
        z = torch.cholesky_solve(v.unsqueeze(2), self.chol).squeeze(2)
        return z.sub_(z.mean(0, keepdim=True))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:      # M v
        return torch.bmm(self.blocks, v.unsqueeze(2)).squeeze(2)


class _CoupledPreconditioner:
    """``M = H + reg·I`` with the loss Hessian ``H`` of one point, every class pair coupled
    (``_LogisticObjective.coupled_preconditioner``), factorised once.

    ``H`` is zero along ``1 ⊗ v`` (adding one vector to every class's row leaves the softmax
    unchanged) and maps the sum-zero subspace, where the iterates live, into itself; adding
    ``κ·Q`` (Q the projector on ``1 ⊗ v``, κ the mean diagonal of H) leaves M unchanged there and
    keeps the factorisation well conditioned whatever ``reg``.  ``solve`` returns ``P₀ M⁻¹ r``.
    ``with_reg`` keeps the factor (its own reg): the preconditioner only shapes the path, and where
    it is used (w ≤ 1e-4 or so) reg is far below the curvature."""

    def __init__(self, hessian: torch.Tensor, reg: float, num_classes: int):
        size = hessian.shape[0]
        d1 = size // num_classes
        self.num_classes, self.d1 = num_classes, d1
        kappa = hessian.diagonal().mean().item()
        eye = torch.eye(d1, dtype=hessian.dtype, device=hessian.device)
        null = torch.kron(torch.full((num_classes, num_classes), kappa / num_classes, dtype=hessian.dtype,
                                     device=hessian.device), eye)                      # κ·(11ᵀ/C ⊗ I)
        matrix = hessian.add_(null)
        matrix.diagonal().add_(reg)
        jitter = 0.0
        while True:
            chol, info = torch.linalg.cholesky_ex(matrix)
            if info.item() == 0:
                break
            # rounding made an eigenvalue ≤ 0 (reg far below it): a tiny shift, a preconditioner still
            jitter = max(2 * jitter, 1e-12 * kappa)
            matrix.diagonal().add_(jitter)
        self.chol = chol

    def with_reg(self, reg: float) -> "_CoupledPreconditioner":
        return self

    def solve(self, v: torch.Tensor) -> torch.Tensor:       # P₀ M⁻¹ v
        # two triangular solves: torch.cholesky_solve with one right-hand side took 60× longer here
        # (0.23 s against 3.8 ms per triangle, 3096², one thread)
        half = torch.linalg.solve_triangular(self.chol, v.reshape(-1, 1), upper=False)
        z = torch.linalg.solve_triangular(self.chol.mT, half, upper=True).reshape(self.num_classes, self.d1)
        return z.sub_(z.mean(0, keepdim=True))

    matvec = None      # the trust region's ‖s‖_M from CG's recurrences (_steihaug_cg): M is C²(d+1)² numbers


def _steihaug_cg(hvp, grad: torch.Tensor, radius: float, cg_tol: float,
                 precond: _BlockPreconditioner | None = None):
    """Approximately minimise ``gᵀs + ½sᵀHs`` over ``‖s‖_M ≤ radius`` (Steihaug's truncated CG,
    preconditioned by ``M``; the trust region is measured in the M-norm, as in liblinear's
    preconditioned TRON, Hsia, Chiang & Lin 2018; the Euclidean norm without ``precond``), until
    ``‖r‖₂ ≤ cg_tol``.  Returns ``(s, r = −g − Hs, Hessian-vector products used, ‖s‖_M)``."""
    solve = precond.solve if precond is not None else (lambda v: v)
    metric = precond.matvec if precond is not None else (lambda v: v)
    dot = lambda a, b: (a * b).sum().item()  # noqa: E731
    step = torch.zeros_like(grad)
    residual = -grad
    z = solve(residual)
    direction = z.clone()
    rz = dot(residual, z)
    ss = 0.0                                                   # ‖s‖_M²
    sd, dd = 0.0, rz                                           # sᵀMd, dᵀMd (recurrences: metric is None)
    used = 0
    while torch.linalg.vector_norm(residual).item() > cg_tol:
        hd = hvp(direction)
        used += 1
        alpha = rz / dot(direction, hd)
        if metric is not None:
            m_dir = metric(direction)
            sd, dd = dot(step, m_dir), dot(direction, m_dir)
        ss_new = ss + 2 * alpha * sd + alpha * alpha * dd
        if ss_new > radius * radius:                           # to the boundary: ‖s + τd‖_M = radius
            rad = max(sd * sd + dd * (radius * radius - ss), 0.0) ** 0.5
            tau = (radius * radius - ss) / (sd + rad) if sd >= 0 else (rad - sd) / dd
            step.add_(direction, alpha=tau)
            residual.sub_(hd, alpha=tau)
            return step, residual, used, radius
        step.add_(direction, alpha=alpha)
        residual.sub_(hd, alpha=alpha)
        ss = ss_new
        z = solve(residual)
        rz_new = dot(residual, z)
        beta = rz_new / rz
        direction.mul_(beta).add_(z)
        # Where M⁻¹ is applied exactly (metric None: M would cost as much as a product to apply),
        # the M-norms follow from CG's own scalars (Conn, Gould & Toint 2000, §7.5.1):
        # s'ᵀMd' = β(sᵀMd + α dᵀMd), d'ᵀMd' = r'ᵀz' + β² dᵀMd.
        sd, dd = beta * (sd + alpha * dd), rz_new + beta * beta * dd
        rz = rz_new
    return step, residual, used, max(ss, 0.0) ** 0.5


def _update_radius(radius, snorm, f, f_new, gs, actual, predicted, first):
    """liblinear's trust-region radius update (tron.cpp)."""
    if first:
        radius = min(radius, snorm)
    curvature = f_new - f - gs
    alpha = _SIGMA3 if curvature <= 0 else max(_SIGMA1, -0.5 * (gs / curvature))
    if actual < _ETA0 * predicted:
        return min(max(alpha, _SIGMA1) * snorm, _SIGMA2 * radius)
    if actual < _ETA1 * predicted:
        return max(_SIGMA1 * radius, min(alpha * snorm, _SIGMA2 * radius))
    if actual < _ETA2 * predicted:
        return max(_SIGMA1 * radius, min(alpha * snorm, _SIGMA3 * radius))
    return max(radius, min(alpha * snorm, _SIGMA3 * radius))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float,
                 init: LogisticFit | None = None, max_iter: int = DEFAULT_MAX_ITER,
                 tol: float = DEFAULT_TOL) -> LogisticFit:
    """Minimise ``f = (Σ_i CE(W x_i + b, y_i) + wd·(‖W‖² + ‖b‖²)) / n`` with trust-region Newton-CG.

    ``x`` float ``(n, d)`` (float64 for the default tolerance) and ``y`` long ``(n,)`` on the same
    device; ``init`` warm-starts (zeros otherwise).  Stops when ``‖∇f‖₂ ≤ tol·‖∇f(0)‖₂`` (the
    gradient at θ = 0, the same for every ``wd``) or after ``max_iter`` Newton iterations.
    Internally ``θ = [W; b]`` acts on ``[x, 1]``: the bias is penalised like the weights, as in
    the official objective.
    """
    return _LogisticObjective(x, y, num_classes).fit(wd, init, max_iter, tol)


def regularisation_path(x: torch.Tensor, y: torch.Tensor, num_classes: int, wds: list[float],
                        max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL,
                        descending: bool = True,
                        held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                        class_average: bool = False) -> list[LogisticFit]:
    """One fit per L2 weight, in the order of ``wds``, computed from the largest to the smallest
    weight (``descending=False``: the official ascending order), each warm-started at the previous
    solution.  Each fit is the minimiser to ``tol`` whatever the order (module docstring).

    With ``held_out = (x_val, y_val)`` a fit also stops as soon as

    * every val prediction is certified equal to the minimiser's (``"certified"``: its val accuracy
      is then exactly the minimiser's), or
    * the w provably cannot be selected (``"screened"``): the minimiser's val accuracy is at most
      ``hi`` and an already fitted w has a minimiser val accuracy of at least ``lo' > hi``
      (``lo' ≥ hi`` when the path ascends, since ties go to the smaller w, the one fitted before).
      A screened fit's own val accuracy is ≤ hi, so it can never be the one selected either.

    ``held_out_bounds`` of each fit holds its ``[lo, hi]`` at the returned point."""
    objective = _LogisticObjective(x, y, num_classes)
    certificate = _HeldOutCertificate(*held_out, class_average) if held_out is not None else None
    order = sorted(range(len(wds)), key=lambda i: -wds[i] if descending else wds[i])
    fits: list[LogisticFit | None] = [None] * len(wds)
    previous = None
    best_lo = -1.0                           # the largest proven lower bound of a fitted w's val accuracy

    def check(theta: torch.Tensor, distance: float) -> str | None:
        lo, hi, exact = certificate.bounds(theta, distance)
        if exact:
            return "certified"
        return "screened" if (hi < best_lo if descending else hi <= best_lo) else None

    before = None
    for i in order:
        start = objective.extrapolate(before, previous, wds[i])
        before, previous = previous, objective.fit(wds[i], start, max_iter, tol,
                                                   check if certificate is not None else None)
        fits[i] = previous
        if certificate is not None:
            previous.held_out_bounds = certificate.last
            best_lo = max(best_lo, certificate.last[0])
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
    ``not_converged`` (w values whose fit stopped above ``tol``), ``solver`` (name, tolerance, iterations,
    the largest relative gradient left), ``test_pred`` / ``test_label`` (numpy, per test image, for
    the paired statistics of :mod:`pipeline.stats`), sizes and seconds.
    The fits run in float64 on ``device``, each to ``params.tol`` (relative gradient norm).
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
    fits = regularisation_path(x_tr, y_tr, num_classes, wds, max_iter=params.max_iter, tol=params.tol,
                               held_out=(x_val, y_val), class_average=class_average)
    val_accs = [accuracy(f.predict(x_val), y_val, class_average) for f in fits]
    # The official loop walks w ascending and replaces its best only on a strictly larger val
    # accuracy: ties go to the smallest w.
    best = 0
    for i in range(1, len(wds)):
        if val_accs[i] > val_accs[best]:
            best = i

    # The refit stops as soon as every test prediction is certified: the reported accuracy is then
    # exactly the minimiser's.
    objective = _LogisticObjective(x_all, y_all, num_classes)
    test_certificate = _HeldOutCertificate(x_test, y_test, class_average) if len(y_test) else None
    final = objective.fit(wds[best], fits[best], params.max_iter, params.tol,
                          (lambda theta, distance: "certified" if test_certificate.bounds(theta, distance)[2] else None)
                          if test_certificate is not None else None)
    if test_certificate is not None:
        final.held_out_bounds = test_certificate.last
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
        "not_converged": [f.wd for f in fits + [final] if not f.converged],   # stopped at the floor or the cap
        "solver": {"name": SOLVER, "tol": params.tol, "max_iter": params.max_iter, "dtype": "float64",
                   "path": "descending w, warm-started", "newton_iterations": sum(f.iterations for f in fits) + final.iterations,
                   "hessian_vector_products": sum(f.hvps for f in fits) + final.hvps,
                   "max_grad_rel": max(f.grad_rel for f in fits + [final]),
                   # how each fit stopped (ascending w, then the refit); STOPS
                   "stops": [f.stop for f in fits], "refit_stop": final.stop,
                   "val_acc_bounds": [list(f.held_out_bounds) for f in fits],
                   # every fit certified or screened, the refit certified: the chosen w and the
                   # reported accuracy are provably the minimisers' (not only to tol)
                   "answer_certified": all(f.stop in ("certified", "screened") for f in fits)
                                       and final.stop == "certified"},
        "test_pred": pred.cpu().numpy().astype(np.int64),
        "test_label": y_test.cpu().numpy().astype(np.int64),
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


def evaluate(ctx) -> "Evaluation":
    """The ``linear`` task (:mod:`pipeline.evaluate.tasks`): the linear probe of every downstream task on the
    model's frozen features; per test image the predicted and the true class (the paired statistics)."""
    from pipeline.evaluate.tasks import Evaluation

    params, model = ctx.params, ctx.model
    metrics, solver, arrays = {}, {}, {}
    for name, task, a in ctx.features():
        t0 = time.perf_counter()
        res = linear_probe(a["train_x"], a[f"train_{task}"], a["test_x"], a[f"test_{task}"], params.eval.linear,
                           seed=params.seed, class_average=name in params.eval.linear.class_average,
                           device=ctx.device)
        # The reported number: top-1, or mean per-class accuracy for eval.linear.class_average datasets.
        metrics[f"linear/{name}/{task}/top1"] = float(res["acc"])
        solver[f"{name}/{task}"] = {**res["solver"], "best_wd": res["best_wd"], "best_val_acc": res["best_val_acc"],
                                    "metric": res["metric"]}
        arrays[f"{name}/{task}/pred"] = res["test_pred"].astype(np.int32)
        arrays[f"{name}/{task}/label"] = res["test_label"].astype(np.int32)
        print(format_linear_result(res, title=f"{model}: linear probe on {name}/{task}"))
        ctx.said(f"{model}: {params.eval.linear.wd_steps} L2 weights + refit on {name}/{task} "
                 f"({len(a['train_x'])} train x {a['train_x'].shape[1]} features)", t0)
    return Evaluation(metrics, {"solver": solver}, items=arrays)
