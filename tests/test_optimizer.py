"""MegatronOptimizer: weight-decay groups, fp16 loss scaling, master weights, DP all-reduce."""

import math

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.model import BertConfig, BertModel
from megatron.training.grad_scaler import DynamicGradScaler
from megatron.training.optimizer import MegatronOptimizer, allreduce_gradients, get_param_groups
from tests.distributed import count_collectives, run_distributed


def _model(**kwargs):
    torch.manual_seed(0)
    return BertModel(BertConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                vocab_size=100, max_position_embeddings=16, hidden_dropout=0.0,
                                attention_dropout=0.0, **kwargs))


def _backward(model, optimizer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 8), generator=generator)
    lm, binary = model(ids, torch.ones(2, 8), lm_labels=ids, loss_mask=torch.ones(2, 8))
    optimizer.scale_loss(lm.float().mean() + binary.float().sum()).backward()


def test_biases_and_layernorm_weights_get_no_weight_decay():
    model = _model()
    decay, no_decay = get_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() > 1 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "language_model.encoder.final_layernorm.weight" in no_decay_names
    assert "language_model.encoder.layers.0.mlp.dense_h_to_4h.bias" in no_decay_names
    assert decay["wd_mult"] == 1.0 and no_decay["wd_mult"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_fp16_overflow_skips_the_step_and_the_scaler_backs_off_and_grows():
    model = _model(fp16=True)
    scaler = DynamicGradScaler(initial_scale=1024.0, min_scale=1.0, growth_factor=2.0,
                               backoff_factor=0.5, growth_interval=2, hysteresis=1)
    optimizer = MegatronOptimizer(model, lr=1e-2, grad_scaler=scaler)
    assert all(p.dtype == torch.float32 for p in optimizer.master_params)
    before = [p.detach().clone() for p in model.parameters()]

    optimizer.zero_grad()
    _backward(model, optimizer)
    next(iter(model.parameters())).main_grad[0, 0] = math.inf  # inject an overflow
    updated, norm = optimizer.step()
    assert not updated and math.isnan(norm) and optimizer.get_loss_scale() == 512.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    for step in range(2):  # two clean steps: the scale grows back
        optimizer.zero_grad()
        _backward(model, optimizer, seed=step)
        updated, norm = optimizer.step()
        assert updated and math.isfinite(norm)
    assert optimizer.get_loss_scale() == 1024.0
    # The fp16 weights are the rounded fp32 master weights.
    for master, param in zip(optimizer.master_params, optimizer.model_params):
        assert torch.equal(master.half(), param)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fp16_gradients_accumulate_in_fp32_and_are_unscaled():
    model = _model(fp16=True)
    scaler = DynamicGradScaler(initial_scale=256.0, min_scale=1.0, growth_factor=2.0,
                               backoff_factor=0.5, growth_interval=100, hysteresis=1)
    optimizer = MegatronOptimizer(model, lr=1e-2, grad_scaler=scaler, clip_grad=0.0)
    optimizer.zero_grad()
    _backward(model, optimizer, seed=1)
    _backward(model, optimizer, seed=2)
    param = next(iter(model.parameters()))
    assert param.grad is None and param.main_grad.dtype == torch.float32
    scaled = [p.main_grad.clone() for p in optimizer.model_params]
    updated, norm = optimizer.step()
    expected = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g / 256.0) for g in scaled]))
    assert updated and abs(norm - expected.item()) < 1e-4 * expected.item()


def test_state_dict_round_trip_with_masters_and_scaler():
    model = _model(bf16=True)
    optimizer = MegatronOptimizer(model, lr=1e-2)
    optimizer.zero_grad()
    _backward(model, optimizer)
    optimizer.step()
    state = optimizer.state_dict()
    assert set(state) == {"optimizer", "fp32_from_fp16_params"}
    other = MegatronOptimizer(_model(bf16=True), lr=1e-2)
    other.load_state_dict(state)
    for a, b in zip(optimizer.master_params, other.master_params):
        assert torch.equal(a, b)
    plain = MegatronOptimizer(_model(), lr=1e-2)
    try:
        plain.load_state_dict(state)
    except ValueError as error:
        assert "--no-load-optim" in str(error)
    else:
        raise AssertionError("loading a bf16 optimizer state into an fp32 one must fail")


def _allreduce_worker(rank, world_size):
    mpu.initialize_model_parallel(1)
    grads = [torch.full((1000,), float(rank + 1)), torch.full((10, 10), float(rank) * 2),
             torch.full((3000,), -float(rank))]
    with count_collectives() as counts:
        calls = allreduce_gradients(grads, mpu.get_data_parallel_group(), bucket_bytes=8000)
    assert calls == 2 and counts == {"allreduce": 2}, (calls, counts)
    mean = sum(range(1, world_size + 1)) / world_size
    assert torch.allclose(grads[0], torch.full((1000,), mean))
    assert torch.allclose(grads[1], torch.full((10, 10), float(world_size - 1)))
    assert torch.allclose(grads[2], torch.full((3000,), -(world_size - 1) / 2))
    assert dist.get_world_size() == world_size


def test_data_parallel_gradients_are_averaged_in_buckets():
    run_distributed(_allreduce_worker, 2)
    run_distributed(_allreduce_worker, 4)


def _tp_dp_step_worker(rank, world_size):
    """At TP=2 x DP=2 a step all-reduces grads over DP only and the norm over TP only."""
    mpu.initialize_model_parallel(2)
    mpu.model_parallel_manual_seed(0)
    torch.manual_seed(0)
    model = BertModel(BertConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                 vocab_size=100, max_position_embeddings=16,
                                 tensor_model_parallel_size=2, hidden_dropout=0.0,
                                 attention_dropout=0.0))
    optimizer = MegatronOptimizer(model, lr=1e-2)
    optimizer.zero_grad()
    _backward(model, optimizer, seed=mpu.get_data_parallel_rank())
    with count_collectives() as counts:
        updated, norm = optimizer.step()
    assert updated and math.isfinite(norm)
    # One bucketed all-reduce of the gradients (DP) and one of the squared norm (TP).
    assert counts == {"allreduce": 2}, counts


def test_a_tp_dp_step_issues_one_gradient_and_one_norm_all_reduce():
    run_distributed(_tp_dp_step_worker, 4)


def test_clipping_inside_the_fused_kernel_equals_clipping_the_gradients_first():
    results = {}
    for fused in (True, False):
        model = _model()
        optimizer = MegatronOptimizer(model, lr=1e-2, clip_grad=0.05, fused=fused)
        assert optimizer._fused_grad_scale == fused
        for step in range(3):
            optimizer.zero_grad()
            _backward(model, optimizer, seed=step)
            updated, norm = optimizer.step()
            assert updated and norm > 0.05  # every step clips
        results[fused] = [p.detach().clone() for p in model.parameters()]
    for fused, plain in zip(results[True], results[False]):
        # Adam updates are ~lr = 1e-2 per step; rounding differs only where gradients are ~0.
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    # Without clipping, nothing is left behind for the next step.
    model = _model()
    optimizer = MegatronOptimizer(model, lr=1e-2, clip_grad=1e6, fused=True)
    _backward(model, optimizer)
    optimizer.step()
    assert optimizer.optimizer.grad_scale is None
