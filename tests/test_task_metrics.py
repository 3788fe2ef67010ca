"""GLUE and RACE metrics against values computed by hand."""

import math

import numpy as np
import pytest

from tasks.data_utils import TaskDataset
from tasks.glue import finetune as glue
from tasks.glue.metrics import (
    accuracy,
    compute_metrics,
    f1_score,
    matthews_corrcoef,
    pearson_corrcoef,
    rankdata,
    spearman_corrcoef,
)
from tasks.race.finetune import race_metrics

PREDICTIONS = [1, 1, 0, 1, 0, 1]
LABELS = [1, 0, 0, 1, 1, 1]  # tp 3, tn 1, fp 1, fn 1


def _dataset(labels, **extra):
    n = len(labels)
    return TaskDataset("dev", ids=np.zeros((n, 4)), types=np.zeros((n, 4)),
                       padding_mask=np.ones((n, 4)), labels=np.asarray(labels),
                       uids=np.arange(n), paths=["dev.tsv"], extra=extra)


def test_accuracy_and_f1():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert f1_score(PREDICTIONS, LABELS) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 0.75
    assert f1_score([0, 0], [0, 0]) == 0.0  # no positive anywhere
    with pytest.raises(ValueError, match="same length"):
        accuracy([1, 0], [1])


def test_matthews_correlation():
    # (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (3 - 1) / sqrt(4 * 4 * 2 * 2)
    assert matthews_corrcoef(PREDICTIONS, LABELS) == pytest.approx(0.25)
    assert matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # one class predicted


def test_pearson_and_spearman_with_ties():
    # dx = (-1.5, -.5, .5, 1.5), dy = (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    assert pearson_corrcoef([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert math.isnan(pearson_corrcoef([1, 1, 1], [1, 2, 3]))
    assert rankdata([3, 1, 3, 3, 2]).tolist() == [4, 1, 4, 4, 2]
    # ranks (1, 2.5, 2.5, 4, 5) and (2, 1, 3.5, 3.5, 5): 7.25 / sqrt(9.5 * 9.5)
    assert spearman_corrcoef([1, 2, 2, 3, 5], [2, 1, 4, 4, 6]) == pytest.approx(7.25 / 9.5)
    assert spearman_corrcoef([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["bleu"], [1], [1])


def test_glue_tasks_report_their_metrics():
    outputs = np.eye(2, dtype=np.float32)[PREDICTIONS]
    cola = glue.get_task("CoLA")
    metrics = cola.metrics(outputs, _dataset(LABELS))
    assert metrics == {"mcc": pytest.approx(0.25), "accuracy": pytest.approx(4 / 6),
                       "samples": 6}
    assert cola.score(metrics) == pytest.approx((0.25 + 4 / 6) / 2)
    mrpc = glue.get_task("MRPC").metrics(outputs, _dataset(LABELS))
    assert (mrpc["f1"], mrpc["accuracy"]) == (pytest.approx(0.75), pytest.approx(4 / 6))
    stsb = glue.get_task("STS-B")
    assert stsb.regression and stsb.num_classes == 1
    scores = stsb.metrics(np.array([[1.0], [2.0], [2.0], [3.0], [5.0]]),
                          _dataset(np.array([2, 1, 4, 4, 6], dtype=np.float32)))
    assert scores["spearman"] == pytest.approx(7.25 / 9.5)
    assert glue.get_task("MNLI").label_names == ["contradiction", "entailment", "neutral"]
    unlabeled = _dataset(np.full(6, -1))
    assert glue.get_task("SST-2").metrics(outputs, unlabeled) == {"samples": 6}


def test_race_accuracy_per_level():
    outputs = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    dataset = _dataset(np.array([0, 1, 0, 0, 0]), level=np.array([0, 0, 1, 1, 1]))
    metrics = race_metrics(outputs, dataset)
    assert metrics == {"accuracy": 0.6, "questions": 5, "accuracy_middle": 1.0,
                       "questions_middle": 2, "accuracy_high": pytest.approx(1 / 3),
                       "questions_high": 3}
