"""Pieces of a BERT sample, as in Megatron-LM's ``dataset_utils``: segments, masking, padding.

All randomness comes from the ``np_rng`` (a ``numpy.random.RandomState``) passed in, so a sample
is a pure function of the data and the seed.
"""

import functools
import logging
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["get_train_valid_test_split_", "get_a_and_b_segments", "truncate_segments",
           "create_tokens_and_tokentypes", "create_masked_lm_predictions",
           "pad_and_convert_to_numpy", "start_piece_table"]

logger = logging.getLogger(__name__)


def get_train_valid_test_split_(splits_string: str, size: int) -> List[int]:
    """Document boundaries of the train/valid/test splits, e.g. ``"949,50,1"`` of ``size``.

    Weights may be separated by commas or slashes and are normalised; missing ones are 0.

    Returns:
        ``[0, end_train, end_valid, size]``.

    Raises:
        ValueError: for a malformed string, negative weights or weights that sum to 0.
    """
    separator = "," if "," in splits_string else "/"
    try:
        splits = [float(part) for part in splits_string.split(separator)]
    except ValueError:
        raise ValueError(f"--split {splits_string!r}: expected up to three numbers such as "
                         "949,50,1") from None
    if len(splits) > 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise ValueError(f"--split {splits_string!r}: expected up to three non-negative "
                         "weights with a positive sum")
    splits += [0.0] * (3 - len(splits))
    total = sum(splits)
    index = [0]
    for split in splits:
        index.append(index[-1] + int(round(split / total * size)))
    diff = index[-1] - size
    index = [index[0]] + [value - diff for value in index[1:]]
    return [max(0, value) for value in index]


def get_a_and_b_segments(sample: Sequence[np.ndarray],
                         np_rng: np.random.RandomState) -> Tuple[np.ndarray, np.ndarray, bool]:
    """Split a sample's sentences into segments A and B; swap them with probability 1/2 (SOP).

    Returns:
        ``(tokens_a, tokens_b, is_next_random)``; ``is_next_random`` is ``True`` when swapped.
    """
    n_sentences = len(sample)
    if n_sentences < 2:
        raise ValueError(f"a two-segment sample needs 2 or more sentences, got {n_sentences}")
    a_end = 1 if n_sentences < 3 else int(np_rng.randint(1, n_sentences))
    tokens_a = np.concatenate(sample[:a_end])
    tokens_b = np.concatenate(sample[a_end:])
    is_next_random = bool(np_rng.random_sample() < 0.5)
    if is_next_random:
        tokens_a, tokens_b = tokens_b, tokens_a
    return tokens_a, tokens_b, is_next_random


def truncate_segments(tokens_a: np.ndarray, tokens_b: np.ndarray, max_num_tokens: int,
                      np_rng: np.random.RandomState) -> Tuple[np.ndarray, np.ndarray, bool]:
    """Trim the longer segment one token at a time, from its front or back at random.

    Returns:
        ``(tokens_a, tokens_b, truncated)``.
    """
    len_a, len_b = len(tokens_a), len(tokens_b)
    if len_a == 0:
        raise ValueError("segment A is empty")
    excess = len_a + len_b - max_num_tokens
    if excess <= 0:
        return tokens_a, tokens_b, False
    front = np_rng.random_sample(excess) < 0.5
    cut = {"a": [0, 0], "b": [0, 0]}  # tokens removed from the front and from the back
    for step in range(excess):
        segment = "a" if len_a > len_b else "b"
        if segment == "a":
            len_a -= 1
        else:
            len_b -= 1
        cut[segment][0 if front[step] else 1] += 1
    tokens_a = tokens_a[cut["a"][0]:len(tokens_a) - cut["a"][1]]
    tokens_b = tokens_b[cut["b"][0]:len(tokens_b) - cut["b"][1]]
    return tokens_a, tokens_b, True


