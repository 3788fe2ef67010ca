"""Reader for RACE in its original layout, and the multiple-choice dataset built from it.

RACE ships as ``{train,dev,test}/{middle,high}/<n>.txt``, each file one JSON object with the
``article``, its ``questions``, four ``options`` per question, the ``answers`` (``A``-``D``) and
an ``id``. A path given to the reader may be a split directory (its ``middle``/``high``
subdirectories are read), a level directory, or one file. Each question becomes one sample of four
sequences ``[CLS] article [SEP] question+option [SEP]``: a question with a ``_`` blank gets the
option written into the blank, other questions are followed by the option (Megatron-LM's rule).
The question+option part keeps at most ``max_qa_length`` tokens and the article is cut from its
end to fit ``seq_length``.
"""

import dataclasses
import glob
import json
import logging
import os
import re
from typing import List, Optional, Sequence

import numpy as np

from tasks.data_utils import (
    CachedTokenizer,
    TaskDataError,
    TaskDataset,
    build_input,
    clean_text,
    stack_encoded,
)

__all__ = ["LEVELS", "MAX_QA_LENGTH", "NUM_CHOICES", "RaceQuestion", "build_race_dataset",
           "merge_question_option", "read_race"]

logger = logging.getLogger(__name__)

NUM_CHOICES = 4
MAX_QA_LENGTH = 128
LEVELS = ("middle", "high")
_ANSWERS = "ABCD"


@dataclasses.dataclass
class RaceQuestion:
    """One question: its article, text, four options, answer index (``-1``: unknown), level."""

    article: str
    question: str
    options: List[str]
    label: int
    level: str
    source: str  # "<file>#<question index>"


def merge_question_option(question: str, option: str) -> str:
    """The question with ``option`` in its ``_`` blank, or followed by ``option``."""
    if "_" in question:
        return question.replace("_", option)
    return f"{question} {option}"


def _files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise TaskDataError(f"RACE path {path} does not exist")
    levels = [os.path.join(path, level) for level in LEVELS
              if os.path.isdir(os.path.join(path, level))]
    found = []
    for directory in levels or [path]:  # middle before high, files in natural order
        found += sorted(glob.glob(os.path.join(directory, "*.txt")), key=_natural_key)
    if not found:
        raise TaskDataError(f"no RACE files (*.txt) in {path}"
                            + ("" if levels else " or its middle/ and high/ subdirectories"))
    return found


