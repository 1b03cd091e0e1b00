"""What one pretraining run trains, resolved once: :class:`RunRequest`.

A run is asked for by name, ``(params, method, variant)``.  :meth:`RunRequest.resolve` is the one
place those names are checked and turned into what training reads: the method and its own section of
``ssl``, λ, the AugSelf-only ablation, the AugSelf head's section (when λ > 0) and the CASSLE
conditioning's section (for the CASSLE variant).  Everything downstream (the training hash
:func:`pipeline.fingerprint.training_hash`, the model recipe
:func:`pipeline.recipe.build_pretrain_model`, the loop, MLflow's tags and params
(:mod:`pipeline.tracking`) and ``run.json``) reads these fields and never derives them again.

It is resolved where a request enters the library: the pretrain stage's glue
(:func:`pipeline.workflow.run_pretraining`, before anything is written or an MLflow run opened) and
:func:`pipeline.train.pretrain` for a caller that holds the names (tests, the premise study, benches).

This module imports no torch: the tracking layer reads the request too.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import check_choice
from pipeline.params import AugSelfParams, CassleParams, MethodParams, Params

__all__ = ["RunRequest"]


@dataclass(frozen=True)
class RunRequest:
    """One model to pretrain: ``method`` × ``variant`` of ``params``, validated and resolved.

    ``lam``: the AugSelf weight λ (``augself.lambda`` for the AugSelf variant, 0 for the others;
    CASSLE is run without the AugSelf loss, as in its paper).  ``ss_only``: the official ``--ss-only``
    ablation (``augself.ss_only`` of the AugSelf variant; the params refuse it with λ = 0).
    ``method_params``: the method's own section ``ssl.<method>``.  ``augself``: the AugSelf head's
    section, None when λ = 0 (no head is built, and the training hash leaves the section out).
    ``cassle``: the CASSLE conditioning's section, None for the unconditioned variants.
    Build it with :meth:`resolve`, not field by field.
    """
    params: Params
    method: str
    variant: str
    lam: float
    ss_only: bool
    method_params: MethodParams
    augself: AugSelfParams | None
    cassle: CassleParams | None

    @classmethod
    def resolve(cls, params: Params, method: str, variant: str) -> "RunRequest":
        """The one check of what a caller asks to train (``method`` in ``ssl.methods``, ``variant`` in
        ``variants``: both lists are subsets of the registries, checked when the params were loaded)
        and the one place the variant is read."""
        check_choice("ssl.methods", method, params.ssl.methods)
        check_choice("variants", variant, params.variants)
        augself = variant == "augself"
        lam = params.augself.lambda_ if augself else 0.0
        return cls(params=params, method=method, variant=variant, lam=lam,
                   ss_only=augself and params.augself.ss_only,
                   method_params=getattr(params.ssl, method),
                   augself=params.augself if lam > 0 else None,
                   cassle=params.cassle if variant == "cassle" else None)

    @property
    def uses_augself(self) -> bool:
        """True when the AugSelf head is trained (λ > 0)."""
        return self.augself is not None

    @property
    def uses_cassle(self) -> bool:
        """True when the projector is conditioned on ω (the CASSLE variant)."""
        return self.cassle is not None
