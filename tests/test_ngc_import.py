"""NVIDIA's released checkpoints and older checkpoint versions; bad inputs give clear errors.

The release zips are built here as NVIDIA shipped ``megatron_bert_345m_v0_1_*.zip``:
``release/mp_rank_00/model_optim_rng.pt`` plus a tracker saying ``release``, with Megatron-LM's
historical key names (``language_model.transformer``, ``layers.N.attention``) and the fused-QKV
order of each checkpoint version, assembled here from separate q/k/v (not with the code under
test): version 0 ``[3, heads, head_dim]`` (no ``checkpoint_version`` key, no args, the old
pickle format), 1.0 ``[heads, head_dim, 3]``, 2.0 ``[heads, 3, head_dim]``. Hugging Face's own
converter (transformers 4.47.1) reads the same zips as the cross-check.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import types
import zipfile

import pytest
import torch

from megatron.checkpoint import CheckpointError, load_model_state_dict, reshard_checkpoint
from megatron.checkpoint.hf import export_to_hf
from megatron.model import BertModel
from megatron.model.hf_conversion import qkv_to_hf
from megatron.training.checkpointing import save_checkpoint
from tests.test_checkpoint_util import read_rank, tiny_config, trained
from tests.test_hf_megatron_converter import hf_converter  # noqa: F401
from tests.training_utils import ROOT, VOCAB

VERSIONS = {"v0": 0, "v1": 1.0, "v2": 2.0}
REAL_VOCAB = 30522


def ngc_model(heads):
    """A tiny trained BERT with the real vocabulary, in our layout (the ground truth)."""
    model, _, _ = trained(tiny_config(heads=heads, vocab_size=REAL_VOCAB), steps=2, seed=5)
    return model


def _old_qkv(tensor, version, heads):
    q, k, v = qkv_to_hf(tensor, heads)  # [h, ...] each, heads in order
    rest = tuple(tensor.shape[1:])
    parts = [t.reshape(heads, -1, *rest) for t in (q, k, v)]  # [heads, head_dim, ...]
    if version == 0:
        return torch.cat([q, k, v])  # [3, heads, head_dim]
    return torch.stack(parts, dim=2 if version == 1.0 else 1).reshape(-1, *rest)


def legacy_state(model, version, heads, with_args=True):
    """The ``model_optim_rng.pt`` dict an old Megatron-LM release holds."""
    flat = model.state_dict()
    embedding, transformer, pooler, heads_ = {}, {}, {}, {"lm_head": {}, "binary_head": {}}
    for name, tensor in flat.items():
        if name.startswith("language_model.embedding."):
            table, _, kind = name[len("language_model.embedding."):].partition(".")
            embedding.setdefault(table, {})[kind] = tensor
        elif name.startswith("language_model.encoder."):
            key = name[len("language_model.encoder."):]
            if "query_key_value" in key:
                tensor = _old_qkv(tensor, version, heads)
            transformer[key.replace("self_attention.", "attention.")] = tensor
        elif name.startswith("language_model.pooler."):
            pooler[name[len("language_model.pooler."):]] = tensor
        else:
            head, _, key = name.partition(".")
            heads_[head][key] = tensor
    state = {"model": {"language_model": {"embedding": embedding, "transformer": transformer,
                                          "pooler": pooler}, **heads_}, "iteration": 0}
    if version:
        state["checkpoint_version"] = version
    if with_args:
        config = model.config
        state["args"] = argparse.Namespace(
            num_layers=config.num_layers, hidden_size=config.hidden_size,
            num_attention_heads=heads, ffn_hidden_size=config.ffn_hidden_size,
            max_position_embeddings=config.max_position_embeddings, model_parallel_size=1,
            padded_vocab_size=config.padded_vocab_size, tokenizer_type="BertWordPieceLowerCase",
            make_vocab_size_divisible_by=128)
    return state


def write_zip(path, state, legacy_format=False, root=""):
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=not legacy_format)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{root}release/mp_rank_00/model_optim_rng.pt", buffer.getvalue())
        archive.writestr(f"{root}latest_checkpointed_iteration.txt", "release")
    return path


def make_zip(tmp_path, name):
    """``(zip path, ground-truth model)`` for version ``name``; v0 as NVIDIA's 345M release."""
    version = VERSIONS[name]
    heads = 16 if name == "v0" else 4  # v0 has no args: the tools assume BERT-345M's 16 heads
    model = ngc_model(heads)
    state = legacy_state(model, version, heads, with_args=name != "v0")
    path = write_zip(tmp_path / f"megatron_bert_345m_{name}_uncased.zip", state,
                     legacy_format=name == "v0")
    return path, model


