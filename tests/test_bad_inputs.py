"""A catalogue of bad inputs to every entry point: one clear line, no traceback, no output.

Each case runs a real command line of ``tools/preprocess_data.py``, ``pretrain_bert.py``,
``tools/checkpoint_util.py``, ``tools/convert_checkpoint_to_hf.py``,
``tools/convert_hf_to_megatron.py`` or ``tasks/main.py`` on a broken input and checks that it
exits non-zero, prints no Python traceback, names the culprit (path, line, key or value) on
stderr, and leaves nothing in its output location.

Cases that fail before ``torch.distributed`` starts run in this process, through ``runpy`` with
the script's own ``__main__`` guard (fast, and any exception other than ``SystemExit`` fails the
test, as a traceback would); the others run as subprocesses.
"""

import json
import os
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import pytest
import torch

from tests.distributed import run_distributed
from tests.training_utils import CORPUS, ROOT, VOCAB, preprocess_sample_corpus, run_pretrain, \
    tiny_argv

TIMEOUT = 120


@dataclass
class Case:
    """One bad input.

    Attributes:
        script: path relative to the repository root.
        argv: arguments; ``{w}`` is replaced by the case's work directory, ``{data}`` by the
            tokenized sample corpus, ``{ckpt}`` by a tiny TP=1 pretraining checkpoint,
            ``{ckpt2}`` by the same at TP=2, ``{vocab}`` by the shipped vocabulary.
        expect: strings stderr must contain (``{w}`` etc. replaced).
        output: path (with placeholders) that must not exist afterwards.
        prepare: ``f(workdir)`` writing the broken input.
        subprocess: run as a separate process (needed once torch.distributed starts).
        env: extra environment variables.
    """

    script: str
    argv: List[str]
    expect: List[str]
    output: Optional[str] = None
    prepare: Optional[Callable[[Path], None]] = None
    subprocess: bool = False
    env: dict = field(default_factory=dict)


def _write(name: str, content):
    def prepare(workdir: Path) -> None:
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return prepare


def _good_lines(n=3):
    with open(CORPUS) as handle:
        return "".join(next(handle) for _ in range(n))


PREPROCESS = "tools/preprocess_data.py"
PRE_ARGS = ["--output-prefix", "{w}/corpus", "--vocab-file", "{vocab}",
            "--tokenizer-type", "BertWordPieceLowerCase", "--workers", "1"]


FINETUNE = ["--pretrained-checkpoint", "{ckpt}", "--epochs", "1", "--micro-batch-size", "2",
            "--lr", "1e-4", "--seq-length", "32", "--save", "{w}/ft"]


def _truncate_shard(path: str):
    def prepare(workdir: Path) -> None:
        target = Path(path.format(w=workdir))
        target.write_bytes(target.read_bytes()[:2000])
    return prepare


