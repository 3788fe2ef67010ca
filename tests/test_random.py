"""Random-number streams (the tracker) and activation checkpointing."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from megatron.mpu.random import RNGStatesTracker
from tests.distributed import run_distributed

SEED = 99


def test_fork_uses_its_own_stream_and_leaves_the_default_one_alone():
    mpu.model_parallel_manual_seed(SEED)
    before = torch.rand(4)
    with mpu.get_rng_tracker().fork():
        forked_1 = torch.rand(4)
    with mpu.get_rng_tracker().fork():
        forked_2 = torch.rand(4)
    after = torch.rand(4)

    torch.manual_seed(SEED)
    assert torch.equal(before, torch.rand(4)) and torch.equal(after, torch.rand(4))
    torch.manual_seed(SEED + 2718)  # tensor-parallel rank 0's stream
    assert torch.equal(forked_1, torch.rand(4)) and torch.equal(forked_2, torch.rand(4))


def test_tracker_errors_and_state_round_trip():
    tracker = RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="seed 1 already exists"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="'a' already exists"):
        tracker.add("a", 2)
    with pytest.raises(KeyError, match="model_parallel_manual_seed"):
        with tracker.fork("missing"):
            pass
    states = tracker.get_states()
    with tracker.fork("a"):
        first = torch.rand(3)
    tracker.set_states(states)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), first)
    # Megatron-LM's names still work.
    assert mpu.CudaRNGStatesTracker is RNGStatesTracker
    assert mpu.get_cuda_rng_tracker() is mpu.get_rng_tracker()
    assert mpu.model_parallel_cuda_manual_seed is mpu.model_parallel_manual_seed


def test_fork_restores_the_default_stream_when_the_block_raises():
    mpu.model_parallel_manual_seed(SEED)
    with pytest.raises(RuntimeError):
        with mpu.get_rng_tracker().fork():
            torch.rand(2)
            raise RuntimeError("inside")
    value = torch.rand(2)
    torch.manual_seed(SEED)
    assert torch.equal(value, torch.rand(2))


def _check_dropout_masks_across_ranks(rank, world_size):
    mpu.initialize_model_parallel(world_size)
    mpu.model_parallel_manual_seed(SEED)
    ones = torch.ones(1000)
    outside = F.dropout(ones, 0.5)
    with mpu.get_rng_tracker().fork():
        inside = F.dropout(ones, 0.5)
    masks = {}
    for name, mask in (("outside", outside), ("inside", inside)):
        parts = [torch.empty_like(mask) for _ in range(world_size)]
        dist.all_gather(parts, mask)
        masks[name] = parts
    assert all(torch.equal(masks["outside"][0], m) for m in masks["outside"])
    assert not any(torch.equal(masks["inside"][0], m) for m in masks["inside"][1:])


def test_dropout_differs_across_tp_ranks_only_inside_the_tracker():
    run_distributed(_check_dropout_masks_across_ranks, 2)


# ------------------------------------------------------------------------- checkpointing


class _Block(torch.nn.Module):
    """Column -> dropout in the TP region -> GeLU -> row -> dropout on replicated activations."""

    def __init__(self, hidden):
        super().__init__()
        self.fc1 = mpu.ColumnParallelLinear(hidden, 4 * hidden, gather_output=False)
        self.fc2 = mpu.RowParallelLinear(4 * hidden, hidden, input_is_parallel=True)

    def forward(self, x):
        h, _ = self.fc1(x)
        with mpu.get_rng_tracker().fork():
            h = F.dropout(h, 0.3)
        out, _ = self.fc2(F.gelu(h))
        return F.dropout(out, 0.3) + x


def _run_block(use_checkpoint, world_size):
    mpu.model_parallel_manual_seed(SEED)
    blocks = torch.nn.ModuleList([_Block(8), _Block(8)])
    x = torch.randn(4, 6, 8).requires_grad_()
    h = x
    for block in blocks:
        h = mpu.checkpoint(block, h) if use_checkpoint else block(h)
    h.pow(2).sum().backward()
    grads = [p.grad.clone() for p in blocks.parameters()] + [x.grad.clone()]
    # Where the random streams stand afterwards: checkpointing must not move them.
    after = torch.rand(3)
    with mpu.get_rng_tracker().fork():
        forked = torch.rand(3)
    return h.detach(), grads, after, forked


def _check_checkpoint(rank, world_size):
    mpu.initialize_model_parallel(world_size)
    plain = _run_block(False, world_size)
    recomputed = _run_block(True, world_size)
    assert torch.equal(plain[0], recomputed[0])
    assert len(plain[1]) == len(recomputed[1]) == 9
    for a, b in zip(plain[1], recomputed[1]):
        assert torch.equal(a, b)
    assert torch.equal(plain[2], recomputed[2]) and torch.equal(plain[3], recomputed[3])


@pytest.mark.parametrize("world_size", [1, 2])
def test_checkpoint_gives_identical_gradients_with_dropout(world_size):
    run_distributed(_check_checkpoint, world_size)


def test_checkpoint_passes_non_tensor_arguments_and_tuple_outputs():
    w = torch.randn(3, 3, requires_grad=True)

    def fn(x, scale, name):
        assert name == "n"
        return x @ w * scale, x.sum()

    x = torch.randn(2, 3, requires_grad=True)
    a, b = mpu.checkpoint(fn, x, 2.0, "n")
    (a.sum() + b).backward()
    grad_w, grad_x = w.grad.clone(), x.grad.clone()
    w.grad = x.grad = None
    a, b = fn(x, 2.0, "n")
    (a.sum() + b).backward()
    assert torch.equal(grad_w, w.grad) and torch.equal(grad_x, x.grad)
