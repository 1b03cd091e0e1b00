"""Few-shot transfer: N-way K-shot episodes with a logistic-regression classifier per episode.

The official protocol (``transfer_few_shot.py`` of github.com/hankook/AugSelf) draws episodes of N
classes with K support and Q query examples each, embeds them with the frozen backbone (pooled
features, **not** normalised) and fits ``sklearn.linear_model.LogisticRegression(solver='liblinear')``
with its defaults on the support set, then scores the queries.  With liblinear (the scikit-learn of
2021) that classifier is **one-vs-rest**: for each class c a binary problem

    min_w̃  ½‖w̃‖² + C Σ_i log(1 + exp(−y_i w̃·x̃_i)),   C = 1,  x̃ = [x, 1],  y_i = ±1,

where the intercept is the weight of a constant feature 1 and is therefore penalised like the rest
(``intercept_scaling=1``); a query goes to the class with the largest decision value w̃_c·x̃.

We solve exactly that objective, for all episodes and classes at once.  The support set is tiny
(N·K ≤ a few dozen examples) next to the feature dimension, so by the representer theorem
w̃ = X̃ᵀα and everything lives in the (N·K)×(N·K) Gram matrix G = X̃X̃ᵀ of each episode, shared by
its N binary problems.  Newton's method in α, ``Δα = −(I + C·D·G)⁻¹(α + C·y⊙ℓ'(y⊙Gα))`` with
``D = diag(ℓ''(y⊙Gα))`` (the exact Newton step when G is invertible, and the same step in the
decision values when it is not), with a per-problem Armijo backtracking line search, converges to
the liblinear solution in a handful of iterations, as ``(E, N, NK, NK)`` batched solves in float64
(the weights agree with liblinear's to 1e-4, ``tests/test_evaluate.py``).  1000 episodes for K = 1 and
K = 5 together take about 1.6 s on one CPU core at d = 128, against about 50 s for the per-episode
scikit-learn loop; the cost in d is only the Gram matrices.

Deviations from the official script, on purpose:

* an episode uses only classes with at least K + Q examples and samples without replacement
  (the official sampler keeps classes with more than K examples and draws the queries of a small
  class *with* replacement, which repeats queries);
* episodes come from a seeded ``torch.Generator`` (one stream per K) instead of Python's global
  ``random``, so the numbers are reproducible;
* DESIGN.md lists 2000 episodes and 16 queries (the paper); ``eval.fewshot`` sets ours.

The reported numbers are the mean episode accuracy in % and the 95 % confidence half-width
``1.96 · std / √episodes`` (population std, as ``np.std`` in the official script).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["episode_digest", "sample_episodes", "ovr_logistic_fit", "summarise_accuracies", "fewshot_eval", "format_fewshot_result", "evaluate"]

_NEWTON_MAX_STEPS = 50
NEWTON_TOL = 1e-10         # stop at |Newton decrement| <= NEWTON_TOL (recorded in fewshot_diagnostics.json)
SOLVER = "newton (dual, batched), liblinear objective"
_MAX_HALVINGS = 20


def _generator(seed: int, shots: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(shots)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def sample_episodes(y: np.ndarray, ways: int, shots: int, queries: int, episodes: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Example indices of ``episodes`` episodes: ``support (E, ways, shots)`` and
    ``query (E, ways, queries)``; position ``n`` on the second axis is the episode's class ``n``.

    Classes are drawn uniformly among those with at least ``shots + queries`` examples, examples
    uniformly without replacement within a class.  Raises ValueError when fewer than ``ways``
    classes qualify.
    """
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    need = shots + queries
    eligible = classes[counts >= need]
    if len(eligible) < ways:
        raise ValueError(
            f"few-shot: a {ways}-way {shots}-shot episode with {queries} queries needs {ways} classes "
            f"with at least K + queries = {need} examples each, but only {len(eligible)} of "
            f"{len(classes)} classes have that many (smallest class: {counts.min() if len(counts) else 0} "
            f"examples, largest: {counts.max() if len(counts) else 0}); lower eval.fewshot.queries, "
            f"eval.fewshot.shots or eval.fewshot.ways, or evaluate on a larger split")
    sizes = np.array([counts[classes == c][0] for c in eligible])
    table = np.zeros((len(eligible), sizes.max()), dtype=np.int64)   # per class: its example indices
    for i, c in enumerate(eligible):
        table[i, :sizes[i]] = np.flatnonzero(y == c)
    table_t, sizes_t = torch.from_numpy(table), torch.from_numpy(sizes)

    chosen = torch.rand(episodes, len(eligible), generator=generator).argsort(1)[:, :ways]   # (E, N)
    # Random keys per (episode, class, example slot); slots past a class's size never win.
    out = []
    chunk = max(1, (1 << 24) // (ways * table.shape[1]))
    for start in range(0, episodes, chunk):
        cls = chosen[start:start + chunk]
        keys = torch.rand(len(cls), ways, table.shape[1], generator=generator)
        keys.masked_fill_(torch.arange(table.shape[1]) >= sizes_t[cls].unsqueeze(-1), 2.0)
        slots = keys.topk(need, dim=-1, largest=False).indices                    # (e, N, K+Q)
        out.append(table_t[cls.unsqueeze(-1), slots])
    idx = torch.cat(out)
    return idx[..., :shots], idx[..., shots:]


def ovr_logistic_fit(support: torch.Tensor, C: float = 1.0, tol: float = NEWTON_TOL) -> torch.Tensor:
    """Dual coefficients α ``(E, N, N·K)`` of the one-vs-rest L2 logistic regressions of a batch of
    episodes (liblinear's objective with a penalised intercept, see the module docstring).

    Stops when every problem's Newton decrement ``|∇ᵀΔ| ≤ tol`` (default 1e-10: Newton converges
    quadratically, so the decision values are then exact to float64 noise; ``tests/test_evaluate.py``
    shows that 1e-14 changes no episode accuracy).

    ``support``: float ``(E, N, K, d)`` support features, class ``n`` at position ``n``.  The binary
    classifier of class ``n`` is ``w̃_n = Σ_i α[e, n, i] · [x_i, 1]`` over the flattened support.
    """
    E, N, K, _ = support.shape
    xs = support.reshape(E, N * K, -1).to(torch.float64)
    gram = xs @ xs.transpose(1, 2) + 1.0                                           # (E, S, S)
    labels = torch.arange(N, device=support.device).repeat_interleave(K)           # (S,)
    y = torch.where(labels == torch.arange(N, device=support.device)[:, None], 1.0, -1.0)
    y = y.to(torch.float64).expand(E, N, N * K).contiguous()                       # (E, N, S)
    alpha = torch.zeros_like(y)
    eye = torch.eye(N * K, dtype=torch.float64, device=support.device)

    def objective(a, f):
        return 0.5 * (a * f).sum(-1) + C * torch.nn.functional.softplus(-y * f).sum(-1)

    f = alpha @ gram                                                               # decision values on the support
    for _ in range(_NEWTON_MAX_STEPS):
        margin = y * f
        residual = alpha - C * y * torch.sigmoid(-margin)                          # G⁻¹∇ (α-space gradient / G)
        curvature = torch.sigmoid(margin) * torch.sigmoid(-margin)                 # ℓ''(m)
        system = eye + C * curvature.unsqueeze(-1) * gram.unsqueeze(1)             # (E, N, S, S)
        delta = -torch.linalg.solve(system, residual.unsqueeze(-1)).squeeze(-1)
        g_delta = delta @ gram                                                     # change of f per unit step
        slope = (residual * g_delta).sum(-1)                                       # ∇ᵀΔ = residualᵀ G Δ  (≤ 0)
        if slope.abs().max().item() <= tol:
            break
        # Armijo backtracking, per problem: the full Newton step is almost always accepted, so
        # only the problems that reject it are re-evaluated at half the step.
        step = torch.ones_like(slope)
        current = objective(alpha, f)
        for _ in range(_MAX_HALVINGS):
            s = step.unsqueeze(-1)
            reject = objective(alpha + s * delta, f + s * g_delta) > current + 1e-4 * step * slope
            if not reject.any():
                break
            step = torch.where(reject, 0.5 * step, step)
        s = step.unsqueeze(-1)
        alpha = alpha + s * delta
        f = f + s * g_delta
    return alpha


def _episode_accuracy(support: torch.Tensor, query: torch.Tensor, C: float, tol: float) -> torch.Tensor:
    """Accuracy (fraction) per episode; ``support (E, N, K, d)``, ``query (E, N, Q, d)``."""
    E, N, K, _ = support.shape
    Q = query.shape[2]
    alpha = ovr_logistic_fit(support, C, tol)                                      # (E, N, S)
    xs = support.reshape(E, N * K, -1).to(torch.float64)
    xq = query.reshape(E, N * Q, -1).to(torch.float64)
    scores = (xq @ xs.transpose(1, 2) + 1.0) @ alpha.transpose(1, 2)               # (E, N·Q, N)
    truth = torch.arange(N, device=query.device).repeat_interleave(Q)
    return (scores.argmax(-1) == truth).to(torch.float64).mean(-1)


def summarise_accuracies(accuracies) -> dict[str, float]:
    """``{"mean": 100·mean, "ci95": 100·1.96·std/√n}`` of per-episode accuracies given as fractions
    (population std, as the official script's ``np.std``)."""
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.ndim != 1 or len(acc) == 0:
        raise ValueError(f"summarise_accuracies: expected a non-empty 1-D array, got shape {acc.shape}")
    return {"mean": float(100.0 * acc.mean()), "ci95": float(100.0 * 1.96 * acc.std() / np.sqrt(len(acc)))}


def episode_digest(support: torch.Tensor, query: torch.Tensor) -> str:
    """SHA-256 of the episodes' example indices: two models evaluated on the same episodes (same
    labels and seed) have the same digest, which is what pairing their accuracies requires."""
    import hashlib

    return hashlib.sha256(support.to(torch.int64).numpy().tobytes() + b"|" +
                          query.to(torch.int64).numpy().tobytes()).hexdigest()


def fewshot_eval(x: np.ndarray, y: np.ndarray, ways: int, shots: list[int], queries: int,
                 episodes: int, seed: int, device: str | torch.device = "cpu", C: float = 1.0,
                 chunk_episodes: int = 250, tol: float = NEWTON_TOL,
                 keep_episodes: bool = False) -> dict[str, dict[str, float]]:
    """Mean accuracy (%) and 95 % CI half-width over ``episodes`` episodes for each K in ``shots``.

    ``x`` frozen features ``(n, d)``, ``y`` labels ``(n,)``.  Returns
    ``{f"{ways}way{K}shot": {"mean": ..., "ci95": ...}}``; with ``keep_episodes`` also
    ``"episode_acc"`` (numpy, per episode, fractions) and ``"episodes_sha256"`` (:func:`episode_digest`).
    Episodes depend on ``y`` and ``seed`` only, never on the features.  Episodes are processed
    ``chunk_episodes`` at a time (bounds the gathered ``(E, N, K+Q, d)`` features in memory).
    ``tol``: the Newton stopping rule of :func:`ovr_logistic_fit`.
    """
    device = torch.device(device)
    feats = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    labels = np.asarray(y)
    if feats.ndim != 2 or labels.shape != (len(feats),):
        raise ValueError(f"fewshot_eval: expected features (n, d) and labels (n,), got "
                         f"{tuple(feats.shape)} and {labels.shape}")
    if ways < 2 or queries < 1 or episodes < 1 or not shots or min(shots) < 1:
        raise ValueError(f"fewshot_eval: need ways >= 2, queries >= 1, episodes >= 1 and shots >= 1; "
                         f"got ways={ways}, queries={queries}, episodes={episodes}, shots={shots}")
    results = {}
    for k in shots:
        support_idx, query_idx = sample_episodes(labels, ways, k, queries, episodes, _generator(seed, k))
        accs = []
        for start in range(0, episodes, chunk_episodes):
            s = support_idx[start:start + chunk_episodes].to(device)
            q = query_idx[start:start + chunk_episodes].to(device)
            accs.append(_episode_accuracy(feats[s], feats[q], C, tol))
        per_episode = torch.cat(accs).cpu().numpy()
        results[f"{ways}way{k}shot"] = summarise_accuracies(per_episode)
        if keep_episodes:
            results[f"{ways}way{k}shot"].update(episode_acc=per_episode,
                                                 episodes_sha256=episode_digest(support_idx, query_idx))
    return results


def format_fewshot_result(result: dict[str, dict[str, float]], title: str = "few-shot") -> str:
    """A short plain-text table of one :func:`fewshot_eval` result."""
    width = max([len(k) for k in result] + [7])
    lines = [title, "-" * max(len(title), width + 20), f"{'setting':<{width}}  {'acc (%)':>8}  {'± 95% CI':>8}"]
    lines += [f"{k:<{width}}  {v['mean']:8.2f}  {v['ci95']:8.2f}" for k, v in result.items()]
    return "\n".join(lines)


def evaluate(ctx) -> "Evaluation":
    """The ``fewshot`` task (:mod:`pipeline.evaluate.tasks`): N-way K-shot episodes on the test features of
    every downstream task; per episode its accuracy (the paired statistics) and its digest (diagnostics)."""
    import time

    from pipeline.evaluate.tasks import Evaluation

    params, model, fs = ctx.params, ctx.model, ctx.params.eval.fewshot
    metrics, arrays, digests = {}, {}, {}
    for name, task, a in ctx.features():
        t0 = time.perf_counter()
        res = fewshot_eval(a["test_x"], a[f"test_{task}"], fs.ways, fs.shots, fs.queries, fs.episodes,
                           seed=params.seed, device=ctx.device, keep_episodes=True)
        for key, r in res.items():
            metrics[f"fewshot/{name}/{task}/{key}"] = float(r["mean"])
            metrics[f"fewshot/{name}/{task}/{key}_ci95"] = float(r["ci95"])
            arrays[f"{name}/{task}/{key}/acc"] = r.pop("episode_acc")
            digests[f"{name}/{task}/{key}"] = r.pop("episodes_sha256")
        print(format_fewshot_result(res, title=f"{model}: few-shot on {name}/{task} ({fs.episodes} episodes)"))
        ctx.said(f"{model}: {fs.episodes} episodes x {len(fs.shots)} shot settings of {fs.ways}-way "
                 f"logistic regression on {name}/{task}", t0)
    return Evaluation(metrics, {"solver": {"name": SOLVER, "tol": NEWTON_TOL, "C": 1.0}, "episodes_sha256": digests},
                      items=arrays)
