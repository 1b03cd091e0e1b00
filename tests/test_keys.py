"""Which keys matter, written once (issue 25 item 4): dvc.yaml is held to pipeline/params.py and fingerprint.py.

* The pretrain stage declares every key that changes the trained weights (found by changing each key of
  ``params.yaml`` in turn and watching :func:`pipeline.fingerprint.training_hash`), and nothing else but the
  bookkeeping keys (:data:`pipeline.params.SSL_BOOKKEEPING_KEYS`), ``tracking`` and its variant's section.
* Its ``ssl.*`` keys by name are exactly the schema's (``SSLParams`` less the method list and the method
  sections, which it declares as ``ssl.${item.method}``): a new ``ssl`` key fails here until declared.
* Every key any stage declares exists in the schema (a renamed key cannot linger in dvc.yaml).
* The configuration group is one definition: the hash and the params MLflow logs on the group's run.
* ``TRAINING_CODE`` and ``PRETRAIN_GLUE`` (fingerprint.py) are the pretrain stage's code deps.
* ``artifacts:`` lists exactly the models the matrix can train (every method × variant), as the expected
  block (printed on failure, to paste) says.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from pipeline.config import flatten, to_dict
from pipeline.params import METHODS, SSL_BOOKKEEPING_KEYS, VARIANTS, Params, SSLParams
from pipeline.request import RunRequest
from tests.e2e import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
# Keys that change the weights but reach the pretrain stage through a dependency's output, not as params.
THROUGH_DEPS = {"data.seed": "fixes the prepared images: prepare@<dataset> declares it and pretrain depends on "
                             "${data.prepared}/${data.pretrain}"}


def _expand(entry: str, params: Params, method: str = "simclr", variant: str = "baseline", key: str = "") -> str:
    return (entry.replace("${item.method}", method).replace("${item.variant}", variant)
            .replace("${data.pretrain}", params.data.pretrain).replace("${key}", key))


def _declared(stage: str, params: Params, **item) -> list[str]:
    return [_expand(e, params, **item) for e in DVC["stages"][stage].get("params", []) if isinstance(e, str)]


def _covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


def _perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 0.5
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, (list, tuple)):
        return type(value)([*value, value[0] if value else "x"])
    if isinstance(value, dict):
        return {**value, "x": 1}
    return 1                                                           # None


def _set(params: Params, dotted: str, value) -> None:
    """Set a leaf by its params.yaml key on the dataclasses, without validation (``lambda`` → ``lambda_``)."""
    *path, last = dotted.split(".")
    obj = params
    for part in path:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, _field(obj, part))
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, _field(obj, last), value)


def _field(obj, key: str) -> str:
    return next(f.name for f in dataclasses.fields(obj) if f.metadata.get("key", f.name) == key)


def _leaves(params: Params) -> list[str]:
    return list(flatten(to_dict(params)))


@pytest.fixture
def hash_of(monkeypatch):
    from pipeline import fingerprint

    monkeypatch.setattr(fingerprint, "training_code_fingerprint", lambda: "0" * 12)

    def hash_of(params, method, variant):
        try:
            return fingerprint.training_hash(RunRequest.resolve(params, method, variant))
        except Exception as e:  # noqa: BLE001 - a key whose change breaks the hash is read by it
            return f"error {type(e).__name__}"
    return hash_of


def _training_keys(hash_of, method: str, variant: str) -> set[str]:
    base = Params()
    base.ssl.methods = list(METHODS)           # every method resolves (the method list is not hashed)
    ref = hash_of(base, method, variant)
    read = set()
    for key in _leaves(base):
        p = copy.deepcopy(base)
        _set(p, key, _perturbed(flatten(to_dict(base))[key]))
        if hash_of(p, method, variant) != ref:
            read.add(key)
    return read


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_pretrain_declares_every_key_that_changes_the_weights_and_nothing_else(hash_of, method, variant):
    params = Params()
    declared = _declared("pretrain", params, method=method, variant=variant)
    read = _training_keys(hash_of, method, variant)
    assert read, "the perturbation found no key at all: the test is broken"
    missing = sorted(k for k in read if k not in THROUGH_DEPS and not any(_covers(d, k) for d in declared))
    assert not missing, (f"pretrain@{method}-{variant}: these keys change the weights (training_hash) but "
                         f"dvc.yaml's pretrain params do not declare them, so DVC would not re-run it: {missing}")
    allowed = {f"ssl.{k}" for k in SSL_BOOKKEEPING_KEYS} | {"tracking", variant}
    unread = [d for d in declared if d not in allowed and not any(_covers(d, k) for k in read)]
    assert not unread, (f"pretrain@{method}-{variant} declares {unread}, which change neither the weights nor "
                        f"the bookkeeping (SSL_BOOKKEEPING_KEYS): a change would re-run it for nothing")


def test_pretrain_names_exactly_the_schemas_ssl_keys():
    named = {e for e in DVC["stages"]["pretrain"]["params"] if isinstance(e, str) and e.startswith("ssl.")}
    schema = {f"ssl.{f.name}" for f in dataclasses.fields(SSLParams)} - {"ssl.methods"} - {f"ssl.{m}" for m in METHODS}
    assert named == schema | {"ssl.${item.method}"}, (
        f"dvc.yaml pretrain params vs SSLParams: missing {sorted(schema - named)}, "
        f"not in the schema {sorted(named - schema - {'ssl.${item.method}'})}")


def test_every_declared_key_exists_in_the_schema():
    params = Params()
    leaves = _leaves(params)
    top = {f.metadata.get("key", f.name) for f in dataclasses.fields(Params)}
    for stage, spec in DVC["stages"].items():
        items = ([{"key": k} for k in params.data.datasets] if "foreach" in spec
                 else [{"method": m, "variant": v} for m in METHODS for v in VARIANTS] if "matrix" in spec else [{}])
        for item in items:
            for key in _declared(stage, params, **item):
                exists = key in top or any(_covers(key, leaf) for leaf in leaves)
                assert exists, f"dvc.yaml stage {stage} declares {key!r}, which params.yaml's schema does not have"


def test_group_is_one_definition_hashed_and_logged():
    from pipeline import tracking
    from pipeline.config import stable_hash

    p = Params()
    assert p.group_hash() == stable_hash(p.group_config())
    logged = tracking.group_params(p)
    assert set(logged) == set(flatten(p.group_config()))
    # what the group leaves out is exactly what varies within it (seed, λ, methods, bookkeeping, the
    # non-AugSelf variants' sections, tracking): none of it is logged as the group's params
    for key in ("seed", "augself.lambda", "ssl.methods", "variants", "cassle.injection", "tracking.enabled",
                *(f"ssl.{k}" for k in SSL_BOOKKEEPING_KEYS)):
        assert key not in logged
        q = copy.deepcopy(p)
        _set(q, key, _perturbed(flatten(to_dict(p))[key]))
        assert q.group_hash() == p.group_hash(), key


def test_training_code_and_glue_are_the_pretrain_stages_code_deps():
    from pipeline.fingerprint import PRETRAIN_GLUE, TRAINING_CODE
    from pipeline.workflow import PRETRAIN_GLUE_OUTSIDE_FINGERPRINT

    deps = [d.removeprefix("pipeline/") for d in DVC["stages"]["pretrain"]["deps"] if d.startswith("pipeline/")]
    modules = (*TRAINING_CODE, *PRETRAIN_GLUE, *PRETRAIN_GLUE_OUTSIDE_FINGERPRINT)
    under = lambda d, m: m == d or m.startswith(d + "/")                      # noqa: E731
    for m in modules:
        assert any(under(d, m) for d in deps), f"pipeline/{m} is training code or glue but not a pretrain dep"
    for d in deps:
        assert any(under(d, m) for m in modules), (
            f"pipeline/{d} is a pretrain dep but neither in fingerprint.TRAINING_CODE (it changes the weights: then "
            f"the training hash must cover it) nor in fingerprint.PRETRAIN_GLUE")
    assert not set(TRAINING_CODE) & (set(PRETRAIN_GLUE) | set(PRETRAIN_GLUE_OUTSIDE_FINGERPRINT))


_NAMES = {"simclr": "SimCLR", "simsiam": "SimSiam", "moco": "MoCo", "byol": "BYOL"}
_DESC = {"baseline": "{m} baseline backbone (λ = 0)", "augself": "{m} + AugSelf backbone (λ = augself.lambda)",
         "cassle": "{m} + CASSLE backbone (projector conditioned on ω)"}


def expected_artifacts() -> dict:
    """The ``artifacts:`` block dvc.yaml must hold: one model per method × variant the matrix can train."""
    return {f"{m}-{v}": {"path": f"models/{m}-{v}/final.pt", "type": "model",
                         "desc": _DESC[v].format(m=_NAMES[m]) + "; pipeline.models.load_backbone reads it",
                         "labels": [m, v]}
            for m in METHODS for v in VARIANTS}


def test_artifacts_are_every_model_the_matrix_can_train():
    assert set(_NAMES) == set(METHODS) and set(_DESC) == set(VARIANTS), "a method or variant without a description"
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in DVC["stages"]["pretrain"]["outs"]]
    assert "models/${item.method}-${item.variant}/final.pt" in outs
    expected = expected_artifacts()
    assert DVC["artifacts"] == expected, ("dvc.yaml's artifacts: differ from the matrix; the block should read\n"
                                          + yaml.safe_dump({"artifacts": expected}, sort_keys=False, allow_unicode=True))


def _names(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def test_every_evaluation_task_is_the_stage_its_record_says():
    """One stage per record of pipeline.evaluate.tasks, named after it, declaring the record's params, its
    metrics file as the only metric, its diagnostics and per-item file as outputs, and what it reads as deps;
    and no evaluation stage without a record."""
    from pipeline.evaluate import tasks

    model = "${item.method}-${item.variant}"
    for t in tasks.records():
        stage = DVC["stages"].get(t.name)
        assert stage is not None, f"evaluation task {t.name!r} has no dvc.yaml stage"
        where = f"dvc.yaml stage {t.name} vs its record in pipeline/evaluate/tasks.py"
        assert stage["matrix"] == {"method": "${ssl.methods}", "variant": "${variants}"}, where
        assert stage["cmd"] == f"python -m stages.evaluate {t.name} {model}", where
        assert stage["params"] == list(t.params), f"{where}: params {stage['params']} != {list(t.params)}"
        assert _names(stage.get("metrics")) == [f"metrics/{model}/{t.metrics_file}"], where
        outs = {f"metrics/{model}/{t.diagnostics_file}"} | ({f"metrics/{model}/{t.items}"} if t.items else set())
        assert set(_names(stage.get("outs"))) == outs, f"{where}: outs {_names(stage.get('outs'))} != {sorted(outs)}"
        reads = {"features": f"features/{model}", "backbone": f"models/{model}/final.pt"}
        for kind, dep in reads.items():
            assert (dep in stage["deps"]) == (t.reads == kind), f"{where}: reads {t.reads}, deps {stage['deps']}"
        assert "pipeline/evaluate" in stage["deps"] and "stages/evaluate.py" in stage["deps"], where
    evaluating = {name for name, s in DVC["stages"].items() if "stages.evaluate" in s.get("cmd", "")}
    assert evaluating == {"features", *tasks.names()}, "a dvc.yaml evaluation stage without a record (or the reverse)"
    # the stages that read the records outside pipeline/evaluate/ (refusals, the report) depend on them
    for stage in ("validate", "report"):
        assert "pipeline/evaluate/tasks.py" in DVC["stages"][stage]["deps"], stage


def test_per_item_files_are_the_records_and_nothing_else_names_them():
    """The per-item file names live in the records only: the workflow writes, the results reader and the
    study ledger read them through the registry (no table of file names beside it)."""
    from pipeline import results, workflow
    from pipeline.evaluate import tasks
    from tests.e2e import ROOT as root

    files = [t.items for t in tasks.with_items()]
    assert files[:2] == ["linear_predictions.npz", "fewshot_episodes.npz"] and len(set(files)) == len(files)
    for module in (workflow, results):
        assert not any(isinstance(v, str) and v in files for v in vars(module).values()), module.__name__
    for path in [*(root / "pipeline").rglob("*.py"), *(root / "stages").glob("*.py")]:
        if path.name == "tasks.py" and path.parent.name == "evaluate":
            continue
        text = path.read_text()
        code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        named = [f for f in files if any(f'"{f}"' in line or f"'{f}'" in line for line in code)]
        assert not named, f"{path.relative_to(root)} names the per-item file(s) {named} as a string: read the record"