def create_tokens_and_tokentypes(tokens_a: np.ndarray, tokens_b: np.ndarray, cls_id: int,
                                 sep_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` with token types 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``.

    With an empty B: ``[CLS] A [SEP]``, all types 0.
    """
    parts = [[cls_id], tokens_a, [sep_id]]
    types = [np.zeros(len(tokens_a) + 2, dtype=np.int64)]
    if len(tokens_b):
        parts += [tokens_b, [sep_id]]
        types.append(np.ones(len(tokens_b) + 1, dtype=np.int64))
    return np.concatenate(parts).astype(np.int64), np.concatenate(types)


def start_piece_table(inv_vocab: dict, vocab_size: int) -> np.ndarray:
    """``table[id]`` is ``True`` unless the token is a ``##`` continuation piece."""
    table = np.ones(vocab_size, dtype=bool)
    for index, token in inv_vocab.items():
        if index < vocab_size and token.startswith("##"):
            table[index] = False
    return table


def _words(tokens: np.ndarray, special: np.ndarray, start_piece: np.ndarray) -> np.ndarray:
    """``[words, 2]`` ``(first, end)`` positions of whole words (special tokens excluded)."""
    previous_special = np.concatenate([[True], special[:-1]])
    starts = ~special & (start_piece[tokens] | previous_special)
    first = np.flatnonzero(starts)
    # A word runs to the next word start or special token.
    boundaries = np.flatnonzero(starts | special)
    following = np.searchsorted(boundaries, first, side="right")
    ends = np.append(boundaries, len(tokens))[following]
    return np.stack([first, ends], axis=1)


@functools.lru_cache(maxsize=None)
def _ngram_cdf(longest: int) -> np.ndarray:
    """Normalised CDF of ``P(n) ~ 1/n`` for ``n`` in ``1..longest``, as ``np.random.choice``."""
    pvals = 1.0 / np.arange(1, longest + 1)
    cdf = (pvals / pvals.sum()).cumsum()
    cdf /= cdf[-1]
    return cdf


def _choose_spans(words: np.ndarray, num_to_predict: int, max_ngrams: int,
                  np_rng: np.random.RandomState) -> List[int]:
    """Positions to predict: n-grams of whole words, ``P(n) ~ 1/n``, never overlapping.

    An n-gram is ``n`` consecutive words; its positions are those of its words only, so a
    special token between them (``[SEP]``) is never chosen.
    """
    # P(n) ~ 1/n over the n-grams that fit. Drawing one uniform number against the normalised
    # CDF is what ``np_rng.choice(longest, p=...)`` does, minus its per-call validation, so the
    # random stream (and every sample) is unchanged.
    cdfs = [None] + [_ngram_cdf(longest) for longest in range(1, max_ngrams + 1)]
    cumulative = np.concatenate([[0], np.cumsum(words[:, 1] - words[:, 0])])
    taken = np.zeros(len(words), dtype=bool)
    chosen = 0
    for word in np_rng.permutation(len(words)):
        if chosen >= num_to_predict:
            break
        longest = min(max_ngrams, len(words) - word)
        n = int(cdfs[longest].searchsorted(np_rng.random_sample(), side="right")) + 1
        while n > 0 and chosen + cumulative[word + n] - cumulative[word] > num_to_predict:
            n -= 1
        if n == 0 or taken[word:word + n].any():
            continue
        taken[word:word + n] = True
        chosen += int(cumulative[word + n] - cumulative[word])
    return [p for first, end in words[taken] for p in range(int(first), int(end))]


def create_masked_lm_predictions(tokens: np.ndarray, vocab_id_list: np.ndarray,
                                 start_piece: np.ndarray, masked_lm_prob: float, cls_id: int,
                                 sep_id: int, mask_id: int, max_predictions_per_seq: int,
                                 np_rng: np.random.RandomState, max_ngrams: int = 3,
                                 do_whole_word_mask: bool = True
                                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choose about ``masked_lm_prob`` of the tokens and corrupt them 80/10/10.

    Whole words are chosen (a word and its ``##`` pieces together), in n-grams of up to
    ``max_ngrams`` words, until ``min(max_predictions_per_seq, max(1, round(len * prob)))``
    positions are chosen. Each chosen position becomes ``[MASK]`` with probability 0.8, keeps its
    token with 0.1 and becomes a random vocabulary id with 0.1.

    Returns:
        ``(output_tokens, masked_positions, masked_labels)``; the labels are the original ids.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if masked_lm_prob <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return tokens.copy(), empty, empty
    special = (tokens == cls_id) | (tokens == sep_id)
    if do_whole_word_mask:
        words = _words(tokens, special, start_piece)
    else:
        single = np.flatnonzero(~special)
        words = np.stack([single, single + 1], axis=1)
    num_to_predict = min(max_predictions_per_seq,
                         max(1, int(round(len(tokens) * masked_lm_prob))))
    positions = np.asarray(_choose_spans(words, num_to_predict, max_ngrams, np_rng),
                           dtype=np.int64).reshape(-1)
    labels = tokens[positions]
    output = tokens.copy()
    draw = np_rng.random_sample((2, len(positions)))
    random_ids = vocab_id_list[np_rng.randint(0, len(vocab_id_list), size=len(positions))]
    replacement = np.where(draw[0] < 0.8, mask_id, np.where(draw[1] < 0.5, labels, random_ids))
    output[positions] = replacement
    return output, positions, labels


def pad_and_convert_to_numpy(tokens: np.ndarray, tokentypes: np.ndarray,
                             masked_positions: np.ndarray, masked_labels: np.ndarray,
                             pad_id: int, max_seq_length: int,
                             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pad to ``max_seq_length``; labels ``-1`` and loss mask 0 except at masked positions.

    Returns:
        ``(tokens, tokentypes, labels, padding_mask, loss_mask)``, all int64.
    """
    num_tokens = len(tokens)
    padding = max_seq_length - num_tokens
    if padding < 0:
        raise ValueError(f"{num_tokens} tokens do not fit max_seq_length {max_seq_length}")
    tokens_np = np.concatenate([tokens, np.full(padding, pad_id, dtype=np.int64)])
    tokentypes_np = np.concatenate([tokentypes, np.zeros(padding, dtype=np.int64)])
    padding_mask_np = (np.arange(max_seq_length) < num_tokens).astype(np.int64)
    labels_np = np.full(max_seq_length, -1, dtype=np.int64)
    labels_np[masked_positions] = masked_labels
    loss_mask_np = np.zeros(max_seq_length, dtype=np.int64)
    loss_mask_np[masked_positions] = 1
    return tokens_np, tokentypes_np, labels_np, padding_mask_np, loss_mask_np


SPLIT_NAMES = ("train", "valid", "test")


def _build_single(data_prefix: str, data_impl: str, splits_string: str,
                  num_samples: Sequence, skip_warmup: bool, dataset_kwargs: dict) -> list:
    from megatron.data import indexed_dataset
    from megatron.data.bert_dataset import BertDataset

    dataset = indexed_dataset.make_dataset(data_prefix, data_impl, skip_warmup)
    num_documents = len(dataset.doc_idx) - 1
    splits = get_train_valid_test_split_(splits_string, num_documents)
    datasets = []
    for index, name in enumerate(SPLIT_NAMES):
        first, end = splits[index], splits[index + 1]
        logger.info("%s: documents [%d, %d) of %s", name, first, end, data_prefix)
        if end <= first or num_samples[index] == 0:
            datasets.append(None)
            continue
        datasets.append(BertDataset(
            name, dataset, data_prefix, 1 if num_samples[index] is None else None,
            num_samples[index], documents=dataset.doc_idx[first:end + 1], **dataset_kwargs))
    return datasets


def build_train_valid_test_datasets(data_prefix, data_impl: str, splits_string: str,
                                    train_valid_test_num_samples: Sequence,
                                    max_seq_length: int, masked_lm_prob: float,
                                    short_seq_prob: float, seed: int, skip_warmup: bool,
                                    binary_head: bool = True, *, tokenizer,
                                    binary_head_mode: str = "sop", max_ngrams: int = 3,
                                    cache_dir=None) -> tuple:
    """Train, valid and test :class:`~megatron.data.bert_dataset.BertDataset` s (Megatron's API).

    Documents are split by ``splits_string`` (``"949,50,1"``) in order, so the splits share no
    document.

    Args:
        data_prefix: a prefix, ``[prefix]``, or ``[weight, prefix, weight, prefix, ...]`` to
            blend several datasets.
        data_impl: ``mmap`` (or ``infer``).
        splits_string: split weights.
        train_valid_test_num_samples: samples per split; ``None`` means one epoch, 0 no dataset.
        max_seq_length, masked_lm_prob, short_seq_prob, seed, binary_head, binary_head_mode,
            max_ngrams, cache_dir: see :class:`~megatron.data.bert_dataset.BertDataset`.
        skip_warmup: do not pre-read the data files.
        tokenizer: the tokenizer the data was made with.

    Returns:
        ``(train, valid, test)``; a split without documents or samples is ``None``.
    """
    kwargs = dict(masked_lm_prob=masked_lm_prob, max_seq_length=max_seq_length,
                  short_seq_prob=short_seq_prob, seed=seed, binary_head=binary_head,
                  tokenizer=tokenizer, binary_head_mode=binary_head_mode, max_ngrams=max_ngrams,
                  cache_dir=cache_dir)
    if isinstance(data_prefix, str):
        data_prefix = [data_prefix]
    if len(data_prefix) == 1:
        return tuple(_build_single(data_prefix[0], data_impl, splits_string,
                                   train_valid_test_num_samples, skip_warmup, kwargs))
    from megatron.data.blendable_dataset import (
        BlendableDataset,
        get_datasets_weights_and_num_samples,
    )

    prefixes, weights, per_dataset = get_datasets_weights_and_num_samples(
        data_prefix, train_valid_test_num_samples)
    parts = [_build_single(prefix, data_impl, splits_string, samples, skip_warmup, kwargs)
             for prefix, samples in zip(prefixes, per_dataset)]
    blended = []
    for index in range(3):
        members = [(p[index], w) for p, w in zip(parts, weights) if p[index] is not None]
        if not members:
            blended.append(None)
            continue
        size = train_valid_test_num_samples[index]
        if size is None:
            raise ValueError("blending several datasets needs the number of samples of each "
                             "split, not None")
        blended.append(BlendableDataset([d for d, _ in members], [w for _, w in members], size))
    return tuple(blended)
