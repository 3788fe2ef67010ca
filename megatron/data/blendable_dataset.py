"""Blend several datasets by weight (``--data-path 0.3 a_text_sentence 0.7 b_text_sentence``)."""

import logging
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["BlendableDataset", "build_blending_indices", "get_datasets_weights_and_num_samples"]

logger = logging.getLogger(__name__)


def get_datasets_weights_and_num_samples(
        data_prefix: Sequence, train_valid_test_num_samples: Sequence[Optional[int]]
) -> Tuple[List[str], List[float], List[List[Optional[int]]]]:
    """Parse ``[weight, prefix, weight, prefix, ...]`` and give each prefix its share.

    Each dataset is asked for ``ceil(n * weight * 1.005)`` samples of each split (0.5% spare,
    as in Megatron-LM, so that blending never runs short).

    Raises:
        ValueError: for an odd-length list, a weight that is not a positive number.
    """
    if len(data_prefix) % 2:
        raise ValueError(f"--data-path {list(data_prefix)}: expected weight/prefix pairs")
    prefixes, weights = [], []
    for weight, prefix in zip(data_prefix[0::2], data_prefix[1::2]):
        try:
            weight = float(weight)
        except ValueError:
            raise ValueError(f"--data-path: weight {weight!r} of {prefix} is not a number") \
                from None
        if not weight > 0:
            raise ValueError(f"--data-path: weight {weight} of {prefix} must be positive")
        prefixes.append(str(prefix))
        weights.append(weight)
    total = sum(weights)
    weights = [weight / total for weight in weights]
    num_samples = [[None if n is None else int(math.ceil(n * weight * 1.005))
                    for n in train_valid_test_num_samples] for weight in weights]
    return prefixes, weights, num_samples


def build_blending_indices(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Interleave datasets so that every prefix of the result follows ``weights`` closely.

    Sample ``k`` of dataset ``d`` is placed at time ``(k + 0.5) / weights[d]``; merging the times
    gives an order in which dataset ``d`` has ``size * weights[d]`` samples, give or take one, in
    every prefix.

    Returns:
        ``(dataset_index, dataset_sample_index)``, each of length ``size``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    counts = np.ceil(weights * size).astype(np.int64) + 1
    times = np.concatenate([(np.arange(n) + 0.5) / w for n, w in zip(counts, weights)])
    owner = np.repeat(np.arange(len(weights)), counts)
    sample = np.concatenate([np.arange(n) for n in counts])
    order = np.argsort(times, kind="stable")[:size]
    return owner[order].astype(np.int16), sample[order].astype(np.int64)


class BlendableDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in the proportions ``weights``.

    Raises:
        ValueError: if a dataset is too small for its share.
    """

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float],
                 size: int) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        total = float(sum(weights))
        self.datasets = list(datasets)
        self.weights = [weight / total for weight in weights]
        self.size = size
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, size)
        for d, dataset in enumerate(self.datasets):
            used = self.dataset_sample_index[self.dataset_index == d]
            if len(used) and used.max() >= len(dataset):
                raise ValueError(f"dataset {d} has {len(dataset)} samples, blending needs "
                                 f"{used.max() + 1}")
        logger.info("blended %d datasets into %d samples", len(datasets), size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        dataset = int(self.dataset_index[idx])
        return self.datasets[dataset][int(self.dataset_sample_index[idx])]
