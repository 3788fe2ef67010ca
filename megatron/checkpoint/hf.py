"""Export a checkpoint of any TP size to Hugging Face ``MegatronBert*``, and import one back.

Export writes an HF folder that ``transformers`` loads offline::

    config.json               MegatronBertConfig (architectures, id2label for classifiers)
    model.safetensors         the weights (tied LM decoder weight and bias left out, as HF does)
    vocab.txt, tokenizer_config.json, special_tokens_map.json    BertTokenizer

The safetensors file is streamed: tensors are gathered from the source ranks one transformer
layer at a time and converted by :func:`megatron.model.hf_conversion.megatron_to_hf_state_dict`
(which sees every other tensor as a shape-only ``meta`` tensor), so memory stays near one layer
whatever the model size. The vocabulary padding is stripped (``vocab_size`` = the tokenizer's)
unless ``keep_padded_vocab``.

Import reads ``config.json`` and ``model.safetensors`` (or a sharded index, or
``pytorch_model.bin``), converts with :func:`~megatron.model.hf_conversion.
hf_to_megatron_state_dict`, pads the vocabulary for the target TP size, splits, and writes a
``release`` checkpoint (for ``--finetune`` / ``--load``) with args describing the model and the
vocabulary copied next to it.
"""

import dataclasses
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence

import torch

from megatron.checkpoint.plan import WORD_EMBEDDINGS, make_plan, shard_tensor
from megatron.checkpoint.reader import CheckpointSource
from megatron.checkpoint.safetensors_stream import SafetensorsWriter
from megatron.checkpoint.sharding import VOCAB_PARALLEL, shard_spec
from megatron.checkpoint.writer import staged_directory, write_bytes_atomic
from megatron.model.config import BertConfig
from megatron.model.hf_conversion import hf_config_dict, megatron_to_hf_state_dict
from megatron.tokenizer.bert_tokenization import load_vocab
from megatron.training.checkpointing import CheckpointError

__all__ = ["export_to_hf", "vocab_size_of_file", "find_vocab_file", "bert_config_of",
           "tokenizer_files", "TIED_HF_KEYS"]

logger = logging.getLogger(__name__)

TIED_HF_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_LAYER = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.")
_LOWER_CASE = {"BertWordPieceLowerCase": True, "BertWordPieceCase": False}
_SPECIAL = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "mask_token": "[MASK]"}


def vocab_size_of_file(path: str) -> int:
    """Number of ids of a WordPiece vocabulary file (what the tokenizer reports).

    Raises:
        CheckpointError: naming the file when it is missing or unreadable.
    """
    try:
        return len(load_vocab(path))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read vocabulary {path}: {error}") from error


def find_vocab_file(explicit: Optional[str], args, load_dir: str) -> Optional[str]:
    """The vocabulary: ``explicit``, else the args' ``vocab_file`` if it exists, else
    ``vocab.txt`` next to the checkpoint (where the HF import puts it)."""
    if explicit:
        return explicit
    saved = getattr(args, "vocab_file", None)
    if saved and os.path.isfile(saved):
        return saved
    beside = os.path.join(load_dir, "vocab.txt")
    return beside if os.path.isdir(load_dir) and os.path.isfile(beside) else None


def _lower_case(tokenizer_type: Optional[str], vocab_file: str) -> bool:
    if tokenizer_type is not None:
        if tokenizer_type not in _LOWER_CASE:
            raise CheckpointError(f"tokenizer type {tokenizer_type} cannot be exported as a "
                                  f"BertTokenizer; expected one of {sorted(_LOWER_CASE)}")
        return _LOWER_CASE[tokenizer_type]
    tokens = [t for t in load_vocab(vocab_file) if not (t.startswith("[") and t.endswith("]"))]
    lower = all(token == token.lower() for token in tokens)
    logger.info("no tokenizer type saved: %s has %s tokens, exporting a %s tokenizer",
                vocab_file, "no upper-case" if lower else "upper-case",
                "lower-casing" if lower else "cased")
    return lower


