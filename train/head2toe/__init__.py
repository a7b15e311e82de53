"""Head2Toe: pooled features from every layer, a group-lasso head to score them, and a linear head retrained
on the top fraction of them (chosen on the eval split)."""

from .config import Head2ToeConfig
from .model import Head2Toe
from .select import kept_count, pooled_split, prepare, select_and_retrain, top_features

__all__ = ["Head2ToeConfig", "Head2Toe", "prepare", "select_and_retrain", "pooled_split", "kept_count",
           "top_features"]
