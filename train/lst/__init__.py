"""LST (Ladder Side-Tuning), encoder side network: a narrow transformer fed by gated ladder connections."""

from .config import LSTConfig
from .model import LST, LSTClassifier

__all__ = ["LSTConfig", "LST", "LSTClassifier"]
