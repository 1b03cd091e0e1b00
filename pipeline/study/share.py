"""A study spread over machines, gathered back, with DVC's own sharing (README "A study over several machines").

Each machine runs its shard (``python -m stages.study run --shard I/N --push REMOTE``).  Every experiment it
finishes is pushed with ``dvc exp push REMOTE <name>``: the experiment's git ref to the git remote and its
cached outputs (models, features) to the project's default DVC remote.  ``gather --from REMOTE`` pulls the
study's experiments back with ``dvc exp pull`` and the runner exports them into the ledger from the shared
MLflow server (per-item scores from MLflow's artifacts or, failing that, from the pulled experiment commits).

A model is *done anywhere* when it is in the ledger, or in the commit of an experiment this clone holds
(its own, or one fetched from the remote: ``refs/exps/``), or finished in the MLflow store (exported into
the ledger first).  The runner trains only models done nowhere, so no model is trained twice.  This module
only wraps ``dvc exp list / push / pull`` and reads ``git``: no scheduler, no state of its own.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.study.plan import ModelKey, Study

PREFIX = "study-"          # every experiment the study runner names (plan.Experiment.name)


def _dvc(args: list[str], cwd: Path | str = ".") -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)


def study_experiments(remote: str | None = None, cwd: Path | str = ".") -> set[str]:
    """Names of the study's experiments on the baseline commit (HEAD): this clone's, or ``remote``'s
    (a git remote name or URL).  A remote that cannot be read is a ConfigError naming it."""
    out = _dvc(["exp", "list", "--name-only", *([remote] if remote else [])], cwd)
    if out.returncode != 0:
        where = f"git remote {remote!r}" if remote else "this clone"
        raise ConfigError(f"dvc exp list {remote or ''}: cannot list the experiments of {where} "
                          f"({(out.stderr or out.stdout).strip().splitlines()[-1:]}); check `git remote -v` "
                          f"or pass a git URL")
    return {line.strip() for line in out.stdout.splitlines() if line.strip().startswith(PREFIX)}


def pull(remote: str, names: set[str] | list[str], cache: bool = True, cwd: Path | str = ".") -> list[str]:
    """``dvc exp pull REMOTE <names>``: the experiments' refs, and their outputs from the default DVC remote
    unless ``cache`` is False (enough to know what is done).  Returns the names pulled."""
    names = sorted(names)
    if not names:
        return []
    out = _dvc(["exp", "pull", *([] if cache else ["--no-cache"]), remote, *names], cwd)
    if out.returncode != 0:
        raise RuntimeError(f"dvc exp pull {remote} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return names


def push(remote: str, names: set[str] | list[str], cwd: Path | str = ".") -> list[str]:
    """``dvc exp push REMOTE <names>``: each experiment's ref to the git remote, its cached outputs to the
    default DVC remote.  Returns the names pushed; a failure is reported and retried on the next call."""
    names = sorted(names)
    if not names:
        return []
    out = _dvc(["exp", "push", remote, *names], cwd)
    if out.returncode != 0:
        print(f"[study] dvc exp push {remote} {' '.join(names)} failed (retried later):\n"
              f"{(out.stderr or out.stdout)[-2000:]}", flush=True)
        return []
    return names


def push_unpushed(remote: str, pushed: set[str], cwd: Path | str = ".") -> list[str]:
    """Push every study experiment this clone holds that is not in ``pushed`` (updated in place)."""
    new = push(remote, study_experiments(None, cwd) - pushed, cwd)
    pushed.update(new)
    return new


def models_in_experiments(study: Study, keys: list[ModelKey], repo: Path | str = ".",
                          params_path: str | Path = "params.yaml") -> dict[str, str]:
    """``{model name: experiment ref}`` for every model of ``keys`` that a committed DVC experiment in this
    clone (``refs/exps/``: run here or pulled) holds, recognised by its ``models/<m>-<v>/run.json``
    (method, variant, λ, seed and config group, which covers the colour strength)."""
    from pipeline.study.ledger import params_of
    from pipeline.results import RUN_INFO_FILE

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout

    wanted = {}
    for key in keys:
        wanted[(key.method, key.variant, float(key.lam), key.seed, params_of(key, study, params_path).group_hash())] = key.name
    found: dict[str, str] = {}
    for ref in git("for-each-ref", "--format=%(refname)", "refs/exps/").split():
        for path in git("ls-tree", "-r", "--name-only", ref, "models/").split():
            if not path.endswith("/" + RUN_INFO_FILE):
                continue
            try:
                info = json.loads(git("show", f"{ref}:{path}"))
                ident = (info["method"], info["variant"], float(info["lambda"]), int(info["seed"]), info["group"])
            except (ValueError, KeyError, TypeError):
                continue
            if ident in wanted:
                found.setdefault(wanted[ident], ref)
    return found