CASES = {
    # ----------------------------------------------------------------- tools/preprocess_data.py
    "preprocess: malformed JSON line": Case(
        PREPROCESS, ["--input", "{w}/bad.jsonl", *PRE_ARGS],
        ["{w}/bad.jsonl:2: malformed JSON"], output="{w}/corpus_text_document.bin",
        prepare=_write("bad.jsonl", _good_lines(1) + '{"text": "unterminated\n')),
    "preprocess: missing JSON key": Case(
        PREPROCESS, ["--input", "{w}/bad.jsonl", *PRE_ARGS],
        ["{w}/bad.jsonl:3: missing key 'text'"], output="{w}/corpus_text_document.bin",
        prepare=_write("bad.jsonl", _good_lines(2) + '{"body": "a b c."}\n')),
    "preprocess: non-UTF-8 bytes": Case(
        PREPROCESS, ["--input", "{w}/bad.jsonl", *PRE_ARGS],
        ["{w}/bad.jsonl:2: invalid UTF-8"], output="{w}/corpus_text_document.bin",
        prepare=_write("bad.jsonl", _good_lines(1).encode() + b'{"text": "caf\xe9"}\n')),
    "preprocess: missing input file": Case(
        PREPROCESS, ["--input", "{w}/nowhere.jsonl", *PRE_ARGS],
        ["input file {w}/nowhere.jsonl does not exist"],
        output="{w}/corpus_text_document.bin"),
    "preprocess: unknown tokenizer name": Case(
        PREPROCESS, ["--input", str(CORPUS), "--output-prefix", "{w}/corpus",
                     "--tokenizer-type", "GPT9Tokenizer", "--vocab-file", "{vocab}"],
        ["GPT9Tokenizer"], output="{w}/corpus_text_document.bin"),
    # ----------------------------------------------------------------------- pretrain_bert.py
    "pretrain: TP does not divide the heads": Case(
        "pretrain_bert.py", ["--tensor-model-parallel-size", "3", "--data-path", "{data}",
                             "--num-layers", "2", "--hidden-size", "64",
                             "--num-attention-heads", "4", "--seq-length", "32",
                             "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
                             "--vocab-file", "{vocab}", "--save", "{w}/save"],
        ["--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"],
        output="{w}/save", env={"WORLD_SIZE": "3"}),
    "pretrain: TP does not divide the world size": Case(
        "pretrain_bert.py", ["--tensor-model-parallel-size", "2", "--data-path", "{data}",
                             "--num-layers", "2", "--hidden-size", "64",
                             "--num-attention-heads", "4", "--seq-length", "32",
                             "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
                             "--vocab-file", "{vocab}", "--save", "{w}/save"],
        ["world size 3 is not divisible by --tensor-model-parallel-size 2"],
        output="{w}/save", env={"WORLD_SIZE": "3"}),
    "pretrain: inconsistent sizes": Case(
        "pretrain_bert.py", ["--data-path", "{data}", "--num-layers", "2", "--hidden-size", "64",
                             "--num-attention-heads", "4", "--seq-length", "128",
                             "--max-position-embeddings", "64", "--micro-batch-size", "2",
                             "--train-iters", "2", "--lr", "1e-3", "--vocab-file", "{vocab}"],
        ["--seq-length 128 is longer than --max-position-embeddings 64"]),
    "pretrain: unknown tokenizer name": Case(
        "pretrain_bert.py", ["--tokenizer-type", "NoSuchTokenizer", "--save", "{w}/save"],
        ["NoSuchTokenizer"], output="{w}/save"),
    "pretrain: missing dataset prefix": Case(
        "pretrain_bert.py", tiny_argv("{w}/nothing/here", "--save", "{w}/save"),
        ["{w}/nothing/here"], output="{w}/save/latest_checkpointed_iteration.txt",
        subprocess=True),
    "pretrain: single-sentence corpus with a binary head": Case(
        "pretrain_bert.py", tiny_argv("{w}/single_text_document", "--split", "100,0,0"),
        ["{w}/single_text_document", "--bert-no-binary-head"], subprocess=True,
        prepare=lambda w: _single_sentence_corpus(w)),
    "pretrain: truncated checkpoint shard": Case(
        "pretrain_bert.py", tiny_argv("{data}", "--load", "{w}/ckpt", "--save", "{w}/ckpt"),
        ["{w}/ckpt/iter_0000002/mp_rank_00/model_optim_rng.pt is truncated or corrupt"],
        output="{w}/ckpt/iter_0000022", subprocess=True,
        prepare=lambda w: (_copy_checkpoint("ckpt", w / "ckpt"),
                           _truncate_shard("{w}/ckpt/iter_0000002/mp_rank_00/"
                                           "model_optim_rng.pt")(w))),
    "pretrain: TP mismatch on load": Case(
        "pretrain_bert.py", tiny_argv("{data}", "--load", "{ckpt2}", "--save", "{w}/save"),
        ["was saved with tensor-model-parallel size 2; this run uses 1",
         "tools/checkpoint_util.py --load-dir {ckpt2}"],
        output="{w}/save", subprocess=True),
    # ---------------------------------------------------------------- tools/checkpoint_util.py
    "checkpoint_util: missing checkpoint directory": Case(
        "tools/checkpoint_util.py", ["--load-dir", "{w}/nowhere", "--save-dir", "{w}/out",
                                     "--target-tensor-parallel-size", "2"],
        ["checkpoint directory {w}/nowhere does not exist"], output="{w}/out"),
    "checkpoint_util: TP does not divide the heads": Case(
        "tools/checkpoint_util.py", ["--load-dir", "{ckpt}", "--save-dir", "{w}/out",
                                     "--target-tensor-parallel-size", "3"],
        ["num_attention_heads 4 is not divisible by the target tensor-parallel size 3"],
        output="{w}/out"),
    "checkpoint_util: truncated shard": Case(
        "tools/checkpoint_util.py", ["--load-dir", "{w}/ckpt", "--save-dir", "{w}/out",
                                     "--target-tensor-parallel-size", "2"],
        ["{w}/ckpt/iter_0000002/mp_rank_00/model_optim_rng.pt is truncated or corrupt"],
        output="{w}/out",
        prepare=lambda w: (_copy_checkpoint("ckpt", w / "ckpt"),
                           _truncate_shard("{w}/ckpt/iter_0000002/mp_rank_00/"
                                           "model_optim_rng.pt")(w))),
    # ------------------------------------------------------- tools/convert_checkpoint_to_hf.py
    "convert_checkpoint_to_hf: a key missing from the checkpoint": Case(
        "tools/convert_checkpoint_to_hf.py", ["--load-dir", "{w}/ckpt", "--save-dir", "{w}/hf"],
        ["'language_model.encoder.final_layernorm.weight'"], output="{w}/hf",
        prepare=lambda w: _edit_checkpoint(w, lambda s: s["model"]["language_model"][
            "encoder"].pop("final_layernorm.weight"))),
    "convert_checkpoint_to_hf: TP=2 checkpoint with a rank missing": Case(
        "tools/convert_checkpoint_to_hf.py", ["--load-dir", "{w}/ckpt2", "--save-dir", "{w}/hf"],
        ["a rank is missing"], output="{w}/hf",
        prepare=lambda w: (_copy_checkpoint("ckpt2", w / "ckpt2"),
                           shutil.rmtree(w / "ckpt2" / "iter_0000002" / "mp_rank_01"))),
    # ------------------------------------------------------- tools/convert_hf_to_megatron.py
    "convert_hf_to_megatron: folder without config.json": Case(
        "tools/convert_hf_to_megatron.py", ["--hf-dir", "{w}/empty", "--save-dir", "{w}/out"],
        ["{w}/empty/config.json"], output="{w}/out",
        prepare=lambda w: (w / "empty").mkdir()),
    "convert_hf_to_megatron: a tensor of the wrong shape": Case(
        "tools/convert_hf_to_megatron.py", ["--hf-dir", "{w}/hf", "--save-dir", "{w}/out",
                                            "--target-tensor-parallel-size", "2"],
        ["bert.encoder.layer.1.intermediate.dense.weight has shape (10, 64); config.json "
         "gives (256, 64)"], output="{w}/out", prepare=lambda w: _broken_hf_export(w)),
    "convert_hf_to_megatron: TP does not divide the heads": Case(
        "tools/convert_hf_to_megatron.py", ["--hf-dir", "{hf}", "--save-dir", "{w}/out",
                                            "--target-tensor-parallel-size", "3"],
        ["num_attention_heads 4 is not divisible by tensor_model_parallel_size 3"],
        output="{w}/out"),
    # --------------------------------------------------------------------------- tasks/main.py
    "tasks: unknown task name": Case(
        "tasks/main.py", ["--task", "SST-3", "--train-data", "{w}/train.tsv", "--save", "{w}/ft"],
        ["unknown --task 'SST-3'"], output="{w}/ft"),
    "tasks: a TSV row with too many fields": Case(
        "tasks/main.py", [*FINETUNE, "--task", "SST-2", "--train-data", "{w}/bad.tsv",
                          "--valid-data", "{w}/bad.tsv"],
        ["{w}/bad.tsv:3: expected 2 tab-separated fields, found 3"], output="{w}/ft",
        prepare=_write("bad.tsv", "sentence\tlabel\na fine film\t1\na dull one\t0\tx\n"),
        subprocess=True),
    "tasks: a GLUE file with non-UTF-8 bytes": Case(
        "tasks/main.py", [*FINETUNE, "--task", "SST-2", "--train-data", "{w}/bad.tsv",
                          "--valid-data", "{w}/bad.tsv"],
        ["{w}/bad.tsv:2: not valid UTF-8"], output="{w}/ft",
        prepare=_write("bad.tsv", b"sentence\tlabel\nna\xefve film\t1\n"), subprocess=True),
    "tasks: a RACE question with three options": Case(
        "tasks/main.py", [*FINETUNE, "--task", "RACE", "--train-data", "{w}/race/dev",
                          "--valid-data", "{w}/race/dev"],
        ["{w}/race/dev/middle/1.txt: question 0: expected 4 option strings, found 3"],
        output="{w}/ft", subprocess=True,
        prepare=_write("race/dev/middle/1.txt", json.dumps(
            {"article": "A short story.", "questions": ["Who?"], "options": [["a", "b", "c"]],
             "answers": ["A"], "id": "middle1.txt"}))),
    "tasks: a flag that disagrees with the checkpoint": Case(
        "tasks/main.py", [*FINETUNE, "--task", "SST-2", "--hidden-size", "128",
                          "--train-data", str(ROOT / "tests/assets/glue/SST-2/train.tsv"),
                          "--valid-data", str(ROOT / "tests/assets/glue/SST-2/dev.tsv")],
        ["--hidden-size 128 disagrees with the checkpoint {ckpt}, which has hidden_size 64"],
        output="{w}/ft", subprocess=True),
}

