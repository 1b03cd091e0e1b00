"""Is CPU pretraining bit-reproducible on this machine?  python scripts/check_determinism.py

Trains the default network (params.yaml, SimCLR baseline, one epoch of 512 synthetic images at batch
128) twice for each layout (channels-last, contiguous) and thread count (2, 1), and prints whether the
two runs agree bit for bit and the first losses, which show how layout and threads change the rounding
(docs/reliability.md, "What is not guaranteed").  About a minute on 2 cores.
"""

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.params import load_params  # noqa: E402
from pipeline.train import pretrain  # noqa: E402


def main() -> int:
    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    low = np.random.default_rng(0).integers(0, 256, size=(512, 4, 4, 3)).astype(np.uint8)
    images = np.ascontiguousarray(low.repeat(8, axis=1).repeat(8, axis=2))
    for channels_last in (True, False):
        for threads in (2, 1):
            ssl = dataclasses.replace(p.ssl, epochs=1, batch_size=128, channels_last=channels_last,
                                      threads=threads, monitor_every=0, log_every=1)
            runs = []
            for _ in range(2):
                losses = []
                with tempfile.TemporaryDirectory() as d:
                    pretrain(dataclasses.replace(p, ssl=ssl), "simclr", "baseline", images, d, device="cpu",
                             progress=False, on_log=lambda s, m: losses.append(m.get("pretrain/loss_ssl")))
                    runs.append((losses, torch.load(f"{d}/final.pt", weights_only=True)["backbone"]))
            (l1, w1), (l2, w2) = runs
            same = w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
            print(f"channels_last={channels_last!s:5} threads={threads}: two runs bit-identical: "
                  f"losses {l1 == l2}, weights {same}; first loss {l1[0]:.7f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
