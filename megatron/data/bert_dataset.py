"""Megatron-LM's ``BertDataset``: masked-LM samples with a sentence-order (or next-sentence) label.

Sample ``idx`` is a pure function of the data, the parameters and ``seed + idx``: every
tensor-parallel rank builds the same dataset and reads the same sample, and the data-parallel
ranks read different samples because the sampler gives them different indices.

Each sample (all arrays ``int64`` of length ``max_seq_length``)::

    text          [CLS] A [SEP] B [SEP] [PAD]...   with 15% of A and B corrupted 80/10/10
    types         0 for [CLS] A [SEP], 1 for B [SEP], 0 for padding
    labels        original id at masked positions, -1 elsewhere
    loss_mask     1 at masked positions
    padding_mask  1 for real tokens, 0 for padding
    is_random     binary label: SOP: 1 when A and B were swapped; NSP: 1 when B comes from
                  another document; 0 without the binary head
    truncated     1 when the segments were cut to fit
"""

import logging
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from megatron.data.dataset_utils import (
    create_masked_lm_predictions,
    create_tokens_and_tokentypes,
    get_a_and_b_segments,
    pad_and_convert_to_numpy,
    start_piece_table,
    truncate_segments,
)
from megatron.data.samples_mapping import get_samples_mapping

__all__ = ["BertDataset", "build_training_sample", "BINARY_HEAD_MODES"]

logger = logging.getLogger(__name__)

BINARY_HEAD_MODES = ("sop", "nsp")


def _nsp_segments(sample: Sequence[np.ndarray], target_seq_length: int,
                  np_rng: np.random.RandomState, random_segment: Callable):
    """Classic next-sentence prediction: B follows A, or (p = 1/2) comes from another document."""
    a_end = 1 if len(sample) < 3 else int(np_rng.randint(1, len(sample)))
    tokens_a = np.concatenate(sample[:a_end])
    if np_rng.random_sample() < 0.5:
        tokens_b = random_segment(np_rng, max(1, target_seq_length - len(tokens_a)))
        return tokens_a, tokens_b, True
    return tokens_a, np.concatenate(sample[a_end:]), False


def build_training_sample(sample: Sequence[np.ndarray], target_seq_length: int,
                          max_seq_length: int, vocab_id_list: np.ndarray,
                          start_piece: np.ndarray, cls_id: int, sep_id: int, mask_id: int,
                          pad_id: int, masked_lm_prob: float, np_rng: np.random.RandomState,
                          binary_head: bool, *, binary_head_mode: str = "sop",
                          random_segment: Optional[Callable] = None,
                          max_ngrams: int = 3) -> Dict[str, np.ndarray]:
    """One training sample from consecutive sentences of a document (see the module docstring).

    Args:
        sample: the sentences (token-id arrays).
        target_seq_length: tokens of A and B together (without special tokens) to aim for.
        max_seq_length: padded length, special tokens included.
        vocab_id_list: ids drawn for random replacement.
        start_piece: ``start_piece[id]`` is ``False`` for ``##`` continuation pieces.
        cls_id, sep_id, mask_id, pad_id: special ids.
        masked_lm_prob: fraction of tokens to predict.
        np_rng: the sample's random state.
        binary_head: make two segments and a binary label; else one segment.
        binary_head_mode: ``sop`` (sentence order) or ``nsp`` (next sentence).
        random_segment: ``f(np_rng, num_tokens)`` giving tokens of another document (NSP).
        max_ngrams: longest masked n-gram of whole words.

    Returns:
        ``{"text", "types", "labels", "is_random", "loss_mask", "padding_mask", "truncated"}``.
    """
    max_num_tokens = min(target_seq_length, max_seq_length - (3 if binary_head else 2))
    if binary_head and binary_head_mode == "nsp":
        tokens_a, tokens_b, is_next_random = _nsp_segments(sample, max_num_tokens, np_rng,
                                                           random_segment)
    elif binary_head:
        tokens_a, tokens_b, is_next_random = get_a_and_b_segments(sample, np_rng)
    else:
        tokens_a = np.concatenate(sample)
        tokens_b = np.zeros(0, dtype=tokens_a.dtype)
        is_next_random = False
    tokens_a, tokens_b, truncated = truncate_segments(tokens_a, tokens_b, max_num_tokens, np_rng)
    tokens, tokentypes = create_tokens_and_tokentypes(tokens_a, tokens_b, cls_id, sep_id)
    max_predictions_per_seq = max(1, int(masked_lm_prob * max_num_tokens))
    tokens, positions, labels = create_masked_lm_predictions(
        tokens, vocab_id_list, start_piece, masked_lm_prob, cls_id, sep_id, mask_id,
        max_predictions_per_seq, np_rng, max_ngrams=max_ngrams)
    text, types, labels, padding_mask, loss_mask = pad_and_convert_to_numpy(
        tokens, tokentypes, positions, labels, pad_id, max_seq_length)
    return {"text": text, "types": types, "labels": labels,
            "is_random": np.int64(is_next_random), "loss_mask": loss_mask,
            "padding_mask": padding_mask, "truncated": np.int64(truncated)}


