"""Helpers for the end-to-end tests: a temporary copy of the repository with a tiny configuration."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.config import set_dotted

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Seconds-scale configuration: one method, a width-4 ResNet, 256 images, 2 epochs of 4 steps.
TINY = {
    "data.datasets": {"cfmnist": {"tasks": ["class", "color"], "image_size": 32, "max_train": 256, "max_test": 200,
                                  }},
    "ssl.methods": ["simclr"],
    "variants": ["baseline", "augself", "cassle"],     # every variant end to end (the default leaves CASSLE out)
    "ssl.width": 4,
    "ssl.epochs": 2,
    "ssl.batch_size": 64,
    "ssl.checkpoint_every": 2,
    # oneDNN's channels-last 1x1-convolution weight gradient (jit_avx2_1x1_convolution_bwd_weights,
    # torch 2.14.1) segfaults or hangs for this width-4 SimCLR at batch 64 on an AMD EPYC (avx2) CPU,
    # 3 runs of 3 (docs/reliability.md); the contiguous layout runs.  The default width 16 is unaffected.
    "ssl.channels_last": False,
    "ssl.log_every": 1,
    "ssl.simclr.proj_hidden_dim": 32,
    "ssl.simclr.proj_dim": 16,
    "augself.hidden_dim": 32,
    "eval.batch_size": 128,
    "eval.linear.wd_steps": 3,
    "eval.linear.max_iter": 30,
    "eval.fewshot.shots": [1],
    "eval.fewshot.queries": 5,
    "eval.fewshot.episodes": 20,
    "eval.probe.images": 64,
}


# What the pipeline writes: never copied from the developer's workspace into a test project.
PIPELINE_OUTPUTS = ("reports/", "bench/results/", "data/", "models/", "features/", "metrics/", "dvc.lock", "mlflow.db")


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}:{e['PATH']}"
    e["PYTHONUNBUFFERED"] = "1"
    # Tiny models: one thread each, so the stages a queue runs side by side (-j 2) do not oversubscribe
    # the 2-core CI machine (spinning OpenMP threads make that many times slower).
    e["OMP_NUM_THREADS"] = "1"
    # CPU only: the determinism these tests assert (bit-identical reruns and resumes) is what
    # docs/reliability.md guarantees on the CPU, not on a GPU (cuDNN, bf16 autocast).  Hiding CUDA
    # makes a GPU runner test the same thing as the CPU CI instead of asserting what is not promised.
    e["CUDA_VISIBLE_DEVICES"] = ""
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("DVC_ROOT", None)
    e.update(extra)
    return e


def make_project(dest: Path, overrides: dict | None = None) -> Path:
    """Copy the repository's files (tracked and untracked-not-ignored) into ``dest`` as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(PIPELINE_OUTPUTS):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    set_dotted(params, {**TINY, **(overrides or {})})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny project"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 600, **extra_env) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\nstdout:\n{out.stdout[-4000:]}\n"
                             f"stderr:\n{out.stderr[-4000:]}")
    return out


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (``.git`` included): directories with their mtime, files with size,
    sha256 and mtime (ns), symlinks with their target.  Two equal snapshots mean nothing under
    ``root`` was created, deleted, rewritten or touched, not even a file written back unchanged."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if path.is_symlink():
                snap[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                snap[rel] = ("dir", st.st_mtime_ns)
            else:
                snap[rel] = ("file", st.st_size, hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns)
    return snap


def assert_tree_unchanged(before: dict[str, tuple], root: Path, what: str = "") -> None:
    """``root`` is as :func:`tree_snapshot` saw it in ``before``; the message lists every difference."""
    after = tree_snapshot(root)
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert not (added or removed or changed), (f"{what}: the workspace changed: added {added[:20]}, "
                                                 f"removed {removed[:20]}, changed {changed[:20]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend, for the lifetime of a `with` block."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.workdir / 'server.db'}",
             "--default-artifact-root", str(self.workdir / "artifacts"), "--workers", "1"],
            cwd=self.workdir, env=env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no job-runner processes
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "server.log", "w"),
            start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    import urllib.request
                    urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {(self.workdir / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start in 90 s")

    def __exit__(self, *exc):
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)


def mlflow_runs(uri: str, experiment: str = "augself"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "group_run" not in r.data.tags]   # model runs, not their groups' parent runs


def stages_run(output: str) -> set[str]:
    """The DVC stages a `dvc repro` / `dvc exp run` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def sqlite_uri(project: Path) -> str:
    return f"sqlite:///{project / 'mlflow.db'}"


def by_variant_lambda(runs) -> dict[tuple[str, float], list]:
    out: dict = {}
    for r in runs:
        out.setdefault((r.data.tags["variant"], float(r.data.tags["lambda"])), []).append(r)
    return out
