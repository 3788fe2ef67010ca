"""BertDataset: samples mapping, sample structure, masking statistics, labels, determinism."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.data import samples_mapping as sm
from megatron.data.bert_dataset import BertDataset
from megatron.data.dataset_utils import (
    build_train_valid_test_datasets,
    get_train_valid_test_split_,
)
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocess import PreprocessConfig, preprocess
from megatron.tokenizer import build_tokenizer
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "shakespeare_tiny.jsonl"
VOCAB = ROOT / "data" / "bert-large-uncased-vocab.txt"
SEQ = 128


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB))


def _preprocess(directory, split_sentences):
    config = PreprocessConfig(input=str(TINY), output_prefix=str(directory / "tiny"),
                              tokenizer_type="BertWordPieceLowerCase", vocab_file=str(VOCAB),
                              split_sentences=split_sentences)
    preprocess(config)
    level = "sentence" if split_sentences else "document"
    return str(directory / f"tiny_text_{level}")


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return _preprocess(tmp_path_factory.mktemp("bert"), split_sentences=True)


def _dataset(prefix, tokenizer, num_samples=2000, seed=1234, **kwargs):
    indexed = MMapIndexedDataset(prefix, skip_warmup=True)
    kwargs.setdefault("binary_head", True)
    return BertDataset("train", indexed, prefix, None, num_samples, 0.15, SEQ, 0.1, seed,
                       tokenizer=tokenizer, **kwargs)


def _segments(sample, sep_id):
    """Original tokens (masking undone) and the positions of the separators."""
    original = sample["text"].copy()
    masked = sample["loss_mask"] == 1
    original[masked] = sample["labels"][masked]
    length = int(sample["padding_mask"].sum())
    seps = np.flatnonzero(original[:length] == sep_id)
    return original[:length], seps


def _contains(array, part):
    if len(part) > len(array):
        return False
    windows = np.lib.stride_tricks.sliding_window_view(array, len(part))
    return bool((windows == part).all(axis=1).any())


# ------------------------------------------------------------------------ samples mapping

def _reference_epoch(doc_idx, sizes, targets, min_num_sent):
    """Megatron-LM's packing loop, sentence by sentence (targets indexed by sentence)."""
    rows = []
    for doc in range(len(doc_idx) - 1):
        first, last = int(doc_idx[doc]), int(doc_idx[doc + 1])
        if last - first < min_num_sent or (sizes[first:last] > sm.LONG_SENTENCE_LEN).any():
            continue
        start, seq_len, num_sent, target = first, 0, 0, targets[first]
        for sentence in range(first, last):
            seq_len += sizes[sentence]
            num_sent += 1
            remaining = last - sentence - 1
            if (seq_len >= target and remaining > 1 and num_sent >= min_num_sent) \
                    or remaining == 0:
                rows.append((start, sentence + 1, int(target)))
                start, seq_len, num_sent = sentence + 1, 0, 0
                target = targets[min(sentence + 1, len(targets) - 1)]
    return rows


@pytest.mark.parametrize("min_num_sent", [1, 2])
def test_vectorised_mapping_equals_megatrons_loop(min_num_sent):
    rng = np.random.RandomState(0)
    counts = rng.randint(0, 30, size=200)
    counts[:5] = 1  # single-sentence documents
    doc_idx = np.concatenate([[0], np.cumsum(counts)])
    sizes = rng.randint(1, 60, size=int(doc_idx[-1])).astype(np.int32)
    sizes[rng.randint(0, len(sizes), 3)] = 600  # long sentences drop their documents
    mapping = sm.build_samples_mapping(doc_idx, sizes, 3, None, 125, 0.1, 7, min_num_sent)
    expected = []
    for epoch in range(3):
        targets = sm._draw_targets(7, range(epoch, epoch + 1), len(sizes), 125, 0.1)[0]
        expected += _reference_epoch(doc_idx, sizes, targets, min_num_sent)
    assert sorted(map(tuple, mapping.tolist())) == sorted(expected)
    assert mapping.dtype == np.uint32
    # Epochs are whole and independent of how many samples are asked for.
    epoch_size = len(_reference_epoch(doc_idx, sizes, sm._draw_targets(
        7, range(1), len(sizes), 125, 0.1)[0], min_num_sent))
    asked = sm.build_samples_mapping(doc_idx, sizes, None, epoch_size + 1, 125, 0.1, 7,
                                     min_num_sent)
    assert epoch_size + 1 <= len(asked) < 3 * epoch_size
    assert set(map(tuple, asked.tolist())) <= set(expected)


