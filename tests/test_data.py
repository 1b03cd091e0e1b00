"""pipeline.data: registry, raw formats through the user code path, cfmnist design, prepared format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import rgb_to_hsv
from torchvision.transforms.functional import adjust_hue

from pipeline.config import ConfigError
from pipeline.data import (DATASETS, CorruptDatasetError, DatasetUnavailableError, PreparedDataMissingError,
                           dataset_tasks, load_meta, load_split, prepare_dataset, pretrain_images,
                           pretrain_splits, validate_dataset_available)
from pipeline.data import cfmnist, sources
from pipeline.data.prepare import subsample
from pipeline.params import DataParams, DatasetEntry, from_dict
from tests import data_fakes as fakes

CF_ENTRY = DatasetEntry(tasks=["class", "color", "fine"])


@pytest.fixture(autouse=True)
def no_system_datasets(tmp_path, monkeypatch):
    """Hide /usr/share/datasets so that only the fake files under tmp_path are found."""
    monkeypatch.setattr(sources, "SYSTEM_DATASET_DIR", tmp_path / "system-datasets")


def params(tmp_path, **kw) -> DataParams:
    return DataParams(root=str(tmp_path / "raw"), prepared=str(tmp_path / "prepared"), **kw)


def circular_mean_hue(rgb: np.ndarray) -> float:
    """Mean hue in [0, 1) of the garment pixels (max channel >= 64) of one uint8 RGB image."""
    pixels = rgb.reshape(-1, 3).astype(np.float64) / 255.0
    pixels = pixels[pixels.max(axis=1) >= 64 / 255]
    angle = 2 * np.pi * rgb_to_hsv(pixels)[:, 0]
    return float(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi) % 1.0)


# ------------------------------------------------------------------------------------------ registry
def test_registry_names_tasks_and_errors():
    assert {"cfmnist", "digits", "cifar10", "cifar100", "stl10", "flowers102", "dtd", "pets", "food101",
            "caltech101", "aircraft", "cars", "sun397", "imagenet100", "fc100", "cub200", "plant_disease"} <= set(DATASETS)
    assert dataset_tasks("cfmnist") == ("class", "color", "fine", "hue")
    assert set(DataParams().datasets["cfmnist"].tasks) <= set(dataset_tasks(DataParams().pretrain))
    assert pretrain_splits("stl10") == ("train", "unlabeled")
    assert DATASETS["stl10"].image_size == 96 and DATASETS["cifar10"].image_size == 32
    with pytest.raises(ConfigError, match=r"data\.datasets: unknown dataset 'mnist'.*cfmnist.*stl10"):
        dataset_tasks("mnist")


def test_entry_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.datasets\.digits\.tasks: unknown task 'color'.*class"):
        validate_dataset_available("digits", DatasetEntry(tasks=["color"]), params(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.datasets\.digits\.image_size"):
        validate_dataset_available("digits", DatasetEntry(image_size=2), params(tmp_path))


# ------------------------------------------------------------------------- colourised Fashion-MNIST
@pytest.fixture
def fmnist(tmp_path):
    return fakes.write_fmnist(tmp_path / "raw" / "fashion-mnist", n_train=60, n_test=24, gz=True)


def test_cfmnist_shapes_labels_and_fine(tmp_path, fmnist):
    out = prepare_dataset("cfmnist", CF_ENTRY, params(tmp_path))
    assert out == tmp_path / "prepared" / "cfmnist"
    for split, n in (("train", 60), ("test", 24)):
        s = load_split(tmp_path / "prepared", "cfmnist", split)
        assert s.images.shape == (n, 32, 32, 3) and s.images.dtype == np.uint8
        assert set(s.labels) == {"class", "color", "fine", "hue"}
        assert all(y.dtype == np.int64 for y in s.labels.values())
        np.testing.assert_array_equal(s.labels["class"], fmnist[split][1])
        assert s.labels["color"].min() >= 0 and s.labels["color"].max() < 6
        np.testing.assert_array_equal(s.labels["fine"], s.labels["class"] * 6 + s.labels["color"])
        np.testing.assert_array_equal(s.labels["hue"] // cfmnist.HUE_SUBBINS, s.labels["color"])
        # black 2-px border (padding of the 28x28 garment) and black background inside
        assert not s.images[:, :2].any() and not s.images[:, :, -2:].any()
        np.testing.assert_array_equal(s.images[..., 2:30, 2:30, :].max(-1) == 0, fmnist[split][0] == 0)
    # bins are balanced within each class: 6 train images per class -> each colour once
    train = load_split(tmp_path / "prepared", "cfmnist", "train")
    for c in range(10):
        assert sorted(train.labels["color"][train.labels["class"] == c]) == list(range(6))
    meta = load_meta(tmp_path / "prepared", "cfmnist")
    assert meta["tasks"]["fine"]["num_classes"] == 60 and meta["tasks"]["color"]["class_names"][0] == "red"
    assert meta["tasks"]["fine"]["class_names"][6 * 9 + 4] == "blue Ankle boot"
    assert meta["splits"] == {"train": 60, "test": 24} and meta["image_size"] == 32
    assert meta["source"] == str(tmp_path / "raw" / "fashion-mnist")
    assert meta["params"]["colour"]["saturation"] == cfmnist.SATURATION
    assert meta["tasks"]["hue"]["num_classes"] == 24


def test_cfmnist_hue_task_follows_the_drawn_hue():
    """'hue' = 6-bin colour · 4 + the 12° sub-bin of the hue within the bin's central ±24° band:
    check against the hue recovered from the colourised pixels (hexcone hue of the garment's tint)."""
    import colorsys
    classes = np.repeat(np.arange(10), 60)
    bins, hues = cfmnist.sample_colours(classes, seed=3, split="train")
    y = cfmnist.hue_class_of(hues)
    assert y.min() == 0 and y.max() == 23 and (y // 4 == bins).all()
    counts = np.bincount(y, minlength=24)
    assert counts.min() > 0.5 * counts.mean()                    # balanced: hue uniform within the band
    grey = np.full((len(hues), 28, 28), 255, np.uint8)
    pixels = cfmnist.colourise(grey, hues)[:, 16, 16].astype(np.float64) / 255
    recovered = np.array([colorsys.rgb_to_hsv(*p)[0] for p in pixels])
    degrees = lambda h: (h * 360 + 180) % 360 - 180
    # sub-bin boundaries every 12°, hue recovered within uint8 rounding (< 1°): away from a boundary
    # the label of the recovered hue is the label
    offset = np.abs(((recovered * 6 - bins + 0.5) % 6 - 0.5) * 60)
    away = (np.abs(offset % 12 - 6) < 5.0)
    np.testing.assert_array_equal(cfmnist.hue_class_of(recovered)[away], y[away])
    assert np.abs(degrees(recovered - hues)).max() < 1.0


def test_cfmnist_colour_label_follows_drawn_hue(tmp_path, fmnist):
    prepare_dataset("cfmnist", CF_ENTRY, params(tmp_path, seed=3))
    s = load_split(tmp_path / "prepared", "cfmnist", "train")
    half_width = 24 / 360 + 0.01          # documented: hues within ±24° of the bin centre (+ rounding)
    for image, colour in zip(s.images, s.labels["color"]):
        hue = circular_mean_hue(image)
        assert int(np.round(hue * 6)) % 6 == colour
        assert abs((hue - colour / 6 + 0.5) % 1.0 - 0.5) <= half_width


def test_cfmnist_hue_jitter_moves_hue_by_a_large_fraction_of_a_bin(tmp_path, fmnist):
    """ColorJitter(hue=0.1) shifts the measured hue by 0.6 bin widths, and (thanks to the high saturation)
    that is a large change of the pixels, not a rounding-level one."""
    prepare_dataset("cfmnist", CF_ENTRY, params(tmp_path))
    images = load_split(tmp_path / "prepared", "cfmnist", "test").images[:8]
    for image in images:
        shifted = adjust_hue(torch.from_numpy(image).permute(2, 0, 1), 0.1).permute(1, 2, 0).numpy()
        shift = (circular_mean_hue(shifted) - circular_mean_hue(image) + 0.5) % 1.0 - 0.5
        assert abs(shift * 6 - 0.6) < 0.1, shift * 6
        garment = image.max(-1) >= 64
        change = np.abs(shifted.astype(int) - image.astype(int)).max(-1)[garment].mean()
        assert change > 60, change          # ~80 grey levels at saturation 0.9; ~27 at 0.3


def test_cfmnist_deterministic_in_seed(tmp_path, fmnist):
    a = prepare_dataset("cfmnist", CF_ENTRY, params(tmp_path, seed=0))
    first = (a / "train.npz").read_bytes()
    prepare_dataset("cfmnist", CF_ENTRY, params(tmp_path, seed=0))      # replaces atomically
    assert (a / "train.npz").read_bytes() == first
    prepare_dataset("cfmnist", CF_ENTRY, params(tmp_path, seed=1))
    other = load_split(tmp_path / "prepared", "cfmnist", "train")
    assert (a / "train.npz").read_bytes() != first
    np.testing.assert_array_equal(other.labels["class"], fmnist["train"][1])  # only the colours differ
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == ["cfmnist"]    # no temp dirs left


def test_raw_idx_and_torchvision_layout(tmp_path):
    """Uncompressed IDX files in torchvision's FashionMNIST/raw layout give the same dataset as gz ones."""
    fakes.write_fmnist(tmp_path / "raw" / "FashionMNIST" / "raw", gz=False)
    prepare_dataset("cfmnist", CF_ENTRY, params(tmp_path))
    raw = load_split(tmp_path / "prepared", "cfmnist", "train")
    assert load_meta(tmp_path / "prepared", "cfmnist")["source"].endswith("FashionMNIST/raw")
    other = tmp_path / "gz"
    fakes.write_fmnist(other / "raw" / "fashion-mnist", gz=True)
    prepare_dataset("cfmnist", CF_ENTRY, params(other))
    np.testing.assert_array_equal(load_split(other / "prepared", "cfmnist", "train").images, raw.images)


def test_max_train_subsampling_is_deterministic_and_keeps_colours(tmp_path, fmnist):
    full = load_split(prepare_dataset("cfmnist", CF_ENTRY, params(tmp_path)).parent, "cfmnist", "train")
    sub_params = params(tmp_path / "sub")
    sub_params.root = str(tmp_path / "raw")
    entry = DatasetEntry(tasks=["class"], max_train=17, max_test=5)
    prepare_dataset("cfmnist", entry, sub_params)
    sub = load_split(sub_params.prepared, "cfmnist", "train")
    keep = subsample(60, 17, 0, "cfmnist", "train")
    assert len(set(keep)) == 17 and sub.images.shape[0] == 17
    np.testing.assert_array_equal(sub.images, full.images[keep])           # same pixels, same colour
    np.testing.assert_array_equal(sub.labels["fine"], full.labels["fine"][keep])
    assert load_meta(sub_params.prepared, "cfmnist")["splits"] == {"train": 17, "test": 5}
    again = load_split(prepare_dataset("cfmnist", entry, sub_params).parent, "cfmnist", "train")
    np.testing.assert_array_equal(again.images, sub.images)
    assert not np.array_equal(subsample(60, 17, 1, "cfmnist", "train"), keep)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="apt package dataset-fashion-mnist not installed")
def test_offline_default_reads_the_system_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DATASET_DIR", Path("/usr/share/datasets"))
    entry = DatasetEntry(tasks=["class", "color", "fine"], max_train=300, max_test=100)
    assert validate_dataset_available("cfmnist", entry, params(tmp_path)) == Path("/usr/share/datasets/fashion-mnist")
    prepare_dataset("cfmnist", entry, params(tmp_path))
    s = load_split(tmp_path / "prepared", "cfmnist", "test", verify=True)
    assert s.images.shape == (100, 32, 32, 3) and s.labels["fine"].max() < 60
    assert s.meta["source"] == "/usr/share/datasets/fashion-mnist"


# ------------------------------------------------------------------------------ missing / corrupt
def test_missing_data_names_dataset_paths_and_fix_and_deletes_nothing(tmp_path):
    old = tmp_path / "prepared" / "cfmnist"
    old.mkdir(parents=True)
    (old / "train.npz").write_bytes(b"previous result")
    p = params(tmp_path)
    for call in (validate_dataset_available, prepare_dataset):
        with pytest.raises(DatasetUnavailableError) as err:
            call("cfmnist", CF_ENTRY, p)
        msg = str(err.value)
        assert isinstance(err.value, FileNotFoundError)
        assert "'cfmnist'" in msg and str(tmp_path / "raw" / "fashion-mnist") in msg
        assert str(tmp_path / "system-datasets" / "fashion-mnist") in msg
        assert "apt-get install dataset-fashion-mnist" in msg and "data.download: true" in msg
    assert (old / "train.npz").read_bytes() == b"previous result"
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["cfmnist"]


def test_not_downloadable_dataset_says_where_to_put_files(tmp_path):
    with pytest.raises(DatasetUnavailableError, match=r"(?s)'fc100'.*raw/fc100.*train/<class>.*cannot be downloaded"):
        validate_dataset_available("fc100", DatasetEntry(tasks=["class"]), params(tmp_path, download=True))
    # a downloadable one passes the cheap check when data.download is true, without touching the network
    assert validate_dataset_available("cifar10", DatasetEntry(), params(tmp_path, download=True)) is None
    with pytest.raises(DatasetUnavailableError, match=r"(?s)'cifar10'.*cifar-10-batches-py.*data.download: true"):
        validate_dataset_available("cifar10", DatasetEntry(), params(tmp_path))


def _corrupt_truncated_gz(d: Path) -> Path:
    path = d / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _corrupt_bad_magic(d: Path) -> Path:
    path = d / "t10k-labels-idx1-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(b"\x00\x00\x0d" + data[3:]))
    return path


def _corrupt_short_payload(d: Path) -> Path:
    path = d / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    return path


@pytest.mark.parametrize("corrupt, detail", [(_corrupt_truncated_gz, "cannot decompress"),
                                             (_corrupt_bad_magic, "bad IDX magic"),
                                             (_corrupt_short_payload, "header announces")])
def test_corrupt_idx_is_named_and_nothing_deleted(tmp_path, fmnist, corrupt, detail):
    p = params(tmp_path)
    prepare_dataset("cfmnist", CF_ENTRY, p)
    before = (tmp_path / "prepared" / "cfmnist" / "train.npz").read_bytes()
    bad = corrupt(tmp_path / "raw" / "fashion-mnist")
    with pytest.raises(CorruptDatasetError) as err:
        prepare_dataset("cfmnist", CF_ENTRY, p)
    msg = str(err.value)
    assert "'cfmnist'" in msg and str(bad) in msg and detail in msg and "Fix:" in msg
    assert err.value.path == str(bad) and isinstance(err.value, FileNotFoundError)
    assert (tmp_path / "prepared" / "cfmnist" / "train.npz").read_bytes() == before
    assert [q.name for q in (tmp_path / "prepared").iterdir()] == ["cfmnist"]


# ------------------------------------------------------------------------------------ CIFAR, STL-10
def test_cifar10_pickles(tmp_path):
    fake = fakes.write_cifar10(tmp_path / "raw")
    prepare_dataset("cifar10", DatasetEntry(tasks=["class"]), params(tmp_path))
    for split in ("train", "test"):
        s = load_split(tmp_path / "prepared", "cifar10", split)
        np.testing.assert_array_equal(s.images, fake[split][0])           # 32 px: stored unchanged
        np.testing.assert_array_equal(s.labels["class"], fake[split][1])
    assert s.meta["tasks"]["class"]["class_names"][1] == "automobile" and s.meta["splits"]["train"] == 20


def test_cifar100_two_tasks_and_resize(tmp_path):
    fake = fakes.write_cifar100(tmp_path / "raw")
    prepare_dataset("cifar100", DatasetEntry(tasks=["class", "coarse"], image_size=96), params(tmp_path))
    s = load_split(tmp_path / "prepared", "cifar100", "test")
    assert s.images.shape == (5, 96, 96, 3)
    np.testing.assert_array_equal(s.labels["class"], fake["test"][1])
    np.testing.assert_array_equal(s.labels["coarse"], fake["test"][2])
    assert s.meta["tasks"]["coarse"]["num_classes"] == 20 and s.meta["tasks"]["class"]["num_classes"] == 100


def test_truncated_cifar_pickle_is_named(tmp_path):
    fakes.write_cifar10(tmp_path / "raw")
    bad = tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(CorruptDatasetError, match=r"(?s)'cifar10'.*data_batch_3 is corrupt or truncated"):
        prepare_dataset("cifar10", DatasetEntry(tasks=["class"]), params(tmp_path))
    assert not (tmp_path / "prepared" / "cifar10").exists()


def test_stl10_binaries_orientation_unlabeled_and_max_train(tmp_path):
    fake = fakes.write_stl10(tmp_path / "raw")
    prepare_dataset("stl10", DatasetEntry(tasks=["class"]), params(tmp_path))
    for split in ("train", "test"):
        s = load_split(tmp_path / "prepared", "stl10", split)
        np.testing.assert_array_equal(s.images, fake[split][0])           # column-major file read right
        np.testing.assert_array_equal(s.labels["class"], fake[split][1])
    unlabeled = load_split(tmp_path / "prepared", "stl10", "unlabeled")
    assert unlabeled.labels == {} and unlabeled.images.shape == (6, 96, 96, 3)
    assert pretrain_images(tmp_path / "prepared", "stl10").shape == (11, 96, 96, 3)
    prepare_dataset("stl10", DatasetEntry(tasks=["class"], image_size=32, max_train=3), params(tmp_path))
    meta = load_meta(tmp_path / "prepared", "stl10")
    assert meta["splits"] == {"train": 3, "test": 4, "unlabeled": 3} and meta["image_size"] == 32
    assert load_split(tmp_path / "prepared", "stl10", "test").images.shape == (4, 32, 32, 3)


def test_truncated_stl10_binary_is_named(tmp_path):
    fakes.write_stl10(tmp_path / "raw")
    bad = tmp_path / "raw" / "stl10_binary" / "test_X.bin"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(CorruptDatasetError, match="test_X.bin is corrupt or truncated"):
        prepare_dataset("stl10", DatasetEntry(tasks=["class"]), params(tmp_path))


# ---------------------------------------------------------------------------- image folders, DTD
def test_image_folder_disjoint_fewshot_classes(tmp_path):
    fakes.write_image_folder(tmp_path / "raw" / "fc100", {"train": ["apple", "bee"], "test": ["cloud", "dolphin"]})
    prepare_dataset("fc100", DatasetEntry(tasks=["class"]), params(tmp_path))
    train = load_split(tmp_path / "prepared", "fc100", "train")
    test = load_split(tmp_path / "prepared", "fc100", "test")
    assert train.images.shape == (6, 32, 32, 3) and sorted(set(train.labels["class"])) == [0, 1]
    assert sorted(set(test.labels["class"])) == [2, 3]
    assert test.meta["tasks"]["class"]["class_names"] == ["apple", "bee", "cloud", "dolphin"]


def test_image_folder_fewshot_pool_and_val_dir(tmp_path):
    fakes.write_image_folder(tmp_path / "raw" / "cub200", {"train": ["a", "b"], "val": ["a", "b"]}, per_class=2)
    prepare_dataset("cub200", DatasetEntry(tasks=["class"], image_size=24), params(tmp_path))
    meta = load_meta(tmp_path / "prepared", "cub200")
    assert meta["splits"] == {"train": 4, "test": 8} and meta["params"]["test_dir"] == "val"
    test = load_split(tmp_path / "prepared", "cub200", "test")
    train = load_split(tmp_path / "prepared", "cub200", "train")
    np.testing.assert_array_equal(test.images[:4], train.images)           # the pool starts with train


def test_corrupt_image_file_is_named(tmp_path):
    fakes.write_image_folder(tmp_path / "raw" / "plant_disease", {"train": ["x"], "test": ["x"]})
    bad = tmp_path / "raw" / "plant_disease" / "test" / "x" / "1.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(CorruptDatasetError, match=r"(?s)'plant_disease'.*1\.png is corrupt"):
        prepare_dataset("plant_disease", DatasetEntry(tasks=["class"]), params(tmp_path))


def test_dtd_through_torchvision_uses_train_plus_val(tmp_path):
    counts = fakes.write_dtd(tmp_path / "raw")
    prepare_dataset("dtd", DatasetEntry(tasks=["class"], image_size=16), params(tmp_path))
    train = load_split(tmp_path / "prepared", "dtd", "train")
    test = load_split(tmp_path / "prepared", "dtd", "test")
    assert train.images.shape == (counts["train"] + counts["val"], 16, 16, 3)
    assert test.images.shape == (counts["test"], 16, 16, 3)
    assert train.meta["tasks"]["class"]["class_names"] == ["banded", "dotted"]
    assert sorted(set(test.labels["class"])) == [0, 1]


def test_caltech101_per_class_split_from_seed(tmp_path):
    """No official split: 30 images per class for train from data.seed, the rest for test."""
    fakes.write_caltech101(tmp_path / "raw", per_class=32)
    p = params(tmp_path)
    prepare_dataset("caltech101", DatasetEntry(tasks=["class"], image_size=16), p)
    train, test = (load_split(p.prepared, "caltech101", s) for s in ("train", "test"))
    assert np.bincount(train.labels["class"]).tolist() == [30, 30]
    assert np.bincount(test.labels["class"]).tolist() == [2, 2]
    assert train.meta["tasks"]["class"]["class_names"] == ["accordion", "airplanes"]
    assert test.images.shape == (4, 16, 16, 3)
    other = params(tmp_path / "s1", seed=1)
    other.root = p.root
    prepare_dataset("caltech101", DatasetEntry(tasks=["class"], image_size=16), other)
    assert not np.array_equal(load_split(other.prepared, "caltech101", "test").images, test.images)


# ----------------------------------------------------------------------------------------- digits
def test_digits_split_and_rgb(tmp_path):
    p = params(tmp_path)
    prepare_dataset("digits", DatasetEntry(tasks=["class"]), p)
    train = load_split(p.prepared, "digits", "train")
    test = load_split(p.prepared, "digits", "test")
    assert train.images.shape == (1297, 32, 32, 3) and test.images.shape == (500, 32, 32, 3)
    assert (train.images[..., 0] == train.images[..., 2]).all() and train.images.max() > 200
    assert np.bincount(test.labels["class"], minlength=10).min() >= 45          # stratified
    other = params(tmp_path / "s1", seed=1)
    prepare_dataset("digits", DatasetEntry(tasks=["class"]), other)
    assert not np.array_equal(load_split(other.prepared, "digits", "test").labels["class"], test.labels["class"])


# ------------------------------------------------------------------------------ prepared format
def test_load_split_missing_names_path_and_fix(tmp_path):
    with pytest.raises(PreparedDataMissingError, match=r"prepared/cifar10/meta\.json.*dvc repro prepare@cifar10"):
        load_split(tmp_path / "prepared", "cifar10", "train")


def test_meta_hashes_and_verify(tmp_path, fmnist):
    out = prepare_dataset("cfmnist", CF_ENTRY, params(tmp_path))
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta) >= {"name", "source", "image_size", "tasks", "splits", "sha256", "params"}
    assert set(meta["sha256"]) == {"train.npz", "test.npz"}
    load_split(tmp_path / "prepared", "cfmnist", "test", verify=True)
    with np.load(out / "test.npz") as z:
        arrays = dict(z)
    arrays["images"][0, 0, 0, 0] ^= 1
    np.savez(out / "test.npz", **arrays)
    with pytest.raises(ValueError, match="sha256 differs"):
        load_split(tmp_path / "prepared", "cfmnist", "test", verify=True)


