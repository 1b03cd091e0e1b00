"""What a pretraining run reports while it runs: the loss log and the progress a person watches.

* **The loss log** (:class:`LossLog`).  Each step's loss terms are written into a small device
  buffer with no host sync; it is read back every ``ssl.log_every`` steps (and before each
  checkpoint), which is when the loop logs and non-finite losses are detected: a non-finite term
  raises :class:`NonFiniteLossError` naming the first bad step and term.  Under DDP the buffer is
  averaged over the ranks when read.  The host keeps the sums of the log window and of the current
  and the last full epoch, and the ``losses.csv`` rows; its :meth:`LossLog.state` is part of the
  checkpoint, so a resumed run writes the same rows and means.
* **Progress** (:class:`Progress`, rank 0): a tqdm bar on a terminal; off a terminal one line per
  epoch on stderr (epoch/total, mean loss terms, kNN top-1 when measured, images/s, elapsed, ETA).
  :func:`say` is the loop's one-line message on stderr (rank 0).

None of it changes the weights (``pipeline.fingerprint.PRETRAIN_GLUE``).
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as torch_dist

from pipeline import distributed

if TYPE_CHECKING:
    from pipeline.run_state import RunState

__all__ = ["NonFiniteLossError", "LossLog", "Progress", "say", "append_csv"]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or ±inf.  ``step`` is 1-based (the step that produced it)."""

    def __init__(self, step: int, term: str, value: float, checkpoint: Path | None = None):
        self.step, self.term, self.value = step, term, value
        where = (f"; the last good checkpoint ({checkpoint}) was left untouched" if checkpoint
                 else "; no checkpoint was written after it")
        super().__init__(f"non-finite loss at step {step}: term '{term}' = {value}{where}. "
                         f"Lower ssl.lr, add ssl.warmup_epochs or set ssl.amp: off, then rerun.")


class LossLog:
    """Per-step loss terms: device buffer → host sums per log window and per epoch."""

    def __init__(self, names: list[str], size: int, device: torch.device):
        self.names = names
        self.buf = torch.zeros(size, len(names), device=device)
        self.buf_steps: list[tuple[int, int]] = []    # (1-based step, epoch) of each buffered row
        self.window = np.zeros(len(names))
        self.window_n = 0
        self.epochs: dict[int, list] = {}              # epoch → [sum vector, count]
        self.rows: list[dict] = []                     # losses.csv rows so far

    def push(self, terms: torch.Tensor, step: int, epoch: int) -> None:
        self.buf[len(self.buf_steps)] = terms
        self.buf_steps.append((step, epoch))

    @property
    def full(self) -> bool:
        return len(self.buf_steps) == self.buf.shape[0]

    def flush(self) -> None:
        """Read the buffered steps back (one sync), check finiteness, add to the host sums."""
        n = len(self.buf_steps)
        if n == 0:
            return
        rows = self.buf[:n]
        if distributed.is_dist():
            rows = rows.clone()
            torch_dist.all_reduce(rows)                   # NaN on any rank reaches every rank
            rows /= distributed.world_size()
        values = rows.cpu().numpy().astype(np.float64)
        steps, self.buf_steps = self.buf_steps, []
        for (step, epoch), v in zip(steps, values):
            if not np.isfinite(v).all():
                j = int(np.flatnonzero(~np.isfinite(v))[0])
                raise NonFiniteLossError(step, self.names[j], float(v[j]))
            self.window += v
            self.window_n += 1
            acc = self.epochs.setdefault(epoch, [np.zeros(len(self.names)), 0])
            acc[0] += v
            acc[1] += 1
        for e in sorted(self.epochs)[:-2]:                 # keep the current and the last full epoch
            del self.epochs[e]

    def take_window(self) -> dict[str, float]:
        mean = self.window / max(1, self.window_n)
        self.window[:] = 0
        self.window_n = 0
        return {f"pretrain/loss_{k}": float(x) for k, x in zip(self.names, mean)}

    def epoch_means(self, epoch: int) -> dict[str, float]:
        s, n = self.epochs[epoch]
        return {f"pretrain/loss_{k}": float(x) for k, x in zip(self.names, s / n)}

    def state(self) -> dict:
        return {"epochs": {e: (s.tolist(), n) for e, (s, n) in self.epochs.items()}, "rows": list(self.rows),
                "window": (self.window.tolist(), self.window_n)}

    def load(self, state: dict) -> None:
        self.epochs = {int(e): [np.array(s), n] for e, (s, n) in state["epochs"].items()}
        self.rows = list(state["rows"])
        self.window, self.window_n = np.array(state["window"][0]), state["window"][1]


def append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def say(msg: str) -> None:
    if distributed.is_main():
        print(f"[pretrain] {msg}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """What a person watching the run sees (rank 0 only, nothing when ``enabled`` is False).

    On a terminal: a tqdm bar over the steps.  Off a terminal (``make repro`` piped to a log, nohup, a
    batch scheduler), where a bar would print nothing useful: one line per epoch on stderr with the
    epoch's mean loss terms, images/s over the epoch (wall clock, checkpoints and monitor included),
    the elapsed time of this process and the ETA from the steps it has done so far.
    """

    def __init__(self, run: RunState, enabled: bool):
        from tqdm.auto import tqdm

        self.on = enabled and run.main
        self.tty = self.on and sys.stderr.isatty()
        self.bar = tqdm(total=run.total_steps, initial=run.step, disable=not self.tty, unit="step",
                        desc=f"{run.request.method}-{run.request.variant}", dynamic_ncols=True, leave=True)
        self.t0 = self.epoch_t0 = time.perf_counter()
        self.first_step = self.epoch_step0 = run.step     # a resumed run starts mid-epoch

    def update(self) -> None:
        self.bar.update(1)

    def postfix(self, loss: float, images_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")

    def epoch_done(self, run: RunState, monitor: dict[str, float]) -> None:
        if not self.on or self.tty:
            return
        now, epoch = time.perf_counter(), run.step // run.steps_per_epoch
        done = run.step - self.first_step
        losses = run.log.epoch_means(epoch - 1)
        terms = "  ".join(f"{k.removeprefix('pretrain/loss_')} {v:.4f}" for k, v in losses.items())
        knn = "".join(f"  {k.removeprefix('monitor/')} {v:.1f}" for k, v in monitor.items() if k.endswith("knn_top1"))
        speed = (run.step - self.epoch_step0) * run.params.ssl.batch_size / max(now - self.epoch_t0, 1e-9)
        eta = (now - self.t0) / max(done, 1) * (run.stop_at - run.step)
        print(f"[pretrain] {run.request.method}-{run.request.variant} epoch {epoch}/{run.params.ssl.epochs}  {terms}{knn}  "
              f"{speed:.0f} img/s  elapsed {_clock(now - self.t0)}  ETA {_clock(eta)}", file=sys.stderr, flush=True)
        self.epoch_t0, self.epoch_step0 = now, run.step

    def close(self) -> None:
        self.bar.close()
