"""One record per evaluation task: what the rest of the library knows about it, in one place.

An evaluation task is its stage function (``evaluate(ctx) -> Evaluation``, in its own module of
:mod:`pipeline.evaluate`: the arithmetic, on the model's frozen features or its backbone) plus the record
below, which every other reader takes its knowledge from:

=============== ==========================================================================================
field           read by
=============== ==========================================================================================
``name``        the DVC stage ``<name>@<model>``, the step of ``stages/evaluate.py``, the metric prefix,
                its files ``metrics/<model>/<name>.json`` and ``<name>_diagnostics.json``
                (:mod:`pipeline.workflow`), the study's queued targets (:mod:`pipeline.study.plan`) and
                cost table (``time/<name>_s``, :mod:`pipeline.study.report`)
``evaluate``    :func:`pipeline.workflow.run_task`: ``"module:function"`` (imported when the stage runs:
                the arithmetic imports torch, this module does not) or the function itself
``params``      the params keys its stage declares in dvc.yaml (its own section is ``eval.<name>``);
                tests/test_keys.py holds dvc.yaml to them
``reads``       ``features`` (``features/<model>/``) or ``backbone`` (``final.pt`` and the pretraining
                data); tests/test_keys.py holds the stage's deps to it
``columns``     the metric columns it writes, by pattern, each with its report label, axis and decimals
                (:func:`pipeline.report.schema.metric_spec`); ``metric`` the pattern as the docs spell it
``expected``    the columns a finished model has: the study ledger waits for them (:mod:`pipeline.study.ledger`)
``items``       its per-item file (None: no paired statistics), next to its metrics and an MLflow artifact
                of the model's run: written by the workflow, read by :mod:`pipeline.results` and the ledger
``scores``      the paired-statistics hook: that file's arrays → per-item scores in % by metric column
                (:func:`pipeline.report.paired.paired_differences` pairs them across variants)
``check``       a refusal before any compute (``stages/validate.py``, the pretrain and its own stage)
``title``       its table's title in the report; ``figure`` the words of its figures' titles;
                ``ci_caption`` the table caption's line on its confidence-interval columns
=============== ==========================================================================================

The records are listed in the order the report shows the tasks (tables, figures, paired rows), after
which come the pretraining losses (:data:`pipeline.report.schema.PRETRAIN`).  ``docs/architecture.md``
("How to add an evaluation task") says what else a new one needs.

This module never imports torch (the validate and report stages read it); :class:`EvalContext` is what
the workflow hands a task's ``evaluate``, so a task needs neither the workflow nor the tracker.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:                                   # pragma: no cover
    from pipeline.params import Params

__all__ = ["Column", "EvalTask", "EvalContext", "Evaluation", "get", "records", "names", "with_items",
           "task_of", "expected_metrics", "register", "unregister", "registered", "check_all",
           "check_fewshot_feasible"]

READS = ("features", "backbone")
RESERVED = ("features", "pretrain", "report", "validate", "prepare", "monitor", "time")


@dataclass(frozen=True)
class Column:
    """Metric columns matching ``pattern`` (a regular expression with named groups), shown in the report as
    ``label`` / ``axis`` (``str.format`` with those groups) with ``decimals``.  ``ci_suffix``: the column
    ``<column><ci_suffix>`` holds a per-run 95 % half-width shown with it.  ``augmentation``: the group that
    names an augmentation; such columns are ordered as :mod:`pipeline.augmentations` lists them."""
    pattern: str
    label: str
    axis: str
    decimals: int
    ci_suffix: str | None = None
    augmentation: str | None = None

    def match(self, column: str) -> re.Match | None:
        return re.match(self.pattern, column)


@dataclass(frozen=True)
class Evaluation:
    """What a task's ``evaluate`` returns: the headline ``metrics`` (``<name>.json``, DVC metrics, MLflow),
    ``diagnostics`` (``<name>_diagnostics.json``: solver settings, stops, digests), the per-item arrays
    (``items``, required when the record names a per-item file) and the prepared ``datasets`` it logs as
    the run's evaluation inputs (None: every downstream dataset)."""
    metrics: dict[str, float]
    diagnostics: dict[str, Any]
    items: dict[str, np.ndarray] | None = None
    datasets: list[str] | None = None


