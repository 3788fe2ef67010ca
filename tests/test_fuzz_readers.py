"""Property-based fuzzing of every reader of JSON or TSV input: our error type, or success.

Whatever bytes a file holds, a reader either returns what it read or raises the project's own
error for that input, whose message names the file; never ``KeyError``, ``IndexError``,
``UnicodeDecodeError``, ``TypeError`` or a crash deeper down. Inputs mix structured near-misses
(JSON objects with missing or mistyped keys, rows with the wrong number of columns) with raw
bytes (invalid UTF-8, NULs, stray quotes and tabs, CR line ends).
"""

import json
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from tests.training_utils import VOCAB

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
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


# ------------------------------------------------------------------------------ GLUE and RACE

from tasks.data_utils import TaskDataError  # noqa: E402
from tasks.glue.data import TASKS, read_glue_file  # noqa: E402
from tasks.race.data import read_race  # noqa: E402

_cells = st.one_of(st.sampled_from(["0", "1", "entailment", "neutral", "contradiction",
                                    "not_entailment", "2.5", "-", "", '"quoted', "a\tb"]),
                   st.text(max_size=20))
_tsv_rows = st.lists(_cells, min_size=0, max_size=12).map(
    lambda cells: "\t".join(cells).encode("utf-8", "surrogatepass"))


@FUZZ
@given(task=st.sampled_from(sorted(TASKS)),
       content=_file_bytes(st.one_of(_tsv_rows, _raw_lines)),
       header=st.booleans())
def test_glue_readers_read_any_bytes_or_raise_their_own_error(workdir, task, content, header):
    path = os.path.join(workdir, "data.tsv")
    with open(path, "wb") as handle:
        if header:  # a real header, so that the fuzzed rows reach the row parser
            handle.write("\t".join(TASKS[task].layouts[0].header or ()).encode() + b"\n")
        handle.write(content)
    try:
        examples, labeled = read_glue_file(TASKS[task], path)
    except TaskDataError as error:
        assert path in str(error)
        return
    assert examples and isinstance(labeled, bool)


_race_options = st.one_of(st.lists(st.text(max_size=10), min_size=0, max_size=5), _json_values)
_race_records = st.fixed_dictionaries(
    {}, optional={"article": st.one_of(st.text(max_size=80), _json_values),
                  "questions": st.one_of(st.lists(st.text(max_size=30), max_size=3), _json_values),
                  "options": st.one_of(st.lists(_race_options, max_size=3), _json_values),
                  "answers": st.one_of(st.lists(st.sampled_from(list("ABCDE") + ["", "AB"]),
                                                max_size=3), _json_values),
                  "id": st.one_of(st.text(max_size=10), _json_values)})


@FUZZ
@given(content=st.one_of(_race_records.map(lambda r: json.dumps(r).encode()),
                         _json_values.map(lambda v: json.dumps(v).encode()),
                         st.binary(max_size=200)),
       level=st.sampled_from(["middle", "high"]), labeled=st.booleans())
def test_race_reader_reads_any_bytes_or_raises_its_own_error(workdir, content, level, labeled):
    shutil.rmtree(os.path.join(workdir, "race"), ignore_errors=True)
    directory = os.path.join(workdir, "race", "dev", level)
    os.makedirs(directory)
    path = os.path.join(directory, "1.txt")
    with open(path, "wb") as handle:
        handle.write(content)
    try:
        questions = read_race([os.path.join(workdir, "race", "dev")], labeled=labeled)
    except TaskDataError as error:
        assert path in str(error) or "no RACE questions" in str(error)
        return
    assert questions
