"""RACE finetuning: one score per ``[CLS] article [SEP] question+option [SEP]`` sequence.

The multiple-choice head scores each of the four sequences of a question; the softmax over the
four is trained with cross-entropy. Metrics: accuracy over every question, and per level
(``accuracy_middle``, ``accuracy_high``) for the levels present; the score is the overall
accuracy. ``--predict`` writes ``source<TAB>prediction`` lines (``file#question`` and the
letter), as RACE has no submission format of its own.
"""

from typing import Dict

import numpy as np

from megatron.model import MultipleChoice
from tasks.data_utils import TaskDataset
from tasks.finetune_utils import FinetuneTask
from tasks.glue.metrics import accuracy
from tasks.race.data import LEVELS, NUM_CHOICES, build_race_dataset

__all__ = ["build_dataset", "get_task", "race_metrics"]


def race_metrics(outputs: np.ndarray, dataset: TaskDataset) -> Dict[str, float]:
    """Accuracy overall and per level, and the number of questions of each."""
    if not dataset.has_labels:
        return {"questions": len(dataset)}
    predictions = outputs.argmax(axis=1)
    values = {"accuracy": accuracy(predictions, dataset.labels), "questions": len(dataset)}
    levels = dataset.extra["level"]
    for index, level in enumerate(LEVELS):
        selected = levels == index
        if selected.any():
            values[f"accuracy_{level}"] = accuracy(predictions[selected],
                                                   dataset.labels[selected])
            values[f"questions_{level}"] = int(selected.sum())
    return values


def format_race_predictions(outputs: np.ndarray, dataset: TaskDataset) -> str:
    lines = ["source\tprediction"]
    for source, choice in zip(dataset.extra["source"], outputs.argmax(axis=1)):
        lines.append(f"{source}\t{'ABCD'[int(choice)]}")
    return "\n".join(lines) + "\n"


def build_dataset(task_name: str, paths, tokenizer, seq_length: int, name=None,
                  labeled: bool = True) -> TaskDataset:
    """The encoded RACE dataset of ``paths`` (split, level directories or files)."""
    return build_race_dataset(paths, tokenizer, seq_length, name, labeled=labeled)


def get_task(task_name: str = "RACE") -> FinetuneTask:
    """The :class:`FinetuneTask` of RACE."""
    return FinetuneTask(
        name="RACE", num_classes=NUM_CHOICES, build_model=MultipleChoice,
        metrics=race_metrics, score=lambda metrics: metrics["accuracy"],
        label_names=list("ABCD"),
        prediction_filename=lambda dataset: f"RACE-{dataset.name}.tsv",
        format_predictions=format_race_predictions, sequences_per_sample=NUM_CHOICES)