def test_mapping_targets_and_split_range(prefix):
    indexed = MMapIndexedDataset(prefix, skip_warmup=True)
    doc_idx = indexed.doc_idx[5:15]  # documents 5..13 only
    mapping = sm.build_samples_mapping(doc_idx, indexed.sizes, 50, None, 125, 0.1, 3)
    assert mapping[:, 0].min() >= doc_idx[0] and mapping[:, 1].max() <= doc_idx[-1]
    short = np.mean(mapping[:, 2] < 125)
    assert 0.06 < short < 0.14  # short_seq_prob 0.1 (a short draw can also equal 125)
    assert (mapping[:, 2] >= 2).all()
    lengths = np.array([indexed.sizes[s:e].sum() for s, e, _ in mapping.astype(np.int64)])
    counts = mapping[:, 1].astype(np.int64) - mapping[:, 0]
    assert (counts >= 2).all()  # binary head: two sentences at least
    # A sample stops growing once it reaches its target (unless the document's end is near).
    last_sizes = indexed.sizes[mapping[:, 1].astype(np.int64) - 1]
    assert (lengths - last_sizes < mapping[:, 2]).mean() > 0.95


def test_cache_is_written_atomically_and_reused(prefix, tokenizer, tmp_path):
    first = _dataset(prefix, tokenizer, 300, cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npy") and "_train_indexmap_300mns_125msl_" \
        in files[0] and "_1234s_bh_" in files[0]
    second = _dataset(prefix, tokenizer, 300, cache_dir=str(tmp_path))
    assert isinstance(second.samples_mapping, np.memmap)  # loaded, not rebuilt
    np.testing.assert_array_equal(first.samples_mapping, second.samples_mapping)
    uncached = _dataset(prefix, tokenizer, 300, cache_dir="")
    np.testing.assert_array_equal(first.samples_mapping, uncached.samples_mapping)
    (tmp_path / files[0]).write_bytes(b"garbage")  # a corrupt cache is rebuilt
    third = _dataset(prefix, tokenizer, 300, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(first.samples_mapping, third.samples_mapping)
    assert os.listdir(tmp_path) == files


# ------------------------------------------------------------------------------ samples

@pytest.fixture(scope="module")
def sop(prefix, tokenizer, tmp_path_factory):
    dataset = _dataset(prefix, tokenizer, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return dataset, [dataset[i] for i in range(len(dataset))]


def test_sample_structure_sop(sop, tokenizer):
    dataset, samples = sop
    assert len(samples) >= 2000
    truncated = 0
    for idx, sample in enumerate(samples):
        assert set(sample) == {"text", "types", "labels", "is_random", "loss_mask",
                               "padding_mask", "truncated"}
        for key in ("text", "types", "labels", "loss_mask", "padding_mask"):
            assert sample[key].shape == (SEQ,) and sample[key].dtype == np.int64
        original, seps = _segments(sample, tokenizer.sep)
        length = len(original)
        start, end, target = (int(v) for v in dataset.samples_mapping[idx])
        assert original[0] == tokenizer.cls and len(seps) == 2 and seps[1] == length - 1
        assert length <= target + 3
        assert (sample["padding_mask"][:length] == 1).all()
        assert (sample["padding_mask"][length:] == 0).all()
        assert (sample["text"][length:] == tokenizer.pad).all()
        types = np.r_[np.zeros(seps[0] + 1), np.ones(length - seps[0] - 1), np.zeros(SEQ - length)]
        np.testing.assert_array_equal(sample["types"], types)
        assert (sample["labels"][sample["loss_mask"] == 0] == -1).all()
        assert sample["loss_mask"][[0, *seps]].sum() == 0  # special tokens are never masked
        a, b = original[1:seps[0]], original[seps[0] + 1:seps[1]]
        assert len(a) and len(b)
        sentences = dataset.indexed_dataset[start:end]
        whole = np.concatenate(sentences)
        first, second = (b, a) if sample["is_random"] else (a, b)
        if sample["truncated"]:
            truncated += 1
            # Trimmed segments are still runs of the text, split at a sentence boundary.
            boundaries = np.cumsum([len(x) for x in sentences])[:-1]
            assert any(_contains(whole[:k], first) and _contains(whole[k:], second)
                       for k in boundaries)
        else:
            np.testing.assert_array_equal(np.concatenate([first, second]), whole)
    assert 0 < truncated < len(samples)


def test_masking_statistics(sop, tokenizer):
    dataset, samples = sop
    real = masked = as_mask = kept = 0
    split_words = 0
    for sample in samples:
        original, _ = _segments(sample, tokenizer.sep)
        positions = np.flatnonzero(sample["loss_mask"])
        real += len(original)
        masked += len(positions)
        as_mask += int((sample["text"][positions] == tokenizer.mask).sum())
        kept += int((sample["text"][positions] == original[positions]).sum())
        # Whole-word masking: a masked word's continuation pieces are masked with it.
        for position in positions:
            following = position + 1
            if following < len(original) and not dataset.start_piece[original[following]]:
                split_words += int(sample["loss_mask"][following] == 0)
    assert 0.13 < masked / real < 0.16
    assert abs(as_mask / masked - 0.8) < 0.02
    assert abs(kept / masked - 0.1) < 0.02
    assert abs((masked - as_mask - kept) / masked - 0.1) < 0.02  # random replacements
    assert split_words == 0


def test_sentence_order_labels_are_balanced(sop):
    _, samples = sop
    assert abs(np.mean([s["is_random"] for s in samples]) - 0.5) < 0.04


def test_samples_are_deterministic_and_seed_dependent(prefix, tokenizer, sop):
    dataset, samples = sop
    again = _dataset(prefix, tokenizer, cache_dir="")
    for idx in (0, 17, len(dataset) - 1):
        for key, value in samples[idx].items():
            np.testing.assert_array_equal(again[idx][key], value)
    other = _dataset(prefix, tokenizer, seed=99, cache_dir="")
    assert not np.array_equal(other.samples_mapping, dataset.samples_mapping)
    assert any(not np.array_equal(other[i]["text"], samples[i]["text"]) for i in range(5))


def test_next_sentence_prediction_mode(prefix, tokenizer):
    dataset = _dataset(prefix, tokenizer, 600, binary_head_mode="nsp", cache_dir="")
    documents = [np.concatenate(dataset.indexed_dataset[int(s):int(e)]).astype(np.int64)
                 for s, e in zip(dataset.doc_idx[:-1], dataset.doc_idx[1:])]
    labels = []
    for idx in range(len(dataset)):
        sample = dataset[idx]
        labels.append(int(sample["is_random"]))
        if sample["truncated"]:
            continue
        original, seps = _segments(sample, tokenizer.sep)
        start, end, _ = (int(v) for v in dataset.samples_mapping[idx])
        home = int(np.searchsorted(dataset.doc_idx, start, side="right")) - 1
        a, b = original[1:seps[0]], original[seps[0] + 1:seps[1]]
        whole = np.concatenate(dataset.indexed_dataset[start:end])
        np.testing.assert_array_equal(whole[:len(a)], a)  # A is always the sample's beginning
        if sample["is_random"]:
            sources = [d for d, text in enumerate(documents) if _contains(text, b)]
            assert set(sources) - {home}  # B is text of another document
        else:
            np.testing.assert_array_equal(np.concatenate([a, b]), whole)
    assert abs(np.mean(labels) - 0.5) < 0.06


def test_without_binary_head_single_segments(prefix, tokenizer):
    dataset = _dataset(prefix, tokenizer, 300, binary_head=False, cache_dir="")
    for idx in range(0, len(dataset), 7):
        sample = dataset[idx]
        original, seps = _segments(sample, tokenizer.sep)
        assert list(seps) == [len(original) - 1] and original[0] == tokenizer.cls
        assert sample["is_random"] == 0 and (sample["types"] == 0).all()
        if not sample["truncated"]:
            start, end, _ = (int(v) for v in dataset.samples_mapping[idx])
            np.testing.assert_array_equal(
                original[1:-1], np.concatenate(dataset.indexed_dataset[start:end]))


def test_single_sentence_documents_need_no_binary_head(tmp_path, tokenizer):
    documents = _preprocess(tmp_path, split_sentences=False)
    with pytest.raises(ValueError, match="--bert-no-binary-head"):
        _dataset(documents, tokenizer, 100, cache_dir="")
    dataset = _dataset(documents, tokenizer, 100, binary_head=False, cache_dir="")
    assert len(dataset) >= 100 and dataset[0]["truncated"] == 1


# ----------------------------------------------------------------------------- splits

def test_split_string():
    assert get_train_valid_test_split_("949,50,1", 1000) == [0, 949, 999, 1000]
    assert get_train_valid_test_split_("8/1/1", 21) == [0, 17, 19, 21]
    assert get_train_valid_test_split_("1", 10) == [0, 10, 10, 10]
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(ValueError, match="--split"):
            get_train_valid_test_split_(bad, 10)


def test_build_train_valid_test_datasets_splits_are_disjoint(prefix, tokenizer, tmp_path):
    datasets = build_train_valid_test_datasets(
        [prefix], "mmap", "6,2,2", [400, 50, None], SEQ, 0.15, 0.1, 1234, True,
        tokenizer=tokenizer, cache_dir=str(tmp_path))
    train, valid, test = datasets
    assert len(train) >= 400 and len(valid) >= 50 and len(test) > 0
    boundaries = get_train_valid_test_split_("6,2,2", 21)
    doc_idx = train.indexed_dataset.doc_idx
    for index, dataset in enumerate(datasets):
        low, high = doc_idx[boundaries[index]], doc_idx[boundaries[index + 1]]
        assert dataset.samples_mapping[:, 0].min() >= low
        assert dataset.samples_mapping[:, 1].max() <= high
    assert sorted(os.listdir(tmp_path))[0].startswith("tiny_text_sentence_test_indexmap_1ep_")
    none = build_train_valid_test_datasets(prefix, "mmap", "1,0,0", [10, 10, 10], SEQ, 0.15,
                                           0.1, 1, True, tokenizer=tokenizer, cache_dir="")
    assert none[1] is None and none[2] is None


def test_blending_two_prefixes(prefix, tokenizer):
    train, _, _ = build_train_valid_test_datasets(
        ["0.25", prefix, "0.75", prefix], "mmap", "1,0,0", [400, 0, 0], SEQ, 0.15, 0.1, 5,
        True, tokenizer=tokenizer, cache_dir="")
    assert len(train) == 400
    assert np.bincount(train.dataset_index, minlength=2).tolist() == [100, 300]
    assert set(train[3]) >= {"text", "labels", "is_random"}


# ------------------------------------------------------------------------ distributed

def _check_ranks(rank, world_size, prefix, cache):
    import torch.distributed as dist

    from megatron import mpu
    from megatron.data.data_samplers import build_pretraining_data_loader

    mpu.initialize_model_parallel(2)
    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB))
    indexed = MMapIndexedDataset(prefix, skip_warmup=True)
    dataset = BertDataset("train", indexed, prefix, None, 64, 0.15, SEQ, 0.1, 1234, True,
                          tokenizer=tokenizer, cache_dir=cache)  # all ranks build at once
    loader = build_pretraining_data_loader(
        dataset, 8, micro_batch_size=4, data_parallel_rank=mpu.get_data_parallel_rank(),
        data_parallel_size=mpu.get_data_parallel_world_size())
    batch = next(iter(loader))["text"]
    gathered = [torch.empty_like(batch) for _ in range(world_size)]
    dist.all_gather(gathered, batch)
    # Ranks 0,1 and 2,3 are tensor-parallel pairs; 0,2 and 1,3 data-parallel pairs.
    assert torch.equal(gathered[0], gathered[1]) and torch.equal(gathered[2], gathered[3])
    assert not torch.equal(gathered[0], gathered[2])
    expected = torch.stack([torch.from_numpy(dataset[i]["text"]) for i in range(8, 16)])
    assert torch.equal(torch.cat([gathered[0], gathered[2]]), expected)


def test_identical_on_tensor_parallel_ranks_different_across_data_parallel(prefix, tmp_path):
    run_distributed(_check_ranks, 4, prefix, str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1  # one cache file, no temporaries left
