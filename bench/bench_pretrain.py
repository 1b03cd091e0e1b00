"""Pretraining throughput: what AugSelf costs, and what the batched on-device augmentation buys.

For every method in ``--methods`` it times the pretraining step of :mod:`pipeline.train` (the same
code path the loop runs: index the on-device uint8 data, two :class:`~pipeline.augment.BatchAugment`
calls on a :func:`~pipeline.augment.view_generator`, :func:`~pipeline.train.train_step`,
``on_step_end``) and reports

* images/s with λ = 0 (baseline) and λ = 1 (AugSelf head on ``augself.augmentations``), and the
  AugSelf overhead ``t(λ=1) / t(λ=0) − 1`` in % of step time; ``--variant cassle`` compares the
  CASSLE variant (projector conditioned on ω, ``cassle`` section) with the baseline instead: the same
  rows under ``cassle_*`` keys (``step_ms_cassle``, ``cassle_overhead_pct`` ...), written to
  ``pretrain-<device>-cassle.json``;
* the share of the baseline step spent in the two augmentation calls;
* the ceiling: the baseline step fed by views augmented once beforehand (no augmentation cost);
* the baseline step fed the way the official code feeds it: per-sample torchvision transforms on
  PIL images (RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter, p),
  RandomGrayscale, ToTensor, Normalize) in a ``DataLoader`` with ``--workers`` worker processes.
  The feeding comparison uses the baseline step because torchvision's transforms do not return ω.
* augmentation throughput alone: two batched views vs two PIL views per image (DataLoader, no
  training), and the speed-up.

Images are random uint8 noise of the requested size (augmentation cost does not depend on content).
Configuration: ``--params`` (default ``params.yaml``, the default CPU config: resnet_small width 16,
32×32, batch 256) with the command-line overrides.  GPU preset (``--preset gpu``): ResNet-18, 96×96,
batch 256, bf16 autocast, on ``cuda``.

Writes ``bench/results/pretrain-<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.augment import BatchAugment, blur_kernel_size, view_generator  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.params import METHODS, Params, load_params  # noqa: E402
from pipeline.train import (build_optimizer, build_pretrain_model, resolve_amp,  # noqa: E402
                            train_step)

PRESETS = {
    "cpu": dict(device="cpu", backbone="resnet_small", width=16, image_size=32, batch_size=256, amp="off"),
    "gpu": dict(device="cuda", backbone="resnet18", width=64, image_size=96, batch_size=256, amp="bf16"),
}
TARGETS = {"augself_overhead_pct_max": 5.0, "aug_share_pct_max": 10.0, "aug_speedup_vs_pil_min": 3.0}


_clock = time.perf_counter          # --clock cpu: time.process_time (CPU seconds of this process)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed_interleaved(fns: dict, steps: int, rounds: int, warmup: int,
                       dev: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each ``fn(i)`` in each round, the conditions interleaved round by round.

    Each round runs ``steps // rounds`` calls of every condition in turn.  Interleaving makes the
    comparisons (λ = 0 vs 1, fed vs ceiling) fair on a machine whose load changes during the run:
    a ratio of two conditions is taken within each round (:func:`_paired_overhead`), and medians
    over rounds drop rounds hit by a burst.
    """
    per_round = max(1, steps // rounds)
    i = 0
    for fn in fns.values():
        for _ in range(warmup):
            fn(i)
            i += 1
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(dev)
            t0 = _clock()
            for _ in range(per_round):
                fn(i)
                i += 1
            _sync(dev)
            times[name].append((_clock() - t0) / per_round)
    return times


def _paired_overhead(slow: list[float], fast: list[float]) -> tuple[float, float, float]:
    """``slow / fast − 1`` in %, per round: (median, 25th, 75th percentile) over the rounds."""
    ratios = 100 * (np.asarray(slow) / np.asarray(fast) - 1)
    return float(np.median(ratios)), float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))