class BertDataset(torch.utils.data.Dataset):
    """BERT pretraining samples over a range of documents of a sentence-level dataset.

    Args:
        name: split name (``train``, ``valid``, ``test``).
        indexed_dataset: sentence-level :class:`~megatron.data.indexed_dataset.MMapIndexedDataset`.
        data_prefix: its prefix (names the samples-mapping cache).
        num_epochs: epochs of samples (``None``: as many as ``max_num_samples`` needs).
        max_num_samples: samples wanted (``None``: ``num_epochs`` epochs).
        masked_lm_prob: fraction of tokens to predict (0.15).
        max_seq_length: sequence length, special tokens included.
        short_seq_prob: probability of a shorter target length (0.1).
        seed: random seed.
        binary_head: two segments with a binary label (``False`` for ``--bert-no-binary-head``).
        tokenizer: gives ``cls``, ``sep``, ``mask``, ``pad``, ``inv_vocab``, ``vocab_size``.
        documents: this split's ``doc_idx`` slice (default: every document).
        binary_head_mode: ``sop`` (Megatron's sentence order) or ``nsp`` (next sentence).
        max_ngrams: longest masked n-gram of whole words.
        cache_dir: where the samples mapping is cached (default: next to the data).

    Raises:
        ValueError: for invalid parameters, or data that cannot make samples (the message says
            what to do, e.g. ``--bert-no-binary-head`` for single-sentence documents).
    """

    def __init__(self, name: str, indexed_dataset, data_prefix: str, num_epochs: Optional[int],
                 max_num_samples: Optional[int], masked_lm_prob: float, max_seq_length: int,
                 short_seq_prob: float, seed: int, binary_head: bool, *, tokenizer,
                 documents: Optional[np.ndarray] = None, binary_head_mode: str = "sop",
                 max_ngrams: int = 3, cache_dir: Optional[str] = None) -> None:
        if binary_head_mode not in BINARY_HEAD_MODES:
            raise ValueError(f"binary_head_mode {binary_head_mode!r} is not one of "
                             f"{BINARY_HEAD_MODES}")
        if not 0.0 <= masked_lm_prob <= 1.0:
            raise ValueError(f"masked_lm_prob {masked_lm_prob} is not in [0, 1]")
        if max_seq_length < 5:
            raise ValueError(f"max_seq_length {max_seq_length} is too short (at least 5)")
        if max_ngrams < 1:
            raise ValueError(f"max_ngrams must be >= 1, got {max_ngrams}")
        self.name = name
        self.indexed_dataset = indexed_dataset
        self.seed = seed
        self.masked_lm_prob = masked_lm_prob
        self.max_seq_length = max_seq_length
        self.binary_head = binary_head
        self.binary_head_mode = binary_head_mode
        self.max_ngrams = max_ngrams
        self.doc_idx = np.asarray(indexed_dataset.doc_idx if documents is None else documents,
                                  dtype=np.int64)
        if binary_head and binary_head_mode == "nsp" and len(self.doc_idx) < 3:
            raise ValueError(f"next-sentence prediction needs two or more documents; the {name} "
                             f"split of {data_prefix} has {len(self.doc_idx) - 1}")
        self.samples_mapping = get_samples_mapping(
            indexed_dataset, data_prefix, num_epochs, max_num_samples,
            max_seq_length - (3 if binary_head else 2), short_seq_prob, seed, name, binary_head,
            doc_idx=self.doc_idx, cache_dir=cache_dir)
        self.vocab_id_list = np.asarray(sorted(tokenizer.inv_vocab), dtype=np.int64)
        self.start_piece = start_piece_table(tokenizer.inv_vocab, tokenizer.vocab_size)
        self.cls_id, self.sep_id = tokenizer.cls, tokenizer.sep
        self.mask_id, self.pad_id = tokenizer.mask, tokenizer.pad
        self._nonempty_docs = np.flatnonzero(np.diff(self.doc_idx) > 0)

    def __len__(self) -> int:
        return self.samples_mapping.shape[0]

    def _random_segment(self, exclude_sentence: int) -> Callable:
        """NSP: ``f(np_rng, num_tokens)`` reading sentences of a random other document."""
        document = int(np.searchsorted(self.doc_idx, exclude_sentence, side="right")) - 1

        def segment(np_rng: np.random.RandomState, num_tokens: int) -> np.ndarray:
            others = self._nonempty_docs[self._nonempty_docs != document]
            chosen = int(others[np_rng.randint(0, len(others))])
            first, end = int(self.doc_idx[chosen]), int(self.doc_idx[chosen + 1])
            sentence = int(np_rng.randint(first, end))
            parts, total = [], 0
            while sentence < end and total < num_tokens:
                parts.append(self.indexed_dataset[sentence])
                total += len(parts[-1])
                sentence += 1
            return np.concatenate(parts)

        return segment

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        start, end, target = (int(value) for value in self.samples_mapping[idx])
        sample = self.indexed_dataset[start:end]
        np_rng = np.random.RandomState(seed=(self.seed + int(idx)) % 2**32)
        return build_training_sample(
            sample, target, self.max_seq_length, self.vocab_id_list, self.start_piece,
            self.cls_id, self.sep_id, self.mask_id, self.pad_id, self.masked_lm_prob, np_rng,
            self.binary_head, binary_head_mode=self.binary_head_mode,
            random_segment=self._random_segment(start), max_ngrams=self.max_ngrams)
