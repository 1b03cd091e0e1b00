"""Frozen backbone features for the transfer evaluations.

Conventions (as the official ``collect_features(..., normalize=False)`` of github.com/hankook/AugSelf):

* the backbone runs in eval mode (BatchNorm uses its running statistics) under ``torch.no_grad``;
* the features are the pooled backbone output, *not* L2-normalised and *not* the projector output;
* input pixels are uint8 NHWC, converted to float in [0, 1] and normalised with the ``mean``/``std``
  the model was pretrained with (the checkpoint stores them);
* images are expected at the model's resolution already (``prepare`` resizes once, with antialiasing);
  when ``size`` differs from the images' size they are resized here with antialiased bilinear
  interpolation (torchvision's ``resize``), like the official ``Resize`` on PIL images.

On CUDA the forward pass runs under bf16 autocast with channels_last memory (the features are cast
back to float32); on CPU it runs in float32, so CPU features are bit-reproducible.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torchvision.transforms.v2 import functional as TF

__all__ = ["extract_features", "embed"]


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def embed(backbone: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """Features of an already normalised float batch ``(B, 3, H, W)`` on the backbone's device.

    The caller sets eval mode; this runs channels_last, bf16 autocast on CUDA only, and returns
    float32 ``(B, d)`` on the same device (a spatial output is flattened).
    """
    views = views.contiguous(memory_format=torch.channels_last)
    with _autocast(views.device):
        out = backbone(views)
    return out.flatten(1).float()


def extract_features(backbone: nn.Module, images_uint8_nhwc: np.ndarray, mean: Sequence[float],
                     std: Sequence[float], batch_size: int, device: str | torch.device = "cpu",
                     size: int | None = None) -> np.ndarray:
    """Frozen features ``(N, d)`` float32 of uint8 images ``(N, H, W, 3)``.

    ``size``: the model's input resolution; ``None`` or equal to the images' size means no resize.
    The backbone is moved to ``device`` and left there; its train/eval mode is restored afterwards.
    """
    images = np.asarray(images_uint8_nhwc)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"extract_features: expected uint8 images of shape (N, H, W, 3), got "
                         f"{images.dtype} {images.shape}; load them with pipeline.data.load_split")
    if batch_size < 1:
        raise ValueError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    resize = size is not None and tuple(images.shape[1:3]) != (size, size)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    was_training = backbone.training
    backbone.to(device).eval()
    chunks = []
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start:start + batch_size]).to(device, non_blocking=True)
            x = batch.permute(0, 3, 1, 2).float().div_(255.0)
            if resize:
                x = TF.resize(x, [size, size], antialias=True).clamp_(0.0, 1.0)
            x = (x - mean_t) / std_t
            chunks.append(embed(backbone, x).cpu())
    finally:
        backbone.train(was_training)
    if not chunks:
        raise ValueError("extract_features: no images given")
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)
