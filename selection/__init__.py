"""quadsel selection package: Quad's cluster bandit and baseline selectors.

Pure Python/numpy. A selector never touches models or files: it proposes row ids to score,
receives their scores, and returns the selected row ids (see ``selection.base``).
"""
from .bandit import QuadSelector
from .base import Selector
from .baselines import ClusterTopKSelector, RandomSelector, TopKSelector
from .config import QUAD_PAPER, BaselineConfig, QuadConfig
from .run import SELECTORS, make_selector, run_selector
from .types import Budget, ClusterView, Probe, Selection, members_by_cluster

__all__ = [
    "members_by_cluster",
    "QUAD_PAPER",
    "SELECTORS",
    "BaselineConfig",
    "Budget",
    "ClusterTopKSelector",
    "ClusterView",
    "Probe",
    "QuadConfig",
    "QuadSelector",
    "RandomSelector",
    "Selection",
    "Selector",
    "TopKSelector",
    "make_selector",
    "run_selector",
]
