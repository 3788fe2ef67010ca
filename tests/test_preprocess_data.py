"""tools/preprocess_data.py: round trip, workers, sentence splitting and bad input."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.sentence_splitter import SentenceSplitter, build_sentence_splitter
from megatron.tokenizer import build_tokenizer
from tests.test_tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "preprocess_data.py"
TINY = ROOT / "data" / "shakespeare_tiny.jsonl"
VOCAB = ROOT / "data" / "bert-large-uncased-vocab.txt"


def _load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _run(tmp_path, input_path, *extra, prefix="out"):
    """Run the tool in-process; returns (exit status, files in tmp_path besides inputs)."""
    argv = ["--input", str(input_path), "--tokenizer-type", "BertWordPieceLowerCase",
            "--vocab-file", str(VOCAB), "--output-prefix", str(tmp_path / prefix), *extra]
    status = tool.main(argv)
    produced = sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".jsonl")
    return status, produced


def _write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n"
                              for line in lines))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB))


def test_sentence_round_trip(tmp_path, tokenizer, capsys):
    status, produced = _run(tmp_path, TINY, "--split-sentences", "--log-interval", "10")
    assert status == 0
    assert produced == ["out_text_sentence.bin", "out_text_sentence.idx"]
    err = capsys.readouterr().err
    assert "Processed 10 documents (" in err and " docs/s, " in err and " MB/s)." in err
    assert "Done: 21 documents read, written text: 21;" in err
    dataset = MMapIndexedDataset(str(tmp_path / "out_text_sentence"))
    assert dataset.dtype == np.uint16
    splitter = SentenceSplitter()
    texts = [json.loads(line)["text"] for line in open(TINY)]
    assert len(dataset.doc_idx) == len(texts) + 1
    for doc, text in enumerate(texts):
        expected = [ids for ids in map(tokenizer.tokenize, splitter.tokenize(text)) if ids]
        first, end = dataset.doc_idx[doc], dataset.doc_idx[doc + 1]
        assert [dataset[i].tolist() for i in range(first, end)] == expected
    total_tokens = int(dataset.sizes.sum())
    assert f"{len(dataset)} sentences, {total_tokens} tokens; skipped 0 bad and 0 empty" in err


def test_document_level_and_two_workers_give_identical_files(tmp_path, tokenizer, capsys):
    assert _run(tmp_path, TINY, "--workers", "1", prefix="one")[0] == 0
    assert _run(tmp_path, TINY, "--workers", "2", "--chunk-size", "3", prefix="two")[0] == 0
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"one_text_document{suffix}").read_bytes()
        assert one == (tmp_path / f"two_text_document{suffix}").read_bytes()
    dataset = MMapIndexedDataset(str(tmp_path / "one_text_document"))
    texts = [json.loads(line)["text"] for line in open(TINY)]
    assert len(dataset) == len(texts) and dataset.doc_idx.tolist() == list(range(22))
    assert dataset[5].tolist() == tokenizer.tokenize(texts[5])
    assert "--bert-no-binary-head" in capsys.readouterr().err  # one sequence per document


def test_several_json_keys_and_empty_documents(tmp_path, tokenizer, capsys):
    source = _write_lines(tmp_path / "in.jsonl", [
        json.dumps({"text": "First doc. It has two sentences.", "title": "One"}),
        json.dumps({"text": "   ", "title": "Empty text"}),
        "",
        json.dumps({"text": "Third doc here. Yes.", "title": ""}),
    ])
    status, produced = _run(tmp_path, source, "--json-keys", "text", "title",
                            "--split-sentences")
    assert status == 0
    assert produced == ["out_text_sentence.bin", "out_text_sentence.idx",
                        "out_title_sentence.bin", "out_title_sentence.idx"]
    text = MMapIndexedDataset(str(tmp_path / "out_text_sentence"))
    title = MMapIndexedDataset(str(tmp_path / "out_title_sentence"))
    assert text.doc_idx.tolist() == [0, 2, 4] and title.doc_idx.tolist() == [0, 1, 2]
    assert text[3].tolist() == tokenizer.tokenize("Yes.")
    # Blank line: both keys empty; doc 2: text empty; doc 4: title empty.
    assert "skipped 0 bad and 4 empty" in capsys.readouterr().err


BAD_CASES = {
    "malformed": ([json.dumps({"text": "ok."}), '{"text": "unterminated'],
                  r"in\.jsonl:2: malformed JSON \(Unterminated string"),
    "missing key": ([json.dumps({"text": "ok."}), json.dumps({"body": "x"})],
                    r"in\.jsonl:2: missing key 'text'"),
    "not an object": ([json.dumps(["text"])], r"in\.jsonl:1: expected a JSON object, got list"),
    "not a string": ([json.dumps({"text": 5})], r"in\.jsonl:1: key 'text' is a int"),
    "invalid utf-8": ([json.dumps({"text": "ok."}), b'{"text": "caf\xe9"}\n'],
                      r"in\.jsonl:2: invalid UTF-8 at byte 13"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_an_error_naming_the_line_and_leaves_nothing(tmp_path, capsys, case):
    lines, message = BAD_CASES[case]
    source = _write_lines(tmp_path / "in.jsonl", lines * 30)  # bad lines after good ones
    status, produced = _run(tmp_path, source, "--split-sentences", "--workers", "2")
    assert status == 1
    assert produced == []  # no output, no temporary file
    err = capsys.readouterr().err
    assert err.startswith("preprocess_data.py: error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_skip_bad_lines_and_replace_invalid_utf8(tmp_path, capsys):
    lines = [json.dumps({"text": "Good one. Two."}), '{"text": ', json.dumps({"x": 1}),
             b'{"text": "caf\xe9 au lait."}\n', json.dumps({"text": "Last. Doc."})]
    source = _write_lines(tmp_path / "in.jsonl", lines)
    status, _ = _run(tmp_path, source, "--skip-bad-lines", "--split-sentences")
    assert status == 0
    assert MMapIndexedDataset(str(tmp_path / "out_text_sentence")).doc_idx.tolist() == [0, 2, 4]
    assert "skipped 3 bad and 0 empty" in capsys.readouterr().err
    status, _ = _run(tmp_path, source, "--skip-bad-lines", "--invalid-utf8", "replace",
                     prefix="replaced")
    assert status == 0
    assert "skipped 2 bad and 0 empty" in capsys.readouterr().err


def test_input_without_tokens_and_bad_arguments(tmp_path, capsys):
    source = _write_lines(tmp_path / "in.jsonl", [json.dumps({"text": ""}), ""])
    assert _run(tmp_path, source) == (1, [])
    assert "no document has any tokens" in capsys.readouterr().err
    assert _run(tmp_path, tmp_path / "missing.jsonl") == (1, [])
    assert "input file" in capsys.readouterr().err
    assert _run(tmp_path, TINY, "--workers", "0") == (1, [])
    assert "workers must be >= 1, got 0" in capsys.readouterr().err
    status = tool.main(["--input", str(TINY), "--tokenizer-type", "BertWordPieceLowerCase",
                        "--vocab-file", str(tmp_path / "nope.txt"),
                        "--output-prefix", str(tmp_path / "o")])
    assert status == 1 and "nope.txt" in capsys.readouterr().err
    assert _run(tmp_path, TINY, prefix="no/such/dir/out") == (1, [])
    assert "output directory" in capsys.readouterr().err


def test_command_line_exit_status_and_no_traceback(tmp_path):
    source = _write_lines(tmp_path / "in.jsonl", [json.dumps({"text": "Fine."}), "{oops"])
    result = subprocess.run(
        [sys.executable, str(TOOL), "--input", str(source), "--tokenizer-type",
         "BertWordPieceLowerCase", "--vocab-file", str(VOCAB), "--output-prefix",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"preprocess_data.py: error: {source}:2: malformed JSON "
                                     "(Expecting property name enclosed in double quotes, "
                                     "column 2) (use --skip-bad-lines to skip such lines)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("text, sentences", [
    ("Mr. Smith went to Washington. He paid $3.14 for it. Then he left.",
     ["Mr. Smith went to Washington.", "He paid $3.14 for it.", "Then he left."]),
    ('J. K. Rowling wrote it. "Stop!" he said. "Go." She went... And then? Yes.',
     ["J. K. Rowling wrote it.", '"Stop!" he said.', '"Go."', "She went...", "And then?",
      "Yes."]),
    ("The U.S. economy grew 2.5% in 2004. No. 10 Downing St. is here. He said no. Then stop.",
     ["The U.S. economy grew 2.5% in 2004.", "No. 10 Downing St. is here.", "He said no.",
      "Then stop."]),
    ("Use e.g. salt, i.e. NaCl. Dr. Who (the doctor) agreed.) Next one",
     ["Use e.g. salt, i.e. NaCl.", "Dr. Who (the doctor) agreed.)", "Next one"]),
    ("Title without a stop\nFirst line. Second line.\n\n  \nLast",
     ["Title without a stop", "First line.", "Second line.", "Last"]),
])
def test_sentence_splitter(text, sentences):
    assert SentenceSplitter().tokenize(text) == sentences


def test_sentence_splitter_keeps_newlines_and_nltk_needs_its_data():
    assert SentenceSplitter(keep_newlines=True).tokenize("A b.\nC d. E f.\nG") == \
        ["A b.\n", "C d.", "E f.\n", "G"]
    try:
        import nltk  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the nltk package and its punkt data"):
            build_sentence_splitter("nltk")
    with pytest.raises(ValueError, match="unknown sentence splitter"):
        build_sentence_splitter("spacy")


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    sentencepiece_model = train_sentencepiece(tmp_path)
    status = tool.main(["--input", str(TINY), "--tokenizer-type", "SentencePieceTokenizer",
                        "--tokenizer-model", sentencepiece_model, "--split-sentences",
                        "--output-prefix", str(tmp_path / "sp")])
    assert status == 0
    dataset = MMapIndexedDataset(str(tmp_path / "sp_text_sentence"))
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sentencepiece_model)
    first_text = json.loads(TINY.open().readline())["text"]
    first_sentence = SentenceSplitter().tokenize(first_text)[0]
    assert dataset[0].tolist() == tokenizer.tokenize(first_sentence)
    assert tokenizer.detokenize(dataset[0].tolist()) == first_sentence
