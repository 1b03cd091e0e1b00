"""Exceptions of the data layer.

All of them subclass :class:`FileNotFoundError`, so a stage that lets them propagate exits non-zero
with the message, and callers can catch "data is not usable" in one place.  Messages always name the
dataset, the path(s) involved and the exact command or param that fixes the problem.
"""

from __future__ import annotations


class DatasetUnavailableError(FileNotFoundError):
    """The raw files of a dataset are not on disk and may not (or could not) be downloaded."""


class CorruptDatasetError(DatasetUnavailableError):
    """A raw file exists but cannot be read (truncated, wrong magic number, bad pickle, bad image).

    Raised first by a reader with the file and what is wrong with it; ``prepare_dataset`` re-raises it
    with the dataset name and the fix prepended.
    """

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = None if path is None else str(path)

    @classmethod
    def file(cls, path, detail: str) -> "CorruptDatasetError":
        """The reader-level error: ``<path> is corrupt or truncated: <detail>``."""
        return cls(f"{path} is corrupt or truncated: {detail}", path)


class PreparedDataMissingError(FileNotFoundError):
    """``data/prepared/<name>/<split>.npz`` (or its meta.json) does not exist: run the prepare stage."""
