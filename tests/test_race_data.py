"""RACE reader: the original directory layout, question+option merging, truncation, bad files."""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron.tokenizer import build_tokenizer
from tasks.data_utils import TaskDataError
from tasks.race.data import build_race_dataset, merge_question_option, read_race

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets" / "race"
SHARED = ROOT.parent / "shared" / "data" / "race"
VOCAB = ROOT / "data" / "bert-large-uncased-vocab.txt"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB))


def _race_file(directory: Path, name: str, **overrides) -> Path:
    data = {"answers": ["B", "D"], "options": [["red", "green", "blue", "black"],
                                               ["one", "two", "three", "four"]],
            "questions": ["The car is _ .", "How many cats are there?"],
            "article": "Tom has a green car. He has four cats and no dog.", "id": "high7.txt"}
    data.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(data))
    return path


def test_split_directories_read_both_levels_in_file_order():
    questions = read_race([str(ASSETS / "train")])
    counts = {level: sum(q.level == level for q in questions) for level in ("middle", "high")}
    assert counts == {"middle": 25, "high": 12}  # 24 and 12 files
    sources = [q.source for q in questions if q.level == "middle"]
    numbers = [int(Path(s.split("#")[0]).stem) for s in sources]
    assert numbers == sorted(numbers)  # natural order: 9.txt before 10.txt
    first = json.loads(Path(sources[0].split("#")[0]).read_text())
    assert questions[0].article == first["article"]
    assert questions[0].label == "ABCD".index(first["answers"][0])
    assert read_race([str(ASSETS / "dev" / "high")])[0].level == "high"


def test_question_and_option_merging():
    assert merge_question_option("The car is _ .", "green") == "The car is green ."
    assert merge_question_option("Who is the thief?", "Ann") == "Who is the thief? Ann"


def test_samples_are_four_article_then_question_option_sequences(tmp_path, tokenizer):
    _race_file(tmp_path / "high", "1.txt")
    dataset = build_race_dataset([str(tmp_path)], tokenizer, 16)
    assert dataset.ids.shape == (2, 4, 16) and dataset.labels.tolist() == [1, 3]
    assert dataset.extra["level"].tolist() == [1, 1]  # high
    article = tokenizer.tokenize("Tom has a green car. He has four cats and no dog.")
    qa = tokenizer.tokenize("The car is blue .")
    room = 16 - 3 - len(qa)
    expected = [tokenizer.cls, *article[:room], tokenizer.sep, *qa, tokenizer.sep]
    assert dataset.ids[0, 2].tolist() == expected  # the article is cut from its end
    assert dataset.types[0, 2].tolist() == [0] * (room + 2) + [1] * (len(qa) + 1)
    assert dataset.padding_mask[0].sum() == 4 * 16


def test_long_questions_keep_at_most_half_the_sequence(tmp_path, tokenizer):
    _race_file(tmp_path, "1.txt", questions=["word " * 50, "short?"])
    dataset = build_race_dataset([str(tmp_path / "1.txt")], tokenizer, 20)
    types = dataset.types[0, 0]
    assert int(types.sum()) == (20 - 3) // 2 + 1  # capped question+option, then [SEP]
    assert dataset.extra["level"].tolist() == [1, 1]  # from the id "high7.txt"


@pytest.mark.parametrize("overrides, message", [
    ({"options": [["a", "b", "c"], ["a", "b", "c", "d"]]},
     r"1.txt: question 0: expected 4 option strings, found 3"),
    ({"answers": ["B", "E"]}, r"1.txt: question 1: answer 'E' is not one of A, B, C, D"),
    ({"answers": ["B"]}, r"1.txt: questions, options and answers differ in length"),
    ({"article": None}, r"1.txt: 'article' must be a str, found NoneType"),
])
def test_bad_files_name_the_file_and_question(tmp_path, overrides, message):
    _race_file(tmp_path, "1.txt", **overrides)
    with pytest.raises(TaskDataError, match=message):
        read_race([str(tmp_path)])


def test_unreadable_inputs(tmp_path):
    (tmp_path / "2.txt").write_text('{"article": "x",\n "questions": [}')
    with pytest.raises(TaskDataError, match=r"2.txt:2: not a JSON object"):
        read_race([str(tmp_path / "2.txt")])
    (tmp_path / "3.txt").write_text('["a list"]')
    with pytest.raises(TaskDataError, match="3.txt: expected a JSON object, found list"):
        read_race([str(tmp_path / "3.txt")])
    data = json.loads(_race_file(tmp_path / "d", "4.txt").read_text())
    del data["questions"]
    (tmp_path / "d" / "4.txt").write_text(json.dumps(data))
    with pytest.raises(TaskDataError, match="4.txt: missing key 'questions'"):
        read_race([str(tmp_path / "d")])
    with pytest.raises(TaskDataError, match="does not exist"):
        read_race([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskDataError, match=r"no RACE files \(\*.txt\) in"):
        read_race([str(tmp_path / "empty")])


def test_unlabeled_test_files(tmp_path, tokenizer):
    path = _race_file(tmp_path, "1.txt")
    data = json.loads(path.read_text())
    del data["answers"]
    path.write_text(json.dumps(data))
    with pytest.raises(TaskDataError, match="missing key 'answers'"):
        read_race([str(path)])
    dataset = build_race_dataset([str(path)], tokenizer, 32, labeled=False)
    assert dataset.labels.tolist() == [-1, -1] and not dataset.has_labels


@pytest.mark.skipif(not SHARED.exists(), reason="shared data pack absent")
def test_the_shared_race_files_read_whole():
    expected = {"train": (804, 378), "dev": (101, 50), "test": (102, 48)}
    for split, (middle, high) in expected.items():
        questions = read_race([str(SHARED / split)])
        levels = np.array([q.level for q in questions])
        assert ((levels == "middle").sum(), (levels == "high").sum()) == (middle, high), split