def _natural_key(path: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _level(path: str, data: dict) -> str:
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if parent in LEVELS:
        return parent
    ident = str(data.get("id", ""))
    for level in LEVELS:
        if ident.startswith(level):
            return level
    return "unknown"


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise TaskDataError(f"{path}: not valid UTF-8 at byte {error.start}") from None
    except OSError as error:
        raise TaskDataError(f"cannot read {path}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TaskDataError(f"{path}:{error.lineno}: not a JSON object: {error.msg} "
                            f"(column {error.colno})") from None
    if not isinstance(data, dict):
        raise TaskDataError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _check_fields(path: str, data: dict) -> None:
    for key, kind in (("article", str), ("questions", list), ("options", list),
                      ("answers", list)):
        if key not in data:
            raise TaskDataError(f"{path}: missing key {key!r}")
        if not isinstance(data[key], kind):
            raise TaskDataError(f"{path}: {key!r} must be a {kind.__name__}, found "
                                f"{type(data[key]).__name__}")
    counts = {key: len(data[key]) for key in ("questions", "options", "answers")}
    if len(set(counts.values())) != 1:
        raise TaskDataError(f"{path}: questions, options and answers differ in length "
                            f"({counts})")


def _read_file(path: str, labeled: bool) -> List[RaceQuestion]:
    data = _load_json(path)
    if not labeled and "answers" not in data:
        data["answers"] = [None] * len(data.get("questions", []))
    _check_fields(path, data)
    level = _level(path, data)
    questions = []
    for i, (question, options, answer) in enumerate(zip(data["questions"], data["options"],
                                                        data["answers"])):
        where = f"{path}: question {i}"
        if not isinstance(question, str):
            raise TaskDataError(f"{where}: the question is not a string")
        if not isinstance(options, list) or len(options) != NUM_CHOICES or \
                not all(isinstance(option, str) for option in options):
            count = len(options) if isinstance(options, list) else type(options).__name__
            raise TaskDataError(f"{where}: expected {NUM_CHOICES} option strings, found "
                                f"{count}")
        if answer is None:
            label = -1
        elif isinstance(answer, str) and len(answer) == 1 and answer in _ANSWERS:
            label = _ANSWERS.index(answer)
        else:
            raise TaskDataError(f"{where}: answer {answer!r} is not one of A, B, C, D")
        questions.append(RaceQuestion(data["article"], question, list(options), label, level,
                                      f"{path}#{i}"))
    return questions


def read_race(paths: Sequence[str], labeled: bool = True) -> List[RaceQuestion]:
    """Every question of the RACE files under ``paths``, in file order.

    Args:
        paths: split directories, level directories or files.
        labeled: answers are required (a test set without them gives label -1 when False).

    Raises:
        TaskDataError: naming the file (and question) at fault.
    """
    questions: List[RaceQuestion] = []
    for path in paths:
        files = _files(path)
        before = len(questions)
        for filename in files:
            questions.extend(_read_file(filename, labeled))
        logger.info("%s: %d questions in %d files", path, len(questions) - before, len(files))
    if not questions:
        raise TaskDataError(f"no RACE questions in {', '.join(paths)}")
    return questions


def _encode(question: RaceQuestion, tokenize, tokenizer, seq_length: int,
            max_qa_length: int):
    article = tokenize(clean_text(question.article))
    rows = []
    for option in question.options:
        qa = list(tokenize(clean_text(merge_question_option(question.question, option))))
        qa = qa[:max_qa_length]
        room = seq_length - 3 - len(qa)
        rows.append(build_input(article[:room], qa, seq_length, cls_id=tokenizer.cls,
                                sep_id=tokenizer.sep, pad_id=tokenizer.pad))
    return tuple(np.stack(parts) for parts in zip(*rows))


def build_race_dataset(paths: Sequence[str], tokenizer, seq_length: int,
                       name: Optional[str] = None, labeled: bool = True,
                       max_qa_length: int = MAX_QA_LENGTH) -> TaskDataset:
    """Read ``paths`` and encode each question as four ``[CLS] article [SEP] qa [SEP]`` rows.

    Args:
        paths: see :func:`read_race`.
        tokenizer: a Megatron tokenizer.
        seq_length: tokens per sequence.
        name: dataset name (default: the paths joined, e.g. ``dev``).
        labeled: see :func:`read_race`.
        max_qa_length: cap on the question+option tokens (also at most half the sequence).

    Returns:
        A :class:`TaskDataset` with ``[n, 4, seq_length]`` arrays and ``extra["level"]``
        (an index into ``LEVELS + ("unknown",)``).
    """
    if seq_length < 8:
        raise ValueError(f"seq_length {seq_length} leaves no room for article and question")
    questions = read_race(paths, labeled)
    tokenize = CachedTokenizer(tokenizer)
    max_qa = min(max_qa_length, (seq_length - 3) // 2)
    ids, types, mask = stack_encoded(
        (_encode(q, tokenize, tokenizer, seq_length, max_qa) for q in questions),
        (NUM_CHOICES, seq_length))
    levels = LEVELS + ("unknown",)
    name = name or "+".join(os.path.basename(os.path.normpath(p)) for p in paths)
    return TaskDataset(
        name, ids=ids, types=types, padding_mask=mask,
        labels=np.array([q.label for q in questions], dtype=np.int64),
        uids=np.arange(len(questions), dtype=np.int64), paths=paths,
        extra={"level": np.array([levels.index(q.level) for q in questions], dtype=np.int64),
               "source": np.array([q.source for q in questions], dtype=object)})
