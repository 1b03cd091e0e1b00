"""The study (docs/study.md, study.yaml): python -m stages.study {plan,run,export,gather,report,power} [--jobs 2]

plan    every model of study.yaml, done (in reports/study/runs/) or not, and the DVC experiments left
run     export what MLflow already holds, queue the missing models as `dvc exp run --queue`
        experiments, run the queue, export each model as it finishes, then build reports/study/
        (--shard I/N: this machine's share; --push REMOTE: `dvc exp push REMOTE` each finished experiment,
        and skip the models of the experiments already on REMOTE)
export  copy finished models from MLflow into the ledger (reports/study/runs/)
gather  (--from REMOTE: `dvc exp pull` the study's experiments from the git remote REMOTE, outputs from the
        DVC remote) export every finished model from MLflow into the ledger, rebuild the study's report
report  rebuild the study's report from the ledger (study.yaml's report_dir: reports/study/; a study with
        `report: premise`, e.g. study-premise.yaml, builds the per-method premise report instead)
power   the confirmatory study's power from the paired hue Δ of --study's models (pipeline/study/power.py): prints
        the seeds per method for each target and the power table, writes reports/study/power.json

A model is skipped when it is done anywhere: in the ledger, in an experiment this clone holds (its own or
pulled), on the --push remote, or finished in the MLflow store (pipeline/study/share.py).

Resumable: killed at any point, `make study` (= run) continues from what the ledger and MLflow hold.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.study.ledger import done, export_finished
from pipeline.config import ConfigError
from pipeline.study.plan import (dvc_queue_command, experiments_for, load_study, parse_queue_status, parse_shard,
                                 shard_models)
from pipeline.study.report import build as build_study
from pipeline.study.share import models_in_experiments, pull, push_unpushed, study_experiments


def build(study):
    """The report the study names (``report:`` in its file) into its ``report_dir``."""
    from pathlib import Path

    if study.report == "premise":
        from pipeline.study.premise_report import build as build_premise

        return build_premise(study, Path(study.report_dir))
    return build_study(study, Path(study.report_dir))


def _queue_status() -> tuple[dict[str, str], int]:
    return parse_queue_status(subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True).stdout)


def _keep_workers(jobs: int) -> None:
    """Bring the queue back to ``jobs`` workers while tasks wait (a worker can exit, e.g. when it saw an
    empty queue during a re-queue; `dvc queue start -j N` tops the pool up to N)."""
    tasks, workers = _queue_status()
    if workers < jobs and "Queued" in tasks.values():
        subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _clear_stale_tasks() -> None:
    """Forget tasks that `dvc queue status` still calls Running while no worker is alive: they were left
    by a machine or worker that stopped (seen at the start of session 6), and a rerun would otherwise skip
    them as running and wait on them for ever. `dvc queue kill -f` clears such an entry."""
    tasks, workers = _queue_status()
    stale = [name for name, state in tasks.items() if state == "Running"]
    if stale and workers == 0:
        print(f"[study] no queue worker is alive; clearing stale running task(s): {', '.join(stale)}", flush=True)
        subprocess.run(["dvc", "queue", "kill", "-f", *stale], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _report_pushed(names: list[str], remote: str) -> None:
    if names:
        print(f"[study] pushed to {remote}: {', '.join(names)}", flush=True)


def _queue_busy() -> bool:
    return bool(_queue_status()[0])


def put_this_interpreter_first_on_path() -> None:
    """`.venv/bin/python -m stages.study run` works without an activated environment: the `dvc` it calls, and
    the `python` of every queued stage (dvc.yaml's cmd), are this interpreter's, not whatever PATH holds."""
    here = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != here:
        os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])


def main() -> int:
    put_this_interpreter_first_on_path()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("plan", "run", "export", "gather", "report", "power"))
    ap.add_argument("--study", default="study.yaml")
    ap.add_argument("--jobs", type=int, default=2, help="dvc queue workers (each pinned to one CPU thread)")
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="this machine's share of the plan: machine I of N trains only its whole experiments "
                         "(a stable split of the full plan; results meet in the shared MLflow server)")
    ap.add_argument("--push", default=None, metavar="REMOTE",
                    help="run: `dvc exp push REMOTE` every experiment as it finishes (its ref to the git remote, its "
                         "outputs to the default DVC remote), and skip the models of experiments already there")
    ap.add_argument("--from", dest="from_remote", default=None, metavar="REMOTE",
                    help="gather: `dvc exp pull REMOTE` the study's experiments first (git remote name or URL)")
    ap.add_argument("--poll", type=float, default=30.0, metavar="SECONDS",
                    help="run: seconds between looks at the queue (export, push)")
    a = ap.parse_args()
    if a.push and a.action != "run":
        ap.error("--push REMOTE goes with `run` (gather reads a remote with --from REMOTE)")
    if a.from_remote and a.action != "gather":
        ap.error("--from REMOTE goes with `gather` (run pushes with --push REMOTE)")
    if a.action == "power":                       # reads the ledger only: trains and plans nothing
        from pathlib import Path

        from pipeline.study.ledger import LEDGER
        from pipeline.study.power import main as power

        power(LEDGER, Path("reports/study/power.json"), {k.name for k in load_study(a.study).models()})
        return 0
    study = load_study(a.study)
    models = study.models()
    if a.shard:
        try:
            models = shard_models(models, parse_shard(a.shard))
        except ConfigError as e:
            ap.error(str(e))                      # one line, exit code 2, before any compute
    remote = a.push or a.from_remote
    pushed: set[str] = set()
    if remote:
        try:
            pushed = study_experiments(remote)
        except ConfigError as e:
            ap.error(str(e))
        # run: the refs are enough to know what is done; gather: the outputs too (models, features)
        got = (pull(remote, pushed) if a.action == "gather" else
               pull(remote, pushed - study_experiments(), cache=False))
        print(f"[study] {len(pushed)} study experiment(s) on {remote}; pulled {len(got)}", flush=True)
    if a.action in ("run", "export", "gather"):
        print(f"[study] exported {len(export_finished(study, models))} finished model(s) from MLflow")
    finished = done()
    elsewhere = {n: ref for n, ref in models_in_experiments(study, models).items() if n not in finished}
    for name, ref in sorted(elsewhere.items()):
        print(f"[study] {name}: done in experiment {ref.rsplit('/', 1)[-1]}, not in the ledger yet "
              f"(exported once its MLflow run is readable); not trained again", flush=True)
    missing = [k for k in models if k.name not in finished and k.name not in elsewhere]
    experiments = study.queue_order(experiments_for(missing))
    if a.action == "plan":
        for k in models:
            print(f"{'done   ' if k.name in finished else 'missing'} {k.name}  ({', '.join(study.block_of(k))})")
        print(f"[study] {len(models) - len(missing)}/{len(models)} done; {len(experiments)} experiment(s) left, "
              f"≈ {sum(study.minutes(k) for k in missing):.0f} min ({sum(study.minutes(k) for k in missing) / 60:.1f} h) "
              f"at {', '.join(sorted({f'{study.minutes(k):g}' for k in missing}, key=float)) or study.minutes_per_model} "
              f"min per model, one worker")
        for e in experiments:
            print("  " + " ".join(dvc_queue_command(e, study.overrides)))
        return 0
    if a.action == "run" and experiments:
        # Re-queue what waits (so it runs the current workspace); leave what a worker already runs (a
        # `make study` whose own process was killed while its workers went on) and add only the workers missing.
        subprocess.run(["dvc", "queue", "remove", "--queued"], check=False)
        _clear_stale_tasks()
        running, _ = _queue_status()
        for e in experiments:
            if running.get(e.name) == "Running":
                print(f"[study] {e.name} is running already; not queued again", flush=True)
                continue
            cmd = dvc_queue_command(e, {**study.overrides, "ssl.threads": 1 if a.jobs > 1 else 0})
            print("[study] " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        _keep_workers(a.jobs)
        while _queue_busy():
            time.sleep(a.poll)
            _keep_workers(a.jobs)
            new = export_finished(study, missing)
            if new:
                print(f"[study] finished: {', '.join(new)}", flush=True)
            if a.push:
                _report_pushed(push_unpushed(a.push, pushed), a.push)
        export_finished(study, missing)
    if a.action == "run" and a.push:
        _report_pushed(push_unpushed(a.push, pushed), a.push)     # the last ones, and any left by a killed run
    if a.action == "run" and experiments:
        left = [k.name for k in models if k.name not in done()]
        if left:
            print(f"[study] {len(left)} model(s) did not finish (see `dvc queue status`, `dvc queue logs`); "
                  f"run `make study` again to retry them", file=sys.stderr)
    print(build(study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
