"""Cross-entropy over logits whose vocabulary dimension is split across the tensor-parallel group.

The full logits are never gathered. Each rank holds ``[..., V/p]``; the loss needs only three
reductions over the vocabulary: the maximum (for a stable softmax), the sum of exponentials and
the target's logit (plus, for label smoothing, the sum of logits). The first is one MAX
all-reduce; the others travel together in one SUM all-reduce. Backward needs no communication.
"""

from typing import Optional

import torch
import torch.distributed as dist

from megatron.mpu.parallel_state import group_rank, group_size, resolve_tensor_model_parallel_group
from megatron.mpu.utils import VocabUtility

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, label_smoothing, group):
        world_size = group_size(group)
        logits = vocab_parallel_logits.float()  # [*, V/p]; softmax statistics in fp32
        partition_vocab_size = logits.size(-1)
        vocab_size = partition_vocab_size * world_size

        logits_max = logits.max(dim=-1)[0]
        if world_size > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)

        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            partition_vocab_size, group_rank(group), world_size
        )
        target_outside = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(target_outside, 0)
        predicted_logits = torch.gather(logits, -1, local_target.unsqueeze(-1)).squeeze(-1)
        predicted_logits = predicted_logits.masked_fill(target_outside, 0.0)

        exp_logits = logits.exp()
        sums = [predicted_logits, exp_logits.sum(dim=-1)]
        if label_smoothing > 0.0:
            sums.append(logits.sum(dim=-1))
        stacked = torch.stack(sums)  # [2 or 3, *]: one all-reduce for all of them
        if world_size > 1:
            dist.all_reduce(stacked, group=group)
        predicted_logits, sum_exp_logits = stacked[0], stacked[1]

        log_sum_exp = sum_exp_logits.log()
        loss = log_sum_exp - predicted_logits  # -log p(target)
        if label_smoothing > 0.0:
            # PyTorch's definition: (1 - e) * nll + e * mean over the vocabulary of -log p.
            mean_neg_log_probs = log_sum_exp - stacked[2] / vocab_size
            loss = (1.0 - label_smoothing) * loss + label_smoothing * mean_neg_log_probs

        softmax = exp_logits.div_(sum_exp_logits.unsqueeze(-1))
        ctx.label_smoothing = label_smoothing
        ctx.vocab_size = vocab_size
        ctx.input_dtype = vocab_parallel_logits.dtype
        ctx.save_for_backward(softmax, target_outside, local_target)
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.backward_done:
            # The saved softmax is turned into the gradient in place to save a [tokens, V/p]
            # buffer, so it cannot serve a second backward.
            raise RuntimeError("vocab_parallel_cross_entropy does not support retain_graph=True")
        ctx.backward_done = True
        softmax, target_outside, local_target = ctx.saved_tensors
        grad_input = softmax  # d loss / d logits = softmax - (smoothed) one-hot target
        on_target = (~target_outside).to(softmax.dtype).unsqueeze(-1)
        grad_input.scatter_add_(
            -1, local_target.unsqueeze(-1), -(1.0 - ctx.label_smoothing) * on_target
        )
        if ctx.label_smoothing > 0.0:
            grad_input.sub_(ctx.label_smoothing / ctx.vocab_size)
        grad_input.mul_(grad_output.unsqueeze(-1))
        return grad_input.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token cross-entropy of vocabulary-parallel logits, without gathering them.

    Equals ``F.cross_entropy(full_logits.view(-1, V), target.view(-1), reduction="none",
    label_smoothing=label_smoothing)`` reshaped like ``target``, where ``full_logits`` is the
    concatenation of every rank's shard. Statistics are computed in fp32; the gradient has the
    logits' dtype. Targets outside ``[0, V)`` (e.g. -1 for unmasked positions) give a finite,
    meaningless loss: multiply by a loss mask.

    Communication: forward one MAX and one SUM all-reduce; backward none.

    Args:
        vocab_parallel_logits: ``[..., V/p]`` this rank's slice of the logits.
        target: ``[...]`` integer class ids in the full vocabulary.
        label_smoothing: in ``[0, 1)``; PyTorch's definition.
        process_group: tensor-parallel group (default: the initialised one, or none).

    Returns:
        ``[...]`` fp32 losses.

    Raises:
        ValueError: for a ``label_smoothing`` outside ``[0, 1)`` or mismatched shapes.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits shape {tuple(vocab_parallel_logits.shape)} does not match target shape "
            f"{tuple(target.shape)} (expected logits [*target.shape, V/p])"
        )
    group = resolve_tensor_model_parallel_group(process_group)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, label_smoothing, group)
