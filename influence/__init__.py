"""quadsel influence: models, per-example gradient features, curvature (K-FAC/EK-FAC), scorers.

Entry point::

    from quadsel.influence import InfluenceModel, make_scorer
    im = InfluenceModel.load("path/or/hub-id", max_length=512, device="auto")
    sc = make_scorer("ekfac", im, layers="all", damping=0.1, projection_dim=None)
    sc.fit(fit_texts); sc.set_reference(ref_texts); scores = sc.score(texts)

This package reads no files other than model and scorer artifacts and knows nothing of clusters.
"""
from . import attention, datainf, predictor, trajectory  # noqa: E402,F401  - register the other scorers
from .compat import check_compatible
from .curvature import EKFAC, KFAC, Curvature, CurvatureArgs, IdentityCurvature, load_curvature, make_curvature
from .features import FeatureExtractor, Features
from .layers import TrackedLayer, find_layers
from .model import InfluenceModel
from .projection import Layout, LayoutMismatchError, make_layout
from .proxy import build_proxy_model
from .scorers import (
    CurvatureConfig,
    GradientConfig,
    GradientScorer,
    Scorer,
    ScorerConfig,
    available_scorers,
    load_scorer,
    make_scorer,
    register_scorer,
)

__all__ = [
    "InfluenceModel", "build_proxy_model", "make_scorer", "load_scorer", "available_scorers",
    "register_scorer", "Scorer", "ScorerConfig", "GradientScorer", "GradientConfig", "CurvatureConfig",
    "FeatureExtractor", "Features", "Layout", "LayoutMismatchError", "make_layout", "TrackedLayer",
    "find_layers", "Curvature", "CurvatureArgs", "IdentityCurvature", "KFAC", "EKFAC", "make_curvature",
    "load_curvature", "check_compatible",
]
