"""UniPT, CNN variant: the parallel side network for a convolutional backbone's stage feature maps."""

from .config import UniPTCNNConfig
from .model import UniPTCNN, UniPTCNNClassifier, window_size

__all__ = ["UniPTCNNConfig", "UniPTCNN", "UniPTCNNClassifier", "window_size"]
