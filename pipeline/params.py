"""The schema of ``params.yaml``: one dataclass per section, each validating its own values.

``load_params()`` is the single entry point: it reads the YAML, builds :class:`Params` and runs the
cross-section checks, so a stage refuses bad input before it spends any compute.  Messages name the
dotted key a user types (``augself.lambda``), the value, and the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import augmentations as registry
from pipeline.config import (ConfigError, check_choice, check_range, check_subset, from_dict,
                             read_yaml, set_dotted, stable_hash, to_dict)

# Names known to the library.  The registries themselves live with their code (pipeline.methods,
# pipeline.models, pipeline.data); these tuples are imported by those registries' tests to keep the
# two in sync, and used here so that validation never has to import torch.  The augmentations (the
# ops of augment.order, the AugSelf targets, the CASSLE blocks) are read from pipeline.augmentations,
# their one registry, which imports no torch either.
METHODS = ("simclr", "simsiam", "moco", "byol")
BACKBONES = ("resnet_small", "resnet18", "resnet50")
# augment.color_strength: the official ``--color-aug`` scale of the jitter strengths and grayscale_p, and
# ``none`` (scale 0: no colour jitter and no grayscale, the premise's control; issue 24).
COLOR_STRENGTHS = {"none": 0.0, "weak": 0.5, "default": 1.0, "strong": 2.0}
# Pretraining variants: each has a section of its own in params.yaml (``baseline: {}``, ``augself:``,
# ``cassle:``) that only its pretrain stages declare.  Adding one: a name here, a section below, a file.
VARIANTS = ("baseline", "augself", "cassle")
CASSLE_INJECTIONS = ("proj-cat", "proj-add", "proj-mul")
# ssl.* keys that change neither the data nor the arithmetic of training (bookkeeping and speed): left
# out of the training hash (pipeline.train), so editing them never voids a run in progress, and out of
# the configuration group (Params.group_config).  The pretrain stages still declare them (they shape
# the log rows, the monitor and the checkpoints); tests/test_keys.py holds dvc.yaml to that.
SSL_BOOKKEEPING_KEYS = ("checkpoint_every", "log_every", "threads", "monitor_every")


@dataclass
class DatasetEntry:
    """One dataset to prepare.  ``tasks`` are the label sets evaluated downstream (empty: pretrain only)."""
    tasks: list[str] = field(default_factory=list)
    image_size: int | None = None        # resize to this (None: the dataset's own default)
    max_train: int = 0                   # keep at most this many training images (0: all)
    max_test: int = 0                    # keep at most this many test images (0: all)


@dataclass
class DataParams:
    pretrain: str = "cfmnist"
    datasets: dict[str, DatasetEntry] = field(default_factory=lambda: {"cfmnist": DatasetEntry(tasks=["class", "color", "fine"])})
    root: str = "data/raw"
    prepared: str = "data/prepared"
    download: bool = False
    seed: int = 0                        # seed of dataset construction (colourisation); fixed across training seeds

    def __post_init__(self):
        if self.pretrain not in self.datasets:
            raise ConfigError(f"data.pretrain: {self.pretrain!r} is not listed under data.datasets; "
                              f"add it there (with tasks: [] if it is only pretrained on); listed: "
                              f"{', '.join(self.datasets) or '(none)'}")

    @property
    def downstream(self) -> list[str]:
        """Every evaluated task as '<dataset>/<task>'."""
        return [f"{name}/{task}" for name, entry in self.datasets.items() for task in entry.tasks]


@dataclass
class MethodParams:
    """Per-method knobs.  Unused keys for a method are ignored by it (documented per method)."""
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    proj_layers: int = 2                # projector depth (official: 2; SimSiam on ImageNet-100: 3)
    pred_hidden_dim: int = 512          # SimSiam / BYOL predictor
    temperature: float = 0.2            # SimCLR, MoCo
    queue_size: int = 65536             # MoCo
    momentum: float = 0.999             # MoCo key encoder EMA; BYOL base EMA (ramped to 1 by cosine)
    official_queue: bool = False        # MoCo: enqueue online queries as the official AugSelf code does

    def __post_init__(self):
        check_range("<section>.temperature", self.temperature, 0, lo_open=True)
        check_range("<section>.momentum", self.momentum, 0, 1)
        check_range("<section>.queue_size", self.queue_size, 1)
        check_range("<section>.proj_layers", self.proj_layers, 1)


def _default_methods() -> dict[str, MethodParams]:
    return {"simclr": MethodParams(), "simsiam": MethodParams(proj_dim=512, pred_hidden_dim=128),
            "moco": MethodParams(), "byol": MethodParams(momentum=0.996, proj_dim=128, pred_hidden_dim=512)}


@dataclass
class SSLParams:
    methods: list[str] = field(default_factory=lambda: ["simclr", "simsiam"])
    backbone: str = "resnet_small"
    width: int = 16                     # resnet_small only: channels of the first stage
    cifar_stem: bool | None = None      # None: CIFAR stem (3x3 conv, no max-pool) for images <= 64 px
    epochs: int = 5
    batch_size: int = 256               # global batch (split across DDP ranks)
    lr: float = 0.03                    # base learning rate, scaled by batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    amp: str = "auto"                   # auto: bf16 on CUDA, off on CPU; or bf16 / fp16 / off
    channels_last: bool = True
    compile: bool = False
    checkpoint_every: int = 50          # steps between checkpoints (and at the end)
    log_every: int = 10                 # steps between loss read-backs (no host sync in between)
    threads: int = 0                    # torch CPU threads (0: torch default)
    monitor_every: int = 1              # epochs between kNN monitor points (0: off); see pipeline/monitor.py
    simclr: MethodParams = field(default_factory=lambda: _default_methods()["simclr"])
    simsiam: MethodParams = field(default_factory=lambda: _default_methods()["simsiam"])
    moco: MethodParams = field(default_factory=lambda: _default_methods()["moco"])
    byol: MethodParams = field(default_factory=lambda: _default_methods()["byol"])

    def __post_init__(self):
        if not self.methods:
            raise ConfigError(f"ssl.methods: empty; allowed values: {', '.join(METHODS)}")
        check_subset("ssl.methods", self.methods, METHODS)
        check_choice("ssl.backbone", self.backbone, BACKBONES)
        check_choice("ssl.amp", self.amp, ("auto", "bf16", "fp16", "off"))
        check_range("ssl.epochs", self.epochs, 1)
        check_range("ssl.batch_size", self.batch_size, 2)
        check_range("ssl.lr", self.lr, 0, lo_open=True)
        check_range("ssl.weight_decay", self.weight_decay, 0)
        check_range("ssl.warmup_epochs", self.warmup_epochs, 0)
        check_range("ssl.checkpoint_every", self.checkpoint_every, 1)
        check_range("ssl.log_every", self.log_every, 1)
        check_range("ssl.monitor_every", self.monitor_every, 0)
        check_range("ssl.width", self.width, 1)

    def method(self, name: str) -> MethodParams:
        check_choice("ssl.methods", name, METHODS)
        return getattr(self, name)


@dataclass
class AugmentParams:
    """The view pipeline: the ops of ``order`` (official: crop → flip → colour jitter → solarize →
    grayscale → blur → rotation), then normalisation.  An op whose probability is 0 is off.

    ``color_strength`` is the official ``--color-aug weak|default|strong`` (hankook/AugSelf
    ``datasets.py``): it multiplies brightness, contrast, saturation, hue and grayscale_p by 0.5 / 1 / 2.
    The products are capped where the sampling range would leave its domain, as kornia's
    ``ColorJitter`` bounds do (factor ≥ 0: brightness/contrast/saturation ≤ 1; hue ≤ 0.5;
    probability ≤ 1); the caps never bind for the official strengths (0.8, 0.2, 0.4 at ``strong``).
    ``none`` scales them by 0: no jitter op and no grayscale changes a view, so the views are the ones
    of ``jitter_p: 0, grayscale_p: 0`` (the premise's control, :mod:`pipeline.study.premise`), bit for
    bit; the colour ω is 0 (augment.py never divides by a zero strength) and AugSelf's colour target
    is refused, as for any colour jitter that is off.
    The *effective* values (:meth:`jitter_strengths`, :meth:`effective_grayscale_p`) are what the
    augmentation samples with and what the colour ω is normalised by.
    """
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    color_strength: str = "default"     # none | weak | default | strong: scales jitter strengths and grayscale_p
    solarize_p: float = 0.0             # official stl10_sol: 0.5 (threshold ~ U(0, 1))
    rotation_p: float = 0.0             # official stl10_rot: 0.5 (k·90°, k uniform in {0, 1, 2, 3})
    order: list[str] = field(default_factory=lambda: list(registry.pipeline_order()))

    def __post_init__(self):
        lo, hi = self.crop_scale
        check_range("augment.crop_scale[0]", lo, 0, 1, lo_open=True)
        check_range("augment.crop_scale[1]", hi, lo, 1)
        check_range("augment.crop_ratio[0]", self.crop_ratio[0], 0, lo_open=True)
        check_range("augment.crop_ratio[1]", self.crop_ratio[1], self.crop_ratio[0])
        for aug in registry.records():                  # each op's probability (crop: always on)
            if aug.key is not None:
                check_range(f"augment.{aug.key}", getattr(self, aug.key), 0, 1)
        for k in ("brightness", "contrast", "saturation"):
            check_range(f"augment.{k}", getattr(self, k), 0, 1)
        check_range("augment.hue", self.hue, 0, 0.5)
        check_range("augment.blur_sigma[0]", self.blur_sigma[0], 0, lo_open=True)
        check_range("augment.blur_sigma[1]", self.blur_sigma[1], self.blur_sigma[0])
        for i, s in enumerate(self.std):
            check_range(f"augment.std[{i}]", s, 0, lo_open=True)
        check_choice("augment.color_strength", self.color_strength, tuple(COLOR_STRENGTHS))
        order, ops = list(self.order), registry.pipeline_order()
        check_subset("augment.order", order, ops)
        if sorted(order) != sorted(ops) or not order or order[0] != "crop":
            raise ConfigError(f"augment.order: {order} must list every op exactly once with crop first "
                              f"(the crop reads the source image; the other ops work on the views); "
                              f"the official order is {list(ops)}; switch an op off with its "
                              f"probability (e.g. augment.rotation_p: 0)")

    def scaled_color(self, s: float) -> dict[str, float]:
        """brightness, contrast, saturation, hue and grayscale_p times ``s``, capped (see the class): the one
        place a colour strength scales them (this section's ``color_strength``; the study's premise curves)."""
        caps = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.5, "grayscale_p": 1.0}
        return {k: min(getattr(self, k) * s, cap) for k, cap in caps.items()}

    def jitter_strengths(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue) scaled by ``color_strength`` and capped (see the class)."""
        c = self.scaled_color(COLOR_STRENGTHS[self.color_strength])
        return c["brightness"], c["contrast"], c["saturation"], c["hue"]

    def effective_grayscale_p(self) -> float:
        """``grayscale_p`` scaled by ``color_strength``, capped at 1 (official: ``p=0.2*s``)."""
        return self.scaled_color(COLOR_STRENGTHS[self.color_strength])["grayscale_p"]

    def probability(self, aug: str) -> float:
        """The probability that the view op ``aug`` changes a view (crop: 1, always on); its record's
        (:mod:`pipeline.augmentations`)."""
        return registry.get(aug).probability(self)


@dataclass
class AugSelfParams:
    lambda_: float = field(default=1.0, metadata={"key": "lambda"})
    augmentations: list[str] = field(default_factory=lambda: ["crop", "color"])
    weights: dict[str, float] = field(default_factory=dict)  # per-augmentation weight (default 1.0)
    hidden_dim: int = 512
    official_flip_mirror: bool = False  # reproduce the official code's use of view 1's flip for view 2
    ss_only: bool = False               # the official --ss-only ablation: the AugSelf loss alone, no SSL loss

    def __post_init__(self):
        check_range("augself.lambda", self.lambda_, 0)
        if self.ss_only and self.lambda_ == 0:
            raise ConfigError("augself.ss_only: true with augself.lambda: 0 leaves no loss to train on; "
                              "set augself.lambda > 0 or augself.ss_only: false")
        targets = registry.target_names()
        if not self.augmentations:
            raise ConfigError(f"augself.augmentations: empty; allowed values: {', '.join(targets)}")
        check_subset("augself.augmentations", self.augmentations, targets)
        check_subset("augself.weights", self.weights, targets)
        for k, w in self.weights.items():
            check_range(f"augself.weights.{k}", w, 0)

    def weight(self, aug: str) -> float:
        return float(self.weights.get(aug, 1.0))


@dataclass
class BaselineParams:
    """The baseline variant's section (``baseline: {}``): plain SSL, nothing to set.  It exists so that
    every variant's pretrain stage declares a section of its own (``${item.variant}`` in dvc.yaml)."""


@dataclass
class CassleParams:
    """CASSLE (pipeline/cassle.py): the projector conditioned on each view's own ω."""
    # theirs: blur, color, color_diff, crop, grayscale; blur only where augment.blur_p > 0 (refused otherwise)
    conditions: list[str] = field(default_factory=lambda: ["color", "color_diff", "crop", "grayscale"])
    injection: str = "proj-cat"         # proj-cat (theirs), proj-add, proj-mul
    depth: int = 6                      # Linear layers of the ω embedding MLP
    width: int = 64                     # its hidden (and, for proj-cat, output) width

    def __post_init__(self):
        blocks = registry.cassle_blocks()
        if not self.conditions:
            raise ConfigError(f"cassle.conditions: empty; allowed values: {', '.join(blocks)}")
        check_subset("cassle.conditions", self.conditions, blocks)
        if len(set(self.conditions)) != len(self.conditions):
            raise ConfigError(f"cassle.conditions: {self.conditions} lists a block twice")
        check_choice("cassle.injection", self.injection, CASSLE_INJECTIONS)
        check_range("cassle.depth", self.depth, 1)
        check_range("cassle.width", self.width, 1)


@dataclass
class LinearParams:
    val_fraction: float = 0.2
    wd_min_exp: float = -6.0            # L2 weights: logspace(wd_min_exp, wd_max_exp, wd_steps)
    wd_max_exp: float = 5.0
    wd_steps: int = 45
    max_iter: int = 500                 # Newton (trust-region) iterations per fit: a safety cap
    tol: float = 1e-9                   # stop a fit at ‖∇f‖ <= tol·‖∇f(0)‖ (f = objective / n); see evaluate/linear.py
    class_average: list[str] = field(default_factory=list)  # datasets reported as mean per-class accuracy

    def __post_init__(self):
        check_range("eval.linear.val_fraction", self.val_fraction, 0, 1, lo_open=True, hi_open=True)
        check_range("eval.linear.wd_steps", self.wd_steps, 1)
        check_range("eval.linear.max_iter", self.max_iter, 1)
        check_range("eval.linear.tol", self.tol, 0, lo_open=True)


@dataclass
class FewShotParams:
    ways: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    queries: int = 15
    episodes: int = 1000

    def __post_init__(self):
        check_range("eval.fewshot.ways", self.ways, 2)
        check_range("eval.fewshot.queries", self.queries, 1)
        check_range("eval.fewshot.episodes", self.episodes, 1)
        for i, k in enumerate(self.shots):
            check_range(f"eval.fewshot.shots[{i}]", k, 1)


@dataclass
class ProbeParams:
    images: int = 2000                  # pairs of views drawn from the pretraining test split
    ridge: float = 1.0                  # ridge penalty of the linear map (features standardised)
    test_fraction: float = 0.5

    def __post_init__(self):
        check_range("eval.probe.images", self.images, 10)
        check_range("eval.probe.ridge", self.ridge, 0)
        check_range("eval.probe.test_fraction", self.test_fraction, 0, 1, lo_open=True, hi_open=True)


@dataclass
class EvalParams:
    batch_size: int = 512               # feature extraction
    linear: LinearParams = field(default_factory=LinearParams)
    fewshot: FewShotParams = field(default_factory=FewShotParams)
    probe: ProbeParams = field(default_factory=ProbeParams)


@dataclass
class TrackingParams:
    experiment: str = "augself"
    enabled: bool = True


@dataclass
class Params:
    seed: int = 0
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    data: DataParams = field(default_factory=DataParams)
    ssl: SSLParams = field(default_factory=SSLParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    baseline: BaselineParams = field(default_factory=BaselineParams)
    augself: AugSelfParams = field(default_factory=AugSelfParams)
    cassle: CassleParams = field(default_factory=CassleParams)
    eval: EvalParams = field(default_factory=EvalParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)

    def __post_init__(self):
        # An AugSelf target needs its augmentation: a view op that is off gives a constant target.  Checked
        # when the AugSelf variant trains (a baseline-only run at augment.color_strength: none is valid).
        for aug in self.augself.augmentations if "augself" in self.variants else []:
            rec = registry.get(aug)
            if self.augment.probability(aug) == 0:
                key = f"augment.{rec.key}"
                if rec.colour and self.augment.color_strength == "none":
                    raise ConfigError(f"augself.augmentations: {aug!r} is listed but augment.color_strength is "
                                      f"'none' (no colour jitter), so its target would be constant; remove "
                                      f"{aug!r} from augself.augmentations, train only variants without augself, "
                                      f"or pick another augment.color_strength")
                raise ConfigError(f"augself.augmentations: {aug!r} is listed but its augmentation is off "
                                  f"({key} = 0{rec.off_when}), "
                                  f"so its target would be constant; set {key} > 0 or remove {aug!r} "
                                  f"from augself.augmentations")
        # A CASSLE condition needs its op too: an op that is off makes its block a constant input.  Checked
        # when the CASSLE variant trains, as the AugSelf targets are (a baseline-only run at
        # augment.color_strength: none is valid with the default conditions).
        for block in self.cassle.conditions if "cassle" in self.variants else []:
            rec = registry.block_owner(block)
            if rec.probability(self.augment) == 0:
                key = f"augment.{rec.key}"
                raise ConfigError(f"cassle.conditions: {block!r} is listed but its augmentation is off "
                                  f"({key} = 0{rec.off_when}), "
                                  f"so the projector would be given a constant; set {key} > 0 or remove "
                                  f"{block!r} from cassle.conditions")
        if not self.variants:
            raise ConfigError(f"variants: empty; allowed values: {', '.join(VARIANTS)}")
        check_subset("variants", self.variants, VARIANTS)
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"variants: {self.variants} lists a variant twice")

    def lambda_for(self, variant: str) -> float:
        """The AugSelf weight λ of ``variant``: ``augself.lambda`` for AugSelf, 0 for the others
        (CASSLE is run without the AugSelf loss, as in its paper)."""
        check_choice("variant", variant, VARIANTS)
        return self.augself.lambda_ if variant == "augself" else 0.0

    def group_config(self) -> dict:
        """Everything that defines a comparable result except seed and λ: the one definition of a
        configuration group (:meth:`group_hash` hashes it, ``tracking.group_params`` logs it flat).

        Runs that share it are aggregated together in the report (seeds → mean ± std, λ → curves).
        ``variants`` and the sections of the variants other than AugSelf (``baseline``, ``cassle``) are
        left out too: a ``cassle.*`` experiment re-runs only the CASSLE models (dvc.yaml), so the
        baseline and AugSelf runs must stay in the group the report reads; the report keeps the latest
        run per (method, variant, λ, seed), i.e. the CASSLE run of the new setting.  The bookkeeping
        keys of ``ssl`` (:data:`SSL_BOOKKEEPING_KEYS`) are left out as well, so a study queued with one
        thread per worker (stages/study.py) compares with the default run.  ``tracking`` is left out.
        """
        d = to_dict(self)
        d.pop("seed")
        d["augself"].pop("lambda")
        d["ssl"].pop("methods")
        for key in SSL_BOOKKEEPING_KEYS:
            d["ssl"].pop(key)
        for key in ("variants", "baseline", "cassle", "tracking"):
            d.pop(key)
        return d

    def group_hash(self) -> str:
        """Hash of :meth:`group_config` (stored in run.json, MLflow's ``group`` tag and the study ledger)."""
        return stable_hash(self.group_config())


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read, validate and return the params; raise ConfigError with a message naming the key."""
    return from_dict(Params, set_dotted(read_yaml(path), overrides or {}))
