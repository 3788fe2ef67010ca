"""GLUE readers: the published TSV layouts of the nine tasks, their quirks and bad rows."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.tokenizer import build_tokenizer
from tasks.data_utils import TaskDataError, TaskDataset, build_input, truncate_pair
from tasks.glue.data import TASKS, build_glue_dataset, read_glue_file
from tasks.glue.finetune import format_glue_predictions, submission_filename

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets" / "glue"
SHARED = ROOT.parent / "shared" / "data" / "glue"
VOCAB = ROOT / "data" / "bert-large-uncased-vocab.txt"

# task -> (labeled fixture, rows read, label strings of the first rows, test rows)
FIXTURES = {
    "CoLA": ("dev.tsv", 6, ["1", "0", "1"], 3),
    "SST-2": ("train.tsv", 256, None, 16),
    "MRPC": ("dev.tsv", 4, ["1", "0", "1"], 2),
    "STS-B": ("dev.tsv", 4, ["4.750", "0.000", "3.800"], 2),
    "QQP": ("dev.tsv", 4, ["1", "0", "1"], 2),
    "MNLI": ("dev_matched.tsv", 16, None, 8),
    "QNLI": ("dev.tsv", 3, ["entailment", "not_entailment", "entailment"], 1),
    "RTE": ("dev.tsv", 2, ["entailment", "not_entailment"], 1),
    "WNLI": ("dev.tsv", 2, ["1", "0"], 1),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB))


def _write(path: Path, text: str) -> str:
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def test_every_task_has_a_fixture():
    assert sorted(FIXTURES) == sorted(TASKS)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_labeled_and_test_layouts_of_every_task(name):
    labeled, rows, first_labels, test_rows = FIXTURES[name]
    task = TASKS[name]
    examples, is_test = read_glue_file(task, str(ASSETS / name / labeled))
    assert not is_test and len(examples) == rows
    if first_labels:
        assert [e.label for e in examples[:len(first_labels)]] == first_labels
    assert all((e.text_b is None) == (name in ("CoLA", "SST-2")) for e in examples)
    test_file = ASSETS / name / ("test_matched.tsv" if name == "MNLI" else "test.tsv")
    tests, is_test = read_glue_file(task, str(test_file))
    assert is_test and len(tests) == test_rows
    assert all(e.label is None for e in tests)
    assert [e.uid for e in tests] == list(range(test_rows))  # the index column


def test_quotes_are_text_not_csv_quoting():
    cola, _ = read_glue_file(TASKS["CoLA"], str(ASSETS / "CoLA" / "test.tsv"))
    assert cola[0].text_a == 'Bill likes "her.'  # an unbalanced quote does not swallow lines
    mrpc, _ = read_glue_file(TASKS["MRPC"], str(ASSETS / "MRPC" / "dev.tsv"))
    assert mrpc[2].text_b == 'According to him, the plan was "very sound".'


def test_cola_train_and_dev_files_have_no_header():
    examples, _ = read_glue_file(TASKS["CoLA"], str(ASSETS / "CoLA" / "dev.tsv"))
    assert examples[0].text_a == "The sailors rode the breeze clear of the rocks."
    assert [e.uid for e in examples] == list(range(6))


def test_mnli_columns_and_labels():
    examples, _ = read_glue_file(TASKS["MNLI"], str(ASSETS / "MNLI" / "train.tsv"))
    first = (ASSETS / "MNLI" / "train.tsv").read_text().split("\n")[1].split("\t")
    assert (examples[0].text_a, examples[0].text_b, examples[0].label) == (
        first[8], first[9], first[11])
    dev, _ = read_glue_file(TASKS["MNLI"], str(ASSETS / "MNLI" / "dev_mismatched.tsv"))
    assert {e.label for e in dev} <= set(TASKS["MNLI"].labels)


def test_qqp_skips_and_counts_ragged_rows_and_empty_questions(caplog):
    with caplog.at_level(logging.WARNING, logger="tasks.glue.data"):
        examples, _ = read_glue_file(TASKS["QQP"], str(ASSETS / "QQP" / "dev.tsv"))
    assert [e.uid for e in examples] == [0, 1, 3, 5]
    assert "skipped 1 row(s) with a wrong number of fields (line 4)" in caplog.text
    assert "skipped 1 row(s) with an empty text (line 6)" in caplog.text


def test_mnli_rows_without_gold_label_are_skipped(tmp_path, caplog):
    lines = (ASSETS / "MNLI" / "train.tsv").read_text().split("\n")
    fields = lines[2].split("\t")
    lines[2] = "\t".join(fields[:-1] + ["-"])
    path = _write(tmp_path / "train.tsv", "\n".join(lines))
    with caplog.at_level(logging.WARNING):
        examples, _ = read_glue_file(TASKS["MNLI"], path)
    assert len(examples) == 63 and "label '-'" in caplog.text


def test_line_endings_bom_and_carriage_returns(tmp_path):
    path = _write(tmp_path / "dev.tsv", "\ufeffsentence\tlabel\r\nfine\rfilm\t1\r\nbad\t0\n\n")
    examples, _ = read_glue_file(TASKS["SST-2"], path)
    # Only "\n" ends a row; a stray "\r" inside a field is whitespace, not a line break.
    assert [(e.text_a, e.label) for e in examples] == [("fine film", "1"), ("bad", "0")]


@pytest.mark.parametrize("text, message", [
    ("sentence\tlabel\ngood\t1\nno label here\n", ":3: expected 2 tab-separated fields, found 1"),
    ("sentence\tlabel\ngood\t1\nbad\tpositive\n", ":3: label 'positive' is not one of 0, 1"),
    ("sentence\tlabel\n\t1\n", ":2: empty text in column 1"),
    ("index\tsentence\nx\tgood\n", ":2: index 'x' is not an integer"),
    ("text\tlabel\tmore\ngood\t1\t2\n", ":1: not a SST-2 file"),
    ("", ": the file is empty"),
    ("sentence\tlabel\n", ": no SST-2 examples"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, text, message):
    path = _write(tmp_path / "bad.tsv", text)
    with pytest.raises(TaskDataError, match="bad.tsv" + message.replace("(", r"\(")):
        read_glue_file(TASKS["SST-2"], path)


def test_invalid_utf8_and_missing_files(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9\t1\n")
    with pytest.raises(TaskDataError, match=r"bad.tsv:3: not valid UTF-8 at byte 3"):
        read_glue_file(TASKS["SST-2"], str(path))
    with pytest.raises(TaskDataError, match="cannot read .*missing.tsv"):
        read_glue_file(TASKS["SST-2"], str(tmp_path / "missing.tsv"))
    bad_score = _write(tmp_path / "stsb.tsv", (ASSETS / "STS-B" / "dev.tsv").read_text()
                       .replace("4.750", "high"))
    with pytest.raises(TaskDataError, match=r"stsb.tsv:2: score 'high' is not a number"):
        read_glue_file(TASKS["STS-B"], bad_score)


def test_truncation_keeps_the_shorter_text():
    a, b = list(range(10)), list(range(100, 103))
    truncate_pair(a, b, 8)
    assert (a, b) == ([0, 1, 2, 3, 4], [100, 101, 102])
    a, b = list(range(4)), list(range(100, 110))
    truncate_pair(a, b, 6)
    assert (a, b) == ([0, 1, 2], [100, 101, 102])
    ids, types, mask = build_input([7, 8], [9], 8, cls_id=1, sep_id=2, pad_id=0)
    assert ids.tolist() == [1, 7, 8, 2, 9, 2, 0, 0]
    assert types.tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert mask.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]


def test_dataset_encodes_pairs_as_bert_inputs(tokenizer):
    dataset = build_glue_dataset(TASKS["MRPC"], [str(ASSETS / "MRPC" / "dev.tsv")], tokenizer, 24)
    assert dataset.name == "dev" and len(dataset) == 4 and dataset.has_labels
    a = tokenizer.tokenize("The company posted a profit of $5 million.")
    b = tokenizer.tokenize("The firm reported a $5 million profit.")
    truncate_pair(a, b, 21)
    expected = [tokenizer.cls, *a, tokenizer.sep, *b, tokenizer.sep]
    assert dataset.ids[0, :len(expected)].tolist() == expected
    assert dataset.types[0].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (
        24 - len(expected))
    assert dataset.labels.tolist() == [1, 0, 1, 0]
    batch = dataset.batch([2, 0], torch.device("cpu"))
    assert batch["text"].shape == (2, 24) and batch["label"].tolist() == [1, 1]
    stsb = build_glue_dataset(TASKS["STS-B"], [str(ASSETS / "STS-B" / "test.tsv")], tokenizer, 32)
    assert not stsb.has_labels and stsb.labels.dtype == np.float32


def test_submission_layout(tokenizer):
    mnli = TASKS["MNLI"]
    dataset = build_glue_dataset(mnli, [str(ASSETS / "MNLI" / "test_matched.tsv")], tokenizer, 32)
    outputs = np.eye(3, dtype=np.float32)[[1, 0, 2, 1, 1, 1, 0, 2]]
    text = format_glue_predictions(mnli, outputs, dataset)
    assert text.split("\n")[:4] == ["index\tprediction", "0\tentailment", "1\tcontradiction",
                                    "2\tneutral"]
    assert submission_filename(mnli, dataset) == "MNLI-m.tsv"
    dataset.name = "test_mismatched"
    assert submission_filename(mnli, dataset) == "MNLI-mm.tsv"
    stsb = TASKS["STS-B"]
    scores = TaskDataset("test", ids=np.zeros((3, 4)), types=np.zeros((3, 4)),
                         padding_mask=np.zeros((3, 4)), labels=np.full(3, np.nan),
                         uids=np.array([5, 6, 7]), paths=["x"])
    text = format_glue_predictions(stsb, np.array([[-0.4], [2.34567], [6.0]]), scores)
    assert text == "index\tprediction\n5\t0.000\n6\t2.346\n7\t5.000\n"
    assert submission_filename(stsb, scores) == "STS-B.tsv"


@pytest.mark.skipif(not SHARED.exists(), reason="shared data pack absent")
def test_the_shared_sst2_and_mnli_files_read_whole():
    counts = {("SST-2", "train.tsv"): 10751, ("SST-2", "dev.tsv"): 1000,
              ("MNLI", "train.tsv"): 20000, ("MNLI", "dev_matched.tsv"): 2000,
              ("MNLI", "dev_mismatched.tsv"): 2000}
    for (task, name), expected in counts.items():
        examples, is_test = read_glue_file(TASKS[task], str(SHARED / task / name))
        assert len(examples) == expected and not is_test, (task, name)
