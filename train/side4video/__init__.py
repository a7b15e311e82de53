"""Side4Video-style side transformer: a narrow transformer fed, by sums, from every other layer."""

from .config import Side4VideoConfig
from .model import Side4Video, Side4VideoClassifier, SideBlock, side_layer_indices

__all__ = ["Side4VideoConfig", "Side4Video", "Side4VideoClassifier", "SideBlock", "side_layer_indices"]
