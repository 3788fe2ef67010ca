"""One target rank's checkpoint: model, optimizer state, args, RNG and the rest.

* optimizer (AdamW state per parameter, numbered in ``get_param_groups`` order, and the fp32
  master weights of half-precision models): every tensor shaped like its parameter is re-split
  like it, the rest (step counts, hyper-parameters, loss scaler) is copied from rank 0;
* ``args``: ``tensor_model_parallel_size`` and ``padded_vocab_size`` updated; iteration and
  scheduler state copied;
* ``rng_state``: the tensor-parallel dropout stream is per rank, so it is regenerated for each
  target rank (seeded from ``args.seed``, the rank and the iteration), with a logged message.
"""

import argparse
import copy
import hashlib
import logging
from typing import Dict, Optional, Tuple

import torch

from megatron.checkpoint import legacy
from megatron.checkpoint.plan import ReshardPlan, build_model_shard, shard_tensor
from megatron.checkpoint.sharding import optimizer_param_names
from megatron.model.bert_model import nested_state_dict
from megatron.training.checkpointing import CheckpointError

__all__ = ["build_target_state", "build_optimizer_shard", "regenerate_rng_state",
           "target_args"]

logger = logging.getLogger(__name__)

_TRACKER_SEED_OFFSET = 2718  # megatron.mpu.random's offset of the tensor-parallel stream


def _inner(optimizer: dict) -> Tuple[dict, bool]:
    wrapped = "optimizer" in optimizer and "state" not in optimizer
    return (optimizer["optimizer"] if wrapped else optimizer), wrapped


def _optimizer_ids(source, plan: ReshardPlan) -> Optional[Dict[int, str]]:
    """Parameter id -> name of the saved AdamW state, validated on every rank (None: none)."""
    present = ["optimizer" in source.state(r) for r in range(source.tp)]
    if not any(present):
        return None
    if not all(present):
        raise CheckpointError(f"{source.file(present.index(False))} has no optimizer state but "
                              "rank 0 does")
    if source.version < legacy.CURRENT_VERSION:
        logger.warning("dropping the optimizer state of a version %g checkpoint", source.version)
        return None
    groups = optimizer_param_names(plan.local_shapes)
    ids, first_keys = None, None
    for rank in range(source.tp):
        inner, _ = _inner(source.state(rank)["optimizer"])
        saved = inner.get("param_groups") if isinstance(inner, dict) else None
        if saved is None or "state" not in inner:
            raise CheckpointError(f"{source.file(rank)}: optimizer state has no param_groups/state")
        sizes = [len(group["params"]) for group in saved]
        if sizes != [len(group) for group in groups]:
            raise CheckpointError(
                f"{source.file(rank)}: optimizer groups hold {sizes} parameters; the model's "
                f"weight-decay groups have {[len(g) for g in groups]}")
        rank_ids = {pid: name for group, names in zip(saved, groups)
                    for pid, name in zip(group["params"], names)}
        if ids is not None and rank_ids != ids:
            raise CheckpointError(f"{source.file(rank)}: optimizer parameter ids differ from "
                                  "rank 0's")
        unknown = [pid for pid in inner["state"] if pid not in rank_ids]
        if unknown:
            raise CheckpointError(f"{source.file(rank)}: optimizer state for parameter id "
                                  f"{unknown[0]}, which no param group lists")
        keys = {pid: sorted(entries) for pid, entries in inner["state"].items()}
        if rank and keys != first_keys:
            raise CheckpointError(f"{source.file(rank)}: optimizer state entries differ from "
                                  "rank 0's")
        ids, first_keys = rank_ids, (keys if not rank else first_keys)
        _check_masters(source, plan, rank, groups)
    return ids


def _check_masters(source, plan: ReshardPlan, rank: int, groups) -> None:
    masters = source.state(rank)["optimizer"].get("fp32_from_fp16_params")
    if masters is None:
        return
    shapes = [[tuple(t.shape) for t in group] for group in masters]
    expected = [[plan.local_shapes[name] for name in group] for group in groups]
    if shapes != expected:
        raise CheckpointError(f"{source.file(rank)}: fp32_from_fp16_params do not match the "
                              "model's parameters (shapes, in get_param_groups order)")


def _optimizer_entry(source, plan, rank, name, pid, key, value):
    local = plan.local_shapes[name]
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    if tuple(value.shape) == local:  # split like the parameter, or copied if replicated
        return shard_tensor(source, plan, name, rank, lambda r: _inner(
            source.state(r)["optimizer"])[0]["state"][pid][key])
    if value.numel() > 1:
        raise CheckpointError(f"{source.file(0)}: optimizer state {key!r} of {name} (id {pid}) "
                              f"has shape {tuple(value.shape)}; the parameter has {local}")
    return value.clone()


