"""The linear protocol, old code against new code, back to back on the same features.

Runs ``pipeline.evaluate.linear.linear_probe`` as it is in this working tree ("new") and as it is at a
git revision ("old", default ``main``: its ``pipeline/evaluate/linear.py`` is loaded from ``git show``)
on the same features, one after the other, and prints per task: seconds, the load average just
before each run (the CPU may be shared: compare a pair, not runs far apart), the chosen w, test
top-1, Hessian-vector products and the sha256 of the test predictions (equal hashes: the same
answer).  ``--rounds 2`` repeats each pair (new first in odd rounds), so a load change shows.

    python bench/linear_old_vs_new.py --features features/simclr-baseline/cfmnist.npz --tasks class,hue
    python bench/linear_old_vs_new.py --synthetic            # the bench_linear 10k x 128 set
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.params import LinearParams  # noqa: E402


def load_old(ref: str):
    """``pipeline/evaluate/linear.py`` at git revision ``ref``, imported as its own module."""
    source = subprocess.run(["git", "show", f"{ref}:pipeline/evaluate/linear.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "linear_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("linear_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["linear_old"] = module          # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else \
        f"{os.getloadavg()[0]:.2f}"


def datasets(args):
    if args.synthetic:
        from bench.bench_linear import make_features
        x, y = make_features(12500, 128, 10, 0.35, 0)
        yield "synthetic 10k x 128", "class", (x[:10000], y[:10000], x[10000:], y[10000:])
    for path in args.features:
        with np.load(path, allow_pickle=False) as f:
            for task in args.tasks.split(","):
                yield path, task, (f["train_x"], f[f"train_{task}"], f["test_x"], f[f"test_{task}"])


def run(module, data, seed: int) -> dict:
    load = loadavg()
    start = time.perf_counter()
    res = module.linear_probe(*data, LinearParams(), seed)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "load": load, "best_wd": res["best_wd"], "top1": res["top1"],
            "hvps": res["solver"]["hessian_vector_products"],
            "sha256": hashlib.sha256(np.ascontiguousarray(res["test_pred"], dtype=np.int64).tobytes()).hexdigest(),
            "stops": res["solver"]["stops"], "refit_stop": res["solver"]["refit_stop"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="main", help="git revision of the old pipeline/evaluate/linear.py")
    ap.add_argument("--features", nargs="*", default=[], help="features npz files (train_x, test_x, train_<task>, ...)")
    ap.add_argument("--tasks", default="class,hue")
    ap.add_argument("--synthetic", action="store_true", help="also the bench_linear synthetic 10k x 128, 10 classes")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="bench/results/linear-old-vs-new.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.evaluate import linear as new
    old = load_old(args.old)
    tiny = np.random.default_rng(0)          # one-time costs (imports, first kernels) paid before timing
    xs, ys = tiny.normal(size=(120, 8)).astype(np.float32), tiny.integers(0, 3, 120)
    for module in (old, new):
        module.linear_probe(xs[:90], ys[:90], xs[90:], ys[90:], LinearParams(wd_steps=3), 0)
    print(f"old = {args.old}:pipeline/evaluate/linear.py, new = this tree; torch threads {torch.get_num_threads()}")
    print(f"{'features':<44} {'task':<6} {'code':<4} {'load':>5} {'seconds':>8} {'HVPs':>6} {'best w':>9} "
          f"{'top-1':>6}  sha256(test predictions)")
    rows = []
    for name, task, data in datasets(args):
        for r in range(args.rounds):
            pair = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
            got = {}
            for label, module in pair:
                got[label] = run(module, data, args.seed)
                g = got[label]
                print(f"{str(name)[-44:]:<44} {task:<6} {label:<4} {g['load']:>5} {g['seconds']:8.2f} {g['hvps']:6d} "
                      f"{g['best_wd']:9.3g} {g['top1']:6.2f}  {g['sha256'][:16]}", flush=True)
            same = got["old"]["sha256"] == got["new"]["sha256"] and got["old"]["best_wd"] == got["new"]["best_wd"]
            print(f"{'':<44} {task:<6} old / new = {got['old']['seconds'] / got['new']['seconds']:.2f}x, "
                  f"same chosen w and test predictions: {same}", flush=True)
            rows.append({"features": str(name), "task": task, "round": r, **{k: v for k, v in got.items()},
                         "same_answer": same})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"old": args.old, "torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    if not all(r["same_answer"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
