"""Backbones (torchvision ResNet-18/50 and a small CPU ResNet) and the MLP heads of the SSL methods.

Every backbone maps images ``(B, 3, H, W)`` to pooled, flattened features ``(B, feat_dim)``; these
are the features the SSL projectors, the AugSelf head and all evaluations read.

Conventions (official AugSelf code, ``models.py``: ``load_backbone`` / ``load_mlp``):

* ``resnet18`` / ``resnet50``: ``torchvision.models.resnet18/50(weights=None,
  zero_init_residual=True)`` with ``fc = nn.Identity()`` (feat_dim 512 / 2048).
* Stem: the CIFAR stem (3×3 conv, stride 1, no max-pool) when ``cifar_stem`` is True, or when it is
  None and ``image_size <= 64``; the standard ImageNet stem (7×7 stride-2 conv + max-pool)
  otherwise, as the official STL-10 (96 px) and ImageNet-100 runs use.
* Initialisation: torchvision's (Kaiming-normal fan-out convs, BN γ=1, last BN of every residual
  block γ=0).  Deviation: the official code afterwards re-runs ``nn.Conv2d.reset_parameters()``
  (PyTorch's default Kaiming-uniform, a=√5) on every conv; since each conv feeds a BatchNorm the
  scale of the initial weights hardly matters, and we keep the standard torchvision init.
* ``resnet_small``: the same BasicBlock residual design at a fraction of the cost, for CPU runs on
  32×32 images: stem conv(3→w) + four stages of one BasicBlock each with widths w·(1, 2, 4, 8)
  (stride 1, 2, 2, 2), global average pool, feat_dim 8·w.
* :func:`mlp` reproduces ``load_mlp``: ``[Linear(no bias)–BN–ReLU] × (num_layers−1)`` then
  ``Linear(bias = not last_bn)`` and, with ``last_bn``, a final BN.

Checkpoints (``final.pt``, docs/architecture.md): ``{backbone: state_dict, backbone_name, width,
cifar_stem, image_size, feat_dim, ...}``; :func:`load_backbone` rebuilds the backbone from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from torchvision.models import resnet18, resnet50
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torchvision.models.resnet import BasicBlock, conv1x1

from pipeline.params import BACKBONES

#: keys a ``final.pt`` must hold for :func:`load_backbone`
CHECKPOINT_KEYS = ("backbone", "backbone_name", "width", "cifar_stem", "image_size", "feat_dim")


def uses_cifar_stem(image_size: int, cifar_stem: bool | None = None) -> bool:
    """Resolve the stem choice: an explicit bool wins; None means CIFAR stem for images <= 64 px."""
    return bool(cifar_stem) if cifar_stem is not None else image_size <= 64


def _cifar_stem(width: int) -> tuple[nn.Module, nn.Module]:
    return nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False), nn.Identity()


def _standard_stem(width: int) -> tuple[nn.Module, nn.Module]:
    return (nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))


class SmallResNet(nn.Module):
    """A narrow ResNet of torchvision ``BasicBlock``\\ s that trains at a useful speed on a CPU.

    Attribute names follow torchvision's ``ResNet`` (``conv1, bn1, relu, maxpool, layer1..4,
    avgpool``), so code that walks a torchvision ResNet (e.g. to find the stem) works on it too.
    """

    def __init__(self, width: int = 16, blocks: tuple[int, ...] = (1, 1, 1, 1), cifar_stem: bool = True):
        super().__init__()
        if width < 1:
            raise ValueError(f"resnet_small: width must be >= 1, got {width}")
        self.conv1, self.maxpool = (_cifar_stem if cifar_stem else _standard_stem)(width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_ch = width
        for i, n in enumerate(blocks):
            out_ch = width * 2 ** i
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or in_ch != out_ch:
                    down = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
                stage.append(BasicBlock(in_ch, out_ch, stride=stride, downsample=down))
                in_ch = out_ch
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = in_ch
        # torchvision's ResNet initialisation, including zero_init_residual=True
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(name: str, image_size: int, width: int = 16,
                   cifar_stem: bool | None = None) -> tuple[nn.Module, int]:
    """Build backbone ``name`` (one of ``pipeline.params.BACKBONES``) for ``image_size`` px images.

    Returns ``(module, feat_dim)``; the module maps ``(B, 3, H, W)`` to ``(B, feat_dim)``.
    ``width`` is used by ``resnet_small`` only (channels of its first stage).
    """
    stem_is_cifar = uses_cifar_stem(image_size, cifar_stem)
    if name == "resnet_small":
        net = SmallResNet(width=width, cifar_stem=stem_is_cifar)
        return net, net.feat_dim
    if name in ("resnet18", "resnet50"):
        net = (resnet18 if name == "resnet18" else resnet50)(weights=None, zero_init_residual=True)
        feat_dim = net.fc.in_features
        net.fc = nn.Identity()
        if stem_is_cifar:
            net.conv1, net.maxpool = _cifar_stem(net.conv1.out_channels)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        return net, feat_dim
    raise ValueError(f"unknown backbone {name!r}; allowed values: {', '.join(BACKBONES)}")


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """Projector / predictor MLP as in the official ``load_mlp``.

    ``num_layers`` Linear layers; every layer but the last is ``Linear(no bias)–BatchNorm1d–ReLU``;
    the last is ``Linear(bias=not last_bn)`` followed by ``BatchNorm1d`` when ``last_bn``.
    """
    if num_layers < 1:
        raise ValueError(f"mlp: num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*layers)


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the key prefixes DDP (``module.``) and torch.compile (``_orig_mod.``) add."""
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def load_backbone(path_or_state: str | Path | Mapping[str, Any],
                  map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone saved in a ``final.pt`` (a path, or the already loaded dict).

    Returns ``(backbone, meta)``: the backbone in eval mode with the saved weights, and every other
    entry of the checkpoint (``backbone_name``, ``feat_dim``, ``method``, ``mean``, ``std`` ...).
    Raises FileNotFoundError for a missing file and ValueError, naming the file, when it is not a
    ``final.pt`` of this project or its weights do not fit the backbone it names.
    """
    if isinstance(path_or_state, Mapping):
        where, ckpt = "checkpoint dict", path_or_state
    else:
        path = Path(path_or_state)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint; run the pretrain stage (dvc repro) first")
        from pipeline.checkpoint import load as load_checkpoint

        # weights_only: a final.pt carrying pickled code is refused (UnsafeCheckpointError), never run
        ckpt = load_checkpoint(path, map_location=map_location)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{where}: not a final.pt of this project (holds a {type(ckpt).__name__}, "
                         f"expected a dict with keys {', '.join(CHECKPOINT_KEYS)})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{where}: not a final.pt of this project; missing keys: {', '.join(missing)} "
                         f"(final.pt is written by the pretrain stage next to checkpoint.pt)")
    name = ckpt["backbone_name"]
    if name not in BACKBONES:
        raise ValueError(f"{where}: unknown backbone_name {name!r}; allowed values: {', '.join(BACKBONES)}")
    backbone, feat_dim = build_backbone(name, int(ckpt["image_size"]), int(ckpt["width"]), ckpt["cifar_stem"])
    if feat_dim != int(ckpt["feat_dim"]):
        raise ValueError(f"{where}: feat_dim {ckpt['feat_dim']} does not match backbone {name!r} "
                         f"(width {ckpt['width']}), which has feat_dim {feat_dim}")
    try:
        backbone.load_state_dict(_strip_wrappers(ckpt["backbone"]), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{where}: the saved weights do not fit backbone {name!r} (width {ckpt['width']}, "
                         f"cifar_stem {ckpt['cifar_stem']}, image_size {ckpt['image_size']}): {e}") from e
    backbone.eval()
    meta = {k: v for k, v in ckpt.items() if k != "backbone"}
    return backbone, meta
