"""Readers for the nine GLUE tasks in the TSV layouts GLUE publishes, and their datasets.

Every file is read as GLUE's files must be: split on ``\\n`` alone (a stray ``\\r`` inside a
field stays in the field), fields split on tabs, no CSV quoting (sentences contain ``"``), UTF-8
with an optional byte-order mark. The first line decides the layout (see :data:`TASKS`): its first
field and the number of fields tell a train/dev file from a test file, which has an index column
and no label. CoLA's train and dev files have no header line at all.

A row that does not fit its layout is an error naming the file and line (:class:`TaskDataError`),
except where the published data is known to have such rows: QQP rows with a wrong number of
fields or an empty question, and MNLI rows whose gold label is ``-`` (no annotator consensus),
are skipped, counted and logged.
"""

import dataclasses
import logging
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from tasks.data_utils import (
    CachedTokenizer,
    TaskDataError,
    TaskDataset,
    build_input,
    clean_text,
    stack_encoded,
    truncate_pair,
)

__all__ = ["GLUE_TASKS", "TASKS", "GlueExample", "GlueTask", "Layout", "build_glue_dataset",
           "read_glue_file"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One TSV layout of a task's files.

    Attributes:
        header: the header line's fields (``None``: the file has no header line). A file matches
            when its first line has as many fields and the same first field.
        text_a, text_b: columns of the first and second text (``text_b`` ``None`` for
            single-sentence tasks).
        label: column of the label (``None`` in test files); negative counts from the end.
        uid: column of the example index (``None``: the data row's number, from 0).
    """

    header: Optional[Tuple[str, ...]]
    num_fields: int
    text_a: int
    text_b: Optional[int]
    label: Optional[int]
    uid: Optional[int]

    @property
    def is_test(self) -> bool:
        return self.label is None


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """A GLUE task: its label strings, file layouts and metrics.

    Attributes:
        name: the task's name as ``--task`` spells it.
        labels: label strings as the files (and GLUE's submission files) write them; class id =
            position. ``None`` for regression (STS-B).
        layouts: the layouts of its train/dev and test files.
        metrics: metric names (see :mod:`tasks.glue.metrics`).
        skip_malformed: skip and count rows with a wrong number of fields or an empty text.
        skip_labels: label values whose rows are skipped and counted.
    """

    name: str
    labels: Optional[Tuple[str, ...]]
    layouts: Tuple[Layout, ...]
    metrics: Tuple[str, ...]
    skip_malformed: bool = False
    skip_labels: Tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """Outputs of the classification head (1 for regression)."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


def _pair_task(name, labels, labeled_header, test_header, a, b, uid=0, metrics=("accuracy",),
               **kw) -> GlueTask:
    """A task whose train/dev files are ``test columns + label`` (label last)."""
    return GlueTask(name, labels, (
        Layout(labeled_header, len(labeled_header), a, b, -1, uid),
        Layout(test_header, len(test_header), a, b, None, uid)), metrics, **kw)


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")
_MNLI_COLUMNS = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                 "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
                 "sentence2")
_STSB_COLUMNS = ("index", "genre", "filename", "year", "old_index", "source1", "source2",
                 "sentence1", "sentence2")

TASKS = {task.name: task for task in (
    GlueTask("CoLA", _BINARY, (
        Layout(None, 4, 3, None, 1, None),  # source, label, original label, sentence
        Layout(("index", "sentence"), 2, 1, None, None, 0)), ("mcc", "accuracy")),
    GlueTask("SST-2", _BINARY, (
        Layout(("sentence", "label"), 2, 0, None, 1, None),
        Layout(("index", "sentence"), 2, 1, None, None, 0)), ("accuracy",)),
    GlueTask("MRPC", _BINARY, (
        Layout(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), 5, 3, 4, 0, None),
        Layout(("index", "#1 ID", "#2 ID", "#1 String", "#2 String"), 5, 3, 4, None, 0)),
        ("f1", "accuracy")),
    _pair_task("STS-B", None, _STSB_COLUMNS + ("score",), _STSB_COLUMNS, 7, 8,
               metrics=("pearson", "spearman")),
    GlueTask("QQP", _BINARY, (
        Layout(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), 6, 3, 4, 5, 0),
        Layout(("id", "question1", "question2"), 3, 1, 2, None, 0)), ("f1", "accuracy"),
        skip_malformed=True),
    GlueTask("MNLI", ("contradiction", "entailment", "neutral"), (
        Layout(_MNLI_COLUMNS + ("label1", "gold_label"), 12, 8, 9, -1, 0),
        Layout(_MNLI_COLUMNS + tuple(f"label{i}" for i in range(1, 6)) + ("gold_label",), 16,
               8, 9, -1, 0),
        Layout(_MNLI_COLUMNS, 10, 8, 9, None, 0)), ("accuracy",), skip_labels=("-",)),
    _pair_task("QNLI", _ENTAILMENT, ("index", "question", "sentence", "label"),
               ("index", "question", "sentence"), 1, 2),
    _pair_task("RTE", _ENTAILMENT, ("index", "sentence1", "sentence2", "label"),
               ("index", "sentence1", "sentence2"), 1, 2),
    _pair_task("WNLI", _BINARY, ("index", "sentence1", "sentence2", "label"),
               ("index", "sentence1", "sentence2"), 1, 2),
)}
GLUE_TASKS = tuple(TASKS)


