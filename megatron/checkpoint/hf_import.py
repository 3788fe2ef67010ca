"""Import a Hugging Face ``MegatronBert*`` folder as a checkpoint at any tensor-parallel size.

Reads ``config.json`` and the weights (``model.safetensors``, a sharded
``model.safetensors.index.json`` or ``pytorch_model.bin``), checks every tensor's name and shape
against the configuration, converts with
:func:`megatron.model.hf_conversion.hf_to_megatron_state_dict` (vocabulary padded with zero rows
to ``make_vocab_size_divisible_by * N``), splits for ``N`` ranks and writes a ``release``
checkpoint: ``--finetune`` or ``--load`` it (Megatron starts release checkpoints at iteration 0
with a fresh optimizer). The args describe the model (and ``label_names`` of a classifier) and
``vocab.txt`` is copied beside the tracker, so the checkpoint exports back to the same files.
"""

import json
import logging
import os
from typing import Dict, Optional

import torch

from megatron.checkpoint.hf import TIED_HF_KEYS, vocab_size_of_file
from megatron.checkpoint.reshard import reshard_model_state_dicts
from megatron.checkpoint.writer import write_checkpoint
from megatron.model.bert_model import nested_state_dict
from megatron.model.config import BertConfig
from megatron.model.hf_conversion import hf_to_megatron_state_dict, megatron_to_hf_state_dict
from megatron.training.arguments import build_parser
from megatron.training.checkpointing import CheckpointError

__all__ = ["import_from_hf", "read_hf_weights", "expected_shapes", "HF_HEADS"]

logger = logging.getLogger(__name__)

HF_HEADS = {"MegatronBertForPreTraining": "pretraining",
            "MegatronBertForSequenceClassification": "classification",
            "MegatronBertForMultipleChoice": "multiple_choice"}
_IGNORED = ("bert.embeddings.position_ids",) + TIED_HF_KEYS  # buffers and tied copies
_HF_WORD = "bert.embeddings.word_embeddings.weight"


def read_hf_weights(hf_dir: str) -> Dict[str, torch.Tensor]:
    """All tensors of an HF folder (safetensors, sharded safetensors or ``pytorch_model.bin``).

    Raises:
        CheckpointError: naming the folder or file when there are no weights or they are
            unreadable.
    """
    single = os.path.join(hf_dir, "model.safetensors")
    index = single + ".index.json"
    legacy = os.path.join(hf_dir, "pytorch_model.bin")
    try:
        if os.path.isfile(single) or os.path.isfile(index):
            from safetensors.torch import load_file

            if os.path.isfile(single):
                return load_file(single)
            with open(index) as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
            weights = {}
            for name in files:
                weights.update(load_file(os.path.join(hf_dir, name)))
            return weights
        if os.path.isfile(legacy):
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files raise many kinds of errors
        raise CheckpointError(f"cannot read the weights in {hf_dir}: "
                              f"{type(error).__name__}: {error}") from error
    raise CheckpointError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin")


def _read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if config.get("model_type") not in (None, "megatron-bert"):
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r} is not "
                              "'megatron-bert'")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{path}: hidden_act {config['hidden_act']!r}; the model uses "
                              "exact GeLU ('gelu')")
    return config


def _bert_config(hf: dict, vocab_size: int, tp: int, divisible_by: int, binary: bool,
                 where: str) -> BertConfig:
    try:
        return BertConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            num_attention_heads=hf["num_attention_heads"], vocab_size=vocab_size,
            ffn_hidden_size=hf.get("intermediate_size", 4 * hf["hidden_size"]),
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            make_vocab_size_divisible_by=divisible_by, tensor_model_parallel_size=tp,
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            layernorm_epsilon=hf.get("layer_norm_eps", 1e-12),
            num_tokentypes=hf.get("type_vocab_size", 2), add_binary_head=binary,
            init_method_std=hf.get("initializer_range", 0.02))
    except KeyError as error:
        raise CheckpointError(f"{where}: no {error.args[0]!r}") from error
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from error


