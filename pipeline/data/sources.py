"""Where each raw dataset lives, how to get it, and how to read it split by split.

A :class:`Source` knows

* the directories it looks in (``candidates``) and how to tell cheaply that one holds a complete copy
  (``is_complete``: file/folder existence only, so stages can refuse before any compute),
* how to obtain the files (``fix``: the command or param a user types; ``download`` through torchvision
  where torchvision can download them and ``data.download`` is true),
* how to read them (``open``) into :class:`RawSplit` objects whose labels are known up front and whose
  images are decoded lazily, chunk by chunk, at the requested size, so ``prepare`` can subsample
  first and stream into a preallocated uint8 array.

Layouts under ``data.root`` (``R``) that are accepted, first match wins:

=============  =====================================================================================
fashion-mnist  ``R/fashion-mnist/``, ``R/FashionMNIST/raw/`` (torchvision), then the system copy
               ``/usr/share/datasets/fashion-mnist/`` (``apt-get install dataset-fashion-mnist``);
               the four IDX files, each gzipped or not
cifar10/100    ``R/cifar-10-batches-py/``, ``R/cifar-100-python/`` (the python pickles, as extracted)
stl10          ``R/stl10_binary/`` with ``{train,test}_{X,y}.bin``, ``unlabeled_X.bin``, ``class_names.txt``
torchvision    the folder each torchvision class expects under ``R`` (``R/flowers-102``, ``R/dtd``, …)
image folders  ``R/<name>/train/<class>/*.jpg`` and ``R/<name>/test/<class>/*.jpg`` (``val`` is accepted
               for ``test``, as ImageNet ships it); any PIL-readable extension
=============  =====================================================================================
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.data import cfmnist, readers
from pipeline.data.errors import CorruptDatasetError
from pipeline.params import DataParams

# pipeline.data.images (torch, torchvision, PIL) is imported where images are decoded or resized, not
# here: the registry imports this module, and `validate` needs the registry but no image (issue 23 item 2).


def resize_batch(*args, **kwargs):
    from pipeline.data.images import resize_batch

    return resize_batch(*args, **kwargs)


def pil_to_square(*args, **kwargs):
    from pipeline.data.images import pil_to_square

    return pil_to_square(*args, **kwargs)


def load_image_file(*args, **kwargs):
    from pipeline.data.images import load_image_file

    return load_image_file(*args, **kwargs)

# Where Debian-style dataset packages install their files; a module attribute so tests can point it
# at an empty directory.
SYSTEM_DATASET_DIR = Path("/usr/share/datasets")

DOWNLOAD_FIX = "set data.download: true in params.yaml (or run `dvc exp run -S data.download=true`)"


@dataclass
class RawSplit:
    """One split of a raw dataset: ``n`` images, labels per task (int64, length n), lazy images.

    ``read(indices, size)`` returns uint8 (len(indices), size, size, 3) for sorted ``indices``.
    """
    n: int
    labels: dict[str, np.ndarray]
    read: Callable[[np.ndarray, int], np.ndarray]


@dataclass
class RawDataset:
    splits: dict[str, RawSplit]
    class_names: dict[str, list[str]]        # per task
    origin: str                              # the directory read (recorded as meta.json 'source')
    params: dict = field(default_factory=dict)  # construction facts for meta.json 'params'


def _parallel_decode(load: Callable[[int], np.ndarray], indices: np.ndarray, size: int) -> np.ndarray:
    """Decode images (PIL releases the GIL while decoding) on a few threads, in order."""
    out = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        for k, image in enumerate(pool.map(load, (int(i) for i in indices))):
            out[k] = image
    return out


def per_class_split(labels: np.ndarray, n_train: int, n_test: int | None,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``n_train`` random images for train and ``n_test`` (None: all the rest) for test."""
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:n_train])
        test.append(idx[n_train:] if n_test is None else idx[n_train:n_train + n_test])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class Source(ABC):
    """How to find, obtain and read one raw dataset (see the module docstring for layouts)."""

    what: str = ""                 # the files, in words, for messages
    downloadable: bool = False     # torchvision can download it

    @abstractmethod
    def candidates(self, data: DataParams) -> list[Path]:
        """Directories that may hold the raw files, in order of preference."""

    @abstractmethod
    def is_complete(self, path: Path) -> bool:
        """Cheap check (existence only) that ``path`` holds everything ``open`` reads."""

    @abstractmethod
    def open(self, path: Path, data: DataParams) -> RawDataset:
        """Read labels (and lazily images) from ``path``."""

    def download(self, data: DataParams) -> None:
        raise NotImplementedError

    def fix(self, data: DataParams) -> str:
        """What a user does to make the files available."""
        where = self.candidates(data)[0]
        fix = f"put the files at {where}"
        if self.downloadable:
            fix += f", or {DOWNLOAD_FIX} to download them with torchvision"
        return fix

    def repair(self, data: DataParams) -> str:
        """What a user does about a corrupt file."""
        return f"delete the damaged file and {self.fix(data)}"