_CHECKPOINTS = {}


def _edit_checkpoint(workdir: Path, edit) -> None:
    """A copy of the TP=1 checkpoint changed by another program (no integrity record)."""
    _copy_checkpoint("ckpt", workdir / "ckpt")
    directory = workdir / "ckpt" / "iter_0000002"
    path = directory / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path)
    (directory / "checkpoint_integrity.json").unlink()


def _broken_hf_export(workdir: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(_CHECKPOINTS["hf"], workdir / "hf")
    path = workdir / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(10, 64)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _copy_checkpoint(name: str, target: Path) -> None:
    shutil.copytree(_CHECKPOINTS[name], target)


def _single_sentence_corpus(workdir: Path) -> None:
    from megatron.data.preprocess import PreprocessConfig, preprocess

    path = workdir / "single.jsonl"
    path.write_text("".join(json.dumps({"text": f"Only one sentence in document {i} here"}) +
                            "\n" for i in range(40)))
    preprocess(PreprocessConfig(input=str(path), output_prefix=str(workdir / "single"),
                                tokenizer_type="BertWordPieceLowerCase", vocab_file=str(VOCAB)))


def _pretrain_worker(rank, world_size, data_prefix, save, tp):
    run_pretrain(tiny_argv(data_prefix, "--tensor-model-parallel-size", str(tp), "--save", save,
                           train_iters=2))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    data = preprocess_sample_corpus(root)
    for name, tp in (("ckpt", 1), ("ckpt2", 2)):
        run_distributed(_pretrain_worker, tp, data, str(root / name), tp, timeout=TIMEOUT)
        _CHECKPOINTS[name] = root / name
    from megatron.checkpoint.hf import export_to_hf

    export_to_hf(str(root / "ckpt"), str(root / "hf"))
    _CHECKPOINTS["hf"] = root / "hf"
    return {"data": data, "ckpt": str(root / "ckpt"), "ckpt2": str(root / "ckpt2"),
            "hf": str(root / "hf"), "vocab": str(VOCAB)}


def _fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _run_in_process(script: Path, argv: List[str], env: dict, capfd) -> tuple:
    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = [str(script), *argv]
    os.environ.update(env)
    try:
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
        if not isinstance(exit_.code, int) and exit_.code is not None:
            sys.stderr.write(f"{exit_.code}\n")
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    out, err = capfd.readouterr()
    return code, out, err


def _run_subprocess(script: Path, argv: List[str], env: dict, cwd: Path) -> tuple:
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                             **env))
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, fixtures, tmp_path, capfd):
    case = CASES[name]
    values = dict(fixtures, w=str(tmp_path))
    if case.prepare is not None:
        case.prepare(tmp_path)
    argv = [_fill(arg, values) for arg in case.argv]
    env = {key: _fill(value, values) for key, value in case.env.items()}
    env.setdefault("MEGATRON_DEMO_DIR", str(tmp_path / "demo"))
    script = ROOT / case.script
    if case.subprocess:
        code, out, err = _run_subprocess(script, argv, env, tmp_path)
    else:
        code, out, err = _run_in_process(script, argv, env, capfd)
    assert code not in (0, None), f"exit status {code}\n{out[-2000:]}\n{err[-2000:]}"
    assert "Traceback" not in out + err, err[-3000:]
    for expected in case.expect:
        assert _fill(expected, values) in err, f"{expected!r} not in:\n{err[-3000:]}"
    if case.output is not None:
        assert not os.path.exists(_fill(case.output, values)), "partial output left behind"
    assert not (tmp_path / "demo").exists()


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 20
    scripts = {case.script for case in CASES.values()}
    assert {"tools/preprocess_data.py", "pretrain_bert.py", "tools/checkpoint_util.py",
            "tools/convert_checkpoint_to_hf.py", "tools/convert_hf_to_megatron.py",
            "tasks/main.py"} <= scripts
