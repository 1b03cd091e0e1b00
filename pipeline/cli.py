"""What every stage entry point shares: argument parsing, params loading, and error reporting.

A stage script is ``main = stage(fn)`` where ``fn(params, args)`` does the work by calling the
library.  Bad input (a ConfigError, a missing/corrupt dataset or checkpoint) is printed as one clear
``error:`` line and the process exits with status 2 before any compute; a non-finite loss exits 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

from pipeline.config import ConfigError
from pipeline.params import Params, load_params

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3

# bench/bench_overhead.py (issue 23 item 2): where a stage process's wall time goes.  When set, each stage
# appends one JSON line to this file: the process's start (from /proc), the moment its entry point runs
# (after the interpreter and the imports), the end of its work and the interpreter's exit (atexit); with
# STAGE_PROFILE_ENV set as well, the work runs under cProfile, dumped into that folder.  Off: nothing.
STAGE_LOG_ENV = "AUGSELF_STAGE_LOG"
STAGE_PROFILE_ENV = "AUGSELF_STAGE_PROFILE"


def write_json(path: str | Path, data: dict) -> Path:
    """The stages' JSON writer: :func:`pipeline.checkpoint.write_json` (one atomic helper), imported when
    called: pipeline.checkpoint imports torch, and a stage that writes no JSON (validate, report) should
    not pay that import (issue 23 item 2).  pipeline.checkpoint itself is left as it is: it is training
    code (pipeline.fingerprint.TRAINING_CODE), and an edit there changes every final.pt's params hash."""
    from pipeline.checkpoint import write_json as write

    return write(path, data)


def _process_start() -> float | None:
    """This process's start in epoch seconds (Linux: /proc; None elsewhere), 10 ms resolution."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def _timed(fn: Callable[[], None], argv: list[str], t_main: float) -> None:
    """Run ``fn``; with STAGE_LOG_ENV set, log its timestamps (and profile it under STAGE_PROFILE_ENV)."""
    log = os.environ.get(STAGE_LOG_ENV)
    if not log:
        fn()
        return
    import atexit
    import json

    record = {"argv": [Path(sys.argv[0]).stem if sys.argv else "", *argv], "pid": os.getpid(),
              "cwd": os.getcwd(), "t_process": _process_start(), "t_main": t_main,
              "t_work": time.time()}

    def write(**more) -> None:
        with open(log, "a") as f:
            f.write(json.dumps({**record, **more}) + "\n")

    profile_dir = os.environ.get(STAGE_PROFILE_ENV)
    prof = None
    if profile_dir:
        import cProfile

        prof = cProfile.Profile()
    try:
        if prof is not None:
            prof.runcall(fn)
        else:
            fn()
    finally:
        record["t_work_end"] = time.time()
        if prof is not None:
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            name = "-".join([*record["argv"], str(os.getpid())]).replace("/", "_")
            prof.dump_stats(str(Path(profile_dir) / f"{name}.prof"))
        atexit.register(lambda: write(t_exit=time.time()))


def stage(description: str, positional: tuple[str, ...] = ()) -> Callable:
    def wrap(fn: Callable[[Params, argparse.Namespace], None]) -> Callable[[list[str] | None], int]:
        def main(argv: list[str] | None = None) -> int:
            t_main = time.time()
            parser = argparse.ArgumentParser(description=description)
            for name in positional:
                parser.add_argument(name)
            parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
            args = parser.parse_args(argv)
            try:
                params = load_params(args.params)
                check_dataset_entries(params)
                _timed(lambda: fn(params, args), list(argv if argv is not None else sys.argv[1:]), t_main)
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
