"""The BERT model: configuration errors, TP invariance, recompute, mixed precision, heads."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from megatron.model import BertConfig, BertModel, Classification, MultipleChoice
from megatron.model.config import vocab_size_with_padding
from megatron.model.hf_conversion import gather_full_state_dict, shard_full_state_dict
from megatron.mpu.utils import merge_partitions_with_stride
from tests.distributed import count_collectives, run_distributed

# vocab 1100 pads to 1152 at TP=1, 1280 at TP=2 and 1536 at TP=4: padding differs per TP size.
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1100,
            max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
B, S = 4, 32


def tiny_config(tp=1, **overrides):
    return BertConfig(**{**TINY, "tensor_model_parallel_size": tp, **overrides})


def make_batch(vocab_size=TINY["vocab_size"], seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (B, S), generator=g)
    attention_mask = torch.ones(B, S, dtype=torch.long)
    attention_mask[1, 20:] = 0
    attention_mask[3, 9:] = 0
    tokentype = torch.zeros(B, S, dtype=torch.long)
    tokentype[:, S // 2:] = 1
    loss_mask = (torch.rand(B, S, generator=g) < 0.3).long() * attention_mask
    labels = torch.randint(0, vocab_size, (B, S), generator=g)
    sop = torch.randint(0, 2, (B,), generator=g)
    return dict(ids=ids, attention_mask=attention_mask, tokentype=tokentype, loss_mask=loss_mask,
                labels=labels, sop=sop)


def pretraining_loss(model, batch, masked_only=True):
    lm_loss, binary_logits = model(batch["ids"], batch["attention_mask"], batch["tokentype"],
                                   lm_labels=batch["labels"],
                                   loss_mask=batch["loss_mask"] if masked_only else None)
    mask = batch["loss_mask"].float()
    lm = (lm_loss * mask).sum() / mask.sum()
    sop = F.cross_entropy(binary_logits.float(), batch["sop"])
    return lm, sop, binary_logits


# ------------------------------------------------------------------------------ configuration


def test_padded_vocab_sizes_match_megatron():
    assert vocab_size_with_padding(30522, 128, 1) == 30592
    assert vocab_size_with_padding(30522, 128, 2) == 30720
    config = BertConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=30522,
                        tensor_model_parallel_size=2)
    assert config.vocab_size == 30522 and config.padded_vocab_size == 30720
    assert config.ffn_hidden_size == 256


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=90), "hidden_size 90 is not divisible by num_attention_heads 4"),
    (dict(num_attention_heads=6, hidden_size=96, tensor_model_parallel_size=4),
     "num_attention_heads 6 is not divisible by tensor_model_parallel_size 4"),
    (dict(padded_vocab_size=1101, tensor_model_parallel_size=2),
     "padded_vocab_size 1101 is not divisible by tensor_model_parallel_size 2"),
    (dict(padded_vocab_size=1000), "padded_vocab_size 1000 is smaller than vocab_size 1100"),
    (dict(fp16=True, bf16=True), "fp16 and bf16 cannot both be set"),
    (dict(hidden_dropout=1.0), "hidden_dropout must be in"),
    (dict(num_layers=0), "num_layers must be a positive integer, got 0"),
    (dict(add_pooler=False), "add_binary_head needs add_pooler"),
])
def test_bad_configs_name_their_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_model_rejects_a_config_for_another_tp_size():
    with pytest.raises(ValueError, match="tensor_model_parallel_size 2 does not match the "
                                         "tensor-parallel group size 1"):
        BertModel(tiny_config(tp=2))


# ------------------------------------------------------------------------- TP invariance


def _singleton_groups(world_size):
    return [dist.new_group([r]) for r in range(world_size)]


def gather_grads(model, group):
    """Every parameter's full gradient, gathered over the tensor-parallel group."""
    world_size = mpu.parallel_state.group_size(group)
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if world_size > 1 and param.tensor_model_parallel:
            shards = [torch.empty_like(grad) for _ in range(world_size)]
            dist.all_gather(shards, grad.contiguous(), group=group)
            grad = merge_partitions_with_stride(shards, param.partition_dim,
                                                param.partition_stride)
        grads[name] = grad
    return grads


