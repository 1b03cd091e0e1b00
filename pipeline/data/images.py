"""Image geometry used while preparing: resizing uint8 batches and decoding image files.

Conventions (the official AugSelf transfer code, ``datasets.py``): images are resized so that the
shorter side is ``size`` with bicubic interpolation and then centre-cropped to ``size``×``size``.
Square in-memory batches (CIFAR, STL-10) take the same path through ``torch.nn.functional.interpolate``
(bicubic with anti-aliasing when shrinking, which is what PIL does), processed in chunks so memory
stays bounded.  Everything returns uint8 RGB NHWC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.data.errors import CorruptDatasetError

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def resize_batch(images: np.ndarray, size: int, mode: str = "bicubic") -> np.ndarray:
    """Resize a square uint8 NHWC (or NHW greyscale → replicated to RGB) batch to ``size``×``size``."""
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.shape[1] == size and images.shape[2] == size:
        return np.ascontiguousarray(images)
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"resize_batch expects square images, got {images.shape[1:3]}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    antialias = size < images.shape[1]
    y = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=antialias)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def pil_to_square(image: Image.Image, size: int, mode: str = "bicubic") -> np.ndarray:
    """Shorter side → ``size`` then centre crop, as uint8 (size, size, 3)."""
    image = image.convert("RGB")
    image = TF.resize(image, size, interpolation=INTERPOLATIONS[mode])
    image = TF.center_crop(image, [size, size])
    return np.asarray(image, dtype=np.uint8)


def load_image_file(path: str | Path, size: int, mode: str = "bicubic") -> np.ndarray:
    """Decode an image file to a ``size``×``size`` RGB array; an unreadable file raises CorruptDatasetError."""
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_square(image, size, mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptDatasetError.file(path, f"cannot decode image ({type(e).__name__}: {e})") from e
