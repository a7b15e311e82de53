"""Two-tower retrieval from two feature stores joined by a pair index (unipt.store.PairIndex): a side network
per tower, trained contrastively (InfoNCE or VSE∞'s hardest-negative triplet) from cached activations, scored
by R@K both ways over the whole gallery."""

from ._checkpoint import load_two_tower, save_two_tower
from ._loader import PairBatch, PairLoader
from ._trainer import Gallery, build_two_tower, embed_split, evaluate_two_tower, fit_retrieval, retrieval_options
from .config import LOSSES, RetrievalOptions
from .losses import hardest_negative_triplet, info_nce
from .metrics import metric_names, retrieval_metrics
from .model import TOWER_METHODS, FrozenConfig, FrozenMean, TwoTower, build_tower, get_tower_method

__all__ = [
    "RetrievalOptions",
    "LOSSES",
    "TwoTower",
    "FrozenMean",
    "FrozenConfig",
    "TOWER_METHODS",
    "build_tower",
    "get_tower_method",
    "info_nce",
    "hardest_negative_triplet",
    "retrieval_metrics",
    "metric_names",
    "PairLoader",
    "PairBatch",
    "fit_retrieval",
    "retrieval_options",
    "build_two_tower",
    "Gallery",
    "evaluate_two_tower",
    "embed_split",
    "save_two_tower",
    "load_two_tower",
]