def test_params_yaml_entry_round_trip(tmp_path):
    """A data section as users type it validates and prepares (digits needs no files)."""
    data = from_dict(DataParams, {"pretrain": "digits", "root": str(tmp_path / "raw"), "prepared": str(tmp_path / "p"),
                                  "datasets": {"digits": {"tasks": ["class"], "max_train": 100, "max_test": 50}}}, "data")
    out = prepare_dataset("digits", data.datasets["digits"], data)
    assert load_meta(out.parent, "digits")["splits"] == {"train": 100, "test": 50}


class _MarkerPayload:
    """Unpickling this calls ``open(marker, "w")``: the marker appears if the reader trusts the pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_cifar_batch_is_refused_and_never_runs(tmp_path):
    import pickle

    fakes.write_cifar10(tmp_path / "raw")
    bad = tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_2"
    with open(bad, "rb") as f:
        batch = pickle.load(f, encoding="latin1")           # the fake's own (safe) content
    marker = tmp_path / "pwned"
    batch["filenames"] = _MarkerPayload(marker)
    with open(bad, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with open(bad, "rb") as f:                              # guard: plain pickle would run it
        pickle.load(f, encoding="latin1")
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CorruptDatasetError, match=r"(?s)data_batch_2.*refused: it names (builtins|io)\.open") as err:
        prepare_dataset("cifar10", DatasetEntry(tasks=["class"]), params(tmp_path))
    assert "can run code" in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "prepared" / "cifar10").exists()


def test_no_loader_in_the_pipeline_trusts_a_pickle():
    """Every file the pipeline reads goes through a restricted loader (pipeline.checkpoint.load,
    the CIFAR unpickler, np.load without pickles): no plain pickle.load / torch.load with
    weights_only=False / np.load(allow_pickle=True) / yaml.load / yaml.unsafe_load in the code."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    unsafe = re.compile(r"pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True|yaml\.load\(|"
                        r"yaml\.unsafe_load|torch\.load\((?![^)]*weights_only\s*=\s*True)")
    hits = [f"{p.relative_to(root)}:{i}: {line.strip()}"
            for d in ("pipeline", "stages", "scripts", "bench") for p in sorted((root / d).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if unsafe.search(line) and not line.lstrip().startswith("#")]
    assert not hits, "unsafe loads:\n" + "\n".join(hits)