def expected_shapes(config: BertConfig, head: str, num_classes: int = 2) -> Dict[str, tuple]:
    """Our full (TP=1) parameter shapes for ``config``, in the model's state-dict order."""
    h, f, layers = config.hidden_size, config.ffn_hidden_size, config.num_layers
    shapes = {"language_model.embedding.word_embeddings.weight": (config.padded_vocab_size, h),
              "language_model.embedding.position_embeddings.weight":
                  (config.max_position_embeddings, h)}
    if config.num_tokentypes:
        shapes["language_model.embedding.tokentype_embeddings.weight"] = \
            (config.num_tokentypes, h)
    per_layer = {"input_layernorm": (h, h), "self_attention.query_key_value": (3 * h, h),
                 "self_attention.dense": (h, h), "post_attention_layernorm": (h, h),
                 "mlp.dense_h_to_4h": (f, h), "mlp.dense_4h_to_h": (h, f)}
    for i in range(layers):
        for name, (rows, cols) in per_layer.items():
            is_norm = name.endswith("layernorm")
            shapes[f"language_model.encoder.layers.{i}.{name}.weight"] = \
                (rows,) if is_norm else (rows, cols)
            shapes[f"language_model.encoder.layers.{i}.{name}.bias"] = (rows,)
    shapes.update({"language_model.encoder.final_layernorm.weight": (h,),
                   "language_model.encoder.final_layernorm.bias": (h,),
                   "language_model.pooler.dense.weight": (h, h),
                   "language_model.pooler.dense.bias": (h,)})
    if head == "pretraining":
        shapes.update({"lm_head.bias": (config.padded_vocab_size,), "lm_head.dense.weight": (h, h),
                       "lm_head.dense.bias": (h,), "lm_head.layernorm.weight": (h,),
                       "lm_head.layernorm.bias": (h,)})
        if config.add_binary_head:
            shapes.update({"binary_head.weight": (2, h), "binary_head.bias": (2,)})
    else:
        prefix = "classification_head" if head == "classification" else "multichoice_head"
        outputs = num_classes if head == "classification" else 1
        shapes.update({f"{prefix}.weight": (outputs, h), f"{prefix}.bias": (outputs,)})
    return shapes


def _check_weights(weights, config: BertConfig, head: str, where: str) -> Dict[str, tuple]:
    """Every HF tensor present, used and shaped as ``config.json`` says; returns our shapes."""
    classes = weights["classifier.weight"].shape[0] if "classifier.weight" in weights else 2
    ours = expected_shapes(config, head, classes)
    meta = {name: torch.empty(shape, device="meta") for name, shape in ours.items()}
    expected = megatron_to_hf_state_dict(meta, config, keep_padded_vocab=True)
    for name in expected:
        if name not in weights and name not in TIED_HF_KEYS:
            raise CheckpointError(f"{where}: missing tensor {name} (a {head} model of this "
                                  "config.json has it)")
    for name, tensor in weights.items():
        if name in _IGNORED:
            continue
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {name} {tuple(tensor.shape)} for "
                                  f"a {head} model of this config.json")
        want = tuple(expected[name].shape)
        if name in (_HF_WORD, "cls.predictions.bias"):
            want = (tensor.shape[0],) + want[1:]  # rows are checked against the vocabulary
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{where}: {name} has shape {tuple(tensor.shape)}; config.json "
                                  f"gives {want}")
    return ours


def _args(hf: dict, config: BertConfig, head: str, vocab_path: Optional[str],
          lower_case: bool, dtype: torch.dtype, labels):
    args = build_parser().parse_args([])
    for key, value in dict(
            num_layers=config.num_layers, hidden_size=config.hidden_size,
            ffn_hidden_size=config.ffn_hidden_size,
            num_attention_heads=config.num_attention_heads,
            max_position_embeddings=config.max_position_embeddings,
            seq_length=config.max_position_embeddings,
            make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            padded_vocab_size=config.padded_vocab_size, vocab_size=config.vocab_size,
            layernorm_epsilon=config.layernorm_epsilon, hidden_dropout=config.hidden_dropout,
            attention_dropout=config.attention_dropout, init_method_std=config.init_method_std,
            bert_binary_head=config.add_binary_head, vocab_file=vocab_path,
            tokenizer_type="BertWordPieceLowerCase" if lower_case else "BertWordPieceCase",
            fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16).items():
        setattr(args, key, value)
    if labels is not None:
        args.label_names = labels
    return args