def _check_tp_invariance(rank, world_size):
    mpu.initialize_model_parallel(world_size)
    singles = _singleton_groups(world_size)
    batch = make_batch()
    results = {}
    for name, tp, group in (("tp", world_size, None), ("ref", 1, singles[rank])):
        mpu.model_parallel_manual_seed(1234)
        model = BertModel(tiny_config(tp=tp), process_group=group)
        with count_collectives() as counts:
            lm, sop, binary_logits = pretraining_loss(model, batch)
            (lm + sop).backward()
        results[name] = (lm, sop, binary_logits, gather_grads(model, model.process_group), counts)

    (lm, sop, logits, grads, counts), (ref_lm, ref_sop, ref_logits, ref_grads, _) = (
        results["tp"], results["ref"])
    torch.testing.assert_close(lm, ref_lm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sop, ref_sop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    vocab = TINY["vocab_size"]
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        grad = grads[name]
        if "word_embeddings" in name or name == "lm_head.bias":
            assert grad[vocab:].abs().max() == 0, f"{name}: padding rows got a gradient"
            grad, ref = grad[:vocab], ref[:vocab]
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5, msg=name)
    if world_size > 1:
        # Forward: embedding, attention and MLP outputs of each layer, two cross-entropy
        # reductions. Backward: QKV and h->4h inputs of each layer, the LM-logits input.
        layers = TINY["num_layers"]
        assert counts == {"allreduce": (1 + 2 * layers + 2) + (2 * layers + 1)}, counts


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_tp_invariance_of_losses_logits_and_gradients(world_size):
    run_distributed(_check_tp_invariance, world_size)


def _check_dropout_reproducible(rank, world_size):
    mpu.initialize_model_parallel(world_size)
    batch = make_batch()
    losses = []
    for _ in range(2):
        mpu.model_parallel_manual_seed(99)
        model = BertModel(tiny_config(tp=world_size, hidden_dropout=0.1, attention_dropout=0.1))
        lm, sop, _ = pretraining_loss(model, batch)
        losses.append(torch.stack([lm, sop]).detach())
    assert torch.equal(losses[0], losses[1])
    gathered = [torch.empty_like(losses[0]) for _ in range(world_size)]
    dist.all_gather(gathered, losses[0])
    assert all(torch.equal(gathered[0], g) for g in gathered)  # every TP rank agrees


@pytest.mark.parametrize("world_size", [1, 2])
def test_dropout_runs_are_reproducible(world_size):
    run_distributed(_check_dropout_reproducible, world_size)


# ---------------------------------------------------------------------- single-process checks


def _grads_with(recompute):
    mpu.model_parallel_manual_seed(5)
    model = BertModel(tiny_config(hidden_dropout=0.1, attention_dropout=0.1,
                                  recompute_activations=recompute))
    lm, sop, _ = pretraining_loss(model, make_batch())
    (lm + sop).backward()
    return lm.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_recompute_gives_identical_gradients_with_dropout():
    loss_plain, plain = _grads_with(False)
    loss_recomputed, recomputed = _grads_with(True)
    assert torch.equal(loss_plain, loss_recomputed)
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name


def test_masked_only_lm_head_equals_the_full_lm_head():
    mpu.model_parallel_manual_seed(3)
    model = BertModel(tiny_config())
    batch = make_batch()
    masked = pretraining_loss(model, batch, masked_only=True)[0]
    full = pretraining_loss(model, batch, masked_only=False)[0]
    torch.testing.assert_close(masked, full, rtol=1e-6, atol=1e-6)


def test_padding_rows_never_reach_the_loss_or_the_logits():
    mpu.model_parallel_manual_seed(3)
    model = BertModel(tiny_config()).eval()
    batch = make_batch()
    vocab = TINY["vocab_size"]
    before = pretraining_loss(model, batch)[0]
    with torch.no_grad():
        model.word_embeddings_weight()[vocab:] = 100.0
        model.lm_head.bias[vocab:] = 100.0
    after = pretraining_loss(model, batch)[0]
    assert torch.equal(before, after)
    logits, _ = model(batch["ids"], batch["attention_mask"], batch["tokentype"])
    assert logits.shape[-1] == 1152 and logits[..., :vocab].argmax(-1).equal(logits.argmax(-1))


