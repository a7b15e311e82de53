"""unipt.train — side networks and baselines trained from a feature store, with no backbone in memory."""

from ._checkpoint import check_store_matches, load_checkpoint, save_checkpoint, store_identity
from ._loader import ActivationLoader, Batch
from ._methods import METHODS, get_method, resolve_layers
from ._metrics import classification_metrics
from ._pooling import ClassificationHead, masked_mean
from ._sweep import MODEL_PREFIX, expand_sweep, sweep_keys
from ._trainer import (PASS_FIELDS, MetricsLog, RunResult, build_model, count_trainable, evaluate, evaluate_checkpoint,
                       fit, fit_many, pass_groups)
from .config import LoaderConfig, TrainConfig
from .linear_probe import LinearProbe, LinearProbeConfig
from .lst import LST, LSTClassifier, LSTConfig
from .scalar_mix import ScalarMix, ScalarMixConfig
from .unipt import UniPT, UniPTClassifier, UniPTConfig
from .unipt_cnn import UniPTCNN, UniPTCNNClassifier, UniPTCNNConfig, window_size

__all__ = [
    "ActivationLoader",
    "Batch",
    "LoaderConfig",
    "TrainConfig",
    "METHODS",
    "get_method",
    "resolve_layers",
    "build_model",
    "fit",
    "fit_many",
    "pass_groups",
    "PASS_FIELDS",
    "expand_sweep",
    "MODEL_PREFIX",
    "sweep_keys",
    "evaluate",
    "evaluate_checkpoint",
    "RunResult",
    "MetricsLog",
    "count_trainable",
    "classification_metrics",
    "save_checkpoint",
    "load_checkpoint",
    "check_store_matches",
    "store_identity",
    "masked_mean",
    "ClassificationHead",
    "UniPT",
    "UniPTClassifier",
    "UniPTConfig",
    "LinearProbe",
    "LinearProbeConfig",
    "ScalarMix",
    "ScalarMixConfig",
    "LST",
    "LSTClassifier",
    "LSTConfig",
    "UniPTCNN",
    "UniPTCNNClassifier",
    "UniPTCNNConfig",
    "window_size",
]
