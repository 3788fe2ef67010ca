"""Property-based fuzzing of every reader of JSON or TSV input: our error type, or success.

Whatever bytes a file holds, a reader either returns what it read or raises the project's own
error for that input, whose message names the file; never ``KeyError``, ``IndexError``,
``UnicodeDecodeError``, ``TypeError`` or a crash deeper down. Inputs mix structured near-misses
(JSON objects with missing or mistyped keys, rows with the wrong number of columns) with raw
bytes (invalid UTF-8, NULs, stray quotes and tabs, CR line ends).
"""

import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from tests.training_utils import VOCAB

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                     st.text(max_size=40))
_json_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
_json_lines = st.one_of(
    st.dictionaries(st.sampled_from(["text", "txt", "id", ""]), _json_values, max_size=3)
    .map(json.dumps),
    _json_values.map(json.dumps),
    st.text(max_size=60),
).map(lambda line: line.encode("utf-8", "surrogatepass"))
_raw_lines = st.binary(max_size=60)
_line_ends = st.sampled_from([b"\n", b"\r\n", b"\r", b""])


def _file_bytes(lines_strategy):
    return st.lists(st.tuples(lines_strategy, _line_ends), min_size=0, max_size=6).map(
        lambda lines: b"".join(line + end for line, end in lines))


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as directory:
        yield directory


@FUZZ
@given(content=_file_bytes(st.one_of(_json_lines, _raw_lines)),
       skip_bad_lines=st.booleans(), split_sentences=st.booleans())
def test_preprocess_data_reads_any_bytes_or_raises_its_own_error(workdir, content,
                                                                 skip_bad_lines,
                                                                 split_sentences):
    path = os.path.join(workdir, "input.jsonl")
    with open(path, "wb") as handle:
        handle.write(content)
    prefix = os.path.join(workdir, "out")
    config = PreprocessConfig(input=path, output_prefix=prefix,
                              tokenizer_type="BertWordPieceLowerCase", vocab_file=str(VOCAB),
                              split_sentences=split_sentences, skip_bad_lines=skip_bad_lines)
    try:
        summary = preprocess(config)
    except PreprocessError as error:
        assert path in str(error)
        leftovers = [name for name in os.listdir(workdir) if name != "input.jsonl"]
        assert not leftovers, leftovers  # nothing half-written
        return
    for output in summary.outputs:
        assert os.path.isfile(output)
        os.remove(output)