def build_optimizer_shard(source, plan: ReshardPlan, rank: int, ids: Dict[int, str]) -> dict:
    """Target ``rank``'s ``optimizer`` entry (AdamW state, masters and scaler), keys in the
    saved order."""
    saved = source.state(0)["optimizer"]
    inner, wrapped = _inner(saved)
    state = {}
    for pid, entries in inner["state"].items():
        state[pid] = {key: _optimizer_entry(source, plan, rank, ids[pid], pid, key, value)
                      for key, value in entries.items()}
    target = {"state": state, "param_groups": copy.deepcopy(inner["param_groups"])}
    if not wrapped:
        return target

    def master(r, g, j):
        return source.state(r)["optimizer"]["fp32_from_fp16_params"][g][j]

    out = {}
    for key, value in saved.items():
        if key == "optimizer":
            out[key] = target
        elif key == "fp32_from_fp16_params":
            groups = optimizer_param_names(plan.local_shapes)
            out[key] = [[shard_tensor(source, plan, name, rank,
                                      lambda r, g=g, j=j: master(r, g, j))
                         for j, name in enumerate(names)] for g, names in enumerate(groups)]
        else:
            out[key] = copy.deepcopy(value)
    return out


def _stream_seed(seed: int, rank: int, iteration: int) -> int:
    digest = hashlib.sha256(f"{seed}/{_TRACKER_SEED_OFFSET + rank}/{iteration}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _accelerator_state(seed: int, like) -> Optional[torch.Tensor]:
    """A CUDA-style Philox generator state (8-byte seed, 8-byte offset), when ``like`` is one."""
    if not isinstance(like, torch.Tensor) or like.numel() != 16 or like.dtype != torch.uint8:
        return None
    return torch.tensor(list(seed.to_bytes(8, "little")) + [0] * 8, dtype=torch.uint8)


def regenerate_rng_state(rng_state, seed: int, rank: int, iteration: int):
    """``rng_state`` with a fresh tensor-parallel stream for target ``rank``.

    The default generators (identical on every tensor-parallel rank) are kept; each tracker
    stream is seeded from ``(seed, 2718 + rank, iteration)``. Returns ``None`` for a layout
    this does not know (load such a checkpoint with ``--no-load-rng``).
    """
    states = rng_state if isinstance(rng_state, list) else [rng_state]
    out = []
    for state in states:
        tracker = state.get("rng_tracker_states") if isinstance(state, dict) else None
        if not isinstance(tracker, dict) or not all(
                isinstance(v, tuple) and len(v) == 2 for v in tracker.values()):
            return None
        new = {}
        for name, (_, accelerator) in tracker.items():
            stream_seed = _stream_seed(seed, rank, iteration)
            cpu = torch.Generator().manual_seed(stream_seed).get_state()
            new[name] = (cpu, _accelerator_state(stream_seed, accelerator))
        out.append(dict(copy.deepcopy({k: v for k, v in state.items()
                                       if k != "rng_tracker_states"}), rng_tracker_states=new))
    return out


def target_args(args, plan: ReshardPlan) -> argparse.Namespace:
    """The saved args for the target layout (a minimal set when the source has none)."""
    args = copy.copy(args) if args is not None else argparse.Namespace()
    args.tensor_model_parallel_size = plan.target_tp
    args.padded_vocab_size = plan.target_rows
    args.make_vocab_size_divisible_by = plan.make_vocab_size_divisible_by
    if plan.vocab_size_exact:
        args.vocab_size = plan.vocab_size
    if plan.num_attention_heads is not None:
        args.num_attention_heads = plan.num_attention_heads
    return args


def build_target_state(source, plan: ReshardPlan, rank: int, optimizer: bool = True) -> dict:
    """Target ``rank``'s whole ``model_optim_rng.pt`` dict."""
    first = source.state(0)
    state = {"args": target_args(source.args, plan),
             "checkpoint_version": legacy.CURRENT_VERSION,
             "iteration": int(first.get("iteration", first.get("total_iters", source.iteration))),
             "model": nested_state_dict(build_model_shard(source, plan, rank))}
    ids = _optimizer_ids(source, plan) if optimizer else None
    if ids is not None:
        state["optimizer"] = build_optimizer_shard(source, plan, rank, ids)
        for key in ("opt_param_scheduler", "lr_scheduler"):
            if key in first:
                state[key] = copy.deepcopy(first[key])
    if "rng_state" in first:
        rng = first["rng_state"]
        if plan.source_tp != plan.target_tp:
            rng = regenerate_rng_state(rng, getattr(source.args, "seed", 1234), rank,
                                       state["iteration"])
            if rng is None:
                logger.warning("unknown rng_state layout: dropped (load with --no-load-rng)")
            elif rank == 0:
                logger.info("regenerated the tensor-parallel RNG streams for TP=%d (the "
                            "saved ones belong to the old layout)", plan.target_tp)
        if rng is not None:
            state["rng_state"] = copy.deepcopy(rng)
    skip = {"args", "checkpoint_version", "iteration", "model", "optimizer", "rng_state",
            "opt_param_scheduler", "lr_scheduler", "total_iters"}
    state.update({k: copy.deepcopy(v) for k, v in first.items() if k not in skip})
    return state
