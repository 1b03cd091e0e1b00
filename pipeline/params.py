"""The schema of ``params.yaml``: one dataclass per section, each validating its own values.

``load_params()`` is the single entry point: it reads the YAML, builds :class:`Params` and runs the
cross-section checks, so a stage refuses bad input before it spends any compute.  Messages name the
dotted key a user types (``augself.lambda``), the value, and the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import (ConfigError, check_choice, check_range, check_subset, from_dict,
                             read_yaml, set_dotted, stable_hash, to_dict)

# Names known to the library.  The registries themselves live with their code (pipeline.methods,
# pipeline.models, pipeline.data); these tuples are imported by those registries' tests to keep the
# two in sync, and used here so that validation never has to import torch.
METHODS = ("simclr", "simsiam", "moco", "byol")
BACKBONES = ("resnet_small", "resnet18", "resnet50")
AUGSELF_AUGMENTATIONS = ("crop", "flip", "color", "blur")
VARIANTS = ("baseline", "augself")


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
        check_range("ssl.width", self.width, 1)

    def method(self, name: str) -> MethodParams:
        check_choice("ssl.methods", name, METHODS)
        return getattr(self, name)


@dataclass
class AugmentParams:
    """The view pipeline (official order: crop → flip → colour jitter → grayscale → blur → normalise)."""
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

    def __post_init__(self):
        lo, hi = self.crop_scale
        check_range("augment.crop_scale[0]", lo, 0, 1, lo_open=True)
        check_range("augment.crop_scale[1]", hi, lo, 1)
        check_range("augment.crop_ratio[0]", self.crop_ratio[0], 0, lo_open=True)
        check_range("augment.crop_ratio[1]", self.crop_ratio[1], self.crop_ratio[0])
        for k in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            check_range(f"augment.{k}", getattr(self, k), 0, 1)
        for k in ("brightness", "contrast", "saturation"):
            check_range(f"augment.{k}", getattr(self, k), 0, 1)
        check_range("augment.hue", self.hue, 0, 0.5)
        check_range("augment.blur_sigma[0]", self.blur_sigma[0], 0, lo_open=True)
        check_range("augment.blur_sigma[1]", self.blur_sigma[1], self.blur_sigma[0])
        for i, s in enumerate(self.std):
            check_range(f"augment.std[{i}]", s, 0, lo_open=True)


@dataclass
class AugSelfParams:
    lambda_: float = field(default=1.0, metadata={"key": "lambda"})
    augmentations: list[str] = field(default_factory=lambda: ["crop", "color"])
    weights: dict[str, float] = field(default_factory=dict)  # per-augmentation weight (default 1.0)
    hidden_dim: int = 512
    official_flip_mirror: bool = False  # reproduce the official code's use of view 1's flip for view 2

    def __post_init__(self):
        check_range("augself.lambda", self.lambda_, 0)
        if not self.augmentations:
            raise ConfigError(f"augself.augmentations: empty; allowed values: {', '.join(AUGSELF_AUGMENTATIONS)}")
        check_subset("augself.augmentations", self.augmentations, AUGSELF_AUGMENTATIONS)
        check_subset("augself.weights", self.weights, AUGSELF_AUGMENTATIONS)
        for k, w in self.weights.items():
            check_range(f"augself.weights.{k}", w, 0)

    def weight(self, aug: str) -> float:
        return float(self.weights.get(aug, 1.0))


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
    data: DataParams = field(default_factory=DataParams)
    ssl: SSLParams = field(default_factory=SSLParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    augself: AugSelfParams = field(default_factory=AugSelfParams)
    eval: EvalParams = field(default_factory=EvalParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)

    def lambda_for(self, variant: str) -> float:
        check_choice("variant", variant, VARIANTS)
        return 0.0 if variant == "baseline" else self.augself.lambda_

    def group_hash(self) -> str:
        """Hash of everything that defines a comparable result except seed and λ.

        Runs that share it are aggregated together in the report (seeds → mean ± std, λ → curves).
        """
        d = to_dict(self)
        d.pop("seed")
        d["augself"].pop("lambda")
        d["ssl"].pop("methods")
        d.pop("tracking")
        return stable_hash(d)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read, validate and return the params; raise ConfigError with a message naming the key."""
    return from_dict(Params, set_dotted(read_yaml(path), overrides or {}))