def import_from_hf(hf_dir: str, save_dir: str, target_tensor_parallel_size: int, *,
                   make_vocab_size_divisible_by: int = 128, head: Optional[str] = None,
                   vocab_file: Optional[str] = None) -> str:
    """Convert an HF ``MegatronBert*`` folder into a ``release`` checkpoint at TP ``N``.

    Args:
        hf_dir: the HF folder (``config.json`` + weights; ``vocab.txt`` if present).
        save_dir: the new save directory.
        target_tensor_parallel_size: TP size to write.
        make_vocab_size_divisible_by: vocabulary padding per rank.
        head: ``pretraining`` / ``classification`` / ``multiple_choice``; default from
            ``architectures``.
        vocab_file: the vocabulary (default ``hf_dir/vocab.txt``); its size is the real
            vocabulary size, else ``config.json``'s ``vocab_size``.

    Returns:
        The iteration directory written.

    Raises:
        CheckpointError: naming the file, tensor and shapes of any problem; nothing is written.
    """
    hf = _read_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    architecture = (hf.get("architectures") or [None])[0]
    head = head or HF_HEADS.get(architecture)
    if head not in HF_HEADS.values():
        raise CheckpointError(f"{where}: architecture {architecture!r} is not one of "
                              f"{sorted(HF_HEADS)} (or pass the head)")
    weights = read_hf_weights(hf_dir)
    if _HF_WORD not in weights:
        raise CheckpointError(f"{hf_dir}: no {_HF_WORD} in the weights")
    vocab_file = vocab_file or os.path.join(hf_dir, "vocab.txt")
    has_vocab = os.path.isfile(vocab_file)
    vocab_size = vocab_size_of_file(vocab_file) if has_vocab else hf["vocab_size"]
    rows = weights[_HF_WORD].shape[0]
    if vocab_size > rows:
        raise CheckpointError(f"{hf_dir}: the vocabulary has {vocab_size} tokens but "
                              f"{_HF_WORD} only {rows} rows")
    config = _bert_config(hf, vocab_size, target_tensor_parallel_size,
                          make_vocab_size_divisible_by,
                          "cls.seq_relationship.weight" in weights, where)
    order = _check_weights(weights, config, head, hf_dir)
    trimmed = dict(weights)
    for name in (_HF_WORD, "cls.predictions.bias"):
        if name in trimmed:
            trimmed[name] = trimmed[name][:vocab_size]  # rows past the vocabulary are padding
    try:
        converted = hf_to_megatron_state_dict(trimmed, config, head)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{hf_dir}: {error.args[0]}") from error
    full = {name: converted[name] for name in order}  # the model's order (optimizer ids)
    labels = None
    if head == "classification":
        id2label = hf.get("id2label") or {}
        labels = [id2label.get(str(i), f"LABEL_{i}")
                  for i in range(full["classification_head.weight"].shape[0])]
    shards = reshard_model_state_dicts([full], target_tensor_parallel_size)
    tokenizer = {}
    if os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")):
        with open(os.path.join(hf_dir, "tokenizer_config.json")) as handle:
            tokenizer = json.load(handle)
    vocab_path = os.path.abspath(os.path.join(save_dir, "vocab.txt")) if has_vocab else None
    args = _args(hf, config, head, vocab_path, tokenizer.get("do_lower_case", True),
                 weights[_HF_WORD].dtype, labels)
    extra = {}
    if has_vocab:
        with open(vocab_file, "rb") as handle:
            extra["vocab.txt"] = handle.read()
    written = write_checkpoint(
        save_dir, lambda rank: {"args": args, "checkpoint_version": 3.0, "iteration": 0,
                                "model": nested_state_dict(shards[rank])},
        target_tensor_parallel_size, 0, release=True, extra_files=extra)
    logger.info("imported %s (%s) as %s at tensor-parallel size %d", hf_dir, architecture,
                written, target_tensor_parallel_size)
    return written
