"""Tiny fake copies of the raw dataset formats, written exactly in the layouts users have on disk.

Each writer returns what it wrote (images as uint8 NHWC, labels) so tests can compare the prepared
arrays with the source pixels.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0x0000, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fake_garments(n: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, 28, 28): a bright textured blob per image on a black background, like Fashion-MNIST."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for k in range(n):
        top, left = rng.integers(2, 8, size=2)
        h, w = rng.integers(12, 20, size=2)
        images[k, top:top + h, left:left + w] = rng.integers(120, 256, size=(h, w))
    return images


def write_fmnist(directory: Path, n_train: int = 60, n_test: int = 24, gz: bool = True, seed: int = 0) -> dict:
    """The four IDX files in ``directory`` (gzipped or not); labels cycle through 0..9."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fake_garments(n, rng), (np.arange(n) % 10).astype(np.uint8)
        for stem, array in zip(FMNIST_STEMS[split], (images, labels)):
            data = idx_bytes(array)
            if gz:
                with gzip.open(directory / f"{stem}.gz", "wb") as f:
                    f.write(data)
            else:
                (directory / stem).write_bytes(data)
        out[split] = (images, labels.astype(np.int64))
    return out


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_data(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train_images, train_labels = [], []
    for b in range(1, 6):
        images = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        labels = list(rng.integers(0, 10, size=per_batch).tolist())
        _pickle(d / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels": labels,
                                        "data": _cifar_data(images), "filenames": [f"{b}_{i}.png" for i in range(per_batch)]})
        train_images.append(images), train_labels.extend(labels)
    test_images = rng.integers(0, 256, size=(n_test, 32, 32, 3), dtype=np.uint8)
    test_labels = list(rng.integers(0, 10, size=n_test).tolist())
    _pickle(d / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels,
                               "data": _cifar_data(test_images), "filenames": []})
    _pickle(d / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck"], "num_vis": 3072, "num_cases_per_batch": 10000})
    return {"train": (np.concatenate(train_images), np.array(train_labels)), "test": (test_images, np.array(test_labels))}


def write_cifar100(root: Path, n_train: int = 10, n_test: int = 5, seed: int = 0) -> dict:
    """``root/cifar-100-python/{train,test,meta}`` with fine and coarse labels."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n)
        _pickle(d / split, {"filenames": [], "batch_label": split, "fine_labels": fine.tolist(),
                            "coarse_labels": (fine // 5).tolist(), "data": _cifar_data(images)})
        out[split] = (images, fine, fine // 5)
    _pickle(d / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                         "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return out


def write_stl10(root: Path, n: dict | None = None, seed: int = 0) -> dict:
    """``root/stl10_binary/``: ``*_X.bin`` column-major (3, 96, 96) per image, ``*_y.bin`` labels 1..10."""
    n = n or {"train": 5, "test": 4, "unlabeled": 6}
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in n.items():
        images = rng.integers(0, 256, size=(count, 96, 96, 3), dtype=np.uint8)
        images.transpose(0, 3, 2, 1).tofile(d / f"{split}_X.bin")     # NHWC -> (N, C, W, H) on disk
        labels = rng.integers(0, 10, size=count)
        if split != "unlabeled":
            (labels + 1).astype(np.uint8).tofile(d / f"{split}_y.bin")
        out[split] = (images, labels)
    (d / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                   "monkey", "ship", "truck"]) + "\n")
    (d / "fold_indices.txt").write_text("0 1 2\n")
    return out


def write_image(path: Path, size: tuple[int, int], rng: np.random.Generator, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def write_image_folder(directory: Path, classes: dict[str, list[str]], per_class: int = 3, seed: int = 0) -> None:
    """``directory/<split>/<class>/<k>.png`` for the given classes per split, odd sizes (not square)."""
    rng = np.random.default_rng(seed)
    for split, names in classes.items():
        for c in names:
            for k in range(per_class):
                write_image(directory / split / c / f"{k}.png", (40 + 3 * k, 30), rng)


def write_dtd(root: Path, seed: int = 0) -> dict[str, int]:
    """torchvision's DTD layout ``root/dtd/dtd/{images/<class>/*.jpg, labels/{train,val,test}1.txt}``."""
    rng = np.random.default_rng(seed)
    base = root / "dtd" / "dtd"
    counts = {"train": 4, "val": 2, "test": 3}
    classes = ["banded", "dotted"]
    (base / "labels").mkdir(parents=True)
    for split, n in counts.items():
        lines = []
        for c in classes:
            for k in range(n):
                name = f"{c}_{split}_{k:04d}.jpg"
                write_image(base / "images" / c / name, (50, 40), rng, fmt="JPEG")
                lines.append(f"{c}/{name}")
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return {split: n * len(classes) for split, n in counts.items()}


def write_caltech101(root: Path, per_class: int = 32, seed: int = 0) -> None:
    """torchvision's ``root/caltech101/101_ObjectCategories/<class>/image_%04d.jpg`` (one greyscale image)."""
    rng = np.random.default_rng(seed)
    base = root / "caltech101" / "101_ObjectCategories"
    for c in ("BACKGROUND_Google", "accordion", "airplanes"):
        for k in range(1, per_class + 1):
            write_image(base / c / f"image_{k:04d}.jpg", (30, 20), rng, fmt="JPEG")
    Image.fromarray(rng.integers(0, 256, size=(20, 30), dtype=np.uint8)).save(base / "accordion" / "image_0001.jpg")
