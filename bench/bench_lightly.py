"""Pretraining throughput beside the loop a user would write with lightly, and beside the ceiling.

Issue 23 item 3.  One run, the conditions interleaved round by round (a load burst on the shared
machine hits them all alike; the median over rounds is reported), on the same data, backbone, batch
and torch threads:

* **ours**: SimCLR baseline as :func:`pipeline.train.pretrain` runs it, measured whole: the loop's
  own phases (``_setup`` / ``_resume`` / ``_place``, then per step ``_train_step``: index the on-device
  uint8 images, two :class:`~pipeline.augment.BatchAugment` calls, forward, backward, SGD step, the
  loss pushed to the device buffer; ``_read_losses`` every ``ssl.log_every`` steps).  Checkpoint
  writes and the kNN monitor are left out, as the loop itself keeps them off its images/s clock.
* **lightly**: what lightly's SimCLR example does, on the same images as PIL images:
  ``lightly.transforms.SimCLRTransform`` (input 32, our *effective* jitter strengths, crop scale,
  grayscale p, no blur, our normalisation) in a ``torch.utils.data.DataLoader`` (shuffle, drop_last),
  the same ``resnet_small`` backbone, lightly's ``SimCLRProjectionHead`` (128 → 512 → 128) and
  ``NTXentLoss`` (temperature as ours), the same SGD and cosine schedule; each view through the
  backbone separately, the loss accumulated detached (no sync per step).  At each of ``--workers``
  (default 0, 1, 2); the best is what ours is compared with.  Each round starts a fresh iterator,
  feeds ``2·workers + 1`` untimed steps (the workers' head start), times its steps and shuts the
  workers down, so they never run during another condition.
* **ceiling**: the same model, optimiser and step (:func:`pipeline.recipe.train_step`) fed by views
  augmented once beforehand (4 batches, cycled): forward + backward + SGD step, no augmentation.

Opt-in rows that try to raise the ceiling (item 3): ``--layouts`` (the ceiling in the other memory
layout: contiguous where the default is channels-last), ``--compile`` (the ceiling under
``ssl.compile``: ``torch.compile`` of the model; the warm-up steps compile it, minutes on 2 cores),
``--variants-ours`` (ours in those settings too), ``--augment-threads N`` (ours with its augmentation
at N threads, the step at ``--threads``), ``--threads`` / ``--interop-threads`` (process-wide),
``--profile`` (``torch.profiler`` table of ceiling steps, top ops by self CPU time).

Writes ``bench/results/lightly-<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_pretrain import write_result  # noqa: E402
from pipeline import train as T  # noqa: E402
from pipeline.models import build_backbone  # noqa: E402
from pipeline.params import Params, load_params  # noqa: E402

TARGETS = {"ours_vs_lightly_best_min": 2.0, "ours_vs_ceiling_min": 0.9}


# ---------------------------------------------------------------------------------------- ours
class _Ours:
    """A real training run of the loop (``pipeline.train``), stepped by the bench."""

    def __init__(self, params: Params, images: np.ndarray, dev: torch.device, out_dir: Path, preaugmented: bool,
                 augment_threads: int = 0):
        self.run = T._setup(params, "simclr", "baseline", images, out_dir, None, dev, None, None, None)
        T._resume(self.run)
        T._place(self.run, images)
        if augment_threads > 0:
            self.run.augment = _ThreadsAround(self.run.augment, augment_threads)
        self.pool = None
        if preaugmented:                       # the ceiling: views made once, outside the clock
            self.pool = []
            for i in range(4):
                x = self.run.data[i * params.ssl.batch_size: (i + 1) * params.ssl.batch_size]
                g = T.view_generator(params.seed, 0, i, "cpu")
                views = [*self.run.augment(x, g), *self.run.augment(x, g)]
                v1, w1, v2, w2 = views
                if not T.use_channels_last(params.ssl, dev):
                    v1, v2 = v1.contiguous(), v2.contiguous()
                self.pool.append((v1.clone(), {k: v.clone() for k, v in w1.items()},
                                  v2.clone(), {k: v.clone() for k, v in w2.items()}))

    def step(self, i: int) -> None:
        run = self.run
        if self.pool is None:
            T._train_step(run)
        else:
            v1, w1, v2, w2 = self.pool[i % len(self.pool)]
            terms = T.train_step(run.runner, run.optimizer, run.scheduler, run.scaler, v1, v2, w1, w2, run.amp_dtype)
            run.step += 1
            run.model.method.on_step_end(run.step / run.total_steps)
            run.log.push(terms, run.step, 0)
        if run.step % run.params.ssl.log_every == 0:
            T._read_losses(run)


class _ThreadsAround:
    """``fn`` run with ``threads`` torch threads (``--augment-threads``): the views are bit-identical
    (checked at 1 and 2 threads on the default config), the OpenMP team of the many small
    augmentation kernels is not."""

    def __init__(self, fn, threads: int):
        self.fn, self.threads = fn, threads

    def __call__(self, *args):
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.fn(*args)
        finally:
            torch.set_num_threads(before)


# ------------------------------------------------------------------------------------- lightly
class _Lightly:
    """lightly's SimCLR example loop on PIL images, ``workers`` DataLoader processes."""

    def __init__(self, params: Params, images: np.ndarray, workers: int, total_steps: int):
        from PIL import Image
        from torch.utils.data import DataLoader, Dataset
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.transforms import SimCLRTransform

        a, ssl = params.augment, params.ssl
        mp = ssl.method("simclr")
        b, c, s, h = a.jitter_strengths()
        self.transform = SimCLRTransform(
            input_size=images.shape[1], cj_prob=a.jitter_p, cj_strength=1.0, cj_bright=b, cj_contrast=c,
            cj_sat=s, cj_hue=h, min_scale=a.crop_scale[0], random_gray_scale=a.effective_grayscale_p(),
            gaussian_blur=a.blur_p, sigmas=tuple(a.blur_sigma), hf_prob=a.flip_p,
            normalize={"mean": list(a.mean), "std": list(a.std)})
        transform = self.transform

        class PILImages(Dataset):                 # as torchvision's CIFAR10 serves its uint8 array
            def __len__(self):
                return len(images)

            def __getitem__(self, i):
                return transform(Image.fromarray(images[i])), 0

        self.loader = DataLoader(PILImages(), batch_size=ssl.batch_size, shuffle=True, drop_last=True,
                                 num_workers=workers, persistent_workers=False)
        self.workers = workers
        torch.manual_seed(params.seed)
        cifar_stem = ssl.cifar_stem if ssl.cifar_stem is not None else images.shape[1] <= 64
        backbone, feat_dim = build_backbone(ssl.backbone, images.shape[1], ssl.width, cifar_stem)

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = backbone
                self.projection_head = SimCLRProjectionHead(feat_dim, mp.proj_hidden_dim, mp.proj_dim)

            def forward(self, x):
                return self.projection_head(self.backbone(x).flatten(start_dim=1))

        self.model = Model().train()
        self.criterion = NTXentLoss(temperature=mp.temperature)
        lr = ssl.lr * ssl.batch_size / 256
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=ssl.momentum,
                                         weight_decay=ssl.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: T.lr_factor(s, total_steps, 0))
        self.total_loss = torch.zeros(())
        self.it = None

    def start(self) -> None:
        self.it = iter(self.loader)

    def stop(self) -> None:
        self.it = None                           # the iterator's __del__ shuts its workers down

    def step(self, i: int) -> None:
        try:
            (x0, x1), _ = next(self.it)
        except StopIteration:
            self.start()
            (x0, x1), _ = next(self.it)
        z0, z1 = self.model(x0), self.model(x1)
        loss = self.criterion(z0, z1)
        self.total_loss += loss.detach()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()


