"""Evaluation of a finetuned model: predictions over whole datasets, and task metrics.

Every sample of a validation set is scored exactly once (no sample is dropped to fill a batch):
data-parallel rank ``r`` of ``d`` takes samples ``r, r + d, r + 2d, ...``; the ranks of a
tensor-parallel group take the same samples and compute the same outputs. The outputs are then
gathered over the data-parallel group, so every rank holds all of them in dataset order and
computes the same metrics (and so takes the same decisions, such as which checkpoint is best);
rank 0 prints them.
"""

import json
import logging
import math
import os
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron import mpu
from megatron.training.utils import print_rank_0
from tasks.data_utils import TaskDataset

__all__ = ["evaluate_datasets", "format_metrics", "predict", "write_atomically"]

logger = logging.getLogger(__name__)


def _data_parallel():
    if mpu.model_parallel_is_initialized():
        return (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(),
                mpu.get_data_parallel_group())
    return 0, 1, None


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: TaskDataset, *, micro_batch_size: int,
            device: torch.device) -> np.ndarray:
    """The model's outputs (``[n, classes]`` fp32) for every sample of ``dataset``, in order.

    Every rank calls this; every rank gets the whole array.
    """
    rank, size, group = _data_parallel()
    indices = np.arange(rank, len(dataset), size)
    was_training = model.training
    model.eval()
    outputs: List[np.ndarray] = []
    try:
        for start in range(0, len(indices), micro_batch_size):
            batch = dataset.batch(indices[start:start + micro_batch_size], device)
            logits = model(batch["text"], batch["padding_mask"], batch["types"])
            outputs.append(logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    local = np.concatenate(outputs) if outputs else None
    parts = [local]
    if size > 1:
        parts = [None] * size
        dist.all_gather_object(parts, local, group=group)
    width = next(part.shape[1] for part in parts if part is not None)
    merged = np.empty((len(dataset), width), dtype=np.float32)
    for part_rank, part in enumerate(parts):
        if part is not None:
            merged[part_rank::size] = part
    return merged


def evaluate_datasets(model: torch.nn.Module, datasets: Sequence[TaskDataset],
                      metrics: Callable[[np.ndarray, TaskDataset], Dict[str, float]], *,
                      micro_batch_size: int, device: torch.device) -> Dict[str, Dict[str, float]]:
    """``{dataset name: {metric: value}}`` for every dataset (identical on every rank)."""
    results = {}
    for dataset in datasets:
        outputs = predict(model, dataset, micro_batch_size=micro_batch_size, device=device)
        results[dataset.name] = metrics(outputs, dataset)
    return results


def format_metrics(where: str, results: Dict[str, Dict[str, float]]) -> str:
    """One console line per dataset, Megatron's validation style."""
    lines = []
    for name, values in results.items():
        parts = " | ".join(f"{metric}: {_number(value)}" for metric, value in values.items())
        lines.append(f" validation at {where} | {name} | {parts}")
    width = max((len(line) for line in lines), default=0)
    return "\n".join(["-" * width, *lines, "-" * width])


def _number(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return "nan" if math.isnan(value) else f"{value:.4f}"


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def print_json_rank_0(title: str, value) -> None:
    """A JSON object on the training console (rank 0)."""
    print_rank_0(f"{title}: {json.dumps(value, sort_keys=True)}")