@dataclass(frozen=True)
class EvalContext:
    """What the workflow hands a task's ``evaluate``: the params, the model's name, the device, and loaders.

    ``features()`` yields ``(dataset, task, arrays)`` for every downstream task (``arrays``: the model's
    frozen features ``train_x`` / ``test_x`` and labels ``train_<task>`` / ``test_<task>``);
    ``backbone()`` → ``(frozen backbone on the device, final.pt's meta)``; ``load_split(dataset, split)``
    a prepared split; ``said(what, t0)`` one progress line on stderr with the seconds since ``t0``."""
    params: Params
    model: str
    device: str
    features: Callable[[], Iterator[tuple[str, str, dict]]]
    backbone: Callable[[], tuple[Any, dict]]
    load_split: Callable[[str, str], Any]
    said: Callable[[str, float], None]


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task (see the module doc for who reads each field)."""
    name: str
    evaluate: str | Callable[[EvalContext], Evaluation]
    title: str
    figure: str
    metric: str
    columns: tuple[Column, ...]
    expected: Callable[[Params], list[str]]
    params: tuple[str, ...] = ()
    reads: str = "features"
    items: str | None = None
    scores: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    check: Callable[[Params], None] | None = None
    ci_caption: str = ""

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name) or self.name in RESERVED:
            raise ValueError(f"evaluation task {self.name!r}: a lower-case identifier, not one of {', '.join(RESERVED)}")
        if self.reads not in READS:
            raise ValueError(f"evaluation task {self.name!r}: reads {self.reads!r}; allowed: {', '.join(READS)}")
        if (self.items is None) != (self.scores is None):
            raise ValueError(f"evaluation task {self.name!r}: a per-item file and its scores hook go together")
        for col in self.columns:
            if not col.pattern.startswith(f"^{self.name}/"):
                raise ValueError(f"evaluation task {self.name!r}: column pattern {col.pattern!r} must start "
                                 f"with '^{self.name}/' (a metric is named by its task)")

    @property
    def metrics_file(self) -> str:
        """``metrics/<model>/<name>.json``: the headline numbers (DVC metrics)."""
        return f"{self.name}.json"

    @property
    def diagnostics_file(self) -> str:
        """``metrics/<model>/<name>_diagnostics.json``: everything else it records (a DVC output, not a metric)."""
        return f"{self.name}_diagnostics.json"

    @property
    def section(self) -> str | None:
        """Its own params section (``eval.<name>``), when its stage declares one."""
        return f"eval.{self.name}" if f"eval.{self.name}" in self.params else None

    def run(self, ctx: EvalContext) -> Evaluation:
        fn = self.evaluate
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        return fn(ctx)

    def column(self, column: str) -> tuple[Column, re.Match] | None:
        """The column description ``column`` matches, with the match; None when it is not this task's."""
        for col in self.columns:
            if m := col.match(column):
                return col, m
        return None


# -- the registry ------------------------------------------------------------------------------------
_RECORDS: dict[str, EvalTask] = {}


def register(task: EvalTask) -> EvalTask:
    """Add ``task`` (listed last).  Its name and per-item file must be new."""
    if task.name in _RECORDS:
        raise ValueError(f"evaluation task {task.name!r} is registered already")
    if task.items is not None and task.items in {t.items for t in _RECORDS.values()}:
        raise ValueError(f"evaluation task {task.name!r}: per-item file {task.items!r} belongs to another task")
    _RECORDS[task.name] = task
    return task


def unregister(name: str) -> None:
    del _RECORDS[name]


@contextlib.contextmanager
def registered(task: EvalTask) -> Iterator[EvalTask]:
    """``task`` registered for the duration of the ``with`` block (tests, experiments)."""
    register(task)
    try:
        yield task
    finally:
        unregister(task.name)


def get(name: str) -> EvalTask:
    try:
        return _RECORDS[name]
    except KeyError:
        raise KeyError(f"unknown evaluation task {name!r}; known: {', '.join(_RECORDS)}") from None


def records() -> tuple[EvalTask, ...]:
    return tuple(_RECORDS.values())


def names() -> tuple[str, ...]:
    return tuple(_RECORDS)


def with_items() -> tuple[EvalTask, ...]:
    """The tasks with a per-item file (the paired statistics' inputs), in the registry's order."""
    return tuple(t for t in _RECORDS.values() if t.items is not None)


def task_of(column: str) -> EvalTask | None:
    """The task whose metric ``column`` is, or None (a pretraining or unknown column)."""
    return next((t for t in _RECORDS.values() if t.column(column) is not None), None)


def expected_metrics(params: Params) -> list[str]:
    """Every metric column a model of ``params`` has once all its evaluation tasks have run."""
    return [c for t in _RECORDS.values() for c in t.expected(params)]


def check_all(params: Params) -> None:
    """Every task's refusal before compute (``stages/validate.py``, before pretraining)."""
    for t in _RECORDS.values():
        if t.check is not None:
            t.check(params)


def _downstream(params: Params) -> Iterator[tuple[str, str]]:
    for name, entry in params.data.datasets.items():
        for task in entry.tasks:
            yield name, task


# -- linear --------------------------------------------------------------------------------------------
def _linear_expected(params: Params) -> list[str]:
    return [f"linear/{name}/{task}/top1" for name, task in _downstream(params)]


def _linear_scores(arrays) -> dict[str, np.ndarray]:
    """Per test image, 100 where the linear probe's prediction is the label, else 0."""
    out = {}
    for key in arrays.files if hasattr(arrays, "files") else arrays:
        if key.endswith("/pred"):
            task = key[: -len("/pred")]
            out[f"linear/{task}/top1"] = 100.0 * (arrays[key] == arrays[f"{task}/label"]).astype(np.float64)
    return out


