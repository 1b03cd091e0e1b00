"""The study (docs/study.md, study.yaml): python -m stages.study {plan,run,export,report} [--jobs 2]

plan    every model of study.yaml, done (in reports/study/runs/) or not, and the DVC experiments left
run     export what MLflow already holds, queue the missing models as `dvc exp run --queue`
        experiments, run the queue, export each model as it finishes, then build reports/study/
export  copy finished models from MLflow into the ledger (reports/study/runs/)
report  rebuild the study's report from the ledger (study.yaml's report_dir: reports/study/; a study with
        `report: premise`, e.g. study-premise.yaml, builds the per-method premise report instead)
power   the confirmatory study's power from the ledger's paired hue Δ (pipeline/study/power.py): prints
        the seeds per method for each target and the power table, writes reports/study/power.json

Resumable: killed at any point, `make study` (= run) continues from what the ledger and MLflow hold.
"""

import argparse
import subprocess
import sys
import time

from pipeline.study.ledger import done, export_finished
from pipeline.config import ConfigError
from pipeline.study.plan import (dvc_queue_command, experiments_for, load_study, parse_queue_status, parse_shard,
                                 shard_models)
from pipeline.study.report import build as build_study


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


def _queue_busy() -> bool:
    return bool(_queue_status()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("plan", "run", "export", "report", "power"))
    ap.add_argument("--study", default="study.yaml")
    ap.add_argument("--jobs", type=int, default=2, help="dvc queue workers (each pinned to one CPU thread)")
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="this machine's share of the plan: machine I of N trains only its whole experiments "
                         "(a stable split of the full plan; results meet in the shared MLflow server)")
    a = ap.parse_args()
    if a.action == "power":                       # reads the ledger only: trains and plans nothing
        from pathlib import Path

        from pipeline.study.ledger import LEDGER
        from pipeline.study.power import main as power

        power(LEDGER, Path("reports/study/power.json"))
        return 0
    study = load_study(a.study)
    models = study.models()
    if a.shard:
        try:
            models = shard_models(models, parse_shard(a.shard))
        except ConfigError as e:
            ap.error(str(e))                      # one line, exit code 2, before any compute
    if a.action in ("run", "export"):
        print(f"[study] exported {len(export_finished(study, models))} finished model(s) from MLflow")
    finished = done()
    missing = [k for k in models if k.name not in finished]
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
            time.sleep(30)
            _keep_workers(a.jobs)
            new = export_finished(study, missing)
            if new:
                print(f"[study] finished: {', '.join(new)}", flush=True)
        export_finished(study, missing)
        left = [k.name for k in models if k.name not in done()]
        if left:
            print(f"[study] {len(left)} model(s) did not finish (see `dvc queue status`, `dvc queue logs`); "
                  f"run `make study` again to retry them", file=sys.stderr)
    print(build(study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
