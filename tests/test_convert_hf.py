"""Hugging Face export and import: transformers loads our export offline and computes our logits.

A tiny BERT with the real uncased vocabulary is trained a few AdamW steps and saved with the
real save path; exports from TP=1 and TP=2 must give ``MegatronBertForPreTraining`` (and the
sequence-classification and multiple-choice models for finetuned heads) whose logits equal ours
on real text; importing back must give our weights bit for bit; export -> import -> export must
give identical files; and Hugging Face's own converter (transformers 4.47.1) must give the same
model as our exporter.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.checkpoint import CheckpointError
from megatron.checkpoint.hf import export_to_hf
from megatron.checkpoint.hf_import import import_from_hf
from megatron.model import Classification, MultipleChoice
from megatron.model.bert_model import flat_state_dict
from megatron.tokenizer import build_tokenizer
from megatron.training.checkpointing import save_checkpoint
from tests.test_checkpoint_util import read_rank, run_tool, tiny_args, tiny_config, trained
from tests.test_hf_megatron_converter import hf_converter, real_text_batch  # noqa: F401
from tests.training_utils import VOCAB

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

REAL_VOCAB = 30522
HF_FILES = ["config.json", "model.safetensors", "special_tokens_map.json",
            "tokenizer_config.json", "vocab.txt"]


def hf_config(**kw):
    return tiny_config(heads=4, vocab_size=REAL_VOCAB, max_position_embeddings=64, **kw)


def hf_args(config, **kw):
    return tiny_args(config, vocab_file=str(VOCAB), tokenizer_type="BertWordPieceLowerCase", **kw)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A TP=1 checkpoint of a pretraining model, its TP=2 reshard, and the model."""
    root = tmp_path_factory.mktemp("hf")
    config = hf_config()
    model, optimizer, scheduler = trained(config, steps=3)
    save_checkpoint(3, model, optimizer, scheduler, save_dir=str(root / "tp1"),
                    args=hf_args(config))
    run_tool("--load-dir", root / "tp1", "--save-dir", root / "tp2",
             "--target-tensor-parallel-size", 2, "--quiet")
    model.eval()
    return root, model


@pytest.fixture(scope="module")
def text():
    return real_text_batch(build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB)))


def load_hf(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True, local_files_only=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], f"{key}: {sorted(info[key])}"
    return model.eval()


