"""The DVC queue the study runner drives: ``dvc queue status / start / kill / remove`` and ``dvc exp run
--queue``.  DVC's workers run the queued experiments; this module only reads the queue's state and tops it
up (no scheduler, no state of its own).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.study.plan import Experiment, dvc_queue_command, parse_queue_status

EXPERIMENT_WORKSPACES = ".dvc/tmp/exps"            # where `dvc exp run --queue` makes each experiment's workspace
CHECKPOINT_POOL = ".dvc/tmp/checkpoint-pool"       # machine-local, beside them
POOL_ENV = "AUGSELF_CHECKPOINT_POOL"   # pipeline.checkpoint_pool.POOL_ENV (not imported here: it imports torch)


def put_this_interpreter_first_on_path() -> None:
    """`.venv/bin/python -m stages.study run` works without an activated environment: the `dvc` it calls, and
    the `python` of every queued stage (dvc.yaml's cmd), are this interpreter's, not whatever PATH holds."""
    here = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != here:
        os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])


def queue_status() -> tuple[dict[str, str], int]:
    """({task name: Queued / Running} of the tasks not finished, live workers): the tasks of `dvc queue
    status`; the workers, the larger of its count and :func:`worker_processes` (its count misses a busy one)."""
    tasks, workers = parse_queue_status(subprocess.run(["dvc", "queue", "status"], capture_output=True,
                                                       text=True).stdout)
    return tasks, max(workers, len(worker_processes()))


def worker_processes() -> list[int]:
    """The pids of this repository's DVC queue workers (`dvc exp queue-worker dvc-exp-<hash>-<n>@localhost`,
    ``<hash>`` from DVC's celery folder ``.dvc/tmp/exps/celery``), read from the process table.

    `dvc queue status` counts the workers that answer celery's broadcast within its timeout (1 s), and a
    worker busy on a loaded 2-core machine can miss it: in session 12 the runner, told 1 worker of 2,
    ran `dvc queue start -j 2`, whose own check missed the same worker and started a second one of its name,
    so three experiments shared two cores.  Counted that way, a salvage could also take live workers for
    dead ones (:func:`clear_stale_tasks`)."""
    import hashlib

    import psutil

    celery_dir = str(Path(EXPERIMENT_WORKSPACES, "celery").resolve())
    prefix = f"dvc-exp-{hashlib.sha256(celery_dir.encode()).hexdigest()[:6]}-"
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "queue-worker" in cmd and any(a.startswith(prefix) and a.endswith("@localhost") for a in cmd):
            pids.append(proc.pid)
    return pids


def keep_workers(jobs: int, status: tuple[dict[str, str], int] | None = None) -> None:
    """Bring the queue back to ``jobs`` workers while tasks wait (a worker can exit, e.g. when it saw an
    empty queue during a re-queue; `dvc queue start -j N` tops the pool up to N).  ``status``: a
    :func:`queue_status` just read (each `dvc queue status` costs ≈ 3.6 s of CPU, beside the study's workers)."""
    tasks, workers = queue_status() if status is None else status
    if workers < jobs and "Queued" in tasks.values():
        subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], check=False, env=worker_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def checkpoint_pool() -> Path:
    """Where this project's salvaged checkpoints go (pipeline.checkpoint_pool); ``$AUGSELF_CHECKPOINT_POOL``
    when set."""
    return Path(os.environ.get(POOL_ENV) or Path(CHECKPOINT_POOL).resolve())


def worker_env() -> dict[str, str]:
    """The environment of the queue workers: this one, with the checkpoint pool named, so the pretrain stages
    they run adopt what :func:`salvage_interrupted` saved."""
    return {**os.environ, POOL_ENV: str(checkpoint_pool())}


def salvage_interrupted() -> None:
    """Save the checkpoints that interrupted experiments' workspaces hold into the pool, so their models
    resume where they stopped when they are queued again, and end those experiments' MLflow runs that still
    say RUNNING as KILLED (their process died with the worker; a resumed model sets its run back to RUNNING).
    Only while no worker is alive."""
    from pipeline.checkpoint_pool import salvage   # imports torch: only when there is something to salvage

    salvage(EXPERIMENT_WORKSPACES, checkpoint_pool())
    end_interrupted_runs(EXPERIMENT_WORKSPACES)


def end_interrupted_runs(workspaces: str | Path) -> list[str]:
    """Set KILLED each MLflow run that a model of ``workspaces/tmp*`` logs to and that is still RUNNING;
    returns their ids.  Runs of other machines sharing the tracking server are never touched: only the run
    ids written in this repository's own interrupted workspaces are read."""
    from pipeline.study.wall_time import last_activity
    from pipeline.tracking import RUN_ID_FILE, tracking_uri

    run_ids = sorted({text for f in Path(workspaces).glob(f"tmp*/models/*/{RUN_ID_FILE}")
                      if (text := f.read_text().strip())})
    if not run_ids:
        return []
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client, ended = MlflowClient(tracking_uri=tracking_uri()), []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
            if run.info.status == "RUNNING":     # ended when it last logged, not now: the gap since is no run time
                client.set_terminated(run_id, status="KILLED", end_time=last_activity(client, run))
                ended.append(run_id)
                print(f"[study] MLflow run {run_id} ({run.info.run_name}) was interrupted: set KILLED", flush=True)
        except MlflowException as e:      # another store's run, or the store unreachable: the study goes on
            print(f"[study] could not end MLflow run {run_id}: {str(e).splitlines()[0][:200]}", flush=True)
    return ended


def clear_stale_tasks() -> None:
    """Forget tasks that `dvc queue status` still calls Running while no worker is alive: they were left
    by a machine or worker that stopped (seen at the start of session 6), and a rerun would otherwise skip
    them as running and wait on them for ever. `dvc queue kill -f` clears such an entry.  Their models'
    checkpoints are salvaged first (:func:`salvage_interrupted`) and their workspaces deleted last
    (:func:`remove_interrupted_workspaces`).  With a live worker nothing is touched: its task is running and
    its workspace in use."""
    tasks, workers = queue_status()
    if workers > 0:
        return
    salvage_interrupted()
    stale = [name for name, state in tasks.items() if state == "Running"]
    if stale:
        print(f"[study] no queue worker is alive; clearing stale running task(s): {', '.join(stale)}", flush=True)
        subprocess.run(["dvc", "queue", "kill", "-f", *stale], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    remove_interrupted_workspaces()


def remove_interrupted_workspaces() -> None:
    """Delete the workspaces interrupted experiments left (``.dvc/tmp/exps/tmp*``), once salvaged: DVC deletes
    an experiment's workspace when the experiment ends and never reuses one, so those of dead workers only
    fill the disk (≈ 75–110 MB each) and would be salvaged again at every restart.  Checked again just before:
    only while no worker is alive."""
    workspaces = sorted(Path(EXPERIMENT_WORKSPACES).glob("tmp*"))
    if not workspaces or queue_status()[1] > 0:
        return
    for d in workspaces:
        shutil.rmtree(d, ignore_errors=True)
    print(f"[study] removed {len(workspaces)} interrupted experiment workspace(s) under {EXPERIMENT_WORKSPACES}",
          flush=True)


def queue_experiments(experiments: list[Experiment], overrides: dict, jobs: int) -> None:
    """Queue ``experiments`` (each pinned to one CPU thread when ``jobs`` > 1) and start ``jobs`` workers.

    What waits is re-queued, so it runs the current workspace; what a worker already runs (a `make study`
    whose own process was killed while its workers went on) is left alone, and only the workers missing
    are added."""
    subprocess.run(["dvc", "queue", "remove", "--queued"], check=False)
    clear_stale_tasks()
    running, _ = queue_status()
    for e in experiments:
        if running.get(e.name) == "Running":
            print(f"[study] {e.name} is running already; not queued again", flush=True)
            continue
        cmd = dvc_queue_command(e, {**overrides, "ssl.threads": 1 if jobs > 1 else 0})
        print("[study] " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    keep_workers(jobs)