# -------------------------------------------------------------------------------------- timing
def _timed_rounds(conds: dict, steps: int, rounds: int, warmup: int, clock) -> dict[str, list[float]]:
    """Seconds per step of each condition in each round, conditions interleaved round by round.

    A condition is ``(step_fn, start_fn, stop_fn, head_start)``: ``start_fn`` before and ``stop_fn``
    after each of its rounds, ``head_start`` untimed steps after ``start_fn`` (a DataLoader's prefetch).
    """
    per_round = max(1, steps // rounds)
    i = 0
    for name, (fn, start, stop, head) in conds.items():
        start()
        for _ in range(warmup + head):
            fn(i)
            i += 1
        stop()
        print(f"  warm: {name}", flush=True)
    times: dict[str, list[float]] = {k: [] for k in conds}
    for r in range(rounds):
        for name, (fn, start, stop, head) in conds.items():
            start()
            for _ in range(head):
                fn(i)
                i += 1
            t0 = clock()
            for _ in range(per_round):
                fn(i)
                i += 1
            times[name].append((clock() - t0) / per_round)
            stop()
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
              flush=True)
    return times


def _profile(ceiling: _Ours, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    for i in range(2):
        ceiling.step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            ceiling.step(i)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _images(params: Params, source: str) -> tuple[np.ndarray, str]:
    from pipeline.data import pretrain_images
    name = params.data.pretrain
    if source in ("auto", "prepared"):
        try:
            return pretrain_images(params.data.prepared, name), f"prepared {name} ({params.data.prepared})"
        except (FileNotFoundError, OSError, KeyError) as e:
            if source == "prepared":
                raise SystemExit(f"--data prepared: {e}; prepare it with `python -m stages.prepare {name}`")
            print(f"# no prepared {name} ({e}); using synthetic uint8 images "
                  f"(prepare it with `python -m stages.prepare {name}`)", flush=True)
    size = params.data.datasets[name].image_size
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(10000, size, size, 3), dtype=np.uint8), "synthetic uint8 noise"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--data", choices=("auto", "prepared", "synthetic"), default="auto",
                    help="auto: the prepared data.pretrain set if present, else synthetic uint8")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per condition (split over the rounds)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each condition first")
    ap.add_argument("--workers", default="0,1,2", help="lightly DataLoader worker counts (comma-separated)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--interop-threads", type=int, default=0, help="torch inter-op threads (0: torch default)")
    ap.add_argument("--layouts", action="store_true",
                    help="also the ceiling in the other memory layout (channels-last / contiguous)")
    ap.add_argument("--compile", action="store_true", help="also the ceiling under ssl.compile")
    ap.add_argument("--variants-ours", action="store_true",
                    help="--layouts / --compile add ours in that setting too, not only the ceiling")
    ap.add_argument("--augment-threads", type=int, default=0, metavar="N",
                    help="also ours with its two BatchAugment calls at N torch threads (the step at --threads)")
    ap.add_argument("--no-lightly", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile N ceiling steps (torch.profiler) and print the top ops")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: CPU seconds of this process, for a loaded machine (lightly then runs at "
                         "--workers 0 only, so that all its work is counted: a measure of work, not of wall time)")
    ap.add_argument("--out", help="JSON path (default bench/results/lightly-cpu.json)")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.clock == "cpu":
        args.workers = "0"
    if args.interop_threads > 0:
        torch.set_num_interop_threads(args.interop_threads)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    params = load_params(args.params) if Path(args.params).exists() else Params()
    images, data_desc = _images(params, args.data)
    dev = torch.device("cpu")
    n_conditions_steps = 10 ** 6                # the schedule's length: the cosine stays near its start
    ssl = dataclasses.replace(params.ssl, epochs=max(1, n_conditions_steps // (len(images) // params.ssl.batch_size)),
                              methods=["simclr"], threads=0)
    params = dataclasses.replace(params, ssl=ssl)
    batch = ssl.batch_size
    default_cl = T.use_channels_last(ssl, dev)
    layout = "channels_last" if default_cl else "contiguous"
    load_start = os.getloadavg()
    print(f"# bench_lightly: {platform.processor() or 'cpu'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {torch.get_num_interop_threads()} interop; "
          f"{ssl.backbone} width {ssl.width}, {images.shape[1]}x{images.shape[2]}, batch {batch}, "
          f"{len(images)} images ({data_desc}); {args.steps} timed steps in {args.rounds} rounds; "
          f"load average {load_start}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-lightly-"))
    nothing = lambda: None  # noqa: E731
    conds: dict = {}
    variants = [("", ssl)]
    if args.layouts:
        variants.append((f" ({'contiguous' if default_cl else 'channels_last'})",
                         dataclasses.replace(ssl, channels_last=not default_cl)))
    if args.compile:
        variants.append((" (compiled)", dataclasses.replace(ssl, compile=True)))
    ceilings = {}
    for suffix, vssl in variants:
        p = dataclasses.replace(params, ssl=vssl)
        if not suffix or args.variants_ours:
            ours = _Ours(p, images, dev, tmp / f"ours{len(conds)}", preaugmented=False)
            conds["ours" + suffix] = (ours.step, nothing, nothing, 0)
        ceiling = _Ours(p, images, dev, tmp / f"ceiling{len(conds)}", preaugmented=True)
        conds["ceiling" + suffix] = (ceiling.step, nothing, nothing, 0)
        ceilings[suffix] = ceiling
    if args.augment_threads > 0:
        ours_at = _Ours(params, images, dev, tmp / "ours-augment-threads", preaugmented=False,
                        augment_threads=args.augment_threads)
        conds[f"ours (augment {args.augment_threads} thr)"] = (ours_at.step, nothing, nothing, 0)
    workers = [] if args.no_lightly else [int(w) for w in args.workers.split(",") if w.strip()]
    for w in workers:
        lt = _Lightly(params, images, w, n_conditions_steps)
        conds[f"lightly w{w}"] = (lt.step, lt.start, lt.stop, 2 * w + 1 if w else 0)
    if workers:
        lt0 = conds[f"lightly w{workers[0]}"][0].__self__
        print(f"# lightly transform: {lt0.transform.transforms[0].transform}", flush=True)

    per_round = _timed_rounds(conds, args.steps, args.rounds, args.warmup, clock)
    t = {k: float(np.median(v)) for k, v in per_round.items()}
    ips = {k: batch / v for k, v in t.items()}
    light = {k: v for k, v in ips.items() if k.startswith("lightly")}
    best = max(light, key=light.get) if light else None
    ratio_lightly = ips["ours"] / light[best] if best else None
    ratio_ceiling = ips["ours"] / ips["ceiling"]
    # paired per-round ratios: the spread a reader should expect
    paired_ceiling = np.asarray(per_round["ceiling"]) / np.asarray(per_round["ours"])
    paired_lightly = (np.asarray(per_round[best]) / np.asarray(per_round["ours"])) if best else None

    head = f"{'condition':28s} {'img/s':>8s} {'ms/step':>8s} {'vs ours':>8s}   per-round ms"
    print("\n" + head + "\n" + "-" * len(head))
    for k in conds:
        rounds_ms = " ".join(f"{1e3 * x:.0f}" for x in per_round[k])
        print(f"{k:28s} {ips[k]:8,.0f} {1e3 * t[k]:8.0f} {ips[k] / ips['ours']:7.2f}x   {rounds_ms}")
    print(f"\nours ({layout}) / lightly best ({best}): "
          + (f"{ratio_lightly:.2f}x (paired per round {np.median(paired_lightly):.2f}x, "
             f"range {paired_lightly.min():.2f}..{paired_lightly.max():.2f})" if best else "not measured"))
    print(f"ours / ceiling: {100 * ratio_ceiling:.1f} % (paired per round {100 * np.median(paired_ceiling):.1f} %, "
          f"range {100 * paired_ceiling.min():.1f}..{100 * paired_ceiling.max():.1f} %)")
    checks = {"ours>=2x_lightly_best": None if best is None else ratio_lightly >= TARGETS["ours_vs_lightly_best_min"],
              "ours>=90%_ceiling": ratio_ceiling >= TARGETS["ours_vs_ceiling_min"]}
    for k, ok in checks.items():
        print(f"  target {k}: {'not measured' if ok is None else 'met' if ok else 'NOT met'}")

    profile = None
    if args.profile > 0:
        profile = _profile(ceilings[""], args.profile, 25)
        print(f"\nprofile of {args.profile} ceiling steps ({layout}):\n{profile}")

    load_end = os.getloadavg()
    print(f"load average at the end {load_end}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"lightly-{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        import lightly
        lightly_version = lightly.__version__
    except ImportError:
        lightly_version = None
    result = {
        "benchmark": "lightly", "device": str(dev), "device_name": platform.processor() or "cpu",
        "torch": torch.__version__, "lightly": lightly_version, "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(), "clock": args.clock,
        "load_average_start": list(load_start), "load_average_end": list(load_end),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": "python bench/bench_lightly.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {"backbone": ssl.backbone, "width": ssl.width, "image_size": int(images.shape[1]),
                   "batch_size": batch, "data": data_desc, "images": int(len(images)), "layout": layout,
                   "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "workers": workers,
                   "augment_threads": args.augment_threads,
                   "lightly_transform": None if not workers else str(lt0.transform.transforms[0].transform)},
        "images_per_s": ips, "step_ms": {k: 1e3 * v for k, v in t.items()},
        "step_ms_per_round": {k: [1e3 * x for x in v] for k, v in per_round.items()},
        "lightly_best": best, "ours_vs_lightly_best": ratio_lightly, "ours_vs_ceiling": ratio_ceiling,
        "ours_vs_ceiling_paired_median": float(np.median(paired_ceiling)),
        "targets": TARGETS, "checks": checks, "profile": profile,
    }
    write_result(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
