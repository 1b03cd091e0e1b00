"""Where a queued study experiment's wall time goes (issue 23 item 2).

Builds a throw-away project from this checkout (tracked + untracked-not-ignored files, no outputs),
prepares its data in the parent (`dvc repro validate`: prepare@* and validate, committed), then queues
ONE study experiment exactly as `stages.study run` does (`pipeline.study.plan.dvc_queue_command`: one
method, variants baseline + augself, `ssl.threads=1`, the study's `-S` overrides) and runs it with one
queue worker (`dvc queue start -j 1`).  Every stage process appends its timestamps to a log
(`pipeline.cli.STAGE_LOG_ENV`: process start from /proc, entry point, end of work, atexit), the temp
workspace's appearance and removal under `.dvc/tmp/exps/` are polled, and after the experiment the
ledger export (`pipeline.study.ledger.export_finished`) is timed in this process.  Stage work is split
further from cProfile (`--profile`): MLflow calls (pipeline.tracking.Tracker), the LoggedModel export,
the pretraining loop and its kNN monitor.

    python bench/bench_overhead.py --epochs 1                       # the table, JSON to bench/results/
    python bench/bench_overhead.py --epochs 1 --profile --keep /tmp/ovh   # + cProfile split, keep the project

``--epochs`` shrinks pretraining only (the study trains 5); every other part (data, evaluation, DVC,
MLflow, imports) is what a study model pays.  Pretraining seconds at 5 epochs come from the ledger
(`reports/study/runs/*.json`, ``pretrain/wall_time_s``) when ``--ledger-pretrain`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUTPUTS = ("reports/", "bench/results/", "data/", "models/", "features/", "metrics/", "dvc.lock", "mlflow.db",
           "params.valid")
VENV_BIN = Path(sys.executable).parent


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}:{e['PATH']}"
    e["PYTHONUNBUFFERED"] = "1"
    e["CUDA_VISIBLE_DEVICES"] = ""
    for k in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "PYTHONPATH"):
        e.pop(k, None)
    e.update(extra)
    return e


def sh(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def make_project(dest: Path) -> Path:
    files = sh(["git", "ls-files", "-co", "--exclude-standard"], ROOT).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(OUTPUTS) and not f.startswith(".venv"):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    sh(["git", "init", "-q"], dest)
    sh(["git", "add", "-A"], dest)
    sh([*git, "commit", "-qm", "bench project"], dest)
    return dest


# (file, function) whose cumulative seconds the profile split reports, per stage process.  Nested ones
# overlap (log_metrics is called inside pretrain through on_log): the docs' table composes them by hand.
PROFILED = {
    "pretrain": ("pipeline/train.py", "pretrain_request"),
    "train_setup": ("pipeline/train.py", "_setup"),
    "train_place": ("pipeline/train.py", "_place"),
    "train_finish": ("pipeline/run_state.py", "finish"),
    "checkpoints": ("pipeline/run_state.py", "save_checkpoint"),
    "knn_monitor": ("pipeline/train.py", "_monitor"),
    "pretrain_images": ("pipeline/data/prepared.py", "pretrain_images"),
    "monitor_data": ("pipeline/workflow.py", "monitor_data"),
    "mlflow_start_run": ("pipeline/tracking.py", "start_model_run"),
    "mlflow_log_metrics": ("pipeline/tracking.py", "log_metrics"),
    "mlflow_log_datasets": ("pipeline/tracking.py", "log_datasets"),
    "mlflow_system_metrics": ("pipeline/tracking.py", "start_system_metrics"),
    "mlflow_end_run": ("pipeline/tracking.py", "end_run"),
    "mlflow_log_artifact": ("pipeline/tracking.py", "log_artifact"),
    "mlflow_logged_model": ("pipeline/tracking.py", "log_backbone"),
    "mlflow_eval_logging": ("pipeline/workflow.py", "_log_to_model_run"),
    "load_backbone": ("pipeline/workflow.py", "_load_model"),
    "load_features": ("pipeline/workflow.py", "_features"),
    "extract_features": ("pipeline/evaluate/features.py", "extract_features"),
    "linear_probe": ("pipeline/evaluate/linear.py", "linear_probe"),
    "fewshot_eval": ("pipeline/evaluate/fewshot.py", "fewshot_eval"),
    "augmentation_probe": ("pipeline/evaluate/probe.py", "augmentation_probe"),
    "write_items": ("pipeline/workflow.py", "_write_items"),
    "check_fewshot_feasible": ("pipeline/evaluate/tasks.py", "check_fewshot_feasible"),
    "collect_results": ("pipeline/results.py", "collect_results"),
    "build_report": ("pipeline/report/__init__.py", "build_report"),
}


def profile_split(prof_dir: Path) -> dict[str, dict[str, float]]:
    """Per stage process (profile file): cumulative seconds of each PROFILED function it called."""
    out = {}
    for f in sorted(prof_dir.glob("*.prof")):
        st = pstats.Stats(str(f))
        split: dict[str, float] = {}
        for (path, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
            for key, (where, name) in PROFILED.items():
                if path.endswith(where) and func == name:
                    split[key] = split.get(key, 0.0) + ct
        out[f.stem] = {k: round(v, 2) for k, v in split.items()}
    return out


def stage_rows(stage_log: Path) -> tuple[list[dict], list[dict]]:
    """The stage records of a stage log in start order, and one timing row per stage process."""
    records = [json.loads(line) for line in stage_log.read_text().splitlines()]
    records.sort(key=lambda r: r["t_process"])
    rows, prev_end = [], None
    for r in records:
        name = " ".join(r["argv"][:1] + [x for x in r["argv"][1:] if not x.startswith("--")])
        rows.append({"stage": name, "profile": "-".join([*r["argv"], str(r["pid"])]).replace("/", "_"),
                     "gap_before_s": round(r["t_process"] - prev_end, 2) if prev_end else None,
                     "start_imports_s": round(r["t_main"] - r["t_process"], 2),
                     "params_s": round(r["t_work"] - r["t_main"], 2),
                     "work_s": round(r["t_work_end"] - r["t_work"], 2),
                     "atexit_s": round(r["t_exit"] - r["t_work_end"], 2)})
        prev_end = r["t_exit"]
    return records, rows


def from_log(stage_log: Path, prof_dir: Path, epochs: int, load: float, only: list[str] | None = None) -> dict:
    """A result from a stage log (and its profiles) alone: an experiment cut short, or whose queue
    timings were not taken.  Queue set-up, the time after the last stage and the ledger export are
    absent (0 in the table), so its total covers the stages that ran."""
    _, rows = stage_rows(stage_log)
    if only is not None:
        rows = [r for r in rows if r["stage"] in only]
    summary = {"until_workspace_s": 0.0, "workspace_to_first_stage_s": 0.0, "after_last_stage_s": 0.0,
               "ledger_export_s": 0.0, "experiment_wall_s": 0.0,
               "between_stages_s": sum(r["gap_before_s"] or 0.0 for r in rows),
               **{k: sum(r[k] for r in rows) for k in ("start_imports_s", "params_s", "work_s", "atexit_s")}}
    return {"label": "", "partial": [r["stage"] for r in rows], "summary": summary, "stages": rows,
            "profile": profile_split(prof_dir) if prof_dir.exists() else {},
            "experiment": {"epochs": epochs}, "machine": {"load_before": [load]}}


def _p(prof: dict, *keys: str) -> float:
    return sum(prof.get(k, 0.0) for k in keys)


MLFLOW_PRETRAIN = ("mlflow_start_run", "mlflow_log_metrics", "mlflow_log_datasets", "mlflow_system_metrics",
                   "mlflow_end_run", "mlflow_log_artifact")


def breakdown(result: dict) -> dict[str, float]:
    """Seconds of one experiment by part, from the stage timestamps and (for the work) the profiles.

    Parts of a stage's work that no profiled function covers go to ``other work`` (file writes, data
    loading, argument checks).  ``pretraining`` is the training loop: the ``pretrain`` function less its
    set-up, placement, finish, checkpoints, kNN monitor and in-loop MLflow logging (all of
    ``log_metrics`` is taken out, a few ms of it the summary after the loop)."""
    s, prof = result["summary"], result.get("profile", {})
    parts: dict[str, float] = {
        "queue + temp workspace set-up": s["until_workspace_s"] + s["workspace_to_first_stage_s"],
        "DVC between stages (+ interpreter exit)": s["between_stages_s"],
        "DVC after the last stage (exp commit, clean-up)": s["after_last_stage_s"],
        "python start + imports + params": s["start_imports_s"] + s["params_s"],
        "exit: waiting for threads": s["atexit_s"],
    }

    def add(key: str, v: float) -> None:
        parts[key] = parts.get(key, 0.0) + v

    for row in result["stages"]:
        pr = prof.get(row.get("profile", "")) or next(
            (v for k, v in prof.items() if k.startswith(row["stage"].replace(" ", "-") + "-")), {})
        work, kind = row["work_s"], row["stage"].split()[0]
        if kind == "pretrain":
            loop = _p(pr, "pretrain") - _p(pr, "train_setup", "train_place", "train_finish", "checkpoints",
                                           "knn_monitor", "mlflow_log_metrics")
            covered = {"pretraining (training loop)": loop, "kNN monitor (in pretraining)": _p(pr, "knn_monitor"),
                       "checkpoints (in pretraining)": _p(pr, "checkpoints"),
                       "pretrain set-up/finish (data, model, final.pt)":
                           _p(pr, "train_setup", "train_place", "train_finish", "pretrain_images", "monitor_data"),
                       "MLflow: run, metrics, datasets, artifacts": _p(pr, *MLFLOW_PRETRAIN),
                       "MLflow: LoggedModel export": _p(pr, "mlflow_logged_model")}
        elif kind == "evaluate":
            step = row["stage"].split()[1]
            fit = {"features": "extract_features", "linear": "linear_probe", "fewshot": "fewshot_eval",
                   "probe": "augmentation_probe"}[step]
            covered = {f"{step}: {fit}": _p(pr, fit),
                       "MLflow: evaluation logging": _p(pr, "mlflow_eval_logging"),
                       "loading features / backbone": _p(pr, "load_features", "load_backbone")}
        else:
            covered = {f"{kind} stage": work}
        for k, v in covered.items():
            add(k, v)
        if pr or kind in ("pretrain", "evaluate"):
            add("other work", work - sum(covered.values()))
    add("ledger export", s["ledger_export_s"])
    return {k: round(v, 1) for k, v in parts.items()}


PRETRAINING = ("pretraining (training loop)",)


def print_table(results: dict[str, dict], models: int = 2, markdown: bool = False) -> None:
    """Per model (an experiment trains ``models``), every labelled measurement side by side."""
    labels = list(results)
    bds = {lab: breakdown(results[lab]) for lab in labels}
    keys = list(dict.fromkeys(k for lab in labels for k in bds[lab]))
    totals = {lab: sum(bds[lab].values()) for lab in labels}
    share = {lab: sum(bds[lab].get(k, 0.0) for k in PRETRAINING) / totals[lab] for lab in labels}
    rows = [(k, [f"{bds[lab].get(k, 0.0) / models:.1f}" for lab in labels]) for k in keys]
    rows += [("**total (sum of parts)**", [f"**{totals[lab] / models:.1f}**" for lab in labels]),
             ("experiment wall / models", [f"{results[lab]['summary']['experiment_wall_s'] / models:.1f}"
                                           for lab in labels]),
             ("**pretraining share**", [f"**{100 * share[lab]:.1f} %**" for lab in labels]),
             ("epochs / load average at start", [f"{results[lab]['experiment']['epochs']} / "
                                                 f"{results[lab]['machine']['load_before'][0]:.1f}" for lab in labels])]
    if markdown:
        print("| seconds per model | " + " | ".join(labels) + " |")
        print("|---|" + "---:|" * len(labels))
        for k, vals in rows:
            print(f"| {k} | " + " | ".join(vals) + " |")
        return
    print(f"{'seconds per model':50s}" + "".join(f" {lab[:22]:>22s}" for lab in labels))
    for k, vals in rows:
        print(f"{k.replace('**', ''):50s}" + "".join(f" {v.replace('**', ''):>22s}" for v in vals))


def import_times(project: Path) -> dict[str, dict[str, float]]:
    """`python -X importtime -c 'import stages.<x>'`: the whole import and the top packages in it (s)."""
    res = {}
    for mod in ("validate", "pretrain", "evaluate", "report"):
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import stages.{mod}"], cwd=project,
                             env=env(), capture_output=True, text=True)
        top: dict[str, float] = {}
        total = 0.0
        for line in out.stderr.splitlines():
            m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
            if not m:
                continue
            cum, indent, name = int(m.group(1)) / 1e6, len(m.group(2)), m.group(3)
            if indent == 1:                       # a top-level import of this process
                total += cum
                pkg = name.split(".")[0]
                top[pkg] = top.get(pkg, 0.0) + cum
        res[mod] = {"total": round(total, 2),
                    **{k: round(v, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:6]}}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1, help="ssl.epochs of the measured experiment (study: 5)")
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="run every stage under cProfile (split of its work)")
    ap.add_argument("--keep", type=Path, default=None, help="build the project here and keep it")
    ap.add_argument("--label", default="", help="a name for this measurement in the JSON (e.g. before/after)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/overhead-cpu.json")
    ap.add_argument("--table", action="store_true", help="only print the table of every measurement in --out")
    ap.add_argument("--markdown", action="store_true", help="with --table: as a markdown table (docs)")
    ap.add_argument("--from-log", type=Path, default=None, metavar="STAGES.jsonl",
                    help="add --label to --out from a stage log (+ its -prof folder) of a run cut short")
    ap.add_argument("--models", type=int, default=2, help="with --table: divide by this many models")
    ap.add_argument("--stages", default=None, help="with --from-log: only these stage processes (comma list, "
                    "e.g. 'validate,pretrain simclr baseline'), to compare runs over the stages both finished")
    ap.add_argument("--load", type=float, default=float("nan"), help="with --from-log: the load average it ran at")
    a = ap.parse_args()
    if a.from_log is not None:
        old = json.loads(a.out.read_text()) if a.out.exists() else {}
        prof = a.from_log.with_name(a.from_log.name.replace("-stages.jsonl", "-prof"))
        only = a.stages.split(",") if a.stages else None
        old[a.label or "latest"] = {**from_log(a.from_log, prof, a.epochs, a.load, only), "label": a.label,
                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(old, indent=1) + "\n")
        a.table = True
    if a.table:
        print_table(json.loads(a.out.read_text()), models=a.models, markdown=a.markdown)
        return 0

    from pipeline.study.plan import Experiment, ModelKey, Study, Block, dvc_queue_command

    project = a.keep or Path(tempfile.mkdtemp(prefix="augself-overhead-"))
    if project.exists() and any(project.iterdir()):
        raise SystemExit(f"{project} is not empty")
    project.mkdir(parents=True, exist_ok=True)
    make_project(project)
    stage_log = project.parent / f"{project.name}-stages.jsonl"
    prof_dir = project.parent / f"{project.name}-prof"
    stage_log.unlink(missing_ok=True)
    shutil.rmtree(prof_dir, ignore_errors=True)
    extra = {"AUGSELF_STAGE_LOG": str(stage_log)}
    if a.profile:
        extra["AUGSELF_STAGE_PROFILE"] = str(prof_dir)
    e = env(**extra)

    t = time.time()
    sh(["dvc", "repro", "validate"], project, env=env())          # the parent: prepared data (make repro's first part)
    sh(["git", "add", "-A"], project)
    sh(["git", "-c", "user.name=b", "-c", "user.email=b@e", "commit", "-qm", "prepared"], project)
    prepare_s = time.time() - t
    # The study's store exists before its first experiment (`make study` runs `make repro` first): create
    # it here, so the first stage does not pay MLflow's table creation and migrations (≈ 13 s at load 15).
    sh([sys.executable, "-c", "from mlflow.tracking import MlflowClient; "
        f"MlflowClient('sqlite:///{project / 'mlflow.db'}').search_experiments()"], project, env=env())

    exp = Experiment("strong", 1.0, a.seed, (a.method,), ("baseline", "augself"))
    study_overrides = {"ssl.epochs": a.epochs}
    cmd = dvc_queue_command(exp, {**study_overrides, "ssl.threads": 1})
    t = time.time()
    sh(cmd, project, env=e)
    queue_cmd_s = time.time() - t

    exps = project / ".dvc" / "tmp" / "exps"
    t_start = time.time()
    sh(["dvc", "queue", "start", "-j", "1"], project, env=e)
    t_queue_started = time.time()
    seen: dict[str, float] = {}
    gone: dict[str, float] = {}
    ref_at = None
    while True:
        now = time.time()
        present = {p.name for p in exps.glob("tmp*")} if exps.exists() else set()
        for n in present - seen.keys():
            seen[n] = now
        for n in seen.keys() - present - gone.keys():
            gone[n] = now
        if ref_at is None and sh(["git", "for-each-ref", "refs/exps/"], project).stdout.strip():
            ref_at = now
        if ref_at is not None and seen and len(gone) == len(seen):
            break
        if seen and len(gone) == len(seen) and now - max(gone.values()) > 20:
            break                                 # workspace gone without an experiment ref: failed

        if now - t_start > 3 * 3600:
            raise SystemExit("the experiment did not finish in 3 h")
        time.sleep(0.25)
    t_end = time.time()
    status = sh(["dvc", "queue", "status"], project, env=env()).stdout
    if "Success" not in status:
        logs = subprocess.run(["dvc", "queue", "logs", exp.name], cwd=project, env=env(), capture_output=True,
                              text=True).stdout
        raise SystemExit(f"experiment did not succeed:\n{status}\n{logs[-4000:]}")

    # The ledger export, as stages.study does it after each experiment (in a running process).
    t = time.time()
    from pipeline.study.ledger import export_finished   # noqa: E402  (import cost counted apart)
    import_ledger_s = time.time() - t
    keys = exp.models()
    study = Study("bench", [a.seed], [Block("b", [a.method], ["baseline", "augself"], [1.0], ["strong"])],
                  overrides=study_overrides)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        for k in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
            os.environ.pop(k, None)
        t = time.time()
        written = export_finished(study, keys, ledger=project / "ledger")
        export_s = time.time() - t
        # What `stages.study run` pays every 30 s while its workers train: an export over models still
        # running (a store query per config group; none finished) and two `dvc queue status` calls.
        waiting = [ModelKey(k.method, k.variant, k.lam, k.strength, k.seed + 100) for k in keys]
        t = time.time()
        export_finished(study, waiting, ledger=project / "ledger")
        poll_export_s = time.time() - t
        t = time.time()
        sh(["dvc", "queue", "status"], project, env=env())
        queue_status_s = time.time() - t
    finally:
        os.chdir(cwd)
    if len(written) != len(keys):
        raise SystemExit(f"ledger export wrote {written}, expected {[k.name for k in keys]}")

    records, rows = stage_rows(stage_log)
    first, last = records[0], records[-1]
    summary = {
        "experiment_wall_s": round(t_end - t_start, 1),
        "queue_start_cmd_s": round(t_queue_started - t_start, 2),
        "until_workspace_s": round(workspace - t_start, 2),
        "workspace_to_first_stage_s": round(first["t_process"] - workspace, 2),
        "after_last_stage_s": round(max(gone.values()) - last["t_exit"], 2),
        "stage_processes_s": round(sum(r["t_exit"] - r["t_process"] for r in records), 1),
        "start_imports_s": round(sum(r["t_main"] - r["t_process"] for r in records), 1),
        "params_s": round(sum(r["t_work"] - r["t_main"] for r in records), 1),
        "work_s": round(sum(r["t_work_end"] - r["t_work"] for r in records), 1),
        "atexit_s": round(sum(r["t_exit"] - r["t_work_end"] for r in records), 1),
        "between_stages_s": round(sum(x["gap_before_s"] for x in rows if x["gap_before_s"] is not None), 1),
        "ledger_export_s": round(export_s, 2),
        "ledger_import_s": round(import_ledger_s, 2),
        "poll_export_s": round(poll_export_s, 2),
        "poll_queue_status_s": round(queue_status_s, 2),
        "queue_cmd_s": round(queue_cmd_s, 2),
        "parent_prepare_s": round(prepare_s, 1),
    }
    result = {"label": a.label, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "host": platform.node(),
                          "python": platform.python_version()},
              "experiment": {"command": cmd, "epochs": a.epochs, "models": [k.name for k in keys]},
              "summary": summary, "stages": rows,
              "profile": profile_split(prof_dir) if a.profile else {},
              "imports": import_times(project)}
    print(f"experiment {exp.name}: {a.epochs} epoch(s), 2 models, one queue worker, ssl.threads=1")
    print(f"{'stage':32s} {'gap':>6s} {'start+imp':>9s} {'params':>6s} {'work':>8s} {'atexit':>6s}")
    for x in rows:
        gap = "" if x["gap_before_s"] is None else f"{x['gap_before_s']:.2f}"
        print(f"{x['stage']:32s} {gap:>6s} {x['start_imports_s']:9.2f} {x['params_s']:6.2f} {x['work_s']:8.2f} "
              f"{x['atexit_s']:6.2f}")
    for k, v in summary.items():
        print(f"  {k:28s} {v}")
    for k, v in result["profile"].items():
        print(f"  profile {k}: {v}")
    for k, v in result["imports"].items():
        print(f"  imports stages.{k}: {v}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(a.out.read_text()) if a.out.exists() else {}
    old[a.label or "latest"] = result
    a.out.write_text(json.dumps(old, indent=1) + "\n")
    print_table(old)
    print(f"→ {a.out} [{a.label or 'latest'}]")
    if a.keep is None:
        shutil.rmtree(project, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
