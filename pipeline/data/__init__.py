"""Datasets: the registry, raw readers, the offline colourised Fashion-MNIST and the prepared format.

Public API (stages use only these):

* ``DATASETS`` (name → :class:`DatasetSpec`), ``dataset_tasks(name)``, ``pretrain_splits(name)``
* ``validate_dataset_available(name, entry, data_params)``: cheap presence check, before any compute
* ``prepare_dataset(name, entry, data_params) -> Path``: raw files → ``data/prepared/<name>/``
* ``load_split(prepared_root, name, split) -> Split(images, labels, meta)``, ``load_meta``,
  ``pretrain_images(prepared_root, name)``
* errors: ``DatasetUnavailableError`` / ``CorruptDatasetError`` / ``PreparedDataMissingError``
  (all ``FileNotFoundError``); unknown names and bad entries raise ``pipeline.config.ConfigError``.

Module map: ``registry`` (specs, splits table), ``sources`` (where raw data lives and how it is read),
``readers`` (IDX, CIFAR pickle, STL-10 binary parsers), ``cfmnist`` (the colourisation design),
``images`` (resize/decode), ``prepare`` (orchestration), ``prepared`` (the on-disk format).
"""

from pipeline.data.errors import CorruptDatasetError, DatasetUnavailableError, PreparedDataMissingError
from pipeline.data.prepare import prepare_dataset, validate_dataset_available, validate_datasets
from pipeline.data.prepared import Split, load_meta, load_split, pretrain_images
from pipeline.data.registry import DATASETS, DatasetSpec, dataset_tasks, get_spec, pretrain_splits

__all__ = ["DATASETS", "DatasetSpec", "dataset_tasks", "get_spec", "pretrain_splits",
           "validate_dataset_available", "validate_datasets", "prepare_dataset",
           "Split", "load_split", "load_meta", "pretrain_images",
           "DatasetUnavailableError", "CorruptDatasetError", "PreparedDataMissingError"]
