"""The study (docs/study.md, study.yaml): python -m stages.study {plan,run,export,gather,report,walltime,power} [--jobs 2]

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
walltime  how long --study's models took on the clock: the union of their MLflow runs (every attempt, start to
        last logged metric), so the time between sessions does not count (pipeline/study/wall_time.py)
power   the confirmatory study's power from the paired hue Δ of --study's models (pipeline/study/power.py): prints
        the seeds per method for each target and the power table, writes reports/study/power.json

A model is skipped when it is done anywhere: in the ledger, in an experiment this clone holds (its own or
pulled), on the --push remote, or finished in the MLflow store (pipeline/study/share.py).

Resumable: killed at any point, `make study` (= run) continues from what the ledger and MLflow hold.
"""

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.study.plan import load_study, parse_shard, shard_models
from pipeline.study.queue import put_this_interpreter_first_on_path
from pipeline.study.runner import run
from pipeline.study.share import study_experiments


def main() -> int:
    put_this_interpreter_first_on_path()
    if not sys.stderr.isatty():      # a log file (the study runs for hours under nohup): no MLflow download bars
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("plan", "run", "export", "gather", "report", "walltime", "power"))
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
    # Each look costs ≈ 5-8 s of CPU (`dvc queue status`, the MLflow export) taken from the workers: every 30 s
    # that was 17 % of a core of the 2-core machine (session 11); every 120 s it is ≈ 4 %.
    ap.add_argument("--poll", type=float, default=120.0, metavar="SECONDS",
                    help="run: seconds between looks at the queue (export, push)")
    a = ap.parse_args()
    if a.push and a.action != "run":
        ap.error("--push REMOTE goes with `run` (gather reads a remote with --from REMOTE)")
    if a.from_remote and a.action != "gather":
        ap.error("--from REMOTE goes with `gather` (run pushes with --push REMOTE)")
    if a.action == "power":                       # reads the ledger only: trains and plans nothing
        from pipeline.study.ledger import LEDGER
        from pipeline.study.power import main as power

        power(LEDGER, Path("reports/study/power.json"), {k.name for k in load_study(a.study).models()})
        return 0
    study = load_study(a.study)
    if a.action == "walltime":                    # reads the ledger and the tracking store only
        from pipeline.study.wall_time import study_wall_time

        w = study_wall_time(study)
        print(f"{study.name}: {w['models']} models in the ledger, {w['runs']} MLflow runs (every attempt); wall time "
              f"{w['hours']:.2f} h (the union of the runs, start to last logged metric), {w['first']} → {w['last']}")
        return 0
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
    return run(a.action, study, models, jobs=a.jobs, push=a.push, remote=remote, pushed=pushed, poll=a.poll)


if __name__ == "__main__":
    raise SystemExit(main())
