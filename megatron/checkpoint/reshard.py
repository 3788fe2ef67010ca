"""Change the tensor-parallel size of a checkpoint: weights, optimizer state, args and RNG.

Two entry points share one implementation (:mod:`megatron.checkpoint.plan`,
:mod:`megatron.checkpoint.state`):

* pure functions on in-memory state dicts (:func:`reshard_states`,
  :func:`reshard_model_state_dicts`, :func:`merge_model_state_dicts`), for tests and small
  models;
* the streaming path (:func:`reshard_checkpoint`, :func:`load_model_state_dict`), which reads
  memory-mapped source files and builds one target rank at a time, tensor by tensor, releasing
  each source tensor's pages once used: it holds one target rank's state plus the source
  slices of one tensor.

Model weights are re-split by :func:`megatron.checkpoint.sharding.target_shard`; the word
embedding and the LM bias are re-padded to ``make_vocab_size_divisible_by * N`` rows (new rows
zero, dropped rows are padding). The vocabulary size (the real rows) comes from ``vocab_size``
when given, else ``args.vocab_size``, else the trailing all-zero rows of the embedding and LM
bias (padding rows never train, see :class:`megatron.model.BertModel`).
"""

import argparse
import dataclasses
import logging
from typing import List, Optional, Sequence, Tuple

from megatron.checkpoint.plan import (
    WORD_EMBEDDINGS,
    InMemorySource,
    ReshardPlan,
    StateDict,
    build_model_shard,
    make_plan,
    validate_models,
)
from megatron.checkpoint.reader import CheckpointSource
from megatron.checkpoint.state import build_target_state, target_args
from megatron.checkpoint.writer import write_checkpoint
from megatron.model.bert_model import nested_state_dict
from megatron.training.checkpointing import CheckpointError

__all__ = ["reshard_checkpoint", "reshard_states", "reshard_model_state_dicts",
           "merge_model_state_dicts", "load_model_state_dict"]

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------- entry points


