"""What identifies a trained model: the training hash of a request and the fingerprint of the training code.

:func:`training_hash` is stored in every ``checkpoint.pt`` and ``final.pt`` (``params_hash``): a
checkpoint is resumed or reused only by a run with the same hash (:mod:`pipeline.run_state`), so the
hash must cover everything that determines the weights.  That is the params it reads from the
:class:`~pipeline.request.RunRequest` and :func:`training_code_fingerprint`, the source of
:data:`TRAINING_CODE`: fixing a bug in, say, the augmentations retrains the model.
``tests/test_keys.py`` finds the keys the hash reads and holds dvc.yaml's pretrain stage to them and to
``TRAINING_CODE`` + ``PRETRAIN_GLUE``; ``tests/test_identity.py`` pins the hashes.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from pipeline.config import stable_hash, to_dict
from pipeline.params import METHODS, SSL_BOOKKEEPING_KEYS
from pipeline.request import RunRequest

__all__ = ["training_hash", "training_code_fingerprint", "TRAINING_CODE", "PRETRAIN_GLUE"]

# ssl.* keys left out of the training hash: the method list, the bookkeeping keys (editing them must not
# void a run in progress) and the method sections (the run's own is hashed as method_params).
_NOT_TRAINING_KEYS = ("methods", *SSL_BOOKKEEPING_KEYS) + METHODS

# The modules whose source determines the trained weights (the same list as the pretrain stages'
# code deps in dvc.yaml, less the glue that only logs and writes files).  The request (λ, the sections
# a variant reads), this hash (which checkpoint is resumed), the recipe and the run state (what a
# resumed run restores) are in it.  pipeline/params.py is not: every value it defines is hashed by value
# (:func:`training_hash`), and its edits (new keys, messages, evaluation and study settings) must not
# retrain every model; the validate stage, not the pretrain stages, depends on it.  The exception is what
# it computes from those values for the views (AugmentParams.scaled_color and the effective colour
# strengths and probabilities augment.py samples with): an edit there changes the weights but not the
# hash, so that arithmetic belongs in augment.py (training code), not in the schema.
TRAINING_CODE = ("train.py", "augment.py", "augself.py", "cassle.py", "models.py", "methods", "distributed.py",
                 "checkpoint.py", "data/prepared.py", "request.py", "fingerprint.py", "recipe.py", "run_state.py",
                 "augmentations.py")
# The rest of the pretrain stages' pipeline/ deps: the glue, which logs and writes files but does not
# change the weights (tests/test_keys.py: TRAINING_CODE + PRETRAIN_GLUE are the stage's deps).
PRETRAIN_GLUE = ("monitor.py", "tracking.py", "workflow.py", "progress.py")


def training_hash(request: RunRequest) -> str:
    """Hash of everything that determines the trained weights of ``request``.

    Covers the seed, the pretraining dataset (its name, its entry under ``data.datasets`` and
    ``data.seed``, which fix the images), ``ssl`` without ``methods`` and the bookkeeping keys
    (:data:`pipeline.params.SSL_BOOKKEEPING_KEYS`) and without the methods' sections, ``augment``, the
    method and its section, λ, the AugSelf section when the head is trained (a baseline does not depend
    on it), the CASSLE section when the projector is conditioned (the only variant it shapes), and
    :func:`training_code_fingerprint`.
    """
    d = to_dict(request.params)
    payload = {
        "seed": d["seed"],
        "data": {"pretrain": d["data"]["pretrain"], "seed": d["data"]["seed"],
                 "entry": d["data"]["datasets"][d["data"]["pretrain"]]},
        "ssl": {k: v for k, v in d["ssl"].items() if k not in _NOT_TRAINING_KEYS},
        "augment": d["augment"],
        "method": request.method,
        "method_params": to_dict(request.method_params),
        "lambda": request.lam,
        "code": training_code_fingerprint(),
    }
    if request.uses_augself:
        payload["augself"] = {k: v for k, v in to_dict(request.augself).items() if k != "lambda"}
    if request.uses_cassle:
        payload["cassle"] = to_dict(request.cassle)
    return stable_hash(payload)


@functools.lru_cache(maxsize=1)
def training_code_fingerprint() -> str:
    """Short hash of the source of :data:`TRAINING_CODE` (comments and all: any edit counts)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        path = root / name
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f.relative_to(root).as_posix().encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:12]
