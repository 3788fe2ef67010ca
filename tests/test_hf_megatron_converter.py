"""Hugging Face's own Megatron-BERT converter reads a TP=1 checkpoint that we saved.

The converter (``transformers/models/megatron_bert/convert_megatron_bert_checkpoint.py``) last
shipped in transformers 4.47.1. It imports only ``MegatronBertConfig``, so it runs against the
installed transformers; the script itself is taken from the 4.47.1 wheel (``pip download``,
cached across runs) and run unmodified as a subprocess, the way a user runs it. The test skips
when transformers is not installed or the wheel cannot be downloaded (no network).

A tiny BERT trains a few iterations with ``pretrain_bert.py`` and saves a checkpoint; the
converter turns it into ``config.json`` and ``pytorch_model.bin`` next to it; the resulting
``MegatronBertForPreTraining`` must then compute our logits on padded Shakespeare pairs.
"""

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from megatron.model import BertModel
from megatron.model.bert_model import flat_state_dict
from megatron.tokenizer import build_tokenizer
from megatron.training.arguments import bert_config_from_args
from tests.distributed import run_distributed
from tests.training_utils import CORPUS, VOCAB, preprocess_sample_corpus, run_pretrain, tiny_argv

transformers = pytest.importorskip("transformers")

CONVERTER_VERSION = "4.47.1"
CONVERTER_IN_WHEEL = "transformers/models/megatron_bert/convert_megatron_bert_checkpoint.py"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron-bert-tests"
DOWNLOAD_TIMEOUT_S = 120
TRAIN_ITERS = 20  # enough to move the logits well away from those at initialisation
SEQ = 64  # tiny_argv's --seq-length and --max-position-embeddings


def _download_converter(target: Path) -> None:
    """Extract the converter from the transformers wheel into ``target`` (skip if offline)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
                   "--dest", download, f"transformers=={CONVERTER_VERSION}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download transformers=={CONVERTER_VERSION} timed out after "
                        f"{DOWNLOAD_TIMEOUT_S} s (no network?)")
        wheels = list(Path(download).glob("transformers-*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            pytest.skip(f"cannot download transformers=={CONVERTER_VERSION}: {reason}")
        partial = Path(download) / target.name
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial.write_bytes(wheel.read(CONVERTER_IN_WHEEL))
        os.replace(partial, target)  # a complete file or none, even if interrupted


@pytest.fixture(scope="session")
def hf_converter() -> Path:
    """Path of Hugging Face's ``convert_megatron_bert_checkpoint.py`` from transformers 4.47.1."""
    target = CACHE_DIR / f"convert_megatron_bert_checkpoint-{CONVERTER_VERSION}.py"
    if not target.exists():
        _download_converter(target)
    return target


def _train(rank, world_size, data_prefix, save_dir):
    # In a child process: pretrain() sets up torch.distributed and mpu state that would leak.
    result = run_pretrain(tiny_argv(data_prefix, "--save", save_dir, train_iters=TRAIN_ITERS))
    assert result.iteration == TRAIN_ITERS and result.checkpoint is not None


def real_text_batch(tokenizer, num_pairs=6):
    """Consecutive Shakespeare lines as ``[CLS] a [SEP] b [SEP]`` with token types, padded."""
    with open(CORPUS, encoding="utf-8") as f:
        lines = [line.strip() for record in f for line in json.loads(record)["text"].split("\n")
                 if line.strip()]
    rows = []
    for i in range(num_pairs):
        first = tokenizer.tokenize(lines[2 * i])[:24]
        second = tokenizer.tokenize(lines[2 * i + 1])[:8 + 4 * i]
        ids = [tokenizer.cls, *first, tokenizer.sep, *second, tokenizer.sep]
        rows.append((ids, [0] * (len(first) + 2) + [1] * (len(second) + 1)))
    length = max(len(ids) for ids, _ in rows)
    assert length <= SEQ
    input_ids = torch.full((num_pairs, length), tokenizer.pad, dtype=torch.long)
    types = torch.zeros((num_pairs, length), dtype=torch.long)
    mask = torch.zeros((num_pairs, length), dtype=torch.long)
    for row, (ids, segment) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        types[row, :len(ids)] = torch.tensor(segment)
        mask[row, :len(ids)] = 1
    assert (mask == 0).any() and (types == 1).any(), "the batch should have padding and segment B"
    return input_ids, mask, types


def test_hf_converter_reads_our_tp1_checkpoint(hf_converter, tmp_path):
    save = tmp_path / "checkpoints"
    data_prefix = preprocess_sample_corpus(tmp_path)
    run_distributed(_train, 1, data_prefix, str(save), timeout=180)
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    checkpoint_file = save / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"

    # The checkpoint holds an argparse.Namespace, which torch.load's weights-only mode refuses.
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    done = subprocess.run([sys.executable, str(hf_converter), str(checkpoint_file)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the converter failed:\n{done.stdout}\n{done.stderr}"

    state = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB))
    config = bert_config_from_args(state["args"], tokenizer.vocab_size)
    ours = BertModel(config)
    ours.load_state_dict(flat_state_dict(state["model"]))
    ours.eval()

    hf, info = transformers.MegatronBertForPreTraining.from_pretrained(
        checkpoint_file.parent, output_loading_info=True)
    hf.eval()
    # The converter stops reading encoder keys at the first one that is not a layer's, so a
    # reordered checkpoint would drop layers silently; from_pretrained would report them missing.
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], f"{key}: {sorted(info[key])}"

    # What the converter took from our args, and the defaults it assumed for the rest.
    hf_config = hf.config
    assert hf_config.vocab_size == config.padded_vocab_size == state["args"].padded_vocab_size
    assert (hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.num_attention_heads,
            hf_config.intermediate_size, hf_config.max_position_embeddings) == (
        config.hidden_size, config.num_layers, config.num_attention_heads,
        config.ffn_hidden_size, config.max_position_embeddings)
    assert hf_config.hidden_act == "gelu"  # exact erf GeLU, as ours
    # HF's default, not read from args: a run with another --layernorm-epsilon converts wrongly.
    assert hf_config.layer_norm_eps == config.layernorm_epsilon
    assert hf_config.type_vocab_size == 2

    input_ids, mask, types = real_text_batch(tokenizer)
    with torch.no_grad():
        logits, binary_logits = ours(input_ids, mask, types)
        expected = hf(input_ids=input_ids, attention_mask=mask, token_type_ids=types)
    vocab = tokenizer.vocab_size
    assert expected.prediction_logits.shape == logits.shape  # [b, s, padded vocab] on both sides
    assert expected.prediction_logits[..., :vocab].abs().max() > 0.5  # a comparison of substance
    torch.testing.assert_close(logits[..., :vocab], expected.prediction_logits[..., :vocab],
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(binary_logits, expected.seq_relationship_logits, rtol=0,
                               atol=1e-4)
    # The HF model keeps the padded vocabulary and does not mask it as we do: its padding ids
    # score exactly 0, because our padding rows of the embedding and the LM bias stay zero.
    assert torch.equal(expected.prediction_logits[..., vocab:],
                       torch.zeros_like(expected.prediction_logits[..., vocab:]))
