"""Linear probe on one cached layer: the baseline every side network must beat."""

from .config import LinearProbeConfig
from .model import LinearProbe

__all__ = ["LinearProbeConfig", "LinearProbe"]