@pytest.mark.parametrize("flag, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_forward_is_close_to_fp32(flag, dtype):
    mpu.model_parallel_manual_seed(11)
    model32 = BertModel(tiny_config()).eval()
    model16 = BertModel(tiny_config(**{flag: True})).eval()
    model16.load_state_dict({k: v.to(dtype) for k, v in model32.state_dict().items()})
    assert all(p.dtype == dtype for p in model16.parameters())
    batch = make_batch()
    with torch.no_grad():
        lm32, sop32, bin32 = pretraining_loss(model32, batch)
        lm16, sop16, bin16 = pretraining_loss(model16, batch)
        logits32 = model32(batch["ids"], batch["attention_mask"], batch["tokentype"])[0]
        logits16 = model16(batch["ids"], batch["attention_mask"], batch["tokentype"])[0]
    # Stated tolerances (LayerNorm, softmax and the loss run in fp32): losses within 0.1%
    # relative; logits within 2% of the largest fp32 logit (bf16 keeps 8 mantissa bits).
    # Measured on this tiny model: bf16 loss 4e-5 relative, logits 0.8%; fp16 1e-6 and 0.1%.
    assert lm16.dtype == torch.float32
    assert abs(lm16.item() - lm32.item()) / lm32.item() < 1e-3
    assert abs(sop16.item() - sop32.item()) / sop32.item() < 1e-3
    vocab = TINY["vocab_size"]
    scale = logits32[..., :vocab].abs().max()
    torch.testing.assert_close(logits16[..., :vocab].float(), logits32[..., :vocab],
                               rtol=0, atol=0.02 * scale.item())
    torch.testing.assert_close(bin16.float(), bin32, rtol=0, atol=0.02)


def test_classification_and_multiple_choice_shapes():
    mpu.model_parallel_manual_seed(1)
    config = tiny_config(add_binary_head=False)
    batch = make_batch()
    logits = Classification(config, num_classes=3)(batch["ids"], batch["attention_mask"],
                                                   batch["tokentype"])
    assert logits.shape == (B, 3)
    ids = batch["ids"].view(2, 2, S)
    scores = MultipleChoice(config)(ids, batch["attention_mask"].view(2, 2, S),
                                    batch["tokentype"].view(2, 2, S))
    assert scores.shape == (2, 2)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        Classification(config, num_classes=0)


def test_sequence_longer_than_positions_is_rejected():
    model = BertModel(tiny_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="sequence length 32 exceeds max_position_embeddings 16"):
        model(make_batch()["ids"], None)


def test_state_dict_uses_megatron_names():
    names = set(BertModel(tiny_config()).state_dict())
    for expected in ("language_model.embedding.word_embeddings.weight",
                     "language_model.embedding.position_embeddings.weight",
                     "language_model.embedding.tokentype_embeddings.weight",
                     "language_model.encoder.layers.0.input_layernorm.weight",
                     "language_model.encoder.layers.0.self_attention.query_key_value.weight",
                     "language_model.encoder.layers.0.self_attention.dense.bias",
                     "language_model.encoder.layers.1.post_attention_layernorm.bias",
                     "language_model.encoder.layers.1.mlp.dense_h_to_4h.weight",
                     "language_model.encoder.layers.1.mlp.dense_4h_to_h.weight",
                     "language_model.encoder.final_layernorm.weight",
                     "language_model.pooler.dense.weight", "lm_head.bias", "lm_head.dense.weight",
                     "lm_head.layernorm.weight", "binary_head.weight"):
        assert expected in names, expected


def test_shard_full_state_dict_errors_name_the_parameter():
    model = BertModel(tiny_config())
    full = gather_full_state_dict(model)
    del full["lm_head.bias"]
    with pytest.raises(KeyError, match="lm_head.bias"):
        shard_full_state_dict(full, model)
    full = gather_full_state_dict(model)
    full["binary_head.weight"] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match=r"binary_head.weight: shape \(3, 64\) does not fit"):
        shard_full_state_dict(full, model)



def test_megatron_checkpoint_nesting_round_trips():
    from megatron.model.bert_model import flat_state_dict, nested_state_dict

    flat = BertModel(tiny_config()).state_dict()
    nested = nested_state_dict(flat)
    assert sorted(nested) == ["binary_head", "language_model", "lm_head"]
    assert sorted(nested["language_model"]) == ["embedding", "encoder", "pooler"]
    assert "weight" in nested["language_model"]["embedding"]["word_embeddings"]
    assert "layers.1.self_attention.query_key_value.weight" in nested["language_model"]["encoder"]
    assert "dense.weight" in nested["lm_head"] and "weight" in nested["binary_head"]
    back = flat_state_dict(nested)
    assert set(back) == set(flat) and all(back[k] is flat[k] for k in flat)
    # Pre-2021 checkpoints call the encoder "transformer".
    old = {**nested, "language_model": {**nested["language_model"]}}
    old["language_model"]["transformer"] = old["language_model"].pop("encoder")
    assert set(flat_state_dict(old)) == set(flat)
    with pytest.raises(ValueError, match="'language_model.decoder.x' is not in Megatron's layout"):
        nested_state_dict({"language_model.decoder.x": torch.zeros(1)})


@pytest.mark.parametrize("recompute", [False, True])
def test_first_token_only_last_layer_gives_the_same_cls_and_gradients(recompute):
    # Classification and MultipleChoice read [CLS] only, so their last layer computes position 0
    # alone; the pooled output and every gradient must equal the full computation's, also when
    # the layers are recomputed in backward.
    torch.manual_seed(0)
    config = BertConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100,
                        max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0,
                        recompute_activations=recompute)
    model = Classification(config, num_classes=3)
    ids = torch.randint(0, 100, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    results = []
    for first in (False, True):
        model.zero_grad()
        hidden, pooled = model.language_model(ids, mask, first_token_only=first)
        assert hidden.shape == ((3, 1, 32) if first else (3, 12, 32))
        pooled.pow(2).sum().backward()
        results.append((hidden[:, 0].detach().clone(), pooled.detach().clone(),
                        {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}))
    (h_full, p_full, g_full), (h_first, p_first, g_first) = results
    torch.testing.assert_close(h_first, h_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_first, p_full, rtol=1e-5, atol=1e-6)
    assert set(g_first) == set(g_full)
    for name, grad in g_full.items():
        torch.testing.assert_close(g_first[name], grad, rtol=1e-4, atol=1e-6, msg=name)
