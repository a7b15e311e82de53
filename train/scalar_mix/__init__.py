"""Scalar-mix probe (ELMo / SUPERB style): a softmax-weighted sum of every selected layer, pooled."""

from .config import ScalarMixConfig
from .model import ScalarMix

__all__ = ["ScalarMixConfig", "ScalarMix"]