def tokenizer_files(vocab_file: str, lower_case: bool, max_length: int) -> Dict[str, bytes]:
    """``vocab.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json`` of a
    ``BertTokenizer`` with BERT's special tokens."""
    with open(vocab_file, "rb") as handle:
        vocab = handle.read()
    config = dict(_SPECIAL, tokenizer_class="BertTokenizer", do_lower_case=lower_case,
                  model_max_length=max_length, tokenize_chinese_chars=True, strip_accents=None,
                  clean_up_tokenization_spaces=True)
    return {"vocab.txt": vocab, "tokenizer_config.json": _json(config),
            "special_tokens_map.json": _json(_SPECIAL)}


def _json(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def bert_config_of(shapes: Dict[str, Sequence[int]], args, *, vocab_size: int,
                   padded_vocab_size: int, num_attention_heads: int) -> BertConfig:
    """The :class:`BertConfig` (TP=1) of a model given its full tensor shapes and saved args.

    Sizes come from the tensors; LayerNorm epsilon, dropouts and init come from the args
    (BERT's defaults when a checkpoint carries none).
    """
    layers = {int(m.group(1)) for m in map(_LAYER.match, shapes) if m}
    position = shapes["language_model.embedding.position_embeddings.weight"]
    tokentypes = shapes.get("language_model.embedding.tokentype_embeddings.weight", (0,))
    try:
        return BertConfig(
            num_layers=max(layers) + 1, hidden_size=position[1],
            num_attention_heads=num_attention_heads, vocab_size=vocab_size,
            ffn_hidden_size=shapes["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"][0],
            max_position_embeddings=position[0], padded_vocab_size=padded_vocab_size,
            num_tokentypes=tokentypes[0], add_binary_head="binary_head.weight" in shapes,
            add_pooler="language_model.pooler.dense.weight" in shapes,
            layernorm_epsilon=getattr(args, "layernorm_epsilon", 1e-12),
            hidden_dropout=getattr(args, "hidden_dropout", 0.1),
            attention_dropout=getattr(args, "attention_dropout", 0.1),
            init_method_std=getattr(args, "init_method_std", 0.02))
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"the checkpoint does not describe a BERT model: {error}") from error


def _head(names: Sequence[str]) -> str:
    if "classification_head.weight" in names:
        return "classification"
    if "multichoice_head.weight" in names:
        return "multiple_choice"
    return "pretraining"


def _labels(explicit: Optional[List[str]], args, num_labels: int) -> List[str]:
    labels = explicit or getattr(args, "label_names", None)
    if labels is None:
        return [f"LABEL_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise CheckpointError(f"{len(labels)} label names given for a head with {num_labels} "
                              "outputs")
    return list(labels)


def _hf_config(config: BertConfig, head: str, names, labels, keep_padded, dtype) -> dict:
    out = hf_config_dict(config, num_labels=len(labels) if labels else None, head=head,
                         keep_padded_vocab=keep_padded)
    out.update(model_type="megatron-bert", torch_dtype=str(dtype).replace("torch.", ""))
    if head == "pretraining" and "binary_head.weight" not in names:
        out["architectures"] = ["MegatronBertForMaskedLM"]  # no sentence-order head to load
    if head == "classification":
        out["id2label"] = {str(i): label for i, label in enumerate(labels)}
        out["label2id"] = {label: i for i, label in enumerate(labels)}
        if len(labels) == 1:
            out["problem_type"] = "regression"
    return out


def _layer_groups(names: Sequence[str]) -> List[List[str]]:
    """Source tensors converted together: one transformer layer, or one other tensor."""
    groups: Dict[str, List[str]] = {}
    for name in names:
        match = _LAYER.match(name)
        groups.setdefault(match.group(0) if match else name, []).append(name)
    return list(groups.values())