def _hf_converter_output(converter, zip_path, model, work):
    """Hugging Face's converter on the zip (it writes next to the zip)."""
    config = model.config
    hf_config = {"vocab_size": config.padded_vocab_size, "hidden_size": config.hidden_size,
                 "num_hidden_layers": config.num_layers,
                 "num_attention_heads": config.num_attention_heads,
                 "intermediate_size": config.ffn_hidden_size,
                 "max_position_embeddings": config.max_position_embeddings}
    (work / "config_in.json").write_text(json.dumps(hf_config))
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    done = subprocess.run([sys.executable, str(converter), str(zip_path), "--config_file",
                           str(work / "config_in.json")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(work / "pytorch_model.bin", weights_only=True)


@pytest.mark.parametrize("name", sorted(VERSIONS))
def test_release_zip_of_each_version_exports_like_hugging_faces_converter(
        tmp_path, name, hf_converter):  # noqa: F811
    from safetensors.torch import load_file

    work = tmp_path / "hf_converter"
    work.mkdir()
    zip_path, model = make_zip(work, name)
    export_to_hf(str(zip_path), str(tmp_path / "ours"), vocab_file=str(VOCAB),
                 keep_padded_vocab=True)
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs = _hf_converter_output(hf_converter, zip_path, model, work)
    ours["cls.predictions.decoder.weight"] = ours["bert.embeddings.word_embeddings.weight"]
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["num_attention_heads"] == model.config.num_attention_heads
    assert config["vocab_size"] == model.config.padded_vocab_size


@pytest.mark.parametrize("name", sorted(VERSIONS))
def test_checkpoint_util_reads_the_zip_and_gives_our_model(tmp_path, name):
    zip_path, model = make_zip(tmp_path, name)
    reshard_checkpoint(str(zip_path), str(tmp_path / "tp2"), 2, vocab_size=REAL_VOCAB)
    assert (tmp_path / "tp2" / "latest_checkpointed_iteration.txt").read_text() == "release"
    state = read_rank(tmp_path / "tp2", 0, 1, release=True)
    assert state["checkpoint_version"] == 3.0 and "optimizer" not in state
    assert state["args"].tensor_model_parallel_size == 2
    assert state["args"].num_attention_heads == model.config.num_attention_heads
    assert "language_model.encoder.layers.1.self_attention.query_key_value.weight" in \
        {f"language_model.encoder.{k}" for k in state["model"]["language_model"]["encoder"]}
    weights, _, iteration = load_model_state_dict(
        str(tmp_path / "tp2"), tensor_model_parallel_size=1, tensor_model_parallel_rank=0,
        vocab_size=REAL_VOCAB)
    assert iteration == 0
    assert list(weights) == list(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(weights[key], tensor), key
    restored = BertModel(model.config)
    restored.load_state_dict(weights)  # strict: the keys are exactly the model's


def test_a_zip_with_a_folder_inside_and_removed_classes_still_loads(tmp_path):
    model = ngc_model(4)
    state = legacy_state(model, 2.0, 4)
    scaler = types.ModuleType("fp16.loss_scaler")  # Megatron-LM's 2019 module, long gone

    class DynamicLossScaler:
        def __init__(self):
            self.cur_scale = 2.0 ** 16

    DynamicLossScaler.__module__ = "fp16.loss_scaler"
    DynamicLossScaler.__qualname__ = "DynamicLossScaler"
    scaler.DynamicLossScaler = DynamicLossScaler
    package = types.ModuleType("fp16")
    package.loss_scaler = scaler
    sys.modules.update({"fp16": package, "fp16.loss_scaler": scaler})
    try:
        state["optimizer"] = {"loss_scaler": DynamicLossScaler()}
        path = write_zip(tmp_path / "nested.zip", state, root="megatron_bert_345m/")
    finally:
        del sys.modules["fp16.loss_scaler"], sys.modules["fp16"]
    weights, args, _ = load_model_state_dict(str(path), tensor_model_parallel_size=2,
                                             tensor_model_parallel_rank=0, vocab_size=REAL_VOCAB)
    assert args.tensor_model_parallel_size == 2 and args.num_attention_heads == 4
    qkv = "language_model.encoder.layers.0.self_attention.query_key_value.weight"
    assert torch.equal(weights[qkv], model.state_dict()[qkv][:96])  # heads 0-1 of 4


# ------------------------------------------------------------------------ bad inputs


def _save_tp2(path):
    model, optimizer, scheduler = trained(tiny_config(heads=4), steps=1)
    save_checkpoint(1, model, optimizer, scheduler, save_dir=str(path / "tp1"),
                    args=argparse.Namespace(num_attention_heads=4, seed=1))
    reshard_checkpoint(str(path / "tp1"), str(path / "tp2"), 2)
    return path / "tp2" / "iter_0000001"


def _edit_rank(directory, rank, edit):
    file = directory / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
    state = torch.load(file, weights_only=False)
    edit(state)
    torch.save(state, file)
    # An edit by another tool: the sizes recorded at save time no longer apply.
    (directory / "checkpoint_integrity.json").unlink(missing_ok=True)


def test_corrupt_and_mismatched_inputs_give_clear_errors_and_no_output(tmp_path):
    out = tmp_path / "out"

    def fails(source, message, **kw):
        with pytest.raises(CheckpointError, match=message):
            reshard_checkpoint(str(source), str(out), 2, **kw)
        assert not out.exists() and not (tmp_path / "out.tmp").exists()

    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    fails(bad, "neither a checkpoint directory nor a zip file")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("README.txt", "nothing here")
    fails(tmp_path / "empty.zip", r"expected one checkpoint \(release/mp_rank_00")
    model = ngc_model(4)
    fails(write_zip(tmp_path / "v4.zip", legacy_state(model, 4.0, 4)),
          "unknown checkpoint_version 4.0")
    fails(tmp_path / "nowhere", "does not exist")

    iteration = _save_tp2(tmp_path)
    shard = iteration / "mp_rank_01" / "model_optim_rng.pt"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:5000])  # the integrity record names the truncated shard
    fails(tmp_path / "tp2", r"mp_rank_01/model_optim_rng\.pt is truncated or corrupt: 5000 bytes")
    shard.write_bytes(intact)
    with pytest.raises(CheckpointError, match="num_attention_heads 4 is not divisible by the "
                       "target tensor-parallel size 8"):
        reshard_checkpoint(str(tmp_path / "tp1"), str(out), 8)
    _edit_rank(iteration, 1, lambda s: s["model"]["lm_head"].pop("dense.bias"))
    fails(tmp_path / "tp2", r"mp_rank_01/model_optim_rng\.pt lacks 'lm_head\.dense\.bias'")
    _edit_rank(iteration, 1, lambda s: s["model"]["lm_head"].update(
        {"dense.bias": torch.zeros(65)}))
    fails(tmp_path / "tp2", r"mp_rank_01/model_optim_rng\.pt: lm_head\.dense\.bias is \(65,\) "
          r"torch\.float32, rank 0 has \(64,\)")
    _edit_rank(iteration, 1, lambda s: s["model"]["lm_head"].update(
        {"dense.bias": torch.zeros(64), "extra.weight": torch.zeros(2)}))
    fails(tmp_path / "tp2", r"has unexpected 'lm_head\.extra\.weight'")
    file = iteration / "mp_rank_01" / "model_optim_rng.pt"
    file.write_bytes(file.read_bytes()[:1000])
    fails(tmp_path / "tp2", r"cannot read checkpoint file .*mp_rank_01/model_optim_rng\.pt")
    os.rename(iteration / "mp_rank_01", iteration / "mp_rank_02")
    fails(tmp_path / "tp2", r"tensor-parallel ranks \[0, 2\] are not 0\.\.1; a rank is missing")
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        reshard_checkpoint(str(tmp_path / "tp1"), str(tmp_path / "tp2"), 1)


def test_the_tools_exit_with_one_line_naming_the_problem(tmp_path):
    for tool, argv in (("checkpoint_util.py", ["--target-tensor-parallel-size", "2"]),
                       ("convert_checkpoint_to_hf.py", [])):
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / tool), "--load-dir", str(tmp_path / "none"),
             "--save-dir", str(tmp_path / "out"), *argv],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert done.stderr.strip() == (f"{tool}: error: checkpoint directory "
                                       f"{tmp_path / 'none'} does not exist")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf-dir",
         str(tmp_path), "--save-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith(
        "convert_hf_to_megatron.py: error: cannot read ") and "config.json" in done.stderr
    assert not (tmp_path / "out").exists()
