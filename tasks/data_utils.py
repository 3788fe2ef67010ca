"""What the task readers share: their error type, BERT input assembly and the encoded dataset.

A task reader turns files into examples (text and label); :class:`TaskDataset` holds them
tokenized as ``[CLS] a [SEP] (b [SEP])`` rows of ``seq_length`` ids, with token types, a padding
mask, a label and a unique id per sample, and hands out batches of tensors.
"""

import logging
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["CachedTokenizer", "TaskDataError", "TaskDataset", "build_input", "clean_text",
           "stack_encoded", "truncate_pair"]

logger = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"\s+")


class TaskDataError(ValueError):
    """Task data that cannot be read; the message names the file (and line or key) at fault."""


def clean_text(text: str) -> str:
    """Collapse every whitespace run (newlines and tabs included) into one space; strip."""
    return _WHITESPACE.sub(" ", text).strip()


class CachedTokenizer:
    """``tokenize`` with a memo: premises, articles and options repeat across samples."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: Dict[str, List[int]] = {}

    def __call__(self, text: str) -> List[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = list(self.tokenizer.tokenize(text))
        return ids


def truncate_pair(a: List[int], b: Optional[List[int]], max_tokens: int) -> None:
    """Trim ``a`` and ``b`` in place, one token at a time from the end of the longer one.

    BERT's rule for sentence pairs (``_truncate_seq_pair``): the shorter text keeps every token
    while it can, so a short hypothesis is never cut because of a long premise.
    """
    while len(a) + (len(b) if b is not None else 0) > max_tokens:
        if b is not None and len(b) > len(a):
            b.pop()
        else:
            a.pop()


def build_input(a: Sequence[int], b: Optional[Sequence[int]], seq_length: int, *, cls_id: int,
                sep_id: int, pad_id: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``, padded to ``seq_length``.

    ``a`` and ``b`` must already fit (see :func:`truncate_pair`). Token type 0 covers
    ``[CLS] a [SEP]``, 1 covers ``b [SEP]``; padding has token type 0 and mask 0.

    Returns:
        ``(ids, types, padding_mask)``, each ``[seq_length]``.
    """
    ids = np.full(seq_length, pad_id, dtype=np.int32)
    types = np.zeros(seq_length, dtype=np.int8)
    mask = np.zeros(seq_length, dtype=np.int8)
    tokens = [cls_id, *a, sep_id]
    first = len(tokens)
    if b is not None:
        tokens += [*b, sep_id]
    if len(tokens) > seq_length:
        raise ValueError(f"{len(tokens)} tokens do not fit seq_length {seq_length}")
    ids[:len(tokens)] = tokens
    types[first:len(tokens)] = 1
    mask[:len(tokens)] = 1
    return ids, types, mask


class TaskDataset:
    """Encoded samples of one task split, as arrays, with batches as tensors.

    Args:
        name: the split's name in logs and metrics (e.g. ``dev_matched``).
        ids, types, padding_mask: ``[n, seq]`` (or ``[n, choices, seq]``) token ids, token types
            and padding masks (1 for tokens).
        labels: ``[n]`` class ids (int64; -1 where unknown) or regression targets (float32;
            NaN where unknown).
        uids: ``[n]`` unique ids (the files' index column where they have one).
        paths: the files read.
        extra: per-sample arrays a task's metrics need (e.g. RACE's ``level``).
    """

    def __init__(self, name: str, *, ids: np.ndarray, types: np.ndarray,
                 padding_mask: np.ndarray, labels: np.ndarray, uids: np.ndarray,
                 paths: Sequence[str], extra: Optional[Dict[str, np.ndarray]] = None) -> None:
        n = len(ids)
        for what, array in (("types", types), ("padding_mask", padding_mask),
                            ("labels", labels), ("uids", uids)):
            if len(array) != n:
                raise ValueError(f"{name}: {what} has {len(array)} rows, ids has {n}")
        self.name = name
        self.ids, self.types, self.padding_mask = ids, types, padding_mask
        self.labels, self.uids = labels, uids
        self.paths = list(paths)
        self.extra = dict(extra or {})

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_labels(self) -> bool:
        """Whether every sample has a label (test files have none)."""
        if self.labels.dtype.kind == "f":
            return bool(len(self.labels)) and not np.isnan(self.labels).any()
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def batch(self, indices: Sequence[int], device: torch.device,
              trim: bool = True) -> Dict[str, torch.Tensor]:
        """Samples ``indices`` as tensors on ``device``: text, types, padding_mask, label.

        With ``trim``, the sequences are cut after the batch's longest sample (dynamic padding):
        the padding columns cut away are masked out of attention and never reach ``[CLS]``, so
        the outputs are the same, for less computation on short texts.
        """
        index = np.asarray(indices, dtype=np.int64)
        mask = self.padding_mask[index]
        length = int(mask.sum(axis=-1).max()) if trim and len(index) else mask.shape[-1]
        out = {"text": self.ids[index][..., :length], "types": self.types[index][..., :length],
               "padding_mask": mask[..., :length]}
        tensors = {key: torch.from_numpy(value.astype(np.int64)) for key, value in out.items()}
        labels = self.labels[index]
        tensors["label"] = torch.from_numpy(labels.astype(
            np.float32 if labels.dtype.kind == "f" else np.int64))
        return {key: value.to(device, non_blocking=True) for key, value in tensors.items()}


def stack_encoded(rows: Iterable[Tuple[np.ndarray, np.ndarray, np.ndarray]], shape: tuple):
    """Stack ``(ids, types, mask)`` rows into three arrays of ``[n, *shape]``."""
    rows = list(rows)
    ids = np.zeros((len(rows), *shape), dtype=np.int32)
    types = np.zeros((len(rows), *shape), dtype=np.int8)
    mask = np.zeros((len(rows), *shape), dtype=np.int8)
    for i, (row_ids, row_types, row_mask) in enumerate(rows):
        ids[i], types[i], mask[i] = row_ids, row_types, row_mask
    return ids, types, mask
