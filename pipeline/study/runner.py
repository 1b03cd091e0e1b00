"""The study's actions (``python -m stages.study``, docs/study.md): plan, run, export, gather, report.

:func:`run` does one action over the planned models: it pulls the study's experiments from a remote
(``gather``, ``run --push``), exports what MLflow already holds into the ledger, finds the models done
nowhere (:mod:`pipeline.study.share`), then prints the plan, or queues and runs those models
(:mod:`pipeline.study.queue`), exporting and pushing each as it finishes, and builds the study's report
(:func:`build`).  Resumable: killed at any point, a rerun continues from what the ledger and MLflow hold.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.study.ledger import done, export_finished
from pipeline.study.plan import Experiment, ModelKey, Study, dvc_queue_command, experiments_for
from pipeline.study.queue import keep_workers, queue_experiments, queue_status
from pipeline.study.report import build as build_study
from pipeline.study.share import models_in_experiments, pull, push_unpushed, study_experiments


def build(study: Study):
    """The report the study names (``report:`` in its file) into its ``report_dir``."""
    if study.report == "premise":
        from pipeline.study.premise_report import build as build_premise

        return build_premise(study, Path(study.report_dir))
    return build_study(study, Path(study.report_dir))


def run(action: str, study: Study, models: list[ModelKey], *, jobs: int = 2, push: str | None = None,
        remote: str | None = None, pushed: set[str] | None = None, poll: float = 120.0) -> int:
    """One action (``plan``, ``run``, ``export``, ``gather``, ``report``) over ``models`` (the study's, or this
    machine's shard of them).  ``remote`` is the git remote of ``--push`` / ``--from`` and ``pushed`` the
    study's experiments already there (:func:`pipeline.study.share.study_experiments`; updated in place as
    ``run`` pushes); ``jobs`` queue workers; ``poll`` seconds between looks at the queue.  Returns the exit code."""
    pushed = set() if pushed is None else pushed
    if remote:
        # run: the refs are enough to know what is done; gather: the outputs too (models, features)
        got = (pull(remote, pushed) if action == "gather" else
               pull(remote, pushed - study_experiments(), cache=False))
        print(f"[study] {len(pushed)} study experiment(s) on {remote}; pulled {len(got)}", flush=True)
    if action in ("run", "export", "gather"):
        print(f"[study] exported {len(export_finished(study, models))} finished model(s) from MLflow")
    finished = done()
    elsewhere = {n: ref for n, ref in models_in_experiments(study, models).items() if n not in finished}
    for name, ref in sorted(elsewhere.items()):
        print(f"[study] {name}: done in experiment {ref.rsplit('/', 1)[-1]}, not in the ledger yet "
              f"(exported once its MLflow run is readable); not trained again", flush=True)
    missing = [k for k in models if k.name not in finished and k.name not in elsewhere]
    experiments = study.queue_order(experiments_for(missing))
    if action == "plan":
        _print_plan(study, models, finished, missing, experiments)
        return 0
    if action == "run" and experiments:
        _train(study, experiments, missing, jobs, push, pushed, poll)
    if action == "run" and push:
        _report_pushed(push_unpushed(push, pushed), push)     # the last ones, and any left by a killed run
    if action == "run" and experiments:
        left = [k.name for k in models if k.name not in done()]
        if left:
            print(f"[study] {len(left)} model(s) did not finish (see `dvc queue status`, `dvc queue logs`); "
                  f"run `make study` again to retry them", file=sys.stderr)
    print(build(study))
    return 0


def _print_plan(study: Study, models: list[ModelKey], finished: set[str], missing: list[ModelKey],
                experiments: list[Experiment]) -> None:
    for k in models:
        print(f"{'done   ' if k.name in finished else 'missing'} {k.name}  ({', '.join(study.block_of(k))})")
    print(f"[study] {len(models) - len(missing)}/{len(models)} done; {len(experiments)} experiment(s) left, "
          f"≈ {sum(study.minutes(k) for k in missing):.0f} min ({sum(study.minutes(k) for k in missing) / 60:.1f} h) "
          f"at {', '.join(sorted({f'{study.minutes(k):g}' for k in missing}, key=float)) or study.minutes_per_model} "
          f"min per model, one worker")
    for e in experiments:
        print("  " + " ".join(dvc_queue_command(e, study.overrides)))


def _train(study: Study, experiments: list[Experiment], missing: list[ModelKey], jobs: int, push: str | None,
           pushed: set[str], poll: float) -> None:
    """Queue ``experiments`` and wait on the queue, exporting (and pushing) each model as it finishes."""
    queue_experiments(experiments, study.overrides, jobs)
    while True:
        status = queue_status()              # once a look: `dvc queue status` takes CPU from the workers
        if not status[0]:
            break
        keep_workers(jobs, status)
        time.sleep(poll)
        new = export_finished(study, missing)
        if new:
            print(f"[study] finished: {', '.join(new)}", flush=True)
        if push:
            _report_pushed(push_unpushed(push, pushed), push)
    export_finished(study, missing)


def _report_pushed(names: list[str], remote: str) -> None:
    if names:
        print(f"[study] pushed to {remote}: {', '.join(names)}", flush=True)
