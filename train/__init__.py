"""unipt.train — side networks and baselines trained from a feature store, with no backbone in memory, for
the store's task (train/tasks/: classification, multilabel, regression, tagging)."""

from ._checkpoint import check_store_matches, checkpoint_task, load_checkpoint, save_checkpoint, store_identity
from ._loader import ActivationLoader, Batch
from ._methods import METHODS, get_method, resolve_layers
from ._metrics import classification_metrics
from ._pooling import ClassificationHead, TokenHead, masked_mean
from ._search import SearchConfig, SectionSearch, SweepSearch, TrialRecord, apply_params, parse_space
from ._sweep import MODEL_PREFIX, expand_sweep, sweep_keys
from ._trainer import (PASS_FIELDS, MetricsLog, RunResult, build_model, count_trainable, evaluate, evaluate_checkpoint,
                       fit, fit_many, make_task, pass_groups, split_targets)
from .config import LoaderConfig, TrainConfig
from .head2toe import Head2Toe, Head2ToeConfig
from .linear_probe import LinearProbe, LinearProbeConfig
from .lst import LST, LSTClassifier, LSTConfig
from .restuning import ResTuningBypass, ResTuningClassifier, ResTuningConfig
from .scalar_mix import ScalarMix, ScalarMixConfig
from .sherl import SHERL, SHERLClassifier, SHERLConfig
from .side4video import Side4Video, Side4VideoClassifier, Side4VideoConfig
from .unipt import UniPT, UniPTClassifier, UniPTConfig
from .tasks import TASKS, HeadSpec, Task, task_for, task_from_record
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
    "make_task",
    "split_targets",
    "checkpoint_task",
    "Task",
    "TASKS",
    "HeadSpec",
    "task_for",
    "task_from_record",
    "TokenHead",
    "fit",
    "fit_many",
    "pass_groups",
    "PASS_FIELDS",
    "expand_sweep",
    "MODEL_PREFIX",
    "sweep_keys",
    "SearchConfig",
    "SectionSearch",
    "SweepSearch",
    "TrialRecord",
    "parse_space",
    "apply_params",
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
    "Head2Toe",
    "Head2ToeConfig",
    "LinearProbe",
    "LinearProbeConfig",
    "ScalarMix",
    "ScalarMixConfig",
    "LST",
    "LSTClassifier",
    "LSTConfig",
    "ResTuningBypass",
    "ResTuningClassifier",
    "ResTuningConfig",
    "Side4Video",
    "Side4VideoClassifier",
    "Side4VideoConfig",
    "SHERL",
    "SHERLClassifier",
    "SHERLConfig",
    "UniPTCNN",
    "UniPTCNNClassifier",
    "UniPTCNNConfig",
    "window_size",
]
