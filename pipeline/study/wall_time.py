"""How long a study took on the clock, from the tracking store (the ledger holds no timestamps).

A model's MLflow run starts with its pretraining and ends with the last metric its evaluation steps log into
it; the study's wall time is the union of those intervals over its models, so two workers' overlapping runs
count once and the time between sessions does not count.  Every attempt counts: a model whose experiment was
interrupted and run again has a run per attempt (before session 12's resumes kept one), each with the name
and group of the run the ledger holds.  An interrupted run's own end time is when it was found dead, not when
it stopped, so a run's end is its last logged metric (and its end time only when it FINISHED)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from pipeline.study.ledger import LEDGER
from pipeline.study.plan import Study


def union_ms(intervals: list[tuple[int, int]]) -> int:
    """Total length of the union of [start, end] intervals."""
    total, current = 0, None
    for start, end in sorted(intervals):
        if current and start <= current[1]:
            current[1] = max(current[1], end)
            continue
        if current:
            total += current[1] - current[0]
        current = [start, end]
    return total + (current[1] - current[0] if current else 0)


def last_activity(client, run) -> int | None:
    """Milliseconds of the run's last logged metric (or its end time when it FINISHED); None without either."""
    stamps = [m.timestamp for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)]
    if run.info.status == "FINISHED" and run.info.end_time:
        stamps.append(run.info.end_time)
    return max(stamps) if stamps else None


def study_wall_time(study: Study, ledger: Path = LEDGER, client=None) -> dict:
    """{models, runs, hours, first, last} of ``study``'s models in the ledger (see the module docstring)."""
    if client is None:
        from mlflow.tracking import MlflowClient

        from pipeline.tracking import tracking_uri

        client = MlflowClient(tracking_uri=tracking_uri())
    names = {k.name for k in study.models()}
    held = [json.loads(f.read_text())["run_id"] for f in sorted(Path(ledger).glob("*.json")) if f.stem in names]
    wanted: dict[tuple[str, str], set[str]] = {}            # (experiment, group) -> the ledger's run names
    for run_id in held:
        run = client.get_run(run_id)
        wanted.setdefault((run.info.experiment_id, run.data.tags.get("group")), set()).add(run.info.run_name)
    attempts = {}
    for (experiment, group), run_names in wanted.items():   # one search per configuration, not per model
        for r in client.search_runs([experiment], filter_string=f"tags.group = '{group}'", max_results=10000):
            if r.info.run_name in run_names:
                attempts[r.info.run_id] = r
    intervals = [(r.info.start_time, end) for r in attempts.values() if (end := last_activity(client, r))]
    if not intervals:
        return {"models": len(held), "runs": 0, "hours": 0.0, "first": None, "last": None}
    clock = lambda ms: datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"models": len(held), "runs": len(intervals), "hours": union_ms(intervals) / 3.6e6,
            "first": clock(min(s for s, _ in intervals)), "last": clock(max(e for _, e in intervals))}
