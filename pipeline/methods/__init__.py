"""SSL methods: one file per method over :class:`~pipeline.methods.base.SSLMethod`, and their registry.

Adding a method: write ``pipeline/methods/<name>.py`` with a subclass whose constructor is
``(backbone, feat_dim, params: MethodParams, conditioning=None)`` that builds its projector with
``self.make_projector(...)`` and projects with ``self.project(f, cond)`` (so CASSLE works for it), add one line to :data:`METHODS`, and add the name
to ``pipeline.params.METHODS`` (with its defaults in ``_default_methods``) so params.yaml accepts it.
"""

from __future__ import annotations

import torch.nn as nn

from pipeline.cassle import Conditioning
from pipeline.methods.base import MethodOutput, SSLMethod
from pipeline.methods.byol import BYOL
from pipeline.methods.moco import MoCo
from pipeline.methods.simclr import SimCLR
from pipeline.methods.simsiam import SimSiam
from pipeline.params import MethodParams

METHODS: dict[str, type[SSLMethod]] = {
    SimCLR.name: SimCLR,
    SimSiam.name: SimSiam,
    MoCo.name: MoCo,
    BYOL.name: BYOL,
}


def build_method(name: str, backbone: nn.Module, feat_dim: int, method_params: MethodParams,
                 conditioning: Conditioning | None = None) -> SSLMethod:
    """Wrap ``backbone`` (features of size ``feat_dim``) into SSL method ``name`` with its heads;
    ``conditioning`` (CASSLE) conditions its projector on each view's ω."""
    if name not in METHODS:
        raise ValueError(f"unknown SSL method {name!r}; allowed values: {', '.join(METHODS)}")
    return METHODS[name](backbone, feat_dim, method_params, conditioning)


__all__ = ["METHODS", "MethodOutput", "SSLMethod", "build_method"]
