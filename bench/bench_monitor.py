"""What the kNN monitor costs: its seconds per evaluation as a share of one pretraining epoch.

Runs :func:`pipeline.train.pretrain` for ``--epochs`` epochs of the configuration in ``--params``
(default ``params.yaml``: resnet_small width 16, 32×32, batch 256) on ``--images`` random uint8
images (the cost of a step and of a forward pass does not depend on the content), once with the
monitor at every epoch on a :class:`~pipeline.monitor.MonitorData` of the module's default sizes
(2000 bank + 1000 query images, three random label sets like cfmnist's class/color/fine), and reads
``timing.json``: ``pretrain/wall_time_s`` (training only; the monitor is excluded from it) and
``pretrain/monitor_s``.  The share per evaluation is ``monitor_s / evaluations`` over
``wall_time_s / epochs``; with ``ssl.monitor_every = m`` the run pays share / m.

Writes ``bench/results/monitor-<device>.json`` and prints one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.data import Split
from pipeline.monitor import BANK_SIZE, QUERY_SIZE, MonitorData
from pipeline.params import load_params
from pipeline.train import TIMING, pretrain


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--variant", default="baseline")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--images", type=int, default=10000, help="pretraining images (default: cfmnist's max_train)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    params = load_params(args.params)
    params = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, epochs=args.epochs, monitor_every=1))
    size = params.data.datasets[params.data.pretrain].image_size or 32
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    tasks = {"class": 10, "color": 8, "fine": 80}

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                     {t: rng.integers(0, k, n) for t, k in tasks.items()}, {})

    monitor = MonitorData.from_splits(split(BANK_SIZE), split(QUERY_SIZE), list(tasks), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        res = pretrain(params, args.method, args.variant, images, tmp, device=args.device, progress=False,
                       monitor=monitor)
        timing = json.loads((Path(tmp) / TIMING).read_text())
    epoch_s = timing["pretrain/wall_time_s"] / args.epochs
    per_eval_s = timing["pretrain/monitor_s"] / args.epochs
    out = {"device": args.device, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "method": args.method, "variant": args.variant,
           "images": args.images, "epochs": args.epochs, "steps": res.step,
           "bank": BANK_SIZE, "queries": QUERY_SIZE, "tasks": len(tasks),
           "epoch_s": epoch_s, "monitor_s_per_eval": per_eval_s, "share_of_epoch": per_eval_s / epoch_s}
    path = Path(args.out or f"bench/results/monitor-{torch.device(args.device).type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"monitor: {per_eval_s:.2f} s per evaluation, epoch {epoch_s:.1f} s of training: "
          f"{100 * out['share_of_epoch']:.1f} % of an epoch ({args.method}-{args.variant}, {args.device}) -> {path}")
    return out


if __name__ == "__main__":
    main()