def _step_flops(setup: "_Setup", i: int) -> int:
    """Floating-point operations of one training step (forward, backward; torch's FLOP counter,
    which counts matrix products and convolutions, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    runner, setup.runner = setup.runner, setup.model      # count the eager graph (same FLOPs, no compile)
    try:
        with counter:
            setup.full_step(i)
    finally:
        setup.runner = runner
    return counter.get_total_flops()


class _Setup:
    """A model, optimiser and on-device data for one (method, λ), as pretrain() builds them."""

    def __init__(self, params: Params, method: str, variant: str, images: torch.Tensor, dev: torch.device,
                 total_steps: int):
        torch.manual_seed(0)
        self.params, self.dev = params, dev
        self.model, _, _ = build_pretrain_model(params, method, variant, images.shape[1])
        self.model.to(dev)
        if params.ssl.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        # what the loop's forward runs (pipeline.train._place): the compiled model under ssl.compile
        self.runner = torch.compile(self.model) if params.ssl.compile else self.model
        self.optimizer, self.scheduler = build_optimizer(params, self.model, total_steps, total_steps)
        self.amp = resolve_amp(params.ssl.amp, dev)
        self.scaler = torch.amp.GradScaler(dev.type) if self.amp == torch.float16 else None
        self.augment = BatchAugment(params.augment, images.shape[1])
        self.images = images
        self.total_steps = total_steps
        self.buf = torch.zeros(64, len(self.model.term_names), device=dev)

    def views(self, i: int):
        b = self.params.ssl.batch_size
        n = self.images.shape[0]
        idx = torch.arange(i * b, (i + 1) * b, device=self.dev) % n
        x = self.images[idx]
        g = view_generator(0, 0, i, "cpu")
        return (*self.augment(x, g), *self.augment(x, g))

    def step(self, i: int, v1, w1, v2, w2) -> None:
        terms = train_step(self.runner, self.optimizer, self.scheduler, self.scaler, v1, v2, w1, w2, self.amp)
        self.model.method.on_step_end(min(1.0, (i + 1) / self.total_steps))
        self.buf[i % self.buf.shape[0]] = terms          # what the loop does instead of .item()

    def full_step(self, i: int) -> None:
        v1, w1, v2, w2 = self.views(i)
        self.step(i, v1, w1, v2, w2)


def _pil_loader(images_np: np.ndarray, params: Params, batch: int, workers: int, pin: bool):
    """The official-style feeding: per-sample torchvision transforms on PIL images, two views
    (with the Gaussian blur, kernel as :func:`~pipeline.augment.blur_kernel_size`, when ``blur_p > 0``)."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    a = params.augment
    size = images_np.shape[1]
    tf = T.Compose([
        T.RandomResizedCrop(size, scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio)),
        T.RandomHorizontalFlip(a.flip_p),
        T.RandomApply([T.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue)], p=a.jitter_p),
        T.RandomGrayscale(a.grayscale_p),
        *([T.RandomApply([T.GaussianBlur(blur_kernel_size(size), tuple(a.blur_sigma))], p=a.blur_p)]
          if a.blur_p > 0 else []),
        T.ToTensor(),
        T.Normalize(a.mean, a.std),
    ])

    class TwoViews(Dataset):
        def __len__(self):
            return len(images_np)

        def __getitem__(self, i):
            img = Image.fromarray(images_np[i])
            return tf(img), tf(img)

    return DataLoader(TwoViews(), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                      pin_memory=pin, persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)


