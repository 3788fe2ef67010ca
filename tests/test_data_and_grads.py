"""``broadcast_data`` and ``clip_grad_norm`` against single-process references."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from tests.distributed import count_collectives, run_distributed

KEYS = ["text", "labels", "mask"]


def _batch(source_rank):
    generator = torch.Generator().manual_seed(source_rank)
    return {
        "text": torch.randint(0, 100, (4, 16), generator=generator),
        "labels": torch.randint(0, 100, (4, 16), generator=generator),
        "mask": torch.randint(0, 2, (4,), generator=generator),
    }


def _check_broadcast(rank, world_size):
    mpu.initialize_model_parallel(2)
    source = mpu.get_tensor_model_parallel_src_rank()
    data = _batch(source) if rank == source else None
    with count_collectives() as counts:
        received = mpu.broadcast_data(KEYS, data, torch.int64)
    assert counts == {"broadcast": 2}
    expected = _batch(source)  # each tensor-parallel group gets its own source's batch
    assert list(received) == KEYS
    for key in KEYS:
        assert torch.equal(received[key], expected[key])

    # Bad data on the source: every rank of the group raises instead of waiting forever.
    bad = {"text": torch.zeros(2, dtype=torch.float32)} if rank == source else None
    message = "dtype torch.float32, expected torch.int64" if rank == source else "invalid data"
    with pytest.raises(ValueError, match=message):
        mpu.broadcast_data(["text"], bad, torch.int64)


def test_broadcast_data_from_each_tensor_parallel_source():
    run_distributed(_check_broadcast, 4)


def test_broadcast_data_single_process_checks_keys():
    data = _batch(0)
    assert mpu.broadcast_data(["text"], data, torch.int64)["text"] is data["text"]
    with pytest.raises(ValueError, match="key 'nope' is missing"):
        mpu.broadcast_data(["nope"], data, torch.int64)


# ------------------------------------------------------------------------------- clipping

HIDDEN = 8


def _grads_of_tp_model(world_size):
    """Column -> GeLU -> row, backward on a fixed batch; returns layers and full references."""
    mpu.model_parallel_manual_seed(7)
    fc1 = mpu.ColumnParallelLinear(HIDDEN, 4 * HIDDEN, gather_output=False,
                                   keep_master_weight_for_test=True)
    fc2 = mpu.RowParallelLinear(4 * HIDDEN, HIDDEN, input_is_parallel=True,
                                keep_master_weight_for_test=True)
    bias1 = torch.randn(4 * HIDDEN, generator=torch.Generator().manual_seed(3))
    tp_rank = mpu.get_tensor_model_parallel_rank()
    with torch.no_grad():
        fc1.bias.copy_(bias1.chunk(world_size)[tp_rank])
        fc2.bias.fill_(0.5)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(4))
    fc2(F.gelu(fc1(x)[0]))[0].pow(2).sum().backward()

    ref = [fc1.master_weight.clone(), bias1.clone(), fc2.master_weight.clone(),
           torch.full((HIDDEN,), 0.5)]
    ref = [t.requires_grad_() for t in ref]
    F.linear(F.gelu(F.linear(x, ref[0], ref[1])), ref[2], ref[3]).pow(2).sum().backward()
    shards = [(fc1.weight, 0), (fc1.bias, 0), (fc2.weight, 1), (fc2.bias, None)]
    return shards, ref, tp_rank


def _check_clip(rank, world_size, norm_type, max_norm):
    mpu.initialize_model_parallel(world_size)
    shards, ref, tp_rank = _grads_of_tp_model(world_size)
    params = [p for p, _ in shards]
    with count_collectives() as counts:
        norm = mpu.clip_grad_norm(params, max_norm, norm_type)
    assert counts == ({} if world_size == 1 else {"allreduce": 1})
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    assert math.isclose(norm, ref_norm.item(), rel_tol=1e-5)
    for (param, dim), full in zip(shards, ref):
        expected = full.grad if dim is None else full.grad.chunk(world_size, dim=dim)[tp_rank]
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("norm_type, max_norm", [(2.0, 0.1), (2.0, 1e6), (float("inf"), 0.1),
                                                 (1.0, 0.5)])
def test_clip_grad_norm_equals_single_process_norm(world_size, norm_type, max_norm):
    run_distributed(_check_clip, world_size, norm_type, max_norm)


def test_clip_grad_norm_rejects_bad_arguments_and_skips_non_finite():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    assert math.isnan(mpu.clip_grad_norm([p], 1.0))
    assert p.grad[0] == 1.0  # a non-finite norm leaves the gradients alone
    with pytest.raises(ValueError, match="max_norm must be positive, got 0"):
        mpu.clip_grad_norm([p], 0)
    with pytest.raises(ValueError, match="norm_type must be positive"):
        mpu.clip_grad_norm([p], 1.0, norm_type=-1)


def test_clip_grad_norm_is_accurate_on_large_gradients():
    # Like an embedding gradient: 2M elements, sparse rows of similar magnitude. torch's CPU norm
    # kernel is off by ~1e-4 relative on such tensors, which made the clipped norm depend on the
    # tensor-parallel split; the sum of squares must agree with float64 to fp32 precision.
    generator = torch.Generator().manual_seed(0)
    grad = torch.zeros(30592, 64)
    rows = torch.randint(0, 30592, (2000,), generator=generator)
    grad[rows] = torch.randn(2000, 64, generator=generator) * 1e-2
    grad += torch.randn(30592, 64, generator=generator) * 1e-3
    param = torch.nn.Parameter(torch.zeros_like(grad))
    param.grad = grad
    exact = grad.double().norm().item()
    assert math.isclose(mpu.clip_grad_norm([param], 1e9), exact, rel_tol=1e-6)
    halves = [torch.nn.Parameter(torch.zeros(15296, 64)) for _ in range(2)]
    for half, part in zip(halves, grad.chunk(2)):
        half.grad = part.clone()
    assert math.isclose(mpu.clip_grad_norm(halves, 1e9), exact, rel_tol=1e-6)