@dataclasses.dataclass
class GlueExample:
    """One row: ``uid``, the text(s) and the label string (``None`` in test files)."""

    uid: int
    text_a: str
    text_b: Optional[str]
    label: Optional[str]


def _lines(path: str):
    """``(line_number, text)`` of each line, split on ``\\n`` only, decoded as UTF-8."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise TaskDataError(f"cannot read {path}: {error.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise TaskDataError(f"{path}:{number}: not valid UTF-8 at byte "
                                    f"{error.start} ({raw[error.start:error.start + 1]!r})"
                                    ) from None


def _pick_layout(task: GlueTask, path: str, first: List[str]) -> Layout:
    for layout in task.layouts:
        if layout.header is not None and len(first) == layout.num_fields \
                and first[0] == layout.header[0]:
            return layout
    for layout in task.layouts:
        if layout.header is None and len(first) == layout.num_fields:
            return layout
    expected = "; ".join(
        "\\t".join(layout.header) if layout.header else f"no header, {layout.num_fields} fields"
        for layout in task.layouts)
    raise TaskDataError(f"{path}:1: not a {task.name} file: the first line has {len(first)} "
                        f"field(s) starting {first[0][:40]!r}; expected one of: {expected}")


class _Skipped:
    """Counts skipped rows by reason and logs one summary per file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: dict = {}

    def add(self, reason: str, number: int) -> None:
        self.lines.setdefault(reason, []).append(number)

    def total(self) -> int:
        return sum(len(lines) for lines in self.lines.values())

    def log(self) -> None:
        for reason, lines in self.lines.items():
            shown = ", ".join(str(n) for n in lines[:5]) + (", ..." if len(lines) > 5 else "")
            logger.warning("%s: skipped %d row(s) with %s (line %s)", self.path, len(lines),
                           reason, shown)


def _parse_row(task: GlueTask, layout: Layout, path: str, number: int, fields: List[str],
               row_index: int, skipped: _Skipped) -> Optional[GlueExample]:
    if len(fields) != layout.num_fields:
        if task.skip_malformed:
            skipped.add("a wrong number of fields", number)
            return None
        raise TaskDataError(f"{path}:{number}: expected {layout.num_fields} tab-separated "
                            f"fields, found {len(fields)}")
    text_a = clean_text(fields[layout.text_a])
    text_b = None if layout.text_b is None else clean_text(fields[layout.text_b])
    if not text_a or text_b == "":
        if task.skip_malformed:
            skipped.add("an empty text", number)
            return None
        column = layout.text_a if not text_a else layout.text_b
        raise TaskDataError(f"{path}:{number}: empty text in column {column + 1}")
    label = None
    if layout.label is not None:
        label = fields[layout.label].strip()
        if label in task.skip_labels:
            skipped.add(f"label {label!r}", number)
            return None
        _check_label(task, path, number, label)
    if layout.uid is None:
        uid = row_index
    else:
        try:
            uid = int(fields[layout.uid])
        except ValueError:
            raise TaskDataError(f"{path}:{number}: index {fields[layout.uid][:40]!r} is not an "
                                "integer") from None
    return GlueExample(uid, text_a, text_b, label)