# --------------------------------------------------------------------------------------- MNIST family
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class FashionMNISTSource(Source):
    """The four Fashion-MNIST IDX files, 28×28 greyscale, labels 0..9."""

    what = "Fashion-MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*; .gz or not)"
    downloadable = True

    def candidates(self, data: DataParams) -> list[Path]:
        root = Path(data.root)
        return [root / "fashion-mnist", root / "FashionMNIST" / "raw", SYSTEM_DATASET_DIR / "fashion-mnist"]

    def is_complete(self, path: Path) -> bool:
        return all(readers.find_idx(path, stem) for pair in _FMNIST_FILES.values() for stem in pair)

    def download(self, data: DataParams) -> None:
        from torchvision.datasets import FashionMNIST
        for train in (True, False):
            FashionMNIST(str(data.root), train=train, download=True)

    def fix(self, data: DataParams) -> str:
        return (f"run `apt-get install dataset-fashion-mnist` (installs {SYSTEM_DATASET_DIR / 'fashion-mnist'}), "
                f"or copy the four files into {Path(data.root) / 'fashion-mnist'}/, or {DOWNLOAD_FIX}")

    def repair(self, data: DataParams) -> str:
        return ("reinstall it (`apt-get install --reinstall dataset-fashion-mnist`) or delete the damaged file "
                f"from {Path(data.root)} and {DOWNLOAD_FIX}")

    def read_grey(self, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{split: (uint8 (N, 28, 28), int64 labels (N,))}, sizes cross-checked."""
        out = {}
        for split, (image_stem, label_stem) in _FMNIST_FILES.items():
            image_file, label_file = readers.find_idx(path, image_stem), readers.find_idx(path, label_stem)
            images = readers.read_idx(image_file, ndim=3)
            labels = readers.read_idx(label_file, ndim=1).astype(np.int64)
            if len(images) != len(labels):
                raise CorruptDatasetError.file(label_file, f"{len(labels)} labels for {len(images)} images in {image_file}")
            if labels.max(initial=0) > 9:
                raise CorruptDatasetError.file(label_file, f"label {labels.max()} outside 0..9")
            out[split] = (images, labels)
        return out


class ColourisedFashionMNISTSource(FashionMNISTSource):
    """Fashion-MNIST tinted one hue per image on a 32×32 black canvas (:mod:`pipeline.data.cfmnist`)."""

    def open(self, path: Path, data: DataParams) -> RawDataset:
        splits = {}
        for split, (grey, classes) in self.read_grey(path).items():
            bins, hues = cfmnist.sample_colours(classes, data.seed, split)

            def read(indices, size, grey=grey, hues=hues):
                return resize_batch(cfmnist.colourise(grey[indices], hues[indices]), size, mode="bilinear")

            splits[split] = RawSplit(len(grey), {"class": classes, "color": bins,
                                                 "fine": classes * cfmnist.NUM_HUE_BINS + bins,
                                                 "hue": cfmnist.hue_class_of(hues)}, read)
        return RawDataset(splits, cfmnist.label_names(), str(path), {"colour": cfmnist.design()})


# ------------------------------------------------------------------------------------------ sklearn
class DigitsSource(Source):
    """scikit-learn's bundled 8×8 digits (1,797 images, 0..16 grey levels): always on disk.

    Grey levels are scaled to 0..255, resized bilinearly to the requested size and replicated to RGB.
    Split: a stratified random 500-image test set from ``data.seed`` (1,297 train).
    """

    what = "scikit-learn's bundled digits"
    TEST_SIZE = 500

    def candidates(self, data: DataParams) -> list[Path]:
        import sklearn.datasets
        return [Path(sklearn.datasets.__file__).parent / "data"]

    def is_complete(self, path: Path) -> bool:
        return (path / "digits.csv.gz").is_file()

    def fix(self, data: DataParams) -> str:
        return "reinstall scikit-learn (`pip install --force-reinstall scikit-learn`)"

    def open(self, path: Path, data: DataParams) -> RawDataset:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        digits = load_digits()
        grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)         # (N, 8, 8)
        labels = digits.target.astype(np.int64)
        train, test = train_test_split(np.arange(len(labels)), test_size=self.TEST_SIZE, stratify=labels,
                                       random_state=int(data.seed) % 2**32)
        splits = {}
        for split, idx in (("train", np.sort(train)), ("test", np.sort(test))):
            def read(indices, size, idx=idx):
                return resize_batch(grey[idx[indices]], size, mode="bilinear")
            splits[split] = RawSplit(len(idx), {"class": labels[idx]}, read)
        return RawDataset(splits, {"class": [str(d) for d in range(10)]}, "sklearn.datasets.load_digits",
                          {"test_size": self.TEST_SIZE, "resize": "bilinear", "grey_to_rgb": "replicated"})


# -------------------------------------------------------------------------------------------- CIFAR
class CifarSource(Source):
    """CIFAR-10 / CIFAR-100 python pickles (``data_batch_1..5``/``test_batch`` or ``train``/``test``).

    CIFAR-100 has two tasks: 'class' (the 100 fine labels) and 'coarse' (the 20 superclasses).
    """

    downloadable = True

    def __init__(self, classes: int):
        self.classes = classes
        if classes == 10:
            self.folder, self.train_files, self.test_files = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
            self.meta_file, self.keys = "batches.meta", {"class": ("labels", "label_names")}
        else:
            self.folder, self.train_files, self.test_files = "cifar-100-python", ["train"], ["test"]
            self.meta_file = "meta"
            self.keys = {"class": ("fine_labels", "fine_label_names"), "coarse": ("coarse_labels", "coarse_label_names")}
        self.what = f"CIFAR-{classes} python pickles ({', '.join(self.train_files + self.test_files)}, {self.meta_file})"

    def candidates(self, data: DataParams) -> list[Path]:
        return [Path(data.root) / self.folder]

    def is_complete(self, path: Path) -> bool:
        return all((path / f).is_file() for f in (*self.train_files, *self.test_files, self.meta_file))

    def download(self, data: DataParams) -> None:
        from torchvision.datasets import CIFAR10, CIFAR100
        (CIFAR10 if self.classes == 10 else CIFAR100)(str(data.root), train=True, download=True)

    def open(self, path: Path, data: DataParams) -> RawDataset:
        label_keys = tuple(k for k, _ in self.keys.values())
        splits = {}
        for split, files in (("train", self.train_files), ("test", self.test_files)):
            images, labels = readers.read_cifar_batches([path / f for f in files], label_keys)

            def read(indices, size, images=images):
                return resize_batch(images[indices], size)
            splits[split] = RawSplit(len(images), {task: labels[key] for task, (key, _) in self.keys.items()}, read)
        names = {task: readers.read_cifar_meta(path / self.meta_file, name_key) for task, (_, name_key) in self.keys.items()}
        return RawDataset(splits, names, str(path))


# ------------------------------------------------------------------------------------------- STL-10
class STL10Source(Source):
    """STL-10 binaries; splits train (5k), test (8k) and unlabeled (100k, no labels), memory-mapped."""

    what = "STL-10 binaries (train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, class_names.txt)"
    downloadable = True
    FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin", "class_names.txt")

    def candidates(self, data: DataParams) -> list[Path]:
        return [Path(data.root) / "stl10_binary"]

    def is_complete(self, path: Path) -> bool:
        return all((path / f).is_file() for f in self.FILES)

    def download(self, data: DataParams) -> None:
        from torchvision.datasets import STL10
        STL10(str(data.root), split="test", download=True)

    def open(self, path: Path, data: DataParams) -> RawDataset:
        splits = {}
        for split in ("train", "test", "unlabeled"):
            images = readers.open_stl10_images(path / f"{split}_X.bin")
            labels = {} if split == "unlabeled" else {"class": readers.read_stl10_labels(path / f"{split}_y.bin", len(images))}

            def read(indices, size, images=images):
                return resize_batch(readers.stl10_to_nhwc(images[indices]), size)
            splits[split] = RawSplit(len(images), labels, read)
        names = [line.strip() for line in (path / "class_names.txt").read_text().splitlines() if line.strip()]
        if len(names) != 10:
            raise CorruptDatasetError.file(path / "class_names.txt", f"{len(names)} class names, expected 10")
        return RawDataset(splits, {"class": names}, str(path))


# ---------------------------------------------------------------------------------- torchvision sets
def _targets(ds) -> np.ndarray:
    """Labels of a torchvision dataset without decoding images (attribute names as of torchvision 0.29)."""
    for attr in ("targets", "_labels", "y"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    raise TypeError(f"{type(ds).__name__}: cannot find its labels (targets/_labels/y); torchvision changed?")


def _image_file(ds, i: int) -> str:
    files = getattr(ds, "_image_files", None)
    return str(files[i]) if files is not None else f"{type(ds).__name__}[{i}]"


class TorchvisionSource(Source):
    """A transfer dataset read by its torchvision class (download=False unless data.download).

    ``train``/``test`` list the torchvision split names concatenated into our train/test (the paper's
    protocol uses train+val as train where a val split exists).  Datasets without an official split
    (``split_kw=None``) are split per class by ``per_class = (n_train, n_test | None)`` from data.seed.
    """

    downloadable = True

    def __init__(self, cls_name: str, folder: str, train=("train",), test=("test",), split_kw: str | None = "split",
                 per_class: tuple[int, int | None] | None = None, kwargs: dict | None = None):
        self.cls_name, self.folder, self.train, self.test = cls_name, folder, tuple(train), tuple(test)
        self.split_kw, self.per_class, self.kwargs = split_kw, per_class, dict(kwargs or {})
        self.what = f"torchvision.datasets.{cls_name} files (folder {folder}/)"

    def candidates(self, data: DataParams) -> list[Path]:
        return [Path(data.root) / self.folder]

    def is_complete(self, path: Path) -> bool:
        return path.is_dir() and any(path.iterdir())

    def _build(self, data: DataParams, split: str | None, download: bool):
        import torchvision.datasets as tvd
        kwargs = dict(self.kwargs)
        if split is not None:
            kwargs[self.split_kw] = split
        try:
            return getattr(tvd, self.cls_name)(str(data.root), download=download, **kwargs)
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            raise CorruptDatasetError(f"{Path(data.root) / self.folder}: torchvision.datasets.{self.cls_name} "
                                      f"cannot read it ({e})", Path(data.root) / self.folder) from e

    def download(self, data: DataParams) -> None:
        for split in (self.train + self.test) if self.split_kw else (None,):
            self._build(data, split, download=True)

    def open(self, path: Path, data: DataParams) -> RawDataset:
        if self.split_kw is None:
            ds = self._build(data, None, download=False)
            labels = _targets(ds)
            rng = np.random.default_rng(np.random.SeedSequence([int(data.seed), 0x5B1, len(labels)]))
            parts = dict(zip(("train", "test"), per_class_split(labels, *self.per_class, rng)))
            members = {split: [(ds, idx)] for split, idx in parts.items()}
        else:
            members = {}
            for ours, theirs in (("train", self.train), ("test", self.test)):
                members[ours] = []
                for split in theirs:
                    ds = self._build(data, split, download=False)
                    members[ours].append((ds, np.arange(len(ds))))
        splits = {split: self._raw_split(parts) for split, parts in members.items()}
        first = members["train"][0][0]
        classes = getattr(first, "classes", None) or getattr(first, "categories", None)
        n_classes = 1 + max(int(s.labels["class"].max(initial=-1)) for s in splits.values())
        names = [str(c) for c in classes] if classes else [str(c) for c in range(n_classes)]
        params = {"torchvision_class": self.cls_name, "train": list(self.train), "test": list(self.test)}
        if self.per_class:
            params["per_class_split"] = list(self.per_class)
        return RawDataset(splits, {"class": names}, str(path), params)

    @staticmethod
    def _raw_split(parts: list[tuple[object, np.ndarray]]) -> RawSplit:
        owners = [(ds, int(i)) for ds, idx in parts for i in idx]
        labels = np.concatenate([_targets(ds)[idx] for ds, idx in parts])

        def load(k: int, size: int) -> np.ndarray:
            ds, i = owners[k]
            try:
                image, _ = ds[i]
            except (OSError, SyntaxError, ValueError) as e:
                raise CorruptDatasetError.file(_image_file(ds, i), f"cannot decode image ({type(e).__name__}: {e})") from e
            return pil_to_square(image, size)

        def read(indices, size):
            return _parallel_decode(lambda k: load(k, size), indices, size)
        return RawSplit(len(owners), {"class": labels}, read)


# ------------------------------------------------------------------------------------- image folders
class ImageFolderSource(Source):
    """``<root>/<dirname>/{train,test}/<class>/<image>`` (``val`` accepted for ``test``).

    Labels index the sorted *union* of class folders over both splits, so a class has the same label
    in train and test and disjoint few-shot class splits (FC100: 60 train / 20 test classes) work.
    ``fewshot_pool``: the official few-shot code pools train and test images into the episode set for
    CUB-200 and Plant Disease; with it the prepared test split is train ∪ test (train stays as is).
    """

    def __init__(self, dirname: str, fewshot_pool: bool = False, note: str = ""):
        self.dirname, self.fewshot_pool, self.note = dirname, fewshot_pool, note
        self.what = f"an image-folder tree <root>/{dirname}/{{train,test}}/<class>/*.jpg"

    def candidates(self, data: DataParams) -> list[Path]:
        return [Path(data.root) / self.dirname]

    @staticmethod
    def _test_dir(path: Path) -> Path:
        return path / "test" if (path / "test").is_dir() or not (path / "val").is_dir() else path / "val"

    def is_complete(self, path: Path) -> bool:
        return all(d.is_dir() and any(d.iterdir()) for d in (path / "train", self._test_dir(path)))

    def fix(self, data: DataParams) -> str:
        root = Path(data.root) / self.dirname
        return (f"place the images as {root}/train/<class>/<image>.jpg and {root}/test/<class>/<image>.jpg "
                f"(cannot be downloaded automatically{'; ' + self.note if self.note else ''})")

    def open(self, path: Path, data: DataParams) -> RawDataset:
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
        dirs = {"train": path / "train", "test": self._test_dir(path)}
        classes = sorted({d.name for split_dir in dirs.values() for d in split_dir.iterdir() if d.is_dir()})
        class_to_idx = {c: i for i, c in enumerate(classes)}
        samples = {split: make_dataset(str(d), {c: class_to_idx[c] for c in classes if (d / c).is_dir()},
                                       extensions=IMG_EXTENSIONS, allow_empty=True)
                   for split, d in dirs.items()}
        if self.fewshot_pool:
            samples["test"] = samples["train"] + samples["test"]
        splits = {}
        for split, items in samples.items():
            files = [f for f, _ in items]

            def read(indices, size, files=files):
                return _parallel_decode(lambda k: load_image_file(files[k], size), indices, size)
            splits[split] = RawSplit(len(items), {"class": np.array([y for _, y in items], dtype=np.int64)}, read)
        return RawDataset(splits, {"class": classes}, str(path),
                          {"test_dir": dirs["test"].name, "fewshot_pool": self.fewshot_pool})
