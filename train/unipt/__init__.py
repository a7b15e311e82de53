"""UniPT, transformer variant: the canonical parallel side network."""

from .config import UniPTConfig
from .model import UniPT, UniPTClassifier

__all__ = ["UniPTConfig", "UniPT", "UniPTClassifier"]