def _timed_pil(loader, consume, steps: int, workers: int, dev: torch.device) -> float:
    """Seconds per batch of ``consume(i, batch)`` fed by ``loader`` in steady state.

    The loader is started, its prefetch queue (2 batches per worker) drained untimed, then ``steps``
    batches are timed back to back; the workers are shut down afterwards, so they never run
    during the other measurements (a DataLoader works ahead in the background, which would both
    slow the other conditions and hand this one batches made on their time).
    """
    def forever():
        while True:
            yield from loader
    it = forever()
    for i in range(2 * workers + 1):
        consume(i, next(it))
    _sync(dev)
    t0 = _clock()
    for i in range(steps):
        consume(i, next(it))
    _sync(dev)
    elapsed = (_clock() - t0) / steps
    it.close()
    loader._iterator = None        # drop the persistent workers now rather than at interpreter exit
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="params.yaml to start from")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="cpu: resnet_small/32px/256; gpu: resnet18/96px/256/bf16")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu, or the preset's)")
    ap.add_argument("--backbone")
    ap.add_argument("--width", type=int, help="resnet_small width")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"))
    ap.add_argument("--compile", action="store_true", help="ssl.compile: torch.compile the model (the first "
                                                           "steps of each condition compile it; raise --warmup)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per condition (split over the rounds)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the median over rounds is reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each condition first")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the PIL pipeline")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--images", type=int, default=2048, help="size of the synthetic data set")
    ap.add_argument("--augself-hidden", type=int, help="hidden width of the AugSelf MLPs (default: augself.hidden_dim)")
    ap.add_argument("--augself-augs", help="comma-separated AugSelf targets for λ = 1 (default: augself.augmentations); "
                                           "rotation / solarize switch their op on at the official p 0.5 "
                                           "for every condition, so the overhead is the heads' alone")
    ap.add_argument("--variant", choices=("augself", "cassle"), default="augself",
                    help="the variant timed against the baseline (default augself: λ = 1)")
    ap.add_argument("--no-pil", action="store_true", help="skip the PIL-pipeline rows (they take most of the time)")
    ap.add_argument("--out", help="JSON path (default bench/results/pretrain-<device>.json)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: count CPU seconds of this process instead of wall time, for a machine shared "
                         "with other jobs; the PIL pipeline then runs in-process (--workers 0) so its work counts")
    args = ap.parse_args(argv)
    global _clock
    if args.clock == "cpu":
        _clock = time.process_time
        args.workers = 0

    params = load_params(args.params) if Path(args.params).exists() else Params()
    cfg = dict(PRESETS[args.preset or "cpu"])
    if not args.preset:  # without a preset the params file decides, except for the device
        cfg.update(backbone=params.ssl.backbone, width=params.ssl.width, batch_size=params.ssl.batch_size,
                   amp=params.ssl.amp)
    for k in ("device", "backbone", "width", "image_size", "batch_size", "amp"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r}; allowed: {', '.join(METHODS)}")
    dev = torch.device(cfg["device"])
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    ssl = dataclasses.replace(params.ssl, backbone=cfg["backbone"], width=cfg["width"],
                              batch_size=cfg["batch_size"], amp=cfg["amp"], methods=methods,
                              compile=args.compile or params.ssl.compile)
    augs = ([a.strip() for a in args.augself_augs.split(",") if a.strip()] if args.augself_augs
            else params.augself.augmentations)
    try:
        augment = dataclasses.replace(params.augment, **{f"{a}_p": max(getattr(params.augment, f"{a}_p"), 0.5)
                                                         for a in ("rotation", "solarize") if a in augs})
        aug_lambda1 = dataclasses.replace(params.augself, lambda_=1.0, augmentations=augs,
                                          hidden_dim=args.augself_hidden or params.augself.hidden_dim)
        params = dataclasses.replace(params, ssl=ssl, augment=augment, augself=aug_lambda1)
    except ConfigError as e:
        ap.error(f"--augself-augs: {e}")
    size, batch, n_img = cfg["image_size"], cfg["batch_size"], max(args.images, 2 * cfg["batch_size"])
    rng = np.random.default_rng(0)
    images_np = rng.integers(0, 256, size=(n_img, size, size, 3), dtype=np.uint8)
    images = torch.from_numpy(images_np).to(dev)
    total = args.warmup + args.steps
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"# bench_pretrain: {device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{cfg['backbone']} (width {cfg['width']}) {size}x{size}, batch {batch}, amp {cfg['amp']}, "
          f"compile {params.ssl.compile}, "
          f"{args.steps} timed steps in {args.rounds} interleaved rounds, {args.clock} clock; "
          f"variant {args.variant}: " + (f"AugSelf augs {params.augself.augmentations}, hidden "
                                         f"{params.augself.hidden_dim}; " if args.variant == "augself" else
                                         f"CASSLE {params.cassle}; ") +
          f"load average {load_start}",
          flush=True)

    # Augmentation alone: batched (two calls) and per-sample PIL (DataLoader, two views per image).
    augment = BatchAugment(params.augment, size)

    def aug_only(i):
        idx = torch.arange(i * batch, (i + 1) * batch, device=dev) % n_img
        g = view_generator(0, 0, i, "cpu")
        augment(images[idx], g)
        augment(images[idx], g)
    if args.no_pil:
        pil, t_pil_alone = None, float("nan")
    else:
        pil = _pil_loader(images_np, params, batch, args.workers, dev.type == "cuda")
        t_pil_alone = _timed_pil(pil, lambda i, b: None, args.steps, args.workers, dev)
        print(f"augmentation alone: PIL DataLoader ({args.workers} workers) {batch / t_pil_alone:,.0f} img/s",
              flush=True)

    rows = []
    for method in methods:
        base = _Setup(params, method, "baseline", images, dev, 100 * total)
        aug = _Setup(params, method, args.variant, images, dev, 100 * total)
        pre = base.views(0)                                  # views augmented once: the ceiling
        per_round = _timed_interleaved({"lambda0": base.full_step, "lambda1": aug.full_step, "aug": aug_only,
                                        "ceiling": lambda i: base.step(i, *pre)},
                                       args.steps, args.rounds, args.warmup, dev)
        t = {k: float(np.median(v)) for k, v in per_round.items()}
        overhead, overhead_q25, overhead_q75 = _paired_overhead(per_round["lambda1"], per_round["lambda0"])
        flops0, flops1 = _step_flops(base, 10 ** 6), _step_flops(aug, 10 ** 6)

        def pil_step(i, views):
            v1, v2 = (v.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last) for v in views)
            base.step(i, v1, {}, v2, {})
        t["pil"] = float("nan") if pil is None else _timed_pil(pil, pil_step, args.steps, args.workers, dev)
        del base, aug
        t0, t1 = t["lambda0"], t["lambda1"]
        row = {"method": method,
               "step_ms_lambda0": 1e3 * t0, "step_ms_lambda1": 1e3 * t1,
               "images_per_s_lambda0": batch / t0, "images_per_s_lambda1": batch / t1,
               "augself_overhead_pct": overhead,              # median over rounds of the paired ratio
               "augself_overhead_pct_iqr": [overhead_q25, overhead_q75],
               "gflops_per_step_lambda0": flops0 / 1e9, "gflops_per_step_lambda1": flops1 / 1e9,
               "augself_flops_pct": 100 * (flops1 / flops0 - 1),
               "aug_ms": 1e3 * t["aug"], "aug_share_pct": 100 * t["aug"] / t0,
               "images_per_s_preaugmented": batch / t["ceiling"],
               "images_per_s_pil_loader": None if pil is None else batch / t["pil"],
               "speedup_vs_pil_loader": None if pil is None else t["pil"] / t0}
        if args.variant != "augself":   # the same measurements, named after the variant
            row = {k.replace("lambda1", args.variant).replace("augself", args.variant): v for k, v in row.items()}
            row["variant"] = args.variant
            print(f"{method}: baseline {row['images_per_s_lambda0']:,.0f} img/s, {args.variant} "
                  f"{row[f'images_per_s_{args.variant}']:,.0f} img/s ({row[f'{args.variant}_overhead_pct']:+.1f}%, "
                  f"rounds IQR {overhead_q25:+.1f}..{overhead_q75:+.1f}%; FLOPs "
                  f"{row[f'{args.variant}_flops_pct']:+.1f}%)", flush=True)
            rows.append(row)
            continue
        rows.append(row)
        print(f"{method}: λ=0 {row['images_per_s_lambda0']:,.0f} img/s, λ=1 {row['images_per_s_lambda1']:,.0f} img/s "
              f"({row['augself_overhead_pct']:+.1f}%, rounds IQR {overhead_q25:+.1f}..{overhead_q75:+.1f}%; "
              f"FLOPs {row['augself_flops_pct']:+.1f}%), aug share {row['aug_share_pct']:.1f}%", flush=True)

    if args.variant != "augself":
        return _write_variant_result(args, cfg, dev, device_name, load_start, params, rows, n_img)
    head = (f"{'method':8s} {'λ=0 img/s':>10s} {'λ=1 img/s':>10s} {'AugSelf +%':>10s} {'+% FLOPs':>9s} "
            f"{'aug % step':>10s} {'ceiling':>10s} {'PIL-fed':>10s} {'vs PIL':>7s}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['method']:8s} {r['images_per_s_lambda0']:10,.0f} {r['images_per_s_lambda1']:10,.0f} "
              f"{r['augself_overhead_pct']:10.1f} {r['augself_flops_pct']:9.1f} {r['aug_share_pct']:10.1f} "
              f"{r['images_per_s_preaugmented']:10,.0f} "
              + (f"{'-':>10s} {'-':>7s}" if r["images_per_s_pil_loader"] is None else
                 f"{r['images_per_s_pil_loader']:10,.0f} {r['speedup_vs_pil_loader']:6.1f}x"))
    t_aug = float(np.median([r["aug_ms"] for r in rows])) / 1e3   # measured alongside every method
    speedup = None if pil is None else t_pil_alone / t_aug
    worst_overhead = max(r["augself_overhead_pct"] for r in rows)
    worst_share = max(r["aug_share_pct"] for r in rows)
    checks = {
        "augself_overhead_pct<=5": worst_overhead <= TARGETS["augself_overhead_pct_max"],
        "aug_share_pct<=10": worst_share <= TARGETS["aug_share_pct_max"],
        "aug_speedup_vs_pil>=3": None if speedup is None else speedup >= TARGETS["aug_speedup_vs_pil_min"],
    }
    versus_pil = "" if speedup is None else f" vs PIL {batch / t_pil_alone:,.0f} img/s ({speedup:.1f}x)"
    print(f"\naugmentation: batched {batch / t_aug:,.0f} img/s{versus_pil}; "
          f"worst AugSelf overhead {worst_overhead:.1f}%, worst aug share {worst_share:.1f}%")
    for k, ok in checks.items():
        print(f"  target {k}: {'not measured (--no-pil)' if ok is None else 'met' if ok else 'NOT met'}")

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"pretrain-{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "pretrain", "device": str(dev), "device_name": device_name,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "clock": args.clock, "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "config": {**cfg, "compile": params.ssl.compile, "steps": args.steps, "rounds": args.rounds,
                   "warmup": args.warmup, "workers": args.workers,
                   "augself_augmentations": params.augself.augmentations,
                   "rotation_p": params.augment.rotation_p, "solarize_p": params.augment.solarize_p,
                   "augself_hidden_dim": params.augself.hidden_dim, "images": n_img},
        "augmentation": {"batched_images_per_s": batch / t_aug,
                         "pil_loader_images_per_s": None if speedup is None else batch / t_pil_alone,
                         "speedup": speedup, "batched_ms_per_batch": 1e3 * t_aug},
        "methods": rows, "targets": TARGETS, "checks": checks,
    }
    write_result(out, result)
    return 0


