"""Res-Tuning-Bypass: a bypass of residual adapters fed laterally by every selected layer."""

from .config import ResTuningConfig
from .model import ResAdapter, ResTuningBypass, ResTuningClassifier

__all__ = ["ResTuningConfig", "ResAdapter", "ResTuningBypass", "ResTuningClassifier"]