def _check_label(task: GlueTask, path: str, number: int, label: str) -> None:
    if task.is_regression:
        try:
            value = float(label)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise TaskDataError(f"{path}:{number}: score {label[:40]!r} is not a number")
    elif label not in task.labels:
        raise TaskDataError(f"{path}:{number}: label {label[:40]!r} is not one of "
                            f"{', '.join(task.labels)}")


def read_glue_file(task: GlueTask, path: str) -> Tuple[List[GlueExample], bool]:
    """Read one GLUE file of ``task`` in any of its layouts.

    Returns:
        ``(examples, is_test)``: the rows (labels are ``None`` in a test file) and whether the
        file has the test layout.

    Raises:
        TaskDataError: for an unreadable file, an unknown layout or a bad row (file and line).
    """
    lines = _lines(path)
    first = next(lines, None)
    if first is None:
        raise TaskDataError(f"{path}: the file is empty")
    layout = _pick_layout(task, path, first[1].split("\t"))
    examples: List[GlueExample] = []
    skipped = _Skipped(path)
    rows = lines if layout.header is not None else _prepend(first, lines)
    for number, text in rows:
        if not text.strip():
            continue  # a blank line (e.g. at the end of a hand-edited file)
        example = _parse_row(task, layout, path, number, text.split("\t"),
                             len(examples) + skipped.total(), skipped)
        if example is not None:
            examples.append(example)
    skipped.log()
    if not examples:
        raise TaskDataError(f"{path}: no {task.name} examples in the file")
    logger.info("%s: %d %s examples (%s layout)", path, len(examples), task.name,
                "test" if layout.is_test else "train/dev")
    return examples, layout.is_test


def _prepend(first, rest):
    yield first
    yield from rest


def _label_array(task: GlueTask, examples: Sequence[GlueExample]) -> np.ndarray:
    if task.is_regression:
        return np.array([math.nan if e.label is None else float(e.label) for e in examples],
                        dtype=np.float32)
    index = {label: i for i, label in enumerate(task.labels)}
    return np.array([-1 if e.label is None else index[e.label] for e in examples],
                    dtype=np.int64)


def build_glue_dataset(task: GlueTask, paths: Sequence[str], tokenizer, seq_length: int,
                       name: Optional[str] = None) -> TaskDataset:
    """Read ``paths`` (train/dev or test layout) and encode them for BERT.

    Each example becomes ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``; a pair too long for
    ``seq_length`` loses tokens from the end of its longer text first.

    Args:
        task: the task.
        paths: its files.
        tokenizer: a Megatron tokenizer (``tokenize``, ``cls``, ``sep``, ``pad``).
        seq_length: tokens per sample.
        name: the dataset's name (default: the files' names without extension).

    Raises:
        TaskDataError: for bad files (see :func:`read_glue_file`).
    """
    if seq_length < 5:
        raise ValueError(f"seq_length {seq_length} leaves no room for text")
    examples: List[GlueExample] = []
    for path in paths:
        examples.extend(read_glue_file(task, path)[0])
    tokenize = CachedTokenizer(tokenizer)
    rows = []
    for example in examples:
        a = list(tokenize(example.text_a))
        b = None if example.text_b is None else list(tokenize(example.text_b))
        truncate_pair(a, b, seq_length - (2 if b is None else 3))
        rows.append(build_input(a, b, seq_length, cls_id=tokenizer.cls, sep_id=tokenizer.sep,
                                pad_id=tokenizer.pad))
    ids, types, mask = stack_encoded(rows, (seq_length,))
    name = name or "+".join(os.path.splitext(os.path.basename(p.rstrip(os.sep)))[0]
                            for p in paths)
    return TaskDataset(name, ids=ids, types=types, padding_mask=mask,
                       labels=_label_array(task, examples),
                       uids=np.array([e.uid for e in examples], dtype=np.int64), paths=paths)
