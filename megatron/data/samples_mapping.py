"""The BERT samples mapping: which consecutive sentences of which document form each sample.

Megatron-LM builds it with a C++ helper; here it is numpy, vectorised over documents (and over
epochs in groups), so a 10 MB corpus takes well under a second.

Packing rule (Megatron's): documents with fewer than ``min_num_sent`` sentences (2 with the
binary head, else 1) or with a sentence longer than :data:`LONG_SENTENCE_LEN` tokens are skipped.
In each remaining document, sentences are added to the current sample until it holds at least
its target length and ``min_num_sent`` sentences while at least two sentences remain; the
document's last sentence always closes a sample. The target length is ``max_seq_length``, or with
probability ``short_seq_prob`` a length drawn uniformly from ``[2, max_seq_length]``. Each epoch
draws new targets. The rows of all epochs are then shuffled with ``seed + 1``.

:func:`get_samples_mapping` caches the array as ``.npy`` next to the data, keyed by every
parameter and a fingerprint of the documents; the file is written under a temporary name and
renamed, so ranks or jobs building it at the same time never see a partial file.
"""

import hashlib
import logging
import math
import os
import time
from typing import List, Optional, Tuple

import numpy as np

from megatron.data.indexed_dataset import temporary_path

__all__ = ["LONG_SENTENCE_LEN", "build_samples_mapping", "get_samples_mapping",
           "samples_mapping_filename"]

logger = logging.getLogger(__name__)

LONG_SENTENCE_LEN = 512
_MAPPING_VERSION = 1  # bump when the construction changes, so stale caches are not reused
_MAX_GROUP_CELLS = 1 << 22  # bounds the memory of epochs processed together


def _pack(first: np.ndarray, count: np.ndarray, sizes: np.ndarray, targets: np.ndarray,
          min_num_sent: int) -> np.ndarray:
    """Pack the documents ``[first[d], first[d] + count[d])``, ``count`` sorted descending.

    ``targets[s]`` is the target length of a sample that starts at sentence ``s``. All documents
    advance one sentence per step (the longest ones last), so the loop runs as many times as the
    longest document has sentences. Returns rows ``(start, end, target)``.
    """
    ndocs = len(first)
    if ndocs == 0:
        return np.zeros((0, 3), dtype=np.int64)
    start = first.copy()
    seq_len = np.zeros(ndocs, dtype=np.int64)
    num_sent = np.zeros(ndocs, dtype=np.int64)
    target = targets[first]
    negative_count = -count  # ascending, for searchsorted
    rows: List[np.ndarray] = []
    for k in range(int(count[0])):
        active = int(np.searchsorted(negative_count, -k, side="left"))  # documents with count > k
        sentence = first[:active] + k
        seq_len[:active] += sizes[sentence]
        num_sent[:active] += 1
        remaining = count[:active] - (k + 1)
        close = ((seq_len[:active] >= target[:active]) & (remaining > 1)
                 & (num_sent[:active] >= min_num_sent)) | (remaining == 0)
        docs = np.flatnonzero(close)
        if len(docs):
            ends = sentence[docs] + 1
            rows.append(np.stack([start[docs], ends, target[docs]], axis=1))
            start[docs] = ends
            target[docs] = targets[np.minimum(ends, len(targets) - 1)]
            seq_len[docs] = 0
            num_sent[docs] = 0
    return np.concatenate(rows)


def _eligible_documents(doc_idx: np.ndarray, sizes: np.ndarray,
                        min_num_sent: int) -> Tuple[np.ndarray, np.ndarray]:
    """First sentence and sentence count of the documents that can make samples, longest first."""
    first = doc_idx[:-1].astype(np.int64)
    count = np.diff(doc_idx).astype(np.int64)
    long_sentence = sizes > LONG_SENTENCE_LEN
    if long_sentence.any():
        # Documents containing a long sentence: count long sentences per document range.
        cumulative = np.concatenate([[0], np.cumsum(long_sentence, dtype=np.int64)])
        has_long = cumulative[doc_idx[1:]] - cumulative[doc_idx[:-1]] > 0
    else:
        has_long = np.zeros(len(first), dtype=bool)
    keep = (count >= min_num_sent) & ~has_long
    order = np.argsort(-count[keep], kind="stable")
    return first[keep][order], count[keep][order]


def _draw_targets(seed: int, epochs: range, num_sentences: int, max_seq_length: int,
                  short_seq_prob: float) -> np.ndarray:
    """Target lengths, ``[epochs, num_sentences]``: a short length with ``short_seq_prob``.

    Each epoch has its own stream, seeded by ``(seed, epoch)``, so epoch ``e`` is the same
    whatever the number of samples asked for.
    """
    targets = np.empty((len(epochs), num_sentences), dtype=np.int64)
    for row, epoch in enumerate(epochs):
        rng = np.random.RandomState([seed % 2**32, epoch])
        short = rng.random_sample(num_sentences) < short_seq_prob
        lengths = rng.randint(2, max_seq_length + 1, size=num_sentences)
        targets[row] = np.where(short, lengths, max_seq_length)
    return targets


