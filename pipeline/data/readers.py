"""Readers of the simple binary raw formats: IDX (MNIST family), CIFAR python pickles, STL-10 binaries.

Torchvision reads these formats too, but its readers verify MD5 sums of whole archives, report a
failure as "Dataset not found or corrupted" without naming the file, and (STL-10) load the 2.7 GB
unlabeled split into memory at once.  These readers check every header and size against the file,
raise :class:`CorruptDatasetError` naming the file and what is wrong, and return arrays the caller
can slice lazily (STL-10 is memory-mapped).  Torchvision is still what *downloads* the files
(``pipeline.data.sources``): the layouts read here are exactly the ones it extracts.

All images come back as uint8 NHWC (greyscale IDX images as (N, H, W)).
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np

from pipeline.data.errors import CorruptDatasetError

# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes occur in the MNIST family.
_IDX_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is EOFError
        raise CorruptDatasetError.file(path, f"cannot decompress ({type(e).__name__}: {e})") from e


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array with ``ndim`` dimensions.

    Checks the magic number (two zero bytes, type 0x08 = ubyte, the number of dimensions) and that the
    payload has exactly the number of bytes the header announces.
    """
    path = Path(path)
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDatasetError.file(path, f"{len(raw)} bytes, shorter than the {header}-byte IDX header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise CorruptDatasetError.file(
            path, f"bad IDX magic {raw[:4].hex()} (expected 0000{_IDX_UBYTE:02x}{ndim:02x}: ubyte, {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise CorruptDatasetError.file(
            path, f"header announces shape {shape} = {expected} bytes, file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx(directory: Path, stem: str) -> Path | None:
    """``<directory>/<stem>`` or ``<stem>.gz`` (the uncompressed file wins, as torchvision extracts it)."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


# What a CIFAR python batch may name (its dict, lists, str and int are pickle opcodes, not
# globals): numpy's array reconstruction, under numpy 1's and numpy 2's module names, and
# _codecs.encode, which protocol 2 pickles written by Python 3 use for bytes (it only encodes a str).
_CIFAR_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a callable a CIFAR batch never needs (it could run code when unpickled)."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and plain containers: any other global is refused before it is
    imported, so a crafted batch file cannot run code (plain ``pickle.load`` would call whatever its
    ``__reduce__`` names)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise UnsafePickleError(f"it names {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except UnsafePickleError as e:
        raise CorruptDatasetError.file(path, f"refused: {e}; such a file can run code when unpickled, so it "
                                             "is never loaded. Replace it with the original CIFAR python "
                                             "batch (cifar-10-python.tar.gz / cifar-100-python.tar.gz)") from e
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            ModuleNotFoundError, IndexError) as e:
        raise CorruptDatasetError.file(path, f"not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CorruptDatasetError.file(path, f"expected a pickled dict, got {type(obj).__name__}")
    return obj


def read_cifar_batches(paths: list[Path], label_keys: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Concatenate CIFAR python batches: images uint8 (N, 32, 32, 3) and one int64 array per label key.

    The pickles hold ``data`` (N, 3072) uint8 in CHW order and a list per label key (``labels`` for
    CIFAR-10, ``fine_labels`` / ``coarse_labels`` for CIFAR-100).
    """
    images, labels = [], {k: [] for k in label_keys}
    for path in paths:
        batch = _unpickle(path)
        for key in ("data", *label_keys):
            if key not in batch:
                raise CorruptDatasetError.file(path, f"key {key!r} missing (has {sorted(batch)})")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise CorruptDatasetError.file(path, f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
        for key in label_keys:
            if len(batch[key]) != len(data):
                raise CorruptDatasetError.file(path, f"{len(batch[key])} {key} for {len(data)} images")
            labels[key].append(np.asarray(batch[key], dtype=np.int64))
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return (np.ascontiguousarray(np.concatenate(images)),
            {k: np.concatenate(v) for k, v in labels.items()})


def read_cifar_meta(path: Path, key: str) -> list[str]:
    """Class names from ``batches.meta`` (key ``label_names``) or CIFAR-100's ``meta``."""
    meta = _unpickle(path)
    if key not in meta:
        raise CorruptDatasetError.file(path, f"key {key!r} missing (has {sorted(meta)})")
    return [str(n) for n in meta[key]]


STL10_SIDE = 96
_STL10_BYTES = 3 * STL10_SIDE * STL10_SIDE


def open_stl10_images(path: Path) -> np.ndarray:
    """A memory-mapped view (N, 3, 96, 96) of an STL-10 ``*_X.bin`` file, stored column-major.

    Index it and call :func:`stl10_to_nhwc` on the slice: nothing is read before that.
    """
    size = path.stat().st_size
    if size == 0 or size % _STL10_BYTES:
        raise CorruptDatasetError.file(path, f"{size} bytes is not a multiple of {_STL10_BYTES} (one 3x96x96 image)")
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(size // _STL10_BYTES, 3, STL10_SIDE, STL10_SIDE))


def stl10_to_nhwc(chunk: np.ndarray) -> np.ndarray:
    """(B, 3, W, H) column-major STL-10 bytes → (B, H, W, 3) uint8 (what torchvision's transpose does)."""
    return np.ascontiguousarray(np.asarray(chunk).transpose(0, 3, 2, 1))


def read_stl10_labels(path: Path, n: int) -> np.ndarray:
    """``*_y.bin``: one byte per image, 1..10 on disk, returned 0-based int64."""
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != n:
        raise CorruptDatasetError.file(path, f"{len(labels)} labels for {n} images")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise CorruptDatasetError.file(path, f"labels outside 1..10 (min {labels.min() + 1}, max {labels.max() + 1})")
    return labels
