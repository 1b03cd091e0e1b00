"""Same params, same bytes across two versions of the code: models, features, metrics (issue 23 item 2).

Builds two throw-away projects with the tiny end-to-end configuration (tests/e2e.py's TINY): one from
the git revision ``--against`` (default: main), one from this working tree (tracked + untracked files),
runs ``dvc repro`` in each (CPU, one thread), and compares the sha256 of every model, feature and
metric file the pipeline writes.  Prints one row per file; exits 1 when any differs or is missing.

    python bench/check_identical.py                      # this branch's base (merge-base with main) vs the working tree
    python bench/check_identical.py --against HEAD~3 --keep /tmp/ident

A speed-up that is meant to leave results alone (lazy imports, fewer processes, cheaper bookkeeping)
must pass this; it is what `docs/performance.md` ("Where a study model's time goes") quotes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e import PIPELINE_OUTPUTS, TINY, env  # noqa: E402

# What the comparison covers: the files DVC tracks as results (and the pretraining curves).
COMPARED = ("models/*/final.pt", "models/*/metrics.json", "models/*/run.json", "models/*/losses.csv",
            "models/*/monitor.csv", "features/*/*.npz", "metrics/*/*.json", "metrics/*/*.npz")


def export_tree(rev: str | None, dest: Path) -> None:
    """The files of ``rev`` (git archive), or of the working tree when ``rev`` is None."""
    dest.mkdir(parents=True)
    if rev is not None:
        data = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
    else:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
        for f in files:
            if (ROOT / f).is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, dest / f)
    for out in PIPELINE_OUTPUTS:
        target = dest / out.rstrip("/")
        if target.is_dir() and out.endswith("/") and out != "bench/results/":
            shutil.rmtree(target)
        elif target.is_file():
            target.unlink()


def tiny_project(dest: Path) -> None:
    import yaml

    from pipeline.config import set_dotted

    params = yaml.safe_load((dest / "params.yaml").read_text())
    set_dotted(params, TINY)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=check", "-c", "user.email=check@example.com"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)


def digests(project: Path) -> dict[str, str]:
    out = {}
    for pattern in COMPARED:
        for f in sorted(project.glob(pattern)):
            out[f.relative_to(project).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default=None,
                    help="git revision of the reference code (default: where this branch left main, "
                         "`git merge-base main HEAD`)")
    ap.add_argument("--keep", type=Path, default=None, help="build both projects under this folder and keep them")
    a = ap.parse_args()
    if a.against is None:
        a.against = subprocess.run(["git", "merge-base", "main", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout.strip()
    base = a.keep or Path(tempfile.mkdtemp(prefix="augself-identical-"))
    sides = {"reference": base / "reference", "working-tree": base / "working-tree"}
    export_tree(a.against, sides["reference"])
    export_tree(None, sides["working-tree"])
    found = {}
    for name, project in sides.items():
        tiny_project(project)
        e = env()
        e.pop("PYTHONPATH", None)            # the project's own code (cwd), not this checkout's
        r = subprocess.run(["dvc", "repro"], cwd=project, env=e, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: dvc repro exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            return 1
        found[name] = digests(project)
    ref, new = found["reference"], found["working-tree"]
    bad = 0
    print(f"{'file':48s} {'reference':14s} {'working tree':14s}")
    for f in sorted(ref.keys() | new.keys()):
        same = ref.get(f) == new.get(f)
        bad += not same
        print(f"{f:48s} {ref.get(f, 'missing')[:12]:14s} {new.get(f, 'missing')[:12]:14s} {'' if same else 'DIFFERS'}")
    print(f"{len(ref.keys() | new.keys())} files, {bad} differ (reference: {a.against})")
    if a.keep is None:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if bad or not ref else 0


if __name__ == "__main__":
    raise SystemExit(main())