def _write_variant_result(args, cfg, dev, device_name, load_start, params, rows, n_img) -> int:
    """Table and JSON of a ``--variant`` other than augself (no targets: they are AugSelf's)."""
    v = args.variant
    head = f"{'method':8s} {'base img/s':>10s} {v + ' img/s':>12s} {v + ' +%':>10s} {'IQR':>13s} {'+% FLOPs':>9s}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        q25, q75 = r[f"{v}_overhead_pct_iqr"]
        print(f"{r['method']:8s} {r['images_per_s_lambda0']:10,.0f} {r[f'images_per_s_{v}']:12,.0f} "
              f"{r[f'{v}_overhead_pct']:10.1f} {q25:+6.1f}..{q75:+5.1f} {r[f'{v}_flops_pct']:9.1f}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"pretrain-{dev.type}-{v}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "pretrain", "variant": v, "device": str(dev), "device_name": device_name,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "clock": args.clock, "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "config": {**cfg, "compile": params.ssl.compile, "steps": args.steps, "rounds": args.rounds,
                   "warmup": args.warmup, "cassle": dataclasses.asdict(params.cassle), "images": n_img},
        "methods": rows,
    }
    write_result(out, result)
    return 0


def write_result(out: Path, result: dict) -> None:
    """Write a bench's JSON atomically (pipeline.checkpoint, the one atomic writer) and say where (the bench
    scripts share it).  Keys in the bench's own order, not sorted: write_text, not write_json."""
    from pipeline.checkpoint import write_text

    write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    raise SystemExit(main())
