"""Same weights, same function: our model against ``transformers.MegatronBert*`` on real text.

The Hugging Face models are created from a config (no download) with their own random
initialisation, converted to our layout with :mod:`megatron.model.hf_conversion`, and compared at
TP=1 and, gathered, at TP=2. Text is Shakespeare from ``data/``, tokenized with BERT's uncased
vocabulary from ``data/`` and padded, so the attention mask matters.
"""

import json
from pathlib import Path

import pytest
import torch

from megatron import mpu
from megatron.model import BertConfig, BertModel, Classification, MultipleChoice
from megatron.model.hf_conversion import (
    gather_full_state_dict,
    hf_config_dict,
    hf_to_megatron_state_dict,
    megatron_to_hf_state_dict,
    shard_full_state_dict,
)
from tests.distributed import run_distributed

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parent.parent / "data"
VOCAB_FILE = DATA / "bert-large-uncased-vocab.txt"
SEQ = 48


def real_text_batch(num_sequences=4, choices=None):
    """Pairs of consecutive Shakespeare sentences as ``[CLS] a [SEP] b [SEP]``, padded."""
    tokenizer = transformers.BertTokenizer(str(VOCAB_FILE), do_lower_case=True)
    with open(DATA / "shakespeare_tiny.jsonl", encoding="utf-8") as f:
        text = " ".join(json.loads(line)["text"] for line in f)
    text = text.replace("?", ".").replace("!", ".")
    sentences = [s.strip() for s in text.split(".") if s.strip()]
    first = sentences[10:10 + num_sequences]
    second = [s[: 20 + 15 * i] for i, s in enumerate(sentences[40:40 + num_sequences])]
    encoded = tokenizer(first, second, padding="max_length", truncation=True, max_length=SEQ,
                        return_tensors="pt")
    assert (encoded["attention_mask"] == 0).any(), "the batch should contain padding"
    return encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"]


def hf_config(**overrides):
    kwargs = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256, max_position_embeddings=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, initializer_range=0.1)
    kwargs.update(overrides)
    return transformers.MegatronBertConfig(**kwargs)


def our_config(hf, tp, **overrides):
    return BertConfig(num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
                      num_attention_heads=hf.num_attention_heads, vocab_size=hf.vocab_size,
                      ffn_hidden_size=hf.intermediate_size,
                      max_position_embeddings=hf.max_position_embeddings, hidden_dropout=0.0,
                      attention_dropout=0.0, tensor_model_parallel_size=tp, **overrides)


def load_ours(model, hf_model, head=None):
    full = hf_to_megatron_state_dict(hf_model.state_dict(), model.config, head=head)
    model.load_state_dict(shard_full_state_dict(full, model))
    return model.eval()


def gathered_logits(logits, vocab_size):
    return mpu.gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]


def _check_pretraining(rank, world_size):
    mpu.initialize_model_parallel(world_size)
    torch.manual_seed(0)
    hf = transformers.MegatronBertForPreTraining(hf_config()).eval()
    ours = load_ours(BertModel(our_config(hf.config, world_size)), hf)
    ids, mask, types = real_text_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        logits, binary = ours(ids, mask, types)
    logits = gathered_logits(logits, 30522)
    assert logits.shape == expected.prediction_logits.shape
    assert expected.prediction_logits.abs().max() > 1.0  # a comparison of real magnitude
    torch.testing.assert_close(logits, expected.prediction_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(binary, expected.seq_relationship_logits, rtol=0, atol=1e-4)

    # Back to Hugging Face from the (gathered) TP model: the same tensors, bit for bit.
    exported = megatron_to_hf_state_dict(gather_full_state_dict(ours), ours.config)
    reference = hf.state_dict()
    assert set(exported) == set(reference)
    for name, tensor in exported.items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize("world_size", [1, 2])
def test_pretraining_logits_match_hugging_face(world_size):
    run_distributed(_check_pretraining, world_size)


def _check_finetuning_heads(rank, world_size):
    mpu.initialize_model_parallel(world_size)
    ids, mask, types = real_text_batch(num_sequences=6)

    torch.manual_seed(1)
    hf = transformers.MegatronBertForSequenceClassification(hf_config(num_labels=3)).eval()
    config = our_config(hf.config, world_size, add_binary_head=False)
    ours = load_ours(Classification(config, 3), hf)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        torch.testing.assert_close(ours(ids, mask, types), expected, rtol=0, atol=1e-4)

    torch.manual_seed(2)
    hf = transformers.MegatronBertForMultipleChoice(hf_config()).eval()
    ours = load_ours(MultipleChoice(our_config(hf.config, world_size, add_binary_head=False)), hf,
                     head="multiple_choice")
    shape = (2, 3, SEQ)  # 2 questions x 3 choices
    with torch.no_grad():
        expected = hf(input_ids=ids.view(shape), attention_mask=mask.view(shape),
                      token_type_ids=types.view(shape)).logits
        got = ours(ids.view(shape), mask.view(shape), types.view(shape))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("world_size", [1, 2])
def test_classification_and_multiple_choice_match_hugging_face(world_size):
    run_distributed(_check_finetuning_heads, world_size)


def test_export_import_round_trip_and_hf_config():
    config = BertConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=30522)
    mpu.model_parallel_manual_seed(0)
    model = BertModel(config)
    full = gather_full_state_dict(model)
    hf_state = megatron_to_hf_state_dict(full, config)
    assert hf_state["bert.embeddings.word_embeddings.weight"].shape[0] == 30522
    padded = megatron_to_hf_state_dict(full, config, keep_padded_vocab=True)
    assert padded["cls.predictions.bias"].shape[0] == 30592
    back = hf_to_megatron_state_dict(hf_state, config)
    assert set(back) == set(full)
    for name in full:
        assert torch.equal(back[name], full[name]), name
    hf_model = transformers.MegatronBertForPreTraining(
        transformers.MegatronBertConfig(**hf_config_dict(config)))
    hf_model.load_state_dict(hf_state, strict=True)

    missing = {k: v for k, v in full.items() if k != "lm_head.dense.weight"}
    with pytest.raises(KeyError, match="no 'lm_head.dense.weight'"):
        megatron_to_hf_state_dict(missing, config)
    with pytest.raises(KeyError, match="'lm_head.extra' has no Hugging Face counterpart"):
        megatron_to_hf_state_dict({**full, "lm_head.extra": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="pass head='classification' or head='multiple_choice'"):
        hf_to_megatron_state_dict({"classifier.weight": torch.zeros(1, 64)}, config)
