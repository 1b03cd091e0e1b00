"""Premise first: does the *baseline* lose what its augmentations vary? (docs/study.md, step 1)

AugSelf can only keep information that invariance throws away.  Before any AugSelf run of the
study, this module trains the baseline alone (λ = 0) at several colour-augmentation strengths and
measures, at snapshots along training, how much of the augmented factor (the hue) a linear probe
still recovers from the frozen backbone features:

* strengths: ``none`` (no colour jitter, no grayscale: the control that keeps colour), and the
  official ``--color-aug`` levels ``weak`` / ``default`` / ``strong``, which scale the four jitter
  strengths and the grayscale probability by 0.5 / 1 / 2 (hue capped at 0.5);
* snapshots after 0 (the random initialisation), 2, 5, 10 and 20 epochs of one cosine schedule of
  20 epochs (a resumed run, so each snapshot is exactly the uninterrupted run at that step);
* tasks: ``cfmnist/hue`` (24 classes of 12°, finer than the ±36° hue jitter: what invariance should
  destroy), ``cfmnist/color`` (6 bins of 60°: should survive), ``cfmnist/class`` (garments: does not
  need colour), each measured by a closed-form ridge linear probe (:func:`ridge_probe`) and a cosine
  20-NN classifier (:func:`knn_probe`): both solver-free and cheap enough for 20 snapshots.

Everything is resumable: each (strength, epoch) result is a JSON file under ``work_dir``; a killed
run restarts from its last checkpoint and skips the snapshots already measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import augmentations
from pipeline.config import to_dict
from pipeline.params import COLOR_STRENGTHS, Params, load_params


def strength_overrides(params: Params, strength: str) -> dict:
    """augment.* overrides of one colour strength (:data:`pipeline.params.COLOR_STRENGTHS`: the official
    ``--color-aug`` scales and ``none``, the control without colour), relative to the params' own
    (default) strengths, scaled and capped as ``augment.color_strength`` is (:meth:`AugmentParams.scaled_color`)."""
    s = COLOR_STRENGTHS[strength]
    if s == 0.0:
        # No colour op at all (the records marked colour: jitter, grayscale): the AugSelf targets and the
        # CASSLE blocks that read one go too (an op that is off is refused there, as its target or condition
        # would be a constant).
        colour = [a for a in augmentations.records() if a.colour]
        blocks = {b.name for a in colour for b in a.cassle}
        return {**{f"augment.{a.key}": 0.0 for a in colour},
                "augself.augmentations": [x for x in params.augself.augmentations if x not in {a.name for a in colour}],
                "cassle.conditions": [c for c in params.cassle.conditions if c not in blocks]}
    return {f"augment.{k}": v for k, v in params.augment.scaled_color(s).items()}


@dataclass
class PremiseConfig:
    params_path: str = "params.yaml"
    method: str = "simclr"
    strengths: list[str] = field(default_factory=lambda: ["none", "weak", "default", "strong"])
    epochs: int = 20
    snapshots: list[int] = field(default_factory=lambda: [0, 2, 5, 10, 20])
    tasks: list[str] = field(default_factory=lambda: ["hue", "color", "class"])
    seed: int = 0
    work_dir: str = "study/premise"
    out_dir: str = "reports/study"


def _params(cfg: PremiseConfig, strength: str) -> Params:
    base = load_params(cfg.params_path)
    over = {"seed": cfg.seed, "ssl.epochs": cfg.epochs, **strength_overrides(base, strength)}
    return load_params(cfg.params_path, over)


def _backbone_at(params: Params, method: str, run_dir: Path, epoch: int, images: np.ndarray):
    """The backbone after ``epoch`` epochs (0: the initialisation pretrain() starts from)."""
    import torch

    from pipeline.train import build_pretrain_model, pretrain

    if epoch == 0:
        torch.manual_seed(params.seed)
        _, backbone, _ = build_pretrain_model(params, method, "baseline", images.shape[1])
        return backbone.eval()
    steps = epoch * (len(images) // params.ssl.batch_size)
    pretrain(params, method, "baseline", images, run_dir, max_steps=steps, progress=False)
    from pipeline.checkpoint import load as load_checkpoint   # the safe loader: tensors and containers only

    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["step"] == steps, (state["step"], steps)
    torch.manual_seed(params.seed)
    _, backbone, _ = build_pretrain_model(params, method, "baseline", images.shape[1])
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
    return backbone.eval()


def ridge_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                seed: int, alphas=tuple(10.0 ** np.arange(-2, 4.5, 0.5))) -> dict:
    """Least-squares linear probe: ridge regression of one-hot labels on standardised features.

    Closed form (no iterative solver, so the answer cannot depend on one): the ridge α is chosen on a
    stratified 20 % validation split of the training set (largest val accuracy, ties to the larger α),
    then refit on the whole training set; reported: test top-1 (%).  Used for the premise curves
    because it costs milliseconds per snapshot; the study's own numbers use the logistic protocol.
    """
    from pipeline.evaluate.linear import stratified_split

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xs = [(a - mu) / sd for a in (train_x, test_x)]
    fit_idx, val_idx = stratified_split(train_y, 0.2, seed)
    k = int(max(train_y.max(), test_y.max())) + 1

    def solve(x, y, alpha):
        x1 = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
        reg = alpha * np.eye(x1.shape[1])
        reg[-1, -1] = 0.0                                      # no penalty on the bias
        return np.linalg.solve(x1.T @ x1 + reg, x1.T @ np.eye(k)[y])

    def acc(w, x, y):
        return 100.0 * float(((np.hstack([x, np.ones((len(x), 1))]) @ w).argmax(1) == y).mean())

    val = [acc(solve(xs[0][fit_idx], train_y[fit_idx], a), xs[0][val_idx], train_y[val_idx]) for a in alphas]
    best = max(range(len(alphas)), key=lambda i: (val[i], alphas[i]))
    w = solve(xs[0], train_y, alphas[best])
    return {"top1": acc(w, xs[1], test_y), "alpha": float(alphas[best]), "val_top1": float(val[best])}


def knn_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 20) -> float:
    """Cosine k-NN (majority of the k nearest training features) test top-1 (%), deterministic."""
    import torch

    a = torch.nn.functional.normalize(torch.from_numpy(train_x).double(), dim=1)
    b = torch.nn.functional.normalize(torch.from_numpy(test_x).double(), dim=1)
    ytr = torch.from_numpy(train_y)
    correct = 0
    for lo in range(0, len(b), 1000):
        idx = (b[lo:lo + 1000] @ a.T).topk(k, dim=1).indices
        votes = torch.zeros(len(idx), int(ytr.max()) + 1, dtype=torch.float64)
        votes.scatter_add_(1, ytr[idx], torch.ones(idx.shape, dtype=torch.float64))
        correct += int((votes.argmax(1) == torch.from_numpy(test_y[lo:lo + 1000])).sum())
    return 100.0 * correct / len(b)


def measure(params: Params, backbone, tasks: list[str]) -> dict:
    """Ridge linear-probe and cosine k-NN accuracy of each cfmnist task on frozen ``backbone`` features."""
    from pipeline.data import load_split
    from pipeline.evaluate.features import extract_features

    root = Path(params.data.prepared)
    splits = {s: load_split(root, params.data.pretrain, s) for s in ("train", "test")}
    feats = {s: extract_features(backbone, d.images, params.augment.mean, params.augment.std,
                                 params.eval.batch_size).astype(np.float64) for s, d in splits.items()}
    out = {}
    for task in tasks:
        ytr, yte = splits["train"].labels[task], splits["test"].labels[task]
        res = ridge_probe(feats["train"], ytr, feats["test"], yte, params.seed)
        res["knn20_top1"] = knn_probe(feats["train"], ytr, feats["test"], yte)
        out[task] = res
    return out


def run(cfg: PremiseConfig) -> Path:
    from pipeline.checkpoint import write_text
    from pipeline.data import pretrain_images

    work = Path(cfg.work_dir)
    for strength in cfg.strengths:
        params = _params(cfg, strength)
        images = pretrain_images(Path(params.data.prepared), params.data.pretrain)
        run_dir = work / f"{cfg.method}-{strength}-seed{cfg.seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        for epoch in cfg.snapshots:
            result_path = run_dir / f"epoch{epoch:03d}.json"
            if result_path.exists():
                continue
            t0 = time.perf_counter()
            backbone = _backbone_at(params, cfg.method, run_dir, epoch, images)
            t1 = time.perf_counter()
            scores = measure(params, backbone, cfg.tasks)
            row = {"method": cfg.method, "strength": strength, "seed": cfg.seed, "epoch": epoch,
                   "epochs": cfg.epochs, "augment": to_dict(params.augment), "scores": scores,
                   "train_s": t1 - t0, "eval_s": time.perf_counter() - t1}
            write_text(result_path, json.dumps(row, indent=1, sort_keys=True))
            print(f"[premise] {cfg.method} {strength} epoch {epoch}: "
                  + ", ".join(f"{t} {s['top1']:.2f}%" for t, s in scores.items())
                  + f" (train {t1 - t0:.0f} s, eval {time.perf_counter() - t1:.0f} s)", flush=True)
    return summarise(cfg)


def summarise(cfg: PremiseConfig) -> Path:
    """reports/study/premise.csv and premise.png from every result file found."""
    import pandas as pd

    rows = []
    for f in sorted(Path(cfg.work_dir).glob("*/epoch*.json")):
        r = json.loads(f.read_text())
        for task, s in r["scores"].items():
            rows.append({"method": r["method"], "strength": r["strength"], "seed": r["seed"], "epoch": r["epoch"],
                         "task": task, "top1": s["top1"], "knn20_top1": s["knn20_top1"]})
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows).sort_values(["task", "strength", "seed", "epoch"])
    df.to_csv(out / "premise.csv", index=False, float_format="%.2f")
    plot(df, out / "premise.png")
    return out / "premise.csv"


def plot(df, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("hue", "color", "class") if t in set(df["task"])]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    order = [s for s in COLOR_STRENGTHS if s in set(df["strength"])]
    for ax, task in zip(axes[0], tasks):
        for strength in order:
            d = df[(df.task == task) & (df.strength == strength)].groupby("epoch")["top1"].agg(["mean", "min", "max"])
            ax.plot(d.index, d["mean"], marker="o", label=strength)
            ax.fill_between(d.index, d["min"], d["max"], alpha=0.15)
        ax.set_title(f"cfmnist/{task}")
        ax.set_xlabel("pretraining epochs (baseline, λ = 0)")
        ax.set_ylabel("ridge linear probe top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(title="colour strength", fontsize=8)
    fig.suptitle("Premise: what the baseline's features keep of the hue, by colour-augmentation strength")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
