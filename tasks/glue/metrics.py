"""The metrics GLUE reports, in numpy: accuracy, F1, Matthews correlation, Pearson, Spearman.

As GLUE (and scikit-learn / scipy, which its evaluation uses) define them: F1 of the positive
class 1; Matthews correlation of the 2x2 confusion matrix, 0 when a marginal is empty; Spearman
as the Pearson correlation of the ranks, ties sharing their average rank.
"""

import math
from typing import Callable, Dict, Sequence

import numpy as np

__all__ = ["METRICS", "accuracy", "f1_score", "matthews_corrcoef", "pearson_corrcoef",
           "spearman_corrcoef", "compute_metrics", "rankdata"]


def _pair(predictions, labels):
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be "
                         "1-D and of the same length")
    if len(labels) == 0:
        raise ValueError("no samples to score")
    return predictions, labels


def accuracy(predictions, labels) -> float:
    """Fraction of ``predictions`` equal to ``labels``."""
    predictions, labels = _pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1_score(predictions, labels, positive: int = 1) -> float:
    """F1 of class ``positive``: ``2 tp / (2 tp + fp + fn)`` (0 when there is no positive)."""
    predictions, labels = _pair(predictions, labels)
    tp = int(np.sum((predictions == positive) & (labels == positive)))
    fp = int(np.sum((predictions == positive) & (labels != positive)))
    fn = int(np.sum((predictions != positive) & (labels == positive)))
    return 0.0 if tp == 0 else 2.0 * tp / (2.0 * tp + fp + fn)


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation ``(tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))`` (binary).

    0 when any factor of the denominator is 0 (e.g. a model that predicts one class only).
    """
    predictions, labels = _pair(predictions, labels)
    p, y = predictions == 1, labels == 1
    tp, tn = float(np.sum(p & y)), float(np.sum(~p & ~y))
    fp, fn = float(np.sum(p & ~y)), float(np.sum(~p & y))
    denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / math.sqrt(denominator)


def pearson_corrcoef(x, y) -> float:
    """Pearson correlation of ``x`` and ``y`` (NaN when either is constant)."""
    x, y = _pair(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    return math.nan if denominator == 0 else float(np.sum(dx * dy)) / denominator


def rankdata(values) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of the ranks they span (scipy's ``average``)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start of each run of equal values, in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]  # exclusive
    average = (starts + ends + 1) / 2.0      # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman_corrcoef(x, y) -> float:
    """Spearman's rank correlation: Pearson of the (tie-averaged) ranks."""
    x, y = _pair(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return pearson_corrcoef(rankdata(x), rankdata(y))


METRICS: Dict[str, Callable] = {
    "accuracy": accuracy, "f1": f1_score, "mcc": matthews_corrcoef,
    "pearson": pearson_corrcoef, "spearman": spearman_corrcoef,
}


def compute_metrics(names: Sequence[str], predictions, labels) -> Dict[str, float]:
    """``{name: value}`` for each metric name of :data:`METRICS`."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    return {name: METRICS[name](predictions, labels) for name in names}
