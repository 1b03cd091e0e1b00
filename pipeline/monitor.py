"""kNN monitor: how well the frozen backbone separates labelled tasks, measured during pretraining.

The pretraining loop (:mod:`pipeline.train`) calls :meth:`KnnMonitor.evaluate` at the end of every
``ssl.monitor_every``-th epoch (and of the last one), so a loss curve comes with a curve of what the
features are good for.  For every labelled task of the pretraining dataset (``data.datasets.<name>.tasks``,
e.g. ``class``, ``color``, ``fine`` for cfmnist) it reports

``monitor/<task>/knn_top1``  weighted kNN top-1 (%): cosine similarity, the ``k = 200`` nearest bank
                            features vote with weight ``exp(sim / 0.1)``, as lightly's
                            ``knn_predict`` and InstDisc (Wu et al. 2018) do;
``monitor/<task>/nn1_top1``  1-NN top-1 (%) with cosine similarity, the monitor of the official AugSelf
                            code (its ``eval_freq`` 1-NN evaluation).

Choices
-------
* **Fixed subsets.** The memory bank is :data:`BANK_SIZE` images of the ``train`` split, the queries
  :data:`QUERY_SIZE` images of the ``test`` split (all of a split when it is smaller).  Both are drawn
  once, without replacement, by :class:`numpy.random.Generator` seeded from ``(data.seed,
  MONITOR_STREAM)``: a generator of their own, independent of the training seed (so curves of
  different seeds are measured on the same images) and never touching the training generators or the
  global torch/NumPy RNG.  With 2000 + 1000 images on the default run (10 000 training images, 2
  views, forward + backward) one evaluation costs a few percent of an epoch; the measured share is in
  ``docs/architecture.md``.
* **Frozen, eval mode, no gradient.** Features come from :func:`pipeline.evaluate.features.extract_features`
  (the evaluation's own feature code: eval mode, ``no_grad``, the pretraining ``mean``/``std``), which
  restores the backbone's train mode afterwards.  Eval mode means BatchNorm uses and does not update its
  running statistics, so training continues exactly as without the monitor (a test checks the weights).
* **On the training device.** Images move to the device batch by batch; the similarity matrix is
  computed there, in :data:`QUERY_CHUNK` query rows at a time.
* **Not the evaluation.** The monitor tracks learning; the reported numbers are the linear, few-shot and
  probe stages on the full splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["MonitorData", "KnnMonitor", "knn_predict", "BANK_SIZE", "QUERY_SIZE", "K", "TEMPERATURE"]

BANK_SIZE = 2000          # memory-bank images from the train split
QUERY_SIZE = 1000         # query images from the test split
K = 200                   # neighbours of the weighted kNN (lightly, InstDisc)
TEMPERATURE = 0.1         # vote weight exp(sim / TEMPERATURE)
QUERY_CHUNK = 1024        # query rows per similarity block
MONITOR_STREAM = 0x6B6E6E  # second word of the subset generator's seed ("knn")


@dataclass
class MonitorData:
    """The labelled images the monitor uses: a bank (from train) and queries (from test), uint8 NHWC."""
    bank_images: np.ndarray
    bank_labels: dict[str, np.ndarray]
    query_images: np.ndarray
    query_labels: dict[str, np.ndarray]

    def __post_init__(self):
        for which, images, labels in (("bank", self.bank_images, self.bank_labels),
                                      ("query", self.query_images, self.query_labels)):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"MonitorData.{which}_images: expected uint8 (N, H, W, 3), got "
                                 f"{images.dtype} {images.shape}")
            for task, y in labels.items():
                if len(y) != len(images):
                    raise ValueError(f"MonitorData.{which}_labels[{task!r}]: {len(y)} labels for {len(images)} images")
        if set(self.bank_labels) != set(self.query_labels) or not self.bank_labels:
            raise ValueError(f"MonitorData: bank tasks {sorted(self.bank_labels)} and query tasks "
                             f"{sorted(self.query_labels)} must be the same, non-empty set")

    @property
    def tasks(self) -> list[str]:
        return list(self.bank_labels)

    @classmethod
    def from_splits(cls, train, test, tasks: Sequence[str], seed: int, bank_size: int = BANK_SIZE,
                    query_size: int = QUERY_SIZE) -> "MonitorData":
        """Fixed subsets of two :class:`~pipeline.data.Split` s (see the module docstring for the draw)."""
        missing = [t for t in tasks if t not in train.labels or t not in test.labels]
        if missing:
            raise ValueError(f"monitor: task(s) {missing} are not labelled in both splits of the pretraining "
                             f"dataset (train has {sorted(train.labels)}, test has {sorted(test.labels)}); "
                             f"fix data.datasets.<name>.tasks")
        rng = np.random.default_rng([int(seed), MONITOR_STREAM])
        bank = np.sort(rng.choice(len(train.images), size=min(bank_size, len(train.images)), replace=False))
        query = np.sort(rng.choice(len(test.images), size=min(query_size, len(test.images)), replace=False))
        return cls(train.images[bank], {t: train.labels[t][bank] for t in tasks},
                   test.images[query], {t: test.labels[t][query] for t in tasks})


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, n_classes: int,
                k: int = K, temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weighted kNN, 1-NN)`` predicted labels of L2-normalised ``query`` rows against ``bank`` rows."""
    k = min(k, bank.shape[0])
    knn, nn1 = [], []
    for lo in range(0, query.shape[0], QUERY_CHUNK):
        sim = query[lo: lo + QUERY_CHUNK] @ bank.T                       # cosine similarity (B, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], n_classes, device=sim.device, dtype=sim.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
        knn.append(votes.argmax(1))
        nn1.append(bank_labels[top_idx[:, 0]])
    return torch.cat(knn), torch.cat(nn1)


class KnnMonitor:
    """Weighted-kNN and 1-NN top-1 of a backbone on :class:`MonitorData`; see the module docstring."""

    def __init__(self, data: MonitorData, mean: Sequence[float], std: Sequence[float], batch_size: int,
                 device: torch.device):
        self.data, self.mean, self.std = data, list(mean), list(std)
        self.batch_size, self.device = int(batch_size), torch.device(device)
        self.bank_labels = {t: torch.as_tensor(y, dtype=torch.long, device=self.device)
                            for t, y in data.bank_labels.items()}
        self.query_labels = {t: torch.as_tensor(y, dtype=torch.long, device=self.device)
                             for t, y in data.query_labels.items()}

    def _features(self, backbone: nn.Module, images: np.ndarray) -> torch.Tensor:
        from pipeline.evaluate.features import extract_features

        f = extract_features(backbone, images, self.mean, self.std, self.batch_size, self.device)
        return nn.functional.normalize(torch.from_numpy(f).to(self.device), dim=1)

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module) -> dict[str, float]:
        """``monitor/<task>/{knn_top1,nn1_top1}`` in percent."""
        bank = self._features(backbone, self.data.bank_images)
        query = self._features(backbone, self.data.query_images)
        out = {}
        for task in self.data.tasks:
            yb, yq = self.bank_labels[task], self.query_labels[task]
            n_classes = int(max(yb.max(), yq.max())) + 1
            knn, nn1 = knn_predict(query, bank, yb, n_classes)
            out[f"monitor/{task}/knn_top1"] = 100.0 * float((knn == yq).float().mean())
            out[f"monitor/{task}/nn1_top1"] = 100.0 * float((nn1 == yq).float().mean())
        return out
