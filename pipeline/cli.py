"""What every stage entry point shares: argument parsing, params loading, and error reporting.

A stage script is ``main = stage(fn)`` where ``fn(params, args)`` does the work by calling the
library.  Bad input (a ConfigError, a missing/corrupt dataset or checkpoint) is printed as one clear
``error:`` line and the process exits with status 2 before any compute; a non-finite loss exits 3.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from pipeline.checkpoint import write_json  # noqa: F401  (the stages' JSON writer: one atomic helper)
from pipeline.config import ConfigError
from pipeline.params import Params, load_params

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3


def stage(description: str, positional: tuple[str, ...] = ()) -> Callable:
    def wrap(fn: Callable[[Params, argparse.Namespace], None]) -> Callable[[list[str] | None], int]:
        def main(argv: list[str] | None = None) -> int:
            parser = argparse.ArgumentParser(description=description)
            for name in positional:
                parser.add_argument(name)
            parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
            args = parser.parse_args(argv)
            try:
                params = load_params(args.params)
                check_dataset_entries(params)
                fn(params, args)
            except ConfigError as e:
                print(f"error: {args.params}: {e}", file=sys.stderr)
                return EXIT_BAD_INPUT
            except (FileNotFoundError, ValueError) as e:
                # Missing/corrupt data or checkpoints; the library's messages name the file and the fix.
                print(f"error: {e}", file=sys.stderr)
                return EXIT_BAD_INPUT
            except RuntimeError as e:
                from pipeline.train import NonFiniteLossError

                if not isinstance(e, NonFiniteLossError):
                    raise
                print(f"error: {e}", file=sys.stderr)
                return EXIT_TRAINING_FAILED
            return 0

        return main

    return wrap


def check_dataset_entries(params: Params) -> None:
    """Every dataset named in data.datasets is registered and its entry fits it (ConfigError if not)."""
    from pipeline.data.registry import check_entry

    for name, entry in params.data.datasets.items():
        check_entry(name, entry)


def is_main_process() -> bool:
    """Rank 0 under torchrun (or not distributed): the only process that writes files and logs."""
    return int(os.environ.get("RANK", "0")) == 0
