"""Colourised Fashion-MNIST ('cfmnist'): the offline default dataset, built like Coloured MNIST.

Design (all constants below are written to meta.json under ``params.colour``):

* Canvas: the 28×28 garment is zero-padded by 2 px on each side to 32×32 (CIFAR geometry, so the
  CIFAR stem and 32-px augmentations apply unchanged).
* Background: black (0, 0, 0), as in Coloured MNIST.  Black has no hue, so colour jitter's hue and
  saturation factors leave it untouched and the colour of an image is carried by the garment alone.
* Colour: one hue per image.  The hue circle is cut into ``NUM_HUE_BINS = 6`` bins of 60° centred on
  red, yellow, green, cyan, blue and magenta (bin k covers (60k − 30°, 60k + 30°]).  Within its bin
  the hue is uniform on the central ``1 − 2·HUE_MARGIN`` = 80 % (±24° around the centre), so a
  label is never ambiguous after uint8 rounding.  Colour jitter with ``hue = 0.1`` shifts the hue by
  up to ±36° = 0.6 bin widths: enough to push an image into the neighbouring bin, which is what makes
  the 'color' task sensitive to colour invariance (the point of AugSelf).
* Saturation ``SATURATION = 0.9`` for every image (high, so a hue shift is a visible colour change;
  below 1 so saturation jitter can move it both ways).  Value = garment intensity / 255, i.e.
  ``pixel = intensity · (1 − S + S · rgb(hue))``: the garment's shading is kept, only tinted.
* Labels: 'class' = the 10 garments, 'color' = the hue bin, 'fine' = class · 6 + color (60 classes,
  used for few-shot episodes), 'hue' = the hue at 12° resolution: each bin's central ±24° band cut
  into ``HUE_SUBBINS = 4`` sub-bins of 12° (24 classes, ``color · 4 + sub-bin``, balanced because the
  hue is uniform within the band).  Colour jitter with ``hue = 0.1`` moves the hue by up to ±36°,
  three sub-bins: a network that becomes invariant to the jitter cannot tell neighbouring 'hue'
  classes apart, while the 6-bin 'color' task survives (the premise of AugSelf, docs/study.md).  Bins are assigned *balanced within each garment class* (a random
  permutation of 0,1,…,5,0,1,… per class), so every fine class has ⌊n_class/6⌋ or ⌈n_class/6⌉
  images: 1000 per fine class in train, 166–167 in test.
* Determinism: bins and hues of a split depend only on (``data.seed``, split), drawn from numpy's
  PCG64 seeded by a ``SeedSequence``; they are drawn for the *whole* split before any
  ``max_train``/``max_test`` subsampling, so an image keeps its colour whatever subset is kept.
"""

from __future__ import annotations

import numpy as np

NUM_HUE_BINS = 6
HUE_SUBBINS = 4           # 'hue' task: sub-bins of the central band of each bin (12° each)
HUE_BIN_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")
HUE_MARGIN = 0.1          # fraction of the bin width kept free on each side
SATURATION = 0.9
CANVAS = 32
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_SPLIT_CODES = {"train": 0, "test": 1}


def design() -> dict:
    """The colourisation constants, recorded in meta.json."""
    return {"canvas": CANVAS, "hue_bins": list(HUE_BIN_NAMES), "hue_margin": HUE_MARGIN,
            "saturation": SATURATION, "background": "black", "value": "garment intensity / 255",
            "bin_assignment": "balanced within each garment class"}


def hue_bin_of(hue: np.ndarray) -> np.ndarray:
    """Bin index of hues in [0, 1) (bin k centred on k/6), the inverse used by tests and analyses."""
    return np.floor((np.asarray(hue) * NUM_HUE_BINS + 0.5) % NUM_HUE_BINS).astype(np.int64)


def hue_class_of(hue: np.ndarray) -> np.ndarray:
    """'hue' task label (0..23) of hues in [0, 1): ``bin · 4 + sub-bin`` of the central ±24° band."""
    h6 = np.asarray(hue, dtype=np.float64) * NUM_HUE_BINS
    bins = hue_bin_of(hue)
    offset = (h6 - bins + 0.5) % NUM_HUE_BINS - 0.5          # position within the bin, in bin widths
    band = 0.5 - HUE_MARGIN
    sub = np.clip(np.floor((offset + band) / (2 * band) * HUE_SUBBINS), 0, HUE_SUBBINS - 1).astype(np.int64)
    return bins * HUE_SUBBINS + sub


def sample_colours(class_labels: np.ndarray, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(bins int64, hues float64 in [0, 1)) for every image of a split, deterministic in (seed, split)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0F, _SPLIT_CODES[split]]))
    bins = np.empty(len(class_labels), dtype=np.int64)
    for c in range(len(FMNIST_CLASSES)):
        idx = np.flatnonzero(class_labels == c)
        bins[idx] = rng.permutation(np.arange(len(idx)) % NUM_HUE_BINS)
    offset = rng.uniform(-(0.5 - HUE_MARGIN), 0.5 - HUE_MARGIN, size=len(class_labels))
    hues = ((bins + offset) / NUM_HUE_BINS) % 1.0
    return bins, hues


def hue_to_rgb(hues: np.ndarray) -> np.ndarray:
    """Fully saturated, full-value RGB in [0, 1] of each hue (the standard HSV hexcone), shape (N, 3)."""
    h6 = np.asarray(hues, dtype=np.float64)[:, None] * 6.0
    k = np.array([5.0, 3.0, 1.0])                    # R, G, B phase of the hexcone
    m = (k + h6) % 6.0
    return 1.0 - np.clip(np.minimum(m, 4.0 - m), 0.0, 1.0)


def colourise(grey: np.ndarray, hues: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) garments + hues (N,) → uint8 (N, 32, 32, 3) on a black canvas."""
    tint = 1.0 - SATURATION + SATURATION * hue_to_rgb(hues)            # (N, 3), RGB at value 1
    pad = (CANVAS - grey.shape[1]) // 2
    out = np.zeros((len(grey), CANVAS, CANVAS, 3), dtype=np.uint8)
    body = grey.astype(np.float32)[..., None] * tint.astype(np.float32)[:, None, None, :]
    out[:, pad:pad + grey.shape[1], pad:pad + grey.shape[2]] = np.rint(body).astype(np.uint8)
    return out


def label_names() -> dict[str, list[str]]:
    """Class names per task: class, color, fine (fine k = class k // 6 in colour k % 6), hue
    (hue k = colour k // 4, sub-bin k % 4, named by its range in degrees from the bin centre)."""
    width = 2 * (0.5 - HUE_MARGIN) * 360 / NUM_HUE_BINS / HUE_SUBBINS     # 12°
    lo = -(0.5 - HUE_MARGIN) * 360 / NUM_HUE_BINS                           # -24°
    subs = [f"{lo + i * width:+.0f}..{lo + (i + 1) * width:+.0f}deg" for i in range(HUE_SUBBINS)]
    return {"class": list(FMNIST_CLASSES), "color": list(HUE_BIN_NAMES),
            "fine": [f"{colour} {garment}" for garment in FMNIST_CLASSES for colour in HUE_BIN_NAMES],
            "hue": [f"{colour} {sub}" for colour in HUE_BIN_NAMES for sub in subs]}
