"""GLUE finetuning: a classification (or, for STS-B, regression) head on the pooled output.

Metrics are GLUE's: accuracy; F1 and accuracy for MRPC and QQP; Matthews correlation (and
accuracy) for CoLA; Pearson and Spearman for STS-B. A run's score, which picks the best checkpoint,
is the mean of the task's metrics, averaged over the validation sets (GLUE's own per-task
score). Predictions are written in GLUE's submission layout: ``index<TAB>prediction`` with a
header line, labels as GLUE names them, STS-B scores clipped to [0, 5].
"""

from typing import Dict

import numpy as np

from megatron.model import Classification
from tasks.data_utils import TaskDataset
from tasks.finetune_utils import FinetuneTask
from tasks.glue.data import TASKS, GlueTask, build_glue_dataset
from tasks.glue.metrics import compute_metrics

__all__ = ["build_dataset", "get_task", "submission_filename"]


def _predictions(task: GlueTask, outputs: np.ndarray) -> np.ndarray:
    if task.is_regression:
        return outputs[:, 0].astype(np.float64)
    return outputs.argmax(axis=1)


def glue_metrics(task: GlueTask, outputs: np.ndarray, dataset: TaskDataset) -> Dict[str, float]:
    """The task's metrics of ``outputs`` against the dataset's labels (and the sample count)."""
    if not dataset.has_labels:
        return {"samples": len(dataset)}
    values = compute_metrics(task.metrics, _predictions(task, outputs), dataset.labels)
    values["samples"] = len(dataset)
    return values


def glue_score(task: GlueTask, metrics: Dict[str, float]) -> float:
    """Mean of the task's metrics (GLUE's score of a task with two metrics)."""
    return float(np.mean([metrics[name] for name in task.metrics]))


def submission_filename(task: GlueTask, dataset: TaskDataset) -> str:
    """GLUE's file name for the predictions on ``dataset`` (``MNLI-mm.tsv``, ``SST-2.tsv``)."""
    if task.name == "MNLI":
        return "MNLI-mm.tsv" if "mismatched" in dataset.name else "MNLI-m.tsv"
    return f"{task.name}.tsv"


def format_glue_predictions(task: GlueTask, outputs: np.ndarray, dataset: TaskDataset) -> str:
    """``index<TAB>prediction`` lines under a header: GLUE's submission layout."""
    predictions = _predictions(task, outputs)
    lines = ["index\tprediction"]
    for uid, prediction in zip(dataset.uids, predictions):
        if task.is_regression:
            lines.append(f"{int(uid)}\t{min(5.0, max(0.0, float(prediction))):.3f}")
        else:
            lines.append(f"{int(uid)}\t{task.labels[int(prediction)]}")
    return "\n".join(lines) + "\n"


def build_dataset(task_name: str, paths, tokenizer, seq_length: int, name=None,
                  labeled: bool = True) -> TaskDataset:
    """The encoded dataset of GLUE files (``labeled`` is implied by each file's layout)."""
    return build_glue_dataset(TASKS[task_name], paths, tokenizer, seq_length, name)


def get_task(task_name: str) -> FinetuneTask:
    """The :class:`FinetuneTask` of GLUE task ``task_name``.

    Raises:
        KeyError: for a name that is not a GLUE task.
    """
    task = TASKS[task_name]
    return FinetuneTask(
        name=task.name, num_classes=task.num_classes,
        build_model=lambda config: Classification(config, task.num_classes),
        metrics=lambda outputs, dataset: glue_metrics(task, outputs, dataset),
        score=lambda metrics: glue_score(task, metrics), regression=task.is_regression,
        label_names=list(task.labels) if task.labels else None,
        prediction_filename=lambda dataset: submission_filename(task, dataset),
        format_predictions=lambda outputs, dataset: format_glue_predictions(
            task, outputs, dataset))
