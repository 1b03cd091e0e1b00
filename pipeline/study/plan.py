"""The study's plan: which models it needs, which are done, and the DVC experiments that make the rest.

``study.yaml`` (committed, docs/study.md) names the study's crossings over ``params.yaml``:

.. code-block:: yaml

    name: colour-strong-5ep
    seeds: [0, 1, 2]
    blocks:                      # each block is a full crossing of its lists
      - name: core               # (optional `seeds:` per block, else the study's)
        methods: [simclr, simsiam, moco, byol]
        variants: [baseline, augself, cassle]
        lambda: [1.0]
        color_strength: [strong]

A block may also set ``epochs`` and ``lr`` (``ssl.epochs``, ``ssl.lr``; left out: params.yaml's, and the
model's name is the one it always had) and ``minutes_per_model`` (its models' cost estimate, else the
study's); a schedule set there is part of the model's key and name (``…-strong-ep20-seed0``).  A study
may name its report: ``report: premise`` (:mod:`pipeline.study.premise_report`, baselines only),
``report: confirmatory`` with ``compare_with: study.yaml`` (:mod:`pipeline.study.confirm`: the pre-registered
primary test above the usual report, and the two studies side by side) or the default ``study``
(:mod:`pipeline.study.report`), written to ``report_dir`` (default ``reports/study``).
Every study shares the one ledger, so a model two studies plan under the same key is trained once.

A *model* is one (method, variant, λ, colour strength, seed[, epochs, lr]); λ only matters for ``augself`` (the other
variants train with λ = 0 whatever ``augself.lambda`` says, so they are planned once, at the block's
first λ).  The plan is the union of every block's models.  Models already in the ledger
(:mod:`pipeline.study.ledger`) are done; the others are grouped into one DVC experiment per
(strength, λ, seed, method), over the variants that method needs there (``dvc.yaml`` trains
``ssl.methods × variants``).  One method per experiment keeps the unit of loss small: a model's
backbone lives in the experiment's temporary workspace until the experiment's evaluation stages have
logged it, so a study killed mid-experiment retrains at most that experiment's 1-3 models.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError, check_subset, read_yaml
from pipeline.params import COLOR_STRENGTHS, METHODS, VARIANTS

STUDY_FILE = "study.yaml"
REPORTS = ("study", "premise", "confirmatory")        # study.yaml's `report:`
BLOCK_SCHEDULE = ("epochs", "lr", "minutes_per_model")   # optional keys of a block beside its crossing


@dataclass(frozen=True, order=True)
class ModelKey:
    method: str
    variant: str
    lam: float            # 0 for every variant but augself
    strength: str
    seed: int
    epochs: int = 0       # ssl.epochs; 0: params.yaml's (and the name says nothing)
    lr: float = 0.0       # ssl.lr; 0: params.yaml's

    @property
    def name(self) -> str:
        lam = f"-lam{self.lam:g}" if self.variant == "augself" else ""
        return f"{self.method}-{self.variant}{lam}-{self.strength}{self.schedule}-seed{self.seed}"

    @property
    def schedule(self) -> str:
        """``-ep<epochs>`` / ``-lr<lr>`` where the key sets them, else empty (the names of params.yaml's schedule)."""
        return (f"-ep{self.epochs}" if self.epochs else "") + (f"-lr{self.lr:g}" if self.lr else "")

    def schedule_overrides(self) -> dict:
        """The ``ssl.*`` overrides of a schedule this key sets."""
        return {**({"ssl.epochs": self.epochs} if self.epochs else {}), **({"ssl.lr": self.lr} if self.lr else {})}

    @property
    def baseline(self) -> "ModelKey":
        """The model this one is compared with: the baseline of the same method, strength, schedule and seed."""
        return ModelKey(self.method, "baseline", 0.0, self.strength, self.seed, self.epochs, self.lr)


@dataclass
class Block:
    name: str
    methods: list[str]
    variants: list[str]
    lambdas: list[float]
    strengths: list[str]
    seeds: list[int] | None = None      # this block's seeds; None: the study's
    epochs: int = 0                     # ssl.epochs of its models; 0: params.yaml's
    lr: float = 0.0                     # ssl.lr of its models; 0: params.yaml's
    minutes_per_model: float | None = None   # its models' cost estimate; None: the study's


@dataclass
class Study:
    name: str
    seeds: list[int]
    blocks: list[Block]
    minutes_per_model: float = 2.0           # the budget estimate shown by `plan` (measured, docs/study.md)
    overrides: dict = field(default_factory=dict)   # -S overrides every experiment of the study adds
    report: str = "study"                    # study | premise | confirmatory: which report `report` builds
    report_dir: str = "reports/study"
    compare_with: str | None = None          # confirmatory: the study file whose seeds generated the hypothesis
    preregistration: str | None = None       # confirmatory: the commit that pre-registered it (pipeline.study.provenance)
    source: str = STUDY_FILE                 # the file it was read from (the report names the command that resumes it)

    def models(self) -> list[ModelKey]:
        keys = set()
        for b in self.blocks:
            for method in b.methods:
                for variant in b.variants:
                    lams = b.lambdas if variant == "augself" else [0.0]
                    for lam in lams:
                        for strength in b.strengths:
                            for seed in self.seeds_of(b):
                                keys.add(ModelKey(method, variant, float(lam), strength, int(seed), b.epochs, b.lr))
        return sorted(keys)

    def minutes(self, key: ModelKey) -> float:
        """The cost estimate of one model: its first block's ``minutes_per_model``, else the study's."""
        for b in self.blocks:
            if b.name in self.block_of(key) and b.minutes_per_model is not None:
                return b.minutes_per_model
        return self.minutes_per_model

    def priority(self, keys) -> int:
        """The index in ``blocks`` of the first block any of ``keys`` belongs to."""
        names = [b.name for b in self.blocks]
        return min((names.index(n) for k in keys for n in self.block_of(k)), default=len(names))

    def queue_order(self, experiments: list) -> list:
        """Seed 0 of every block first (in the blocks' order), then seed 1, then seed 2: a study cut short
        has every dimension of the design at one seed before it has more seeds of any."""
        return sorted(experiments, key=lambda e: (e.seed, self.priority(e.models())))

    def seeds_of(self, block: Block) -> list[int]:
        """The block's own seeds, or the study's."""
        return block.seeds if block.seeds is not None else self.seeds

    def block_of(self, key: ModelKey) -> list[str]:
        return [b.name for b in self.blocks if key.method in b.methods and key.variant in b.variants
                and key.strength in b.strengths and (key.variant != "augself" or key.lam in b.lambdas)
                and key.seed in self.seeds_of(b) and (key.epochs, key.lr) == (b.epochs, b.lr)]


def load_study(path: str | Path = STUDY_FILE) -> Study:
    """Read and validate ``study.yaml``; errors name the key and the allowed values."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with name, seeds, blocks")
    unknown = set(raw) - {"name", "seeds", "blocks", "minutes_per_model", "overrides", "report", "report_dir",
                          "compare_with", "preregistration"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: name, seeds, blocks, "
                          f"minutes_per_model, overrides, report, report_dir, compare_with, preregistration")
    report = raw.get("report", "study")
    if report not in REPORTS:
        raise ConfigError(f"{path}: report: {report!r} is not one of {', '.join(REPORTS)}")
    compare_with = raw.get("compare_with")
    if (report == "confirmatory") != (compare_with is not None):
        raise ConfigError(f"{path}: compare_with (the study file whose seeds generated the hypothesis, e.g. "
                          f"study.yaml) goes with report: confirmatory, and only with it")
    if compare_with is not None and not Path(compare_with).is_file():
        raise ConfigError(f"{path}: compare_with: {compare_with!r} is not a file; name the first study's file, "
                          f"e.g. study.yaml")
    prereg = raw.get("preregistration")
    if (report == "confirmatory") != (prereg is not None):
        raise ConfigError(f"{path}: preregistration (the commit that pre-registered the study, e.g. the hash `git log "
                          f"docs/study.md` shows for it; the report checks every model was trained after it) goes "
                          f"with report: confirmatory, and only with it")
    if prereg is not None and not (isinstance(prereg, str) and len(prereg) >= 7
                                   and all(c in "0123456789abcdef" for c in prereg)):
        raise ConfigError(f"{path}: preregistration: {prereg!r} is not a commit hash; write it as a quoted string of "
                          f"at least 7 hex digits (YAML reads an unquoted all-digit hash as a number)")
    blocks = []
    for i, b in enumerate(raw.get("blocks") or []):
        where = f"{path}: blocks[{i}]"
        for key in ("name", "methods", "variants", "lambda", "color_strength"):
            if key not in b:
                raise ConfigError(f"{where}: missing '{key}'")
        check_subset(f"{where}.methods", b["methods"], METHODS)
        check_subset(f"{where}.variants", b["variants"], VARIANTS)
        check_subset(f"{where}.color_strength", b["color_strength"], COLOR_STRENGTHS)
        for lam in b["lambda"]:
            if not isinstance(lam, (int, float)) or lam < 0:
                raise ConfigError(f"{where}.lambda: {lam!r} must be a number >= 0")
        if "augself" in b["variants"] and 0 in b["lambda"]:
            raise ConfigError(f"{where}.lambda: 0 is the baseline; list the variant 'baseline' instead")
        unknown_b = set(b) - {"name", "methods", "variants", "lambda", "color_strength", "seeds", *BLOCK_SCHEDULE}
        if unknown_b:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown_b)}; allowed: name, methods, variants, "
                              f"lambda, color_strength, seeds, {', '.join(BLOCK_SCHEDULE)}")
        epochs, lr, minutes = b.get("epochs", 0), b.get("lr", 0.0), b.get("minutes_per_model")
        if "epochs" in b and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
            raise ConfigError(f"{where}.epochs: {epochs!r} must be an integer >= 1 (ssl.epochs of the block's "
                              f"models); leave it out for params.yaml's")
        if "lr" in b and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0):
            raise ConfigError(f"{where}.lr: {lr!r} must be a number > 0 (ssl.lr of the block's models); leave it "
                              f"out for params.yaml's")
        if minutes is not None and (not isinstance(minutes, (int, float)) or minutes <= 0):
            raise ConfigError(f"{where}.minutes_per_model: {minutes!r} must be a number > 0 (minutes per model)")
        block_seeds = b.get("seeds")
        if block_seeds is not None and (not block_seeds or not all(isinstance(x, int) and x >= 0 for x in block_seeds)):
            raise ConfigError(f"{where}.seeds: a non-empty list of integers >= 0, got {block_seeds!r}")
        blocks.append(Block(b["name"], list(b["methods"]), list(b["variants"]), [float(x) for x in b["lambda"]],
                            list(b["color_strength"]), list(block_seeds) if block_seeds is not None else None,
                            int(epochs), float(lr), None if minutes is None else float(minutes)))
    if not blocks:
        raise ConfigError(f"{path}: blocks is empty")
    seeds = raw.get("seeds") or []
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise ConfigError(f"{path}: name must be a non-empty string (it labels the study's runs)")
    return Study(raw["name"], list(seeds), blocks, float(raw.get("minutes_per_model", 2.0)),
                 dict(raw.get("overrides") or {}), report, str(raw.get("report_dir", "reports/study")), compare_with,
                 prereg, str(path))


@dataclass(frozen=True)
class Experiment:
    """One `dvc exp run`: every model of ``methods × variants`` at one (strength, λ, seed[, schedule])."""
    strength: str
    lam: float
    seed: int
    methods: tuple[str, ...]
    variants: tuple[str, ...]
    epochs: int = 0
    lr: float = 0.0

    @property
    def name(self) -> str:
        schedule = ModelKey("", "", 0.0, "", 0, self.epochs, self.lr).schedule
        return (f"study-{self.strength}{schedule}-lam{self.lam:g}-s{self.seed}-"
                f"{'-'.join(v[:2] for v in self.variants)}-{'-'.join(self.methods)}")

    def overrides(self, extra: dict | None = None) -> dict:
        return {**(extra or {}), "seed": self.seed, "ssl.methods": list(self.methods),
                "variants": list(self.variants), "augment.color_strength": self.strength,
                "augself.lambda": self.lam, **self.models()[0].schedule_overrides()}

    def models(self) -> list[ModelKey]:
        return [ModelKey(m, v, self.lam if v == "augself" else 0.0, self.strength, self.seed, self.epochs, self.lr)
                for m in self.methods for v in self.variants]


def experiments_for(missing: list[ModelKey], default_lambda: float = 1.0) -> list[Experiment]:
    """Group models into experiments.  Non-AugSelf variants ride along with the experiment of
    ``augself.lambda = default_lambda`` (their training ignores λ)."""
    cells: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for k in missing:
        lam = k.lam if k.variant == "augself" else default_lambda
        cells[(k.strength, lam, k.seed, k.epochs, k.lr)][k.method].add(k.variant)
    out = []
    for (strength, lam, seed, epochs, lr), by_method in sorted(cells.items()):
        for method in METHODS:
            if method in by_method:
                out.append(Experiment(strength, lam, seed, (method,), tuple(v for v in VARIANTS if v in by_method[method]),
                                      epochs, lr))
    return out


# The stages a study experiment runs: the evaluations of its models and what they depend on (validate,
# pretrain, features).  Not `report`: the study's report is built from the ledger (reports/study/), and the
# per-experiment reports/ was written into the experiment's commit and never read: a process that imports
# pandas, matplotlib and MLflow and queries the store, per experiment (issue 23 item 2).
def study_targets() -> tuple[str, ...]:
    """The DVC stages a study experiment runs: every evaluation task (:mod:`pipeline.evaluate.tasks`)."""
    from pipeline.evaluate import tasks

    return tasks.names()


def dvc_queue_command(exp: Experiment, extra: dict | None = None) -> list[str]:
    """``dvc exp run --queue -n <name> -S key=value ... linear fewshot probe`` for one experiment."""
    import json

    argv = ["dvc", "exp", "run", "--queue", "-n", exp.name]
    for k, v in exp.overrides(extra).items():
        value = json.dumps(v, separators=(",", ":")).replace('"', "") if isinstance(v, list) else str(v)
        argv += ["-S", f"{k}={value}"]
    return argv + list(study_targets())


def parse_queue_status(text: str) -> tuple[dict[str, str], int]:
    """``({experiment name: "Queued" | "Running"}, workers)`` from ``dvc queue status``'s table; the workers
    are the active and the idle ones (a worker between two tasks is idle, not gone)."""
    import re

    tasks = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] in ("Queued", "Running"):
            tasks[parts[1]] = parts[-1]
    workers = re.search(r"Worker status: (\d+) active, (\d+) idle", text)
    return tasks, int(workers.group(1)) + int(workers.group(2)) if workers else 0


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (1 ≤ i ≤ n) from ``--shard``; a ConfigError naming the option otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: {text!r} is not 'i/n' (e.g. --shard 1/2 on the first of two machines)") from None
    if not 1 <= i <= n:
        raise ConfigError(f"--shard: {text!r} needs 1 ≤ i ≤ n (e.g. --shard 1/2 and --shard 2/2)")
    return i, n


def shard_models(models: list[ModelKey], shard: tuple[int, int], default_lambda: float = 1.0) -> list[ModelKey]:
    """The models machine ``i`` of ``n`` trains: whole planned experiments, by a stable hash of their names.

    The split is made over the experiments of the *whole* plan (not of what is still missing), so it
    does not move as models finish: each planned model belongs to exactly one shard on every machine,
    whatever each has done, and no two machines train the same model.  Needs no coordination.
    """
    import hashlib

    i, n = shard
    mine = set()
    for exp in experiments_for(models, default_lambda):
        if int(hashlib.sha256(exp.name.encode()).hexdigest(), 16) % n == i - 1:
            mine.update(exp.models())
    return [k for k in models if k in mine]
