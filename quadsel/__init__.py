"""quadsel: choose language-model training data that is influential and diverse (the Quad method).

The project's four packages are installed under this namespace::

    quadsel.pipeline    reading, validating, embedding, clustering, writing shards
    quadsel.influence   models, per-example gradient features, curvature, scorers
    quadsel.selection   the cluster bandit and the baseline selectors
    quadsel.jobs        job config, orchestration, CLI, inspection, reports
"""
from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("quadsel")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
