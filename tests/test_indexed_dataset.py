"""The mmap indexed dataset: Megatron-LM's byte layout, reading, building, merging, bad files."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from megatron.data import indexed_dataset
from megatron.data.indexed_dataset import (
    DTYPES,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_fitting_dtype,
    make_builder,
    make_dataset,
)


def _documents(seed=0, num_docs=7, vocab=30000):
    """Random documents: lists of sentences (int arrays), some docs of a single sentence."""
    rng = np.random.RandomState(seed)
    return [[rng.randint(0, vocab, size=rng.randint(1, 40)) for _ in range(rng.randint(1, 6))]
            for _ in range(num_docs)]


def _write(prefix, docs, dtype=np.uint16):
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        for sentence in doc:
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def _megatron_index_bytes(sizes, doc_idx, dtype_code, itemsize):
    """The index exactly as Megatron-LM documents it, written by hand with struct."""
    pointers, offset = [], 0
    for size in sizes:
        pointers.append(offset)
        offset += size * itemsize
    return (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
            + struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
            + struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers)
            + struct.pack(f"<{len(doc_idx)}q", *doc_idx))


@pytest.mark.parametrize("dtype, dtype_code", [(np.uint16, 8), (np.int32, 4), (np.int64, 5)])
def test_files_are_megatron_layout_byte_for_byte(tmp_path, dtype, dtype_code):
    docs = _documents()
    prefix = str(tmp_path / "data")
    _write(prefix, docs, dtype)
    sizes = [len(s) for doc in docs for s in doc]
    doc_idx = [0] + list(np.cumsum([len(doc) for doc in docs]))
    expected_index = _megatron_index_bytes(sizes, doc_idx, dtype_code, np.dtype(dtype).itemsize)
    assert open(prefix + ".idx", "rb").read() == expected_index
    expected_bin = b"".join(np.asarray(s, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
                            for doc in docs for s in doc)
    assert open(prefix + ".bin", "rb").read() == expected_bin
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx"]  # no temporaries left


def test_reads_a_file_written_by_hand_in_megatron_layout(tmp_path):
    sentences = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    sizes = [len(s) for s in sentences]
    prefix = str(tmp_path / "megatron")
    with open(prefix + ".idx", "wb") as handle:
        handle.write(_megatron_index_bytes(sizes, [0, 2, 4], 4, 4))
    with open(prefix + ".bin", "wb") as handle:
        handle.write(struct.pack(f"<{sum(sizes)}i", *[t for s in sentences for t in s]))
    dataset = make_dataset(prefix, "infer", skip_warmup=True)
    assert len(dataset) == 4 and dataset.dtype == np.int32
    assert [dataset[i].tolist() for i in range(4)] == sentences
    assert dataset.doc_idx.tolist() == [0, 2, 4]
    assert dataset.sizes.tolist() == sizes


def test_dtype_table_and_best_fitting_dtype():
    assert {code: np.dtype(dtype).name for code, dtype in DTYPES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64",
        7: "float64", 8: "uint16"}
    assert indexed_dataset.code(np.float64) == 6  # the first match, as in Megatron
    assert best_fitting_dtype(30522) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(None) == np.int32
    with pytest.raises(ValueError, match="cannot be stored"):
        indexed_dataset.code(np.float16)


def test_reader_api(tmp_path):
    docs = _documents(seed=3)
    prefix = str(tmp_path / "data")
    _write(prefix, docs)
    dataset = MMapIndexedDataset(prefix)
    flat = [s for doc in docs for s in doc]
    assert len(dataset) == len(flat)
    for i, sentence in enumerate(flat):
        np.testing.assert_array_equal(dataset[i], sentence)
    np.testing.assert_array_equal(dataset[-1], flat[-1])
    np.testing.assert_array_equal(dataset[np.int64(2)], flat[2])
    for got, want in zip(dataset[1:5], flat[1:5]):
        np.testing.assert_array_equal(got, want)
    assert dataset[3:3] == []
    longest = int(np.argmax(dataset.sizes))
    np.testing.assert_array_equal(dataset.get(longest, offset=2, length=3), flat[longest][2:5])
    np.testing.assert_array_equal(dataset.get(longest, offset=1), flat[longest][1:])
    assert dataset.doc_idx.tolist() == [0] + list(np.cumsum([len(d) for d in docs]))
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(flat)]
    with pytest.raises(IndexError, match="outside sequence"):
        dataset.get(0, offset=0, length=int(dataset.sizes[0]) + 1)
    with pytest.raises(ValueError, match="contiguous"):
        dataset[0:4:2]
    # Memory-mapped: items are views of the mapped file, not copies.
    assert isinstance(dataset._bin_buffer, np.memmap)
    assert not dataset[0].flags.owndata and not dataset[0].flags.writeable
    # Pickles as its path (DataLoader workers reopen the files).
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[4], dataset[4])


def test_add_doc_merge_and_empty(tmp_path):
    docs_a, docs_b = _documents(seed=1), _documents(seed=2)
    _write(str(tmp_path / "a"), docs_a)
    _write(str(tmp_path / "b"), docs_b)
    builder = make_builder(str(tmp_path / "m.bin"), "mmap", vocab_size=30522)
    doc = docs_a[0]
    builder.add_doc(np.concatenate(doc), [len(s) for s in doc])
    builder.merge_file_(str(tmp_path / "b"))
    builder.finalize(str(tmp_path / "m.idx"))
    merged = MMapIndexedDataset(str(tmp_path / "m"))
    expected = doc + [s for d in docs_b for s in d]
    assert [x.tolist() for x in merged[0:len(merged)]] == [s.tolist() for s in expected]
    assert merged.doc_idx.tolist() == [0, len(doc)] + [len(doc) + int(n) for n in
                                                       np.cumsum([len(d) for d in docs_b])]
    with pytest.raises(ValueError, match="cannot merge"):
        MMapIndexedDatasetBuilder(str(tmp_path / "x.bin"), np.int32).merge_file_(
            str(tmp_path / "a"))
    # An empty dataset is valid (mmap cannot map empty files; the reader copes).
    empty = MMapIndexedDatasetBuilder(str(tmp_path / "e.bin"), np.uint16)
    empty.finalize(str(tmp_path / "e.idx"))
    assert len(MMapIndexedDataset(str(tmp_path / "e"))) == 0


def test_builder_failures_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"token id range \[0, 70000\] does not fit dtype uint16"):
        with MMapIndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16) as builder:
            builder.add_item([1, 2, 3])
            builder.add_item([0, 70000])
    with pytest.raises(ValueError, match="lengths sum to 3"):
        with MMapIndexedDatasetBuilder(str(tmp_path / "d.bin"), np.int32) as builder:
            builder.add_doc([1, 2], [1, 2])
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "d.bin"), np.int32)
    builder.add_item([1])
    builder.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="not supported"):
        make_builder(str(tmp_path / "d.bin"), "lazy")


def test_reader_rejects_bad_files(tmp_path):
    prefix = str(tmp_path / "data")
    _write(prefix, _documents())
    index = open(prefix + ".idx", "rb").read()
    with pytest.raises(FileNotFoundError, match="not found"):
        make_dataset(str(tmp_path / "missing"))
    open(prefix + ".idx", "wb").write(b"TNTIDX\x00\x00" + index[8:])
    with pytest.raises(ValueError, match="not a Megatron mmap index"):
        MMapIndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(index[:9] + struct.pack("<Q", 2) + index[17:])
    with pytest.raises(ValueError, match="index version 2"):
        MMapIndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(index[:-8])
    with pytest.raises(ValueError, match="truncated"):
        MMapIndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(index)
    data = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:-2])
    with pytest.raises(ValueError, match="truncated or mismatched"):
        MMapIndexedDataset(prefix)
