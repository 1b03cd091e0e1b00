"""Augmentation throughput: our batched :class:`~pipeline.augment.BatchAugment` beside kornia and PIL.

The reason ``pipeline/augment.py`` is written here rather than taken from a library is a measured
ratio; this benchmark keeps it measured.  Three feeds of the same view pipeline, side by side, on
the same uint8 data and batch:

* ``ours``: two :class:`~pipeline.augment.BatchAugment` calls on a
  :func:`~pipeline.augment.view_generator` (what the training loop runs), returning ω;
* ``kornia``: kornia's ``AugmentationSequential`` as a new user would write it (the library the
  official AugSelf code uses for its batch-side ops; it also returns the sampled parameters):
  ``RandomResizedCrop → RandomHorizontalFlip → ColorJitter(p) → RandomGrayscale(p) →
  RandomGaussianBlur(p) → Normalize``, two calls per batch, after the uint8 NHWC → float NCHW
  conversion (which ours does inside its crop, so both start from the same data);
* ``pil``: the official way, per-sample torchvision transforms on PIL images in a ``DataLoader``
  with ``--workers`` processes (``bench_pretrain._pil_loader``, two views per image); these do not
  return ω.

Pipeline (the issue's comparison): crop scale (0.2, 1), flip 0.5, jitter (0.4, 0.4, 0.4, 0.1) with
p 0.8, grayscale p 0.2, blur p 0.5 (σ in (0.1, 2), kernel ⌊0.1·S⌋ made odd), normalise; batch 256;
``--threads`` 2; sizes 32 and 96 px; CPU by default.  A fourth row, ``ours+rot+sol``, adds the
optional rotation and solarize ops (p 0.5 each) to ours, to show what they cost.

Timing: ours and kornia (and ours+rot+sol) are interleaved round by round (``--rounds``, median
over rounds), so a load burst on a shared machine hits them alike; the PIL DataLoader is timed on
its own with its prefetch queue drained first (``bench_pretrain._timed_pil``).  On a machine shared
with other jobs, ``--clock cpu`` counts the CPU seconds of this process instead of wall time (the
PIL feed then runs in-process, ``--workers 0``): the ratios are then a measure of work, independent
of the load.  Images are random
uint8 noise (augmentation cost does not depend on content).  Reported: source images per second
(each gives two views) and the speed-ups of ours over kornia and over PIL.

Needs kornia (an optional extra, not in requirements.lock): ``.venv/bin/pip install -e '.[bench]'``
or ``.venv/bin/pip install kornia``.  Writes ``bench/results/augment-<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench.bench_pretrain as bench_pretrain  # noqa: E402
from bench.bench_pretrain import _pil_loader, _timed_pil  # noqa: E402
from pipeline.augment import BatchAugment, blur_kernel_size, view_generator  # noqa: E402
from pipeline.params import AugmentParams, Params  # noqa: E402


PIPELINE = dict(flip_p=0.5, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8,
                grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0))


def kornia_pipeline(a: AugmentParams, size: int, dev: torch.device):
    """kornia's AugmentationSequential with the same ops and probabilities as ``a``."""
    try:
        import kornia.augmentation as K
    except ImportError:
        raise SystemExit("bench_augment: kornia is not installed; install the optional extra with "
                         "`.venv/bin/pip install -e '.[bench]'` (or `.venv/bin/pip install kornia`), "
                         "or run with --no-kornia") from None
    k = blur_kernel_size(size)
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio)),
        K.RandomHorizontalFlip(p=a.flip_p),
        K.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue, p=a.jitter_p),
        K.RandomGrayscale(p=a.grayscale_p),
        K.RandomGaussianBlur((k, k), tuple(a.blur_sigma), border_type="reflect", p=a.blur_p),
        K.Normalize(torch.tensor(a.mean), torch.tensor(a.std)),
    ).to(dev)


def _interleaved(fns: dict, rounds: int, steps: int, dev: torch.device) -> dict[str, float]:
    """Median over rounds of the seconds per call of each ``fn(i)``, conditions interleaved per round
    (bench_pretrain's timer: one untimed warm-up call each, then ``steps`` calls per round)."""
    per_round = bench_pretrain._timed_interleaved(fns, steps * rounds, rounds, 1, dev)
    return {k: float(np.median(v)) for k, v in per_round.items()}


