"""The training stage's library path on a GPU, without DVC or MLflow (the GPU machine has neither).

Pretrains one method for a short schedule (by default 2 epochs of 4096 images: 32 steps) on
synthetic uint8 images with ``ssl.amp: auto`` (bf16 on CUDA), channels_last and the on-device
data, checks that the losses are finite and that the schedule finished, then extracts features on
the GPU (bf16 autocast) and on the CPU (fp32) from the same ``final.pt`` and reports how far apart
they are.  Prints one JSON line and writes it to ``--out``.  On a CPU (``--device cpu``) it is the
dry run of issue 13's device script.

    python scripts/gpu_smoke.py --device cuda --out $OUT/smoke.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluate.features import extract_features  # noqa: E402
from pipeline.models import load_backbone  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.recipe import resolve_amp  # noqa: E402
from pipeline.train import pretrain  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--variant", default="augself")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    params = load_params(ROOT / "params.yaml", {"ssl.amp": "auto", "ssl.epochs": args.epochs, "ssl.width": args.width,
                                                 "ssl.monitor_every": 0, "ssl.log_every": 8})
    size = 32
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, size, size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        logs: list[dict] = []
        res = pretrain(params, args.method, args.variant, images, tmp, on_log=lambda s, m: logs.append(m),
                       device=args.device, progress=False)
        train_s = time.perf_counter() - t0
        a = params.augment
        feats = {dev: extract_features(load_backbone(res.final)[0], images[:1024], a.mean, a.std, 256, device=dev)
                 for dev in (args.device, "cpu")}
    feats_dev, feats_cpu = feats[args.device], feats["cpu"]
    rel = float(np.linalg.norm(feats_dev - feats_cpu) / np.linalg.norm(feats_cpu))
    losses = [m.get("pretrain/loss_total", m.get("pretrain/loss_ssl")) for m in logs if "pretrain/loss_ssl" in m]
    out = {"device": args.device, "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "method": args.method, "variant": args.variant,
           "amp": params.ssl.amp, "autocast_dtype": str(resolve_amp(params.ssl.amp, torch.device(args.device))),
           "finished": res.finished, "steps": res.step,
           "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
           "losses_finite": bool(losses) and all(np.isfinite(losses)),
           "train_s": round(train_s, 2), "images_per_s": round(res.step * params.ssl.batch_size / train_s, 1),
           "features_rel_diff_device_vs_cpu": rel}
    ok = out["finished"] and out["losses_finite"] and rel < 0.05
    out["ok"] = ok
    line = json.dumps(out)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
