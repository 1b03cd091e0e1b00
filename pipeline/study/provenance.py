"""Was every model of a pre-registered study trained after, and by the code of, its pre-registration?

A confirmatory study names the commit that pre-registered it (``preregistration:`` in its study file).
Each ledger record carries the commit its model was trained from (the MLflow run's git commit).  From
the repository's history alone, so it holds in a fresh clone with no tracking store, :func:`check` asks
of every model:

* **after**: the pre-registration commit is an ancestor of the model's commit
  (``git merge-base --is-ancestor``): the design existed in the history the model was trained from;
* **same training code**: the files that decide the weights are byte-identical at the two commits
  (``git diff --quiet``): :data:`pipeline.fingerprint.TRAINING_CODE`, plus ``pipeline/params.py``,
  whose colour-strength arithmetic the views use but the fingerprint does not cover.

A model whose commit is not in this clone (a shallow clone, a record without a commit) is *unchecked*,
said so, never counted as passing.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.fingerprint import TRAINING_CODE

WEIGHT_FILES = tuple(f"pipeline/{name}" for name in TRAINING_CODE) + ("pipeline/params.py",)


@dataclass
class Provenance:
    preregistration: str                        # the commit as the study file names it
    date: str | None                            # its committer date, None where it is not in this clone
    after: list[str] = field(default_factory=list)        # models trained from a descendant, same code
    before: list[str] = field(default_factory=list)       # models whose commit does not descend from it
    code_changed: list[str] = field(default_factory=list)  # descend from it, but the training code differs
    unchecked: list[str] = field(default_factory=list)     # no commit, or a commit this clone lacks

    @property
    def holds(self) -> bool:
        return self.date is not None and bool(self.after) and not (self.before or self.code_changed
                                                                   or self.unchecked)


def _git(args: list[str], repo: Path) -> subprocess.CompletedProcess:
    # TZ=UTC: the date is printed in local time (format-local) and labelled UTC
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env={**os.environ, "TZ": "UTC"})


def _known(commit: str, repo: Path) -> bool:
    return bool(commit) and _git(["cat-file", "-e", f"{commit}^{{commit}}"], repo).returncode == 0


def check(preregistration: str, commits: dict[str, str], repo: Path = Path(".")) -> Provenance:
    """Classify each model (``commits``: model name → the commit it was trained from)."""
    date = None
    if _known(preregistration, repo):
        date = _git(["log", "-1", "--format=%cd", "--date=format-local:%Y-%m-%d %H:%M UTC", preregistration],
                    repo).stdout.strip()
    out = Provenance(preregistration, date)
    verdicts: dict[str, str] = {}                 # one git call per distinct commit, not per model
    for model, commit in sorted(commits.items()):
        if commit not in verdicts:
            if date is None or not _known(commit, repo):
                verdicts[commit] = "unchecked"
            elif _git(["merge-base", "--is-ancestor", preregistration, commit], repo).returncode != 0:
                verdicts[commit] = "before"
            elif _git(["diff", "--quiet", preregistration, commit, "--", *WEIGHT_FILES], repo).returncode != 0:
                verdicts[commit] = "code_changed"
            else:
                verdicts[commit] = "after"
        getattr(out, verdicts[commit]).append(model)
    return out


def summary(p: Provenance) -> str:
    """One paragraph for the report: what was checked and what it found, failures named."""
    short = p.preregistration[:8]
    if p.date is None:
        return (f"Pre-registration commit `{short}` is not in this clone (a shallow clone?), so whether the "
                f"models were trained after it cannot be checked here; `git fetch --unshallow` and rebuild.")
    n = len(p.after) + len(p.before) + len(p.code_changed) + len(p.unchecked)
    if n == 0:
        return f"Pre-registration commit `{short}` ({p.date}); no model of the study has finished yet."
    text = (f"Pre-registration commit `{short}` ({p.date}): of the {n} models in the ledger, "
            f"**{len(p.after)}** were trained from a commit that descends from it "
            "(`git merge-base --is-ancestor`) with the training code (`pipeline.fingerprint.TRAINING_CODE` and "
            "`pipeline/params.py`) byte-identical to it (`git diff --quiet`).")
    for names, what in ((p.before, "trained from a commit that does not descend from it"),
                        (p.code_changed, "trained after it, but with different training code"),
                        (p.unchecked, "unchecked (no commit recorded, or the commit is not in this clone)")):
        if names:
            text += f" **{len(names)} {what}:** " + ", ".join(f"`{m}`" for m in names) + "."
    return text