def _pack_epochs(first: np.ndarray, count: np.ndarray, sizes: np.ndarray, targets: np.ndarray,
                 min_num_sent: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pack several epochs at once: epoch ``e`` is a copy of the corpus shifted by ``e * n``.

    ``targets`` is ``[epochs, n]``. Returns rows ``(start, end, target)`` in epoch, then
    sentence order, with sentence indices relative to the corpus, and each row's epoch.
    """
    epochs, num_sentences = targets.shape
    shift = np.repeat(np.arange(epochs, dtype=np.int64) * num_sentences, len(first))
    all_first = np.tile(first, epochs) + shift
    all_count = np.tile(count, epochs)
    order = np.argsort(-all_count, kind="stable")
    rows = _pack(all_first[order], all_count[order], np.tile(sizes, epochs), targets.reshape(-1),
                 min_num_sent)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]  # epoch-major, then by position
    epoch = rows[:, 0] // num_sentences
    rows[:, 0] -= epoch * num_sentences
    rows[:, 1] -= epoch * num_sentences
    return rows, epoch


def build_samples_mapping(doc_idx: np.ndarray, sizes: np.ndarray, num_epochs: Optional[int],
                          max_num_samples: Optional[int], max_seq_length: int,
                          short_seq_prob: float, seed: int, min_num_sent: int = 2) -> np.ndarray:
    """Build the mapping (see the module docstring); rows are ``(start, end, target_length)``.

    Whole epochs are added until there are at least ``max_num_samples`` rows or ``num_epochs``
    epochs, as in Megatron-LM.

    Args:
        doc_idx: first sentence of each document, then the end (``len = documents + 1``);
            indices into ``sizes``.
        sizes: tokens of every sentence of the dataset.
        num_epochs: epochs to build (``None``: as many as ``max_num_samples`` needs).
        max_num_samples: samples wanted (``None``: exactly ``num_epochs`` epochs).
        max_seq_length: longest target length (the sequence length minus special tokens).
        short_seq_prob: probability of a shorter target.
        seed: random seed.
        min_num_sent: sentences a sample needs (2 for the binary head).

    Returns:
        ``[samples, 3]`` array (uint32, or uint64 for huge corpora), shuffled.

    Raises:
        ValueError: for inconsistent arguments.
    """
    if num_epochs is None and max_num_samples is None:
        raise ValueError("need num_epochs or max_num_samples")
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length {max_seq_length} is too small (at least 2)")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob {short_seq_prob} is not in [0, 1]")
    num_epochs = num_epochs if num_epochs is not None else np.iinfo(np.int32).max
    max_num_samples = max_num_samples if max_num_samples is not None else np.iinfo(np.int64).max
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    low, high = int(doc_idx[0]), int(doc_idx[-1])
    first, count = _eligible_documents(doc_idx - low, sizes[low:high], min_num_sent)
    if len(first) == 0:
        return np.zeros((0, 3), dtype=np.uint32)
    local_sizes = np.asarray(sizes[low:high], dtype=np.int64)
    chunks: List[np.ndarray] = []
    total, epoch = 0, 0
    while epoch < num_epochs and total < max_num_samples:
        # One epoch first, to learn how many samples an epoch gives; then as many as needed.
        needed = 1 if epoch == 0 else math.ceil((max_num_samples - total) / (total / epoch))
        group = max(1, min(num_epochs - epoch, needed, _MAX_GROUP_CELLS // (high - low)))
        targets = _draw_targets(seed, range(epoch, epoch + group), high - low, max_seq_length,
                                short_seq_prob)
        rows, row_epoch = _pack_epochs(first, count, local_sizes, targets, min_num_sent)
        # Keep whole epochs up to the first that reaches max_num_samples.
        cumulative = total + np.cumsum(np.bincount(row_epoch, minlength=group))
        kept = min(group, int(np.searchsorted(cumulative, max_num_samples, side="left")) + 1)
        rows = rows[row_epoch < kept]
        chunks.append(rows)
        total += len(rows)
        epoch += kept
    mapping = np.concatenate(chunks)
    mapping[:, :2] += low
    dtype = np.uint32 if high < np.iinfo(np.uint32).max else np.uint64
    mapping = mapping.astype(dtype)
    np.random.RandomState((seed + 1) % 2**32).shuffle(mapping)
    return mapping


def samples_mapping_filename(data_prefix: str, name: str, num_epochs: Optional[int],
                             max_num_samples: Optional[int], max_seq_length: int,
                             short_seq_prob: float, seed: int, binary_head: bool,
                             fingerprint: str) -> str:
    """Megatron's cache name, plus the binary-head flag and a fingerprint of the documents."""
    filename = f"{data_prefix}_{name}_indexmap"
    if num_epochs is not None:
        filename += f"_{num_epochs}ep"
    if max_num_samples is not None:
        filename += f"_{max_num_samples}mns"
    filename += f"_{max_seq_length}msl_{short_seq_prob:0.2f}ssp_{seed}s"
    filename += f"_{'bh' if binary_head else 'nobh'}_{fingerprint}.npy"
    return filename


def _fingerprint(doc_idx: np.ndarray, sizes: np.ndarray, short_seq_prob: float) -> str:
    low, high = int(doc_idx[0]), int(doc_idx[-1])
    key = (f"v{_MAPPING_VERSION}:{len(doc_idx)}:{low}:{high}:{int(sizes[low:high].sum())}:"
           f"{short_seq_prob!r}")
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _load(path: str) -> Optional[np.ndarray]:
    try:
        mapping = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable samples mapping %s (%s); rebuilding", path, error)
        return None
    if mapping.ndim != 2 or mapping.shape[1] != 3:
        logger.warning("ignoring samples mapping %s of shape %s; rebuilding", path,
                       mapping.shape)
        return None
    return mapping


def _save(path: str, mapping: np.ndarray) -> None:
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            np.save(handle, mapping, allow_pickle=False)
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("could not cache the samples mapping at %s (%s); keeping it in memory",
                       path, error)
        if os.path.exists(temporary):
            os.remove(temporary)


def get_samples_mapping(indexed_dataset, data_prefix: str, num_epochs: Optional[int],
                        max_num_samples: Optional[int], max_seq_length: int,
                        short_seq_prob: float, seed: int, name: str, binary_head: bool, *,
                        doc_idx: Optional[np.ndarray] = None,
                        cache_dir: Optional[str] = None) -> np.ndarray:
    """Load the cached samples mapping, or build it (deterministically) and cache it.

    Every rank may call this at once: a missing cache is built from the same seed everywhere and
    written with write-then-rename, so whichever rank renames last leaves the same bytes.

    Args:
        indexed_dataset: the sentence-level :class:`MMapIndexedDataset`.
        data_prefix: dataset prefix; the cache file is named after it.
        num_epochs, max_num_samples, max_seq_length, short_seq_prob, seed: see
            :func:`build_samples_mapping` (``max_seq_length`` excludes the special tokens).
        name: split name (``train``, ``valid``, ``test``), part of the file name.
        binary_head: samples need two sentences.
        doc_idx: this split's documents (default: all of ``indexed_dataset.doc_idx``).
        cache_dir: directory of the cache (default: the data's; ``""`` disables caching).

    Returns:
        ``[samples, 3]`` rows ``(start sentence, end sentence, target length)``.

    Raises:
        ValueError: if no sample can be made, with what to do about it.
    """
    doc_idx = np.asarray(indexed_dataset.doc_idx if doc_idx is None else doc_idx)
    sizes = indexed_dataset.sizes
    path = None
    if cache_dir != "":
        path = samples_mapping_filename(
            data_prefix, name, num_epochs, max_num_samples, max_seq_length, short_seq_prob, seed,
            binary_head, _fingerprint(doc_idx, sizes, short_seq_prob))
        if cache_dir is not None:
            path = os.path.join(cache_dir, os.path.basename(path))
        if os.path.exists(path):
            mapping = _load(path)
            if mapping is not None:
                logger.info("loaded samples mapping %s (%d samples)", path, len(mapping))
                return mapping
    started = time.perf_counter()
    mapping = build_samples_mapping(doc_idx, sizes, num_epochs, max_num_samples, max_seq_length,
                                    short_seq_prob, seed, min_num_sent=2 if binary_head else 1)
    if len(mapping) == 0:
        _raise_no_samples(doc_idx, sizes, name, data_prefix, binary_head)
    logger.info("built %s samples mapping of %s: %d samples in %.2f s", name, data_prefix,
                len(mapping), time.perf_counter() - started)
    if path is not None:
        _save(path, mapping)
    return mapping


def _raise_no_samples(doc_idx: np.ndarray, sizes: np.ndarray, name: str, data_prefix: str,
                      binary_head: bool) -> None:
    counts = np.diff(doc_idx)
    documents = len(counts)
    where = f"{name} split of {data_prefix} ({documents} documents)"
    if binary_head and documents and counts.max() < 2:
        raise ValueError(
            f"the {where} has no document with two or more sentences, so no sentence-order / "
            "next-sentence sample can be made; preprocess with --split-sentences, or train "
            "without the binary head (--bert-no-binary-head)")
    raise ValueError(f"the {where} yields no samples: documents are empty or contain a "
                     f"sentence longer than {LONG_SENTENCE_LEN} tokens")
