"""Every dataset the pipeline knows: name → :class:`DatasetSpec` (tasks, default image size, source).

Default image sizes follow the paper: 32 for CIFAR-type data (and the offline cfmnist/digits), 96 for
STL-10 and for the transfer sets evaluated on STL-10-pretrained models (the official transfer code
resizes every image to the pretraining resolution), 224 for ImageNet-100.  ``DatasetEntry.image_size``
overrides it per dataset in params.yaml.

Splits (the paper's, via ``transfer_linear_eval.py``/``datasets.py`` of the official code, with train
meaning train+val where the official code refits on both):

============  ========================================  =========================================
name          train                                     test
============  ========================================  =========================================
cfmnist       60,000 colourised                         10,000 colourised
digits        1,297 (stratified, from data.seed)        500
cifar10/100   50,000                                    10,000
stl10         5,000 (+ 100,000 'unlabeled' split)       8,000
flowers102    train + val (2,040)                       test (6,149)
dtd           train1 + val1 (3,760)                     test1 (1,880)
pets          trainval (3,680)                          test (3,669)
food101       train (75,750)                            test (25,250)
aircraft      trainval (6,667)                          test (3,333)
cars          train (8,144)                             test (8,041)
caltech101    30 per class (from data.seed)             the rest of each class
sun397        50 per class (from data.seed)             50 per class
imagenet100   <root>/imagenet100/train                  <root>/imagenet100/val (or test)
fc100         <root>/fc100/train (60 classes)           <root>/fc100/test (20 novel classes)
cub200        <root>/cub200/train                       train ∪ test (the official few-shot pool)
plant_disease <root>/plant_disease/train                train ∪ test (the official few-shot pool)
============  ========================================  =========================================

Deviations from the official code, because the official split files are not public data we can
ship: Caltech-101 and SUN397 use per-class random splits from ``data.seed`` (the official code loads
``splits/caltech101.pth`` / ``splits/sun397.pth``; ours follow the common 30-per-class and
50/50-per-class protocols).  ImageNet-100 must be provided as the 100-class folder (the official code
filters full ImageNet with ``splits/imagenet100.txt``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError, check_range
from pipeline.data.sources import (CifarSource, ColourisedFashionMNISTSource, DigitsSource, ImageFolderSource,
                                   Source, STL10Source, TorchvisionSource)
from pipeline.params import DatasetEntry


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    tasks: tuple[str, ...]               # label sets stored as labels_<task>
    image_size: int                      # default output size (square)
    source: Source
    description: str
    pretrain_splits: tuple[str, ...] = ("train",)   # the splits a pretraining stage reads


def _specs() -> list[DatasetSpec]:
    tv = TorchvisionSource
    return [
        DatasetSpec("cfmnist", ("class", "color", "fine", "hue"), 32, ColourisedFashionMNISTSource(),
                    "Fashion-MNIST colourised one hue per image (offline default)"),
        DatasetSpec("digits", ("class",), 32, DigitsSource(), "scikit-learn 8x8 digits, upsampled (offline transfer)"),
        DatasetSpec("cifar10", ("class",), 32, CifarSource(10), "CIFAR-10"),
        DatasetSpec("cifar100", ("class", "coarse"), 32, CifarSource(100), "CIFAR-100 (fine classes, 20 superclasses)"),
        DatasetSpec("stl10", ("class",), 96, STL10Source(), "STL-10; pretraining reads train + unlabeled",
                    pretrain_splits=("train", "unlabeled")),
        DatasetSpec("flowers102", ("class",), 96, tv("Flowers102", "flowers-102", train=("train", "val")), "Oxford Flowers-102"),
        DatasetSpec("dtd", ("class",), 96, tv("DTD", "dtd", train=("train", "val")), "Describable Textures, partition 1"),
        DatasetSpec("pets", ("class",), 96, tv("OxfordIIITPet", "oxford-iiit-pet", train=("trainval",)), "Oxford-IIIT Pets"),
        DatasetSpec("food101", ("class",), 96, tv("Food101", "food-101"), "Food-101"),
        DatasetSpec("aircraft", ("class",), 96, tv("FGVCAircraft", "fgvc-aircraft-2013b", train=("trainval",)),
                    "FGVC-Aircraft (100 variants)"),
        DatasetSpec("cars", ("class",), 96, tv("StanfordCars", "stanford_cars"), "Stanford Cars"),
        DatasetSpec("caltech101", ("class",), 96, tv("Caltech101", "caltech101", split_kw=None, per_class=(30, None)),
                    "Caltech-101 (30 train images per class)"),
        DatasetSpec("sun397", ("class",), 96, tv("SUN397", "SUN397", split_kw=None, per_class=(50, 50)),
                    "SUN397 (50/50 images per class)"),
        DatasetSpec("imagenet100", ("class",), 224, ImageFolderSource("imagenet100", note="the 100 classes of "
                    "the CMC ImageNet-100 list, val as test"), "ImageNet-100", ),
        DatasetSpec("fc100", ("class",), 32, ImageFolderSource("fc100", note="FC100 class split: 60 train, "
                    "20 test superclass-disjoint CIFAR-100 classes"), "FC100 few-shot (CIFAR-100 classes)"),
        DatasetSpec("cub200", ("class",), 96, ImageFolderSource("cub200", fewshot_pool=True, note="CUB-200-2011 "
                    "split into train/test class folders"), "CUB-200-2011 few-shot"),
        DatasetSpec("plant_disease", ("class",), 96, ImageFolderSource("plant_disease", fewshot_pool=True,
                    note="PlantVillage train/test class folders"), "Plant Disease few-shot"),
    ]


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _specs()}


def get_spec(name: str) -> DatasetSpec:
    """The spec of ``name``, or ConfigError naming data.datasets and the registered names."""
    if name not in DATASETS:
        raise ConfigError(f"data.datasets: unknown dataset {name!r}; registered datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_tasks(name: str) -> tuple[str, ...]:
    """The tasks (label sets) a registered dataset provides, e.g. ('class', 'color', 'fine')."""
    return get_spec(name).tasks


def pretrain_splits(name: str) -> tuple[str, ...]:
    """The prepared splits a pretraining stage reads (STL-10: train and unlabeled)."""
    return get_spec(name).pretrain_splits


def check_entry(name: str, entry: DatasetEntry) -> DatasetSpec:
    """Validate one ``data.datasets.<name>`` entry against the registry; return the spec."""
    spec = get_spec(name)
    key = f"data.datasets.{name}"
    for task in entry.tasks:
        if task not in spec.tasks:
            raise ConfigError(f"{key}.tasks: unknown task {task!r} for {name}; allowed values: {', '.join(spec.tasks)}")
    if entry.image_size is not None:
        check_range(f"{key}.image_size", entry.image_size, 8, 1024)
    check_range(f"{key}.max_train", entry.max_train, 0)
    check_range(f"{key}.max_test", entry.max_test, 0)
    return spec


def image_size(name: str, entry: DatasetEntry) -> int:
    return entry.image_size or get_spec(name).image_size