def export_to_hf(load_dir: str, save_dir: str, *, iteration=None, keep_padded_vocab: bool = False,
                 vocab_file: Optional[str] = None, tokenizer_type: Optional[str] = None,
                 num_attention_heads: Optional[int] = None,
                 labels: Optional[List[str]] = None) -> str:
    """Convert a checkpoint (directory of any TP size, or a release zip) to an HF folder.

    Args:
        load_dir: the save directory or ``.zip``.
        save_dir: the HF folder to create (must not exist).
        iteration: the iteration to export (default: the tracker's).
        keep_padded_vocab: keep the padding rows (``vocab_size`` = padded size).
        vocab_file: the WordPiece vocabulary (default: the args', or ``vocab.txt`` beside).
        tokenizer_type: ``BertWordPieceLowerCase`` / ``BertWordPieceCase`` (default: the args',
            else guessed from the vocabulary's case).
        num_attention_heads: for checkpoints without args.
        labels: class names of a classification head (default: ``args.label_names``).

    Returns:
        ``save_dir``.

    Raises:
        CheckpointError: for any problem; nothing is left under ``save_dir``.
    """
    with CheckpointSource(load_dir, iteration, num_attention_heads) as source:
        vocab_file = find_vocab_file(vocab_file, source.args, load_dir)
        if vocab_file is None:
            raise CheckpointError(f"no vocabulary for {load_dir}: pass --vocab-file (the "
                                  "checkpoint's args name none that exists)")
        plan = make_plan(source, 1, vocab_size=vocab_size_of_file(vocab_file))
        if keep_padded_vocab:
            plan = dataclasses.replace(plan, target_rows=plan.source_rows)
        shapes = {name: _full_shape(plan, name) for name in plan.names}
        config = bert_config_of(shapes, source.args, vocab_size=plan.vocab_size,
                                padded_vocab_size=plan.target_rows,
                                num_attention_heads=plan.num_attention_heads)
        first = source.model(0)
        meta = {name: torch.empty(shapes[name], dtype=first[name].dtype, device="meta")
                for name in plan.names}
        head = _head(plan.names)
        architecture_keys = _hf_keys(meta, config, keep_padded_vocab, head)
        lower = _lower_case(tokenizer_type or getattr(source.args, "tokenizer_type", None),
                            vocab_file)
        num_labels = shapes["classification_head.weight"][0] if head == "classification" else 0
        hf_config = _hf_config(config, head, plan.names,
                               _labels(labels, source.args, num_labels) if num_labels else None,
                               keep_padded_vocab, first[WORD_EMBEDDINGS].dtype)
        with staged_directory(save_dir) as staging:
            writer = SafetensorsWriter(os.path.join(staging, "model.safetensors"),
                                       architecture_keys)
            for group in _layer_groups(plan.names):
                inputs = dict(meta)
                for name in group:
                    inputs[name] = shard_tensor(source, plan, name, 0,
                                                lambda r, n=name: source.model(r)[n])
                for key, tensor in megatron_to_hf_state_dict(
                        inputs, config, keep_padded_vocab).items():
                    if key in architecture_keys and not tensor.is_meta:
                        writer.write(key, tensor)
            writer.close()
            files = {"config.json": _json(hf_config)}
            files.update(tokenizer_files(vocab_file, lower, config.max_position_embeddings))
            for name, data in files.items():
                write_bytes_atomic(os.path.join(staging, name), data)
    logger.info("exported %s (%s, vocabulary %d) to %s", load_dir,
                hf_config["architectures"][0], hf_config["vocab_size"], save_dir)
    return save_dir


def _full_shape(plan, name: str):
    shape = list(plan.local_shapes[name])
    spec = shard_spec(name)
    if spec is not None:
        shape[spec.dim] *= plan.source_tp
    if name in VOCAB_PARALLEL:
        shape[0] = plan.target_rows
    return tuple(shape)


def _hf_keys(meta, config: BertConfig, keep_padded_vocab: bool, head: str) -> dict:
    """``{HF name: (shape, dtype)}`` of the file: every converted tensor but the tied ones."""
    try:
        converted = megatron_to_hf_state_dict(meta, config, keep_padded_vocab)
    except KeyError as error:
        raise CheckpointError(f"cannot convert to Hugging Face: {error.args[0]}") from error
    keys = {key: (tuple(t.shape), t.dtype) for key, t in converted.items()
            if key not in TIED_HF_KEYS}
    if head == "pretraining" and "binary_head.weight" not in meta:
        keys = {k: v for k, v in keys.items() if not k.startswith("bert.pooler.")}
    return keys