# -- few-shot ------------------------------------------------------------------------------------------
def _fewshot_expected(params: Params) -> list[str]:
    fs = params.eval.fewshot
    return [f"fewshot/{name}/{task}/{fs.ways}way{k}shot" for name, task in _downstream(params) for k in fs.shots]


def _fewshot_scores(arrays) -> dict[str, np.ndarray]:
    """Per episode, its accuracy in %."""
    return {f"fewshot/{key[: -len('/acc')]}": 100.0 * np.asarray(arrays[key], dtype=np.float64)
            for key in (arrays.files if hasattr(arrays, "files") else arrays) if key.endswith("/acc")}


def _load_test_labels(params: Params, name: str, task: str) -> np.ndarray:
    from pathlib import Path

    from pipeline.data import load_split

    return load_split(Path(params.data.prepared), name, "test").labels[task]


def check_fewshot_feasible(params: Params) -> None:
    """Refuse (before any compute) a few-shot setting that some downstream task cannot serve."""
    from pipeline.config import ConfigError

    fs = params.eval.fewshot
    need = max(fs.shots) + fs.queries
    for name, entry in params.data.datasets.items():
        for task in entry.tasks:
            try:
                labels = _load_test_labels(params, name, task)
            except FileNotFoundError:
                continue  # not prepared yet: checked again when the fewshot stage runs
            counts = np.bincount(labels)
            counts = counts[counts > 0]
            usable = int((counts >= need).sum())
            if len(counts) < fs.ways:
                raise ConfigError(
                    f"eval.fewshot: {fs.ways}-way episodes need {fs.ways} classes, but {name}/{task} has only "
                    f"{len(counts)}; allowed: eval.fewshot.ways <= {len(counts)}")
            if usable < fs.ways:
                raise ConfigError(
                    f"eval.fewshot: {fs.ways}-way episodes with K={max(fs.shots)} shots + {fs.queries} queries need "
                    f"{fs.ways} classes with >= {need} test images in {name}/{task}, but only {usable} have that "
                    f"many (smallest class: {int(counts.min())}, classes: {len(counts)}); allowed: "
                    f"eval.fewshot.shots <= {int(np.sort(counts)[-fs.ways]) - fs.queries} with these queries, "
                    f"or fewer eval.fewshot.ways / eval.fewshot.queries")


# -- augmentation probe ----------------------------------------------------------------------------------
def _probe_expected(params: Params) -> list[str]:
    """Every augmentation the views use, as its record says (:func:`pipeline.augmentations.probed`); one that
    is off (colour at augment.color_strength: none) has a constant ω: its probe logs NaN, so it is not
    waited for."""
    from pipeline.augmentations import PROBE_METRICS, get, probed

    return [f"probe/{a}/{PROBE_METRICS[get(a).probe]}" for a in probed(params.augment)
            if params.augment.probability(a) > 0]


register(EvalTask(
    "linear", "pipeline.evaluate.linear:evaluate",
    title="Linear evaluation: top-1 accuracy (%)", figure="linear top-1",
    metric="linear/<dataset>/<task>/top1",
    columns=(Column(r"^linear/(?P<dataset>[^/]+)/(?P<task>[^/]+)/top1$", "{dataset}/{task}", "top-1 accuracy (%)", 2),),
    expected=_linear_expected, params=("seed", "eval.linear", "tracking"),
    items="linear_predictions.npz", scores=_linear_scores))

register(EvalTask(
    "fewshot", "pipeline.evaluate.fewshot:evaluate",
    title="Few-shot evaluation: accuracy (%)", figure="few-shot accuracy",
    metric="fewshot/<dataset>/<task>/<N>way<K>shot",
    columns=(Column(r"^fewshot/(?P<dataset>[^/]+)/(?P<task>[^/]+)/(?P<ways>\d+)way(?P<shots>\d+)shot$",
                    "{dataset}/{task} {ways}-way {shots}-shot", "accuracy (%)", 2, ci_suffix="_ci95"),),
    expected=_fewshot_expected, params=("seed", "eval.fewshot", "tracking"),
    items="fewshot_episodes.npz", scores=_fewshot_scores, check=check_fewshot_feasible,
    ci_caption="CI: mean over seeds of the 95 % confidence half-width over episodes."))

register(EvalTask(
    "probe", "pipeline.evaluate.probe:evaluate",
    title="Augmentation awareness: linear probe of ω from frozen features", figure="augmentation-awareness probe",
    metric="probe/<aug>/r2",
    columns=(Column(r"^probe/(?P<aug>[^/]+)/r2$", "{aug} R²", "{aug} R² (unitless)", 3, augmentation="aug"),
             Column(r"^probe/(?P<aug>[^/]+)/acc$", "{aug} acc. (%)", "{aug} accuracy (%)", 2, augmentation="aug")),
    expected=_probe_expected, params=("seed", "data.pretrain", "augment", "eval.probe", "eval.batch_size", "tracking"),
    reads="backbone"))
