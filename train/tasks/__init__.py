"""Tasks: what a side network is trained to predict, one module per kind (see ``_base.Task``).

The store says which task its targets are for (``FeatureStore.task``); :func:`task_for` builds the task
object a run trains with.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ._base import HeadSpec, Task
from .classification import ClassificationTask
from .multilabel import MultiLabelTask, f1_scores, mean_average_precision, tune_threshold
from .regression import RegressionTask, pearson, spearman
from .tagging import TaggingTask, entity_scores, entity_spans, is_bio

TASKS: dict[str, type[Task]] = {cls.kind: cls for cls in (ClassificationTask, MultiLabelTask, RegressionTask,
                                                          TaggingTask)}


def task_for(kind: str, names: Sequence[str], options: Mapping[str, Any] | None = None,
             state: Mapping[str, Any] | None = None) -> Task:
    """The task object of ``kind`` over ``names`` (classes, labels, targets or tags)."""
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r}; available: {sorted(TASKS)}")
    return TASKS[kind](names, options, state)


def task_from_record(record: Mapping[str, Any] | None, label_names: Sequence[str]) -> Task:
    """The task a checkpoint saved (:meth:`Task.record`); checkpoints written before tasks existed hold none
    and are single-label classifiers over ``label_names``."""
    if not record:
        return ClassificationTask(label_names)
    return task_for(record["kind"], record["names"], record.get("options"), record.get("state"))


__all__ = ["Task", "HeadSpec", "TASKS", "task_for", "task_from_record", "ClassificationTask", "MultiLabelTask",
           "RegressionTask", "TaggingTask", "f1_scores", "mean_average_precision", "tune_threshold", "pearson",
           "spearman", "entity_scores", "entity_spans", "is_bio"]