@pytest.mark.parametrize("source", ["tp1", "tp2"])
def test_export_loads_offline_and_gives_our_logits(pretrained, text, tmp_path, source):
    root, model = pretrained
    export_to_hf(str(root / source), str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path / "hf")) == HF_FILES
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MegatronBertForPreTraining"]
    assert config["vocab_size"] == REAL_VOCAB  # the padding is stripped
    hf = load_hf(transformers.MegatronBertForPreTraining, tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ours = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB))
    line = "To be, or not to be: that is the question; Ophelia's Denmark!"
    assert tokenizer(line, add_special_tokens=False)["input_ids"] == ours.tokenize(line)

    input_ids, mask, types = text
    with torch.no_grad():
        logits, binary = model(input_ids, mask, types)
        expected = hf(input_ids=input_ids, attention_mask=mask, token_type_ids=types)
    assert expected.prediction_logits.shape[-1] == REAL_VOCAB
    assert expected.prediction_logits.abs().max() > 0.5  # a comparison of substance
    torch.testing.assert_close(expected.prediction_logits, logits[..., :REAL_VOCAB],
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(expected.seq_relationship_logits, binary, rtol=0, atol=1e-4)


def test_import_back_is_bit_exact_and_export_import_export_is_identical(pretrained, tmp_path):
    root, model = pretrained
    export_to_hf(str(root / "tp1"), str(tmp_path / "hf1"))
    import_from_hf(str(tmp_path / "hf1"), str(tmp_path / "back1"), 1)
    import_from_hf(str(tmp_path / "hf1"), str(tmp_path / "back2"), 2)
    assert (tmp_path / "back1" / "latest_checkpointed_iteration.txt").read_text() == "release"
    back = read_rank(tmp_path / "back1", 0, 0, release=True)
    original = flat_state_dict(read_rank(root / "tp1", 3, 0)["model"])
    imported = flat_state_dict(back["model"])
    assert list(imported) == list(original)
    for name, tensor in original.items():
        assert torch.equal(imported[name], tensor), name
    assert back["args"].padded_vocab_size == 30592 and back["args"].vocab_size == REAL_VOCAB
    for rank in range(2):  # at TP=2 it equals what resharding our checkpoint gives
        resharded = flat_state_dict(read_rank(root / "tp2", 3, rank)["model"])
        imported = flat_state_dict(read_rank(tmp_path / "back2", 0, rank, release=True)["model"])
        assert resharded.keys() == imported.keys()
        assert all(torch.equal(resharded[k], imported[k]) for k in resharded)
    export_to_hf(str(tmp_path / "back2"), str(tmp_path / "hf2"))
    for name in HF_FILES:
        assert (tmp_path / "hf1" / name).read_bytes() == (tmp_path / "hf2" / name).read_bytes(), \
            name


def _save_finetuned(path, head):
    config = hf_config()
    torch.manual_seed(0)
    model = Classification(config, 3) if head == "classification" else MultipleChoice(config)
    head_layer = model.classification_head if head == "classification" else model.multichoice_head
    torch.nn.init.normal_(head_layer.weight, std=1.0)  # logits of substance
    save_checkpoint(7, model, save_dir=str(path),
                    args=hf_args(config, label_names=["entailment", "neutral", "contradiction"]))
    return model.eval()


@pytest.mark.parametrize("head", ["classification", "multiple_choice"])
def test_finetuned_heads_export_to_their_hf_models(tmp_path, text, head):
    model = _save_finetuned(tmp_path / "ckpt", head)
    run_tool("--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "tp2",
             "--target-tensor-parallel-size", 2, "--no-optimizer", "--quiet")
    export_to_hf(str(tmp_path / "tp2"), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    input_ids, mask, types = text
    if head == "classification":
        assert config["architectures"] == ["MegatronBertForSequenceClassification"]
        assert config["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
        hf = load_hf(transformers.MegatronBertForSequenceClassification, tmp_path / "hf")
        args = dict(input_ids=input_ids, attention_mask=mask, token_type_ids=types)
        ours_args = (input_ids, mask, types)
    else:
        assert config["architectures"] == ["MegatronBertForMultipleChoice"]
        hf = load_hf(transformers.MegatronBertForMultipleChoice, tmp_path / "hf")
        choices = [t.view(2, 3, -1) for t in text]  # 6 pairs = 2 questions x 3 choices
        args = dict(input_ids=choices[0], attention_mask=choices[1], token_type_ids=choices[2])
        ours_args = tuple(choices)
    with torch.no_grad():
        ours = model(*ours_args)
        theirs = hf(**args).logits
    assert theirs.shape == ours.shape and ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    # Importing the classifier keeps its labels.
    import_from_hf(str(tmp_path / "hf"), str(tmp_path / "back"), 1)
    back = read_rank(tmp_path / "back", 0, 0, release=True)
    if head == "classification":
        assert back["args"].label_names == ["entailment", "neutral", "contradiction"]


def test_hugging_face_converter_gives_the_same_model_as_ours(pretrained, hf_converter,  # noqa: F811
                                                             tmp_path):
    root, _ = pretrained
    export_to_hf(str(root / "tp1"), str(tmp_path / "ours"), keep_padded_vocab=True)
    checkpoint = tmp_path / "theirs" / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes((root / "tp1" / "iter_0000003" / "mp_rank_00" /
                            "model_optim_rng.pt").read_bytes())
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    done = subprocess.run([sys.executable, str(hf_converter), str(checkpoint)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.load(checkpoint.parent / "pytorch_model.bin", weights_only=True)
    ours = safetensors_torch.load_file(tmp_path / "ours" / "model.safetensors")
    ours["cls.predictions.decoder.weight"] = ours["bert.embeddings.word_embeddings.weight"]
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    their_config = json.loads((checkpoint.parent / "config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size",
                "layer_norm_eps", "hidden_act"):
        assert our_config[key] == their_config[key], key


def test_bad_hf_folders_give_clear_errors_and_no_output(pretrained, tmp_path):
    root, _ = pretrained
    export_to_hf(str(root / "tp1"), str(tmp_path / "hf"))
    weights = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    cases = {
        "shape": (lambda w: w.update({"bert.encoder.layer.1.intermediate.dense.weight":
                                      torch.zeros(255, 64)}),
                  r"bert\.encoder\.layer\.1\.intermediate\.dense\.weight has shape \(255, 64\); "
                  r"config\.json gives \(256, 64\)"),
        "missing": (lambda w: w.pop("bert.encoder.layer.0.attention.self.key.bias"),
                    r"missing tensor bert\.encoder\.layer\.0\.attention\.self\.key\.bias"),
        "extra": (lambda w: w.update({"bert.encoder.layer.2.ln.weight": torch.zeros(64)}),
                  r"unexpected tensor bert\.encoder\.layer\.2\.ln\.weight \(64,\)"),
    }
    for case, (edit, message) in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        for name in HF_FILES[:-2] + ["vocab.txt", "tokenizer_config.json"]:
            if name != "model.safetensors":
                (folder / name).write_bytes((tmp_path / "hf" / name).read_bytes())
        broken = dict(weights)
        edit(broken)
        safetensors_torch.save_file(broken, folder / "model.safetensors",
                                    metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=message):
            import_from_hf(str(folder), str(tmp_path / f"out_{case}"), 2)
        assert not any(p.name.startswith(f"out_{case}") for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="already exists"):
        export_to_hf(str(root / "tp1"), str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path / "hf")) == HF_FILES