def reshard_checkpoint(load_dir: str, save_dir: str, target_tensor_parallel_size: int, *,
                       iteration=None, no_optimizer: bool = False,
                       vocab_size: Optional[int] = None,
                       num_attention_heads: Optional[int] = None,
                       make_vocab_size_divisible_by: Optional[int] = None) -> str:
    """Read a checkpoint (directory or release zip) and write it at another TP size.

    Args:
        load_dir: the source save directory or ``.zip``.
        save_dir: the new save directory (must not hold a checkpoint).
        target_tensor_parallel_size: TP size to write.
        iteration: the source iteration (default: the tracker's).
        no_optimizer: drop the optimizer and scheduler state.
        vocab_size: the tokenizer's vocabulary size (default: saved or inferred).
        num_attention_heads: for checkpoints without args.
        make_vocab_size_divisible_by: default: the checkpoint's.

    Returns:
        The iteration directory written.

    Raises:
        CheckpointError: for any problem with the input; nothing is left under ``save_dir``.
    """
    with CheckpointSource(load_dir, iteration, num_attention_heads) as source:
        plan = make_plan(source, target_tensor_parallel_size, vocab_size=vocab_size,
                         make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        plan = dataclasses.replace(plan, lazy=True)  # each tensor computed as it is written
        logger.info("resharding %s (TP %d, %s) to TP %d: vocabulary %d rows -> %d",
                    load_dir, plan.source_tp, "release" if source.release
                    else f"iteration {source.iteration}", plan.target_tp, plan.source_rows,
                    plan.target_rows)
        return write_checkpoint(
            save_dir, lambda rank: build_target_state(source, plan, rank, not no_optimizer),
            plan.target_tp, source.iteration, source.release)


def reshard_states(states: Sequence[dict], target_tensor_parallel_size: int, *,
                   no_optimizer: bool = False, vocab_size: Optional[int] = None,
                   num_attention_heads: Optional[int] = None) -> List[dict]:
    """Pure version of :func:`reshard_checkpoint` on loaded ``model_optim_rng.pt`` dicts."""
    source = InMemorySource(states, num_attention_heads)
    plan = make_plan(source, target_tensor_parallel_size, vocab_size=vocab_size)
    return [build_target_state(source, plan, rank, not no_optimizer)
            for rank in range(target_tensor_parallel_size)]


def reshard_model_state_dicts(shards: Sequence[StateDict], target_tensor_parallel_size: int, *,
                              padded_vocab_size: Optional[int] = None) -> List[StateDict]:
    """Re-split flat model state dicts (one per source rank) for another TP size.

    Args:
        shards: every source rank's flat state dict (our names, current QKV layout).
        target_tensor_parallel_size: the TP size wanted.
        padded_vocab_size: new rows of the word embedding and LM bias (default: unchanged).
    """
    source = InMemorySource([{"model": nested_state_dict(s), "checkpoint_version": 3.0}
                             for s in shards])
    names = validate_models(source)
    rows = shards[0][WORD_EMBEDDINGS].shape[0] * len(shards)
    plan = ReshardPlan(len(shards), target_tensor_parallel_size, names,
                       {n: tuple(shards[0][n].shape) for n in names}, rows, False, rows,
                       padded_vocab_size or rows, 1, None)
    return [build_model_shard(source, plan, rank) for rank in range(target_tensor_parallel_size)]


def merge_model_state_dicts(shards: Sequence[StateDict]) -> StateDict:
    """The TP=1 state dict of a model given every rank's flat state dict (rows unchanged)."""
    return reshard_model_state_dicts(shards, 1)[0]


def load_model_state_dict(load_dir: str, *, tensor_model_parallel_size: int,
                          tensor_model_parallel_rank: int, iteration=None,
                          vocab_size: Optional[int] = None,
                          num_attention_heads: Optional[int] = None
                          ) -> Tuple[StateDict, Optional[argparse.Namespace], int]:
    """This rank's model weights from a checkpoint of any tensor-parallel size.

    Reads only what this rank needs (memory-mapped), re-splits it and re-pads the vocabulary
    for ``tensor_model_parallel_size``. For ``--pretrained-checkpoint`` and tools.

    Args:
        load_dir: a save directory (tracker or ``iteration``) or a release ``.zip``.
        tensor_model_parallel_size, tensor_model_parallel_rank: the target layout and rank.
        iteration: read this iteration (or ``"release"``) instead of the tracker's.
        vocab_size: the tokenizer's vocabulary size; pass it when known (the padded size then
            matches ``BertConfig`` exactly), else it is read from the args or inferred.
        num_attention_heads: for checkpoints without args.

    Returns:
        ``(state_dict, args, iteration)``: the flat state dict (``model.state_dict()`` names),
        the saved args with ``tensor_model_parallel_size`` and ``padded_vocab_size`` updated
        (``None`` if the checkpoint has none), and the saved iteration (0 for a release).

    Raises:
        CheckpointError: naming the file, key and shapes of any problem.
    """
    if not 0 <= tensor_model_parallel_rank < tensor_model_parallel_size:
        raise CheckpointError(f"tensor-parallel rank {tensor_model_parallel_rank} is outside "
                              f"0..{tensor_model_parallel_size - 1}")
    with CheckpointSource(load_dir, iteration, num_attention_heads) as source:
        plan = make_plan(source, tensor_model_parallel_size, vocab_size=vocab_size)
        model = build_model_shard(source, plan, tensor_model_parallel_rank)
        args = None if source.args is None else target_args(source.args, plan)
        first = source.state(0)
        saved_iteration = 0 if source.release else int(first.get("iteration", source.iteration))
    logger.info("loaded %s for tensor-parallel rank %d of %d (saved at TP %d)", load_dir,
                tensor_model_parallel_rank, tensor_model_parallel_size, plan.source_tp)
    return model, args, saved_iteration