def measure(size: int, args, dev: torch.device) -> dict:
    a = dataclasses.replace(AugmentParams(), **PIPELINE)
    batch, n_img = args.batch_size, max(args.images, 2 * args.batch_size)
    rng = np.random.default_rng(0)
    images_np = rng.integers(0, 256, size=(n_img, size, size, 3), dtype=np.uint8)
    images = torch.from_numpy(images_np).to(dev)
    ours = BatchAugment(a, size)
    ours_rs = BatchAugment(dataclasses.replace(a, rotation_p=0.5, solarize_p=0.5), size)

    def batch_of(i):
        return images[(torch.arange(i * batch, (i + 1) * batch, device=dev) % n_img)]

    def run_ours(aug):
        def fn(i):
            x, g = batch_of(i), view_generator(0, 0, i, "cpu")
            aug(x, g)
            aug(x, g)
        return fn

    fns = {"ours": run_ours(ours), "ours+rot+sol": run_ours(ours_rs)}
    if not args.no_kornia:
        seq = kornia_pipeline(a, size, dev)

        def run_kornia(i):
            x = batch_of(i).permute(0, 3, 1, 2).float().div_(255)
            seq(x)
            seq(x)
        fns["kornia"] = run_kornia
    t = _interleaved(fns, args.rounds, args.steps, dev)
    if args.no_pil:
        t["pil"] = float("nan")
    else:
        params = dataclasses.replace(Params(), augment=a)
        loader = _pil_loader(images_np, params, batch, args.workers, dev.type == "cuda")
        t["pil"] = _timed_pil(loader, lambda i, b: None, args.steps * args.rounds, args.workers, dev)
    ips = {k: (batch / v if v == v else None) for k, v in t.items()}
    return {"image_size": size, "images_per_s": ips, "ms_per_batch": {k: 1e3 * v for k, v in t.items()},
            "speedup_vs_kornia": None if "kornia" not in t else t["kornia"] / t["ours"],
            "speedup_vs_pil": None if args.no_pil else t["pil"] / t["ours"],
            "rotation_solarize_overhead_pct": 100 * (t["ours+rot+sol"] / t["ours"] - 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,96", help="comma-separated view sizes (source images are the same size)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch default)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the PIL feed")
    ap.add_argument("--steps", type=int, default=2, help="timed batches per condition per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--images", type=int, default=1024, help="size of the synthetic data set")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-kornia", action="store_true", help="skip kornia (when it is not installed)")
    ap.add_argument("--no-pil", action="store_true", help="skip the PIL DataLoader feed")
    ap.add_argument("--out", help="JSON path (default bench/results/augment-<device>.json)")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. how loaded the machine was)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: count CPU seconds of this process instead of wall time, for a machine shared with "
                         "other jobs; the PIL feed then runs in-process (--workers 0) so that its work counts")
    args = ap.parse_args(argv)
    if args.clock == "cpu":                  # bench_pretrain's timer counts CPU seconds of this process
        bench_pretrain._clock = time.process_time
        args.workers = 0
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    kornia_version = None
    if not args.no_kornia:
        try:
            import kornia
            kornia_version = kornia.__version__
        except ImportError:
            kornia_pipeline(AugmentParams(), 8, dev)        # exits with the install hint
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"# bench_augment: {device_name}, torch {torch.__version__}, kornia {kornia_version}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.rounds} rounds x {args.steps} "
          f"batches, PIL workers {args.workers}, {args.clock} clock; load average {load_start}", flush=True)
    rows = [measure(s, args, dev) for s in sizes]

    names = ["ours", "ours+rot+sol", "kornia", "pil"]
    head = f"{'size':>5s} " + " ".join(f"{n + ' img/s':>18s}" for n in names) + f" {'vs kornia':>10s} {'vs PIL':>7s}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        cells = " ".join(f"{r['images_per_s'].get(n) or float('nan'):18,.0f}" for n in names)
        vk = "-" if r["speedup_vs_kornia"] is None else f"{r['speedup_vs_kornia']:.1f}x"
        vp = "-" if r["speedup_vs_pil"] is None else f"{r['speedup_vs_pil']:.1f}x"
        print(f"{r['image_size']:5d} {cells} {vk:>10s} {vp:>7s}")
    print("(source images per second; each gives two views. ours+rot+sol: rotation and solarize on, p 0.5)")

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"augment-{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "augment", "device": str(dev), "device_name": device_name, "torch": torch.__version__,
              "kornia": kornia_version, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_start": load_start,
              "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "clock": args.clock, "note": args.note,
              "config": {"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
                         "workers": args.workers, "images": max(args.images, 2 * args.batch_size),
                         "pipeline": PIPELINE},
              "sizes": rows}
    bench_pretrain.write_result(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
