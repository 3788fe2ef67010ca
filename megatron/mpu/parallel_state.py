"""Tensor- and data-parallel process groups.

The state is one small frozen dataclass, :class:`ParallelState`, held in a single module variable
and set by :func:`initialize_model_parallel`. Megatron-LM's getter functions read it.

Layers never require this state: they take an optional ``process_group`` and fall back to the
state here through :func:`resolve_tensor_model_parallel_group`, which treats "nothing
initialised" as a group of one, so every layer also works as a plain single-process module.
"""

import datetime
import dataclasses
import logging
from typing import Optional, Tuple

import torch.distributed as dist

__all__ = [
    "ParallelState",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "destroy_model_parallel",
    "get_parallel_state",
    "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "get_tensor_model_parallel_src_rank",
    "get_tensor_model_parallel_ranks",
    "get_data_parallel_group",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
    "resolve_tensor_model_parallel_group",
    "group_size",
    "group_rank",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ParallelState:
    """The process groups this rank belongs to.

    Attributes:
        tensor_model_parallel_size: ranks per tensor-parallel group (p).
        data_parallel_size: number of tensor-parallel replicas (world size / p).
        tensor_model_parallel_group: the group this rank shares its layers' shards with.
        tensor_model_parallel_ranks: global ranks of that group, in group-rank order.
        data_parallel_group: the group of ranks holding the same shard (gradients reduce here).
        data_parallel_ranks: global ranks of that group, in group-rank order.
    """

    tensor_model_parallel_size: int
    data_parallel_size: int
    tensor_model_parallel_group: dist.ProcessGroup
    tensor_model_parallel_ranks: Tuple[int, ...]
    data_parallel_group: dist.ProcessGroup
    data_parallel_ranks: Tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.tensor_model_parallel_ranks) != self.tensor_model_parallel_size:
            raise ValueError(
                f"tensor_model_parallel_ranks {self.tensor_model_parallel_ranks} does not have "
                f"tensor_model_parallel_size {self.tensor_model_parallel_size} entries"
            )
        if len(self.data_parallel_ranks) != self.data_parallel_size:
            raise ValueError(
                f"data_parallel_ranks {self.data_parallel_ranks} does not have "
                f"data_parallel_size {self.data_parallel_size} entries"
            )


_STATE: Optional[ParallelState] = None


def tensor_and_data_parallel_ranks(
    world_size: int, tensor_model_parallel_size: int
) -> Tuple[Tuple[Tuple[int, ...], ...], Tuple[Tuple[int, ...], ...]]:
    """Return the rank lists of every tensor-parallel group and every data-parallel group.

    Pure function (no communication), used by :func:`initialize_model_parallel` and by tools that
    need the layout without a process group. See that function's docstring for a worked example.

    Raises:
        ValueError: if ``tensor_model_parallel_size`` is not positive or does not divide
            ``world_size``.
    """
    if tensor_model_parallel_size < 1:
        raise ValueError(
            f"tensor_model_parallel_size must be >= 1, got {tensor_model_parallel_size}"
        )
    if world_size % tensor_model_parallel_size != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by "
            f"tensor_model_parallel_size {tensor_model_parallel_size}"
        )
    tp = tensor_model_parallel_size
    dp = world_size // tp
    tp_groups = tuple(tuple(range(i * tp, (i + 1) * tp)) for i in range(dp))
    dp_groups = tuple(tuple(range(j, world_size, tp)) for j in range(tp))
    return tp_groups, dp_groups


def initialize_model_parallel(tensor_model_parallel_size: int = 1, *,
                              timeout: Optional[datetime.timedelta] = None) -> ParallelState:
    """Create the tensor- and data-parallel groups on an initialised ``torch.distributed``.

    Tensor-parallel groups are blocks of consecutive ranks, so with one process per device and
    devices numbered node by node, a tensor-parallel group (which all-reduces twice per layer in
    forward and twice in backward) stays inside a node. Data-parallel groups take one rank from
    each block.

    Worked example: 16 ranks (two nodes of 8 GPUs) with ``tensor_model_parallel_size=4`` give
    4 tensor-parallel groups and 4 data-parallel groups::

        tensor-parallel groups: [g0, g1, g2, g3]     [g4, g5, g6, g7]
                                [g8, g9, g10, g11]   [g12, g13, g14, g15]
        data-parallel groups:   [g0, g4, g8, g12]    [g1, g5, g9, g13]
                                [g2, g6, g10, g14]   [g3, g7, g11, g15]

    Rank g6 holds the third quarter (tensor-parallel rank 2) of the shards of the second model
    replica (data-parallel rank 1). Node 0 holds g0-g7, so both of its tensor-parallel groups
    communicate over the node's own links.

    Every rank must call this function, in the same order relative to other group creation.

    Args:
        tensor_model_parallel_size: number of ranks each layer is split over.
        timeout: how long a collective of the new groups may wait for a peer before it fails
            (``torch.distributed``'s default for the backend when ``None``; ``new_group`` does
            not inherit the timeout given to ``init_process_group``).

    Returns:
        The :class:`ParallelState` now in force.

    Raises:
        RuntimeError: if ``torch.distributed`` is not initialised, or if model parallelism is
            already initialised (call :func:`destroy_model_parallel` first).
        ValueError: if ``tensor_model_parallel_size`` does not divide the world size.
    """
    global _STATE
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "initialize_model_parallel() needs torch.distributed to be initialised first "
            "(torch.distributed.init_process_group)"
        )
    if _STATE is not None:
        raise RuntimeError(
            "model parallel is already initialized with tensor_model_parallel_size="
            f"{_STATE.tensor_model_parallel_size}; cannot initialise again with "
            f"tensor_model_parallel_size={tensor_model_parallel_size} "
            "(call destroy_model_parallel() first)"
        )
    world_size = dist.get_world_size()
    rank = dist.get_rank()
    tp_groups, dp_groups = tensor_and_data_parallel_ranks(world_size, tensor_model_parallel_size)

    # new_group is collective over the world: every rank creates every group, in the same order.
    my_tp_group = my_dp_group = None
    my_tp_ranks: Tuple[int, ...] = ()
    my_dp_ranks: Tuple[int, ...] = ()
    for ranks in dp_groups:
        group = dist.new_group(list(ranks), timeout=timeout)
        if rank in ranks:
            my_dp_group, my_dp_ranks = group, ranks
    for ranks in tp_groups:
        group = dist.new_group(list(ranks), timeout=timeout)
        if rank in ranks:
            my_tp_group, my_tp_ranks = group, ranks
    assert my_tp_group is not None and my_dp_group is not None

    _STATE = ParallelState(
        tensor_model_parallel_size=tensor_model_parallel_size,
        data_parallel_size=world_size // tensor_model_parallel_size,
        tensor_model_parallel_group=my_tp_group,
        tensor_model_parallel_ranks=my_tp_ranks,
        data_parallel_group=my_dp_group,
        data_parallel_ranks=my_dp_ranks,
    )
    logger.debug(
        "rank %d: tensor-parallel ranks %s, data-parallel ranks %s", rank, my_tp_ranks, my_dp_ranks
    )
    return _STATE


def model_parallel_is_initialized() -> bool:
    """Whether :func:`initialize_model_parallel` has run (and not been destroyed)."""
    return _STATE is not None


def destroy_model_parallel() -> None:
    """Forget the groups created by :func:`initialize_model_parallel` (safe to call twice).

    The groups themselves belong to ``torch.distributed``; they are released by
    ``torch.distributed.destroy_process_group()``.
    """
    global _STATE
    _STATE = None


def get_parallel_state() -> ParallelState:
    """Return the :class:`ParallelState`, raising ``RuntimeError`` if it is not initialised."""
    if _STATE is None:
        raise RuntimeError(
            "model parallel groups are not initialized: call "
            "megatron.mpu.initialize_model_parallel(tensor_model_parallel_size) after "
            "torch.distributed.init_process_group()"
        )
    return _STATE


def get_tensor_model_parallel_group() -> dist.ProcessGroup:
    """The tensor-parallel group of this rank."""
    return get_parallel_state().tensor_model_parallel_group


def get_data_parallel_group() -> dist.ProcessGroup:
    """The data-parallel group of this rank."""
    return get_parallel_state().data_parallel_group


def get_tensor_model_parallel_ranks() -> Tuple[int, ...]:
    """Global ranks of this rank's tensor-parallel group."""
    return get_parallel_state().tensor_model_parallel_ranks


def _single_process_or_raise(what: str) -> None:
    """Outside any process group a lone process is trivially rank 0 of a group of one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"{what}: torch.distributed runs {dist.get_world_size()} processes but model "
            "parallel groups are not initialized; call "
            "megatron.mpu.initialize_model_parallel(tensor_model_parallel_size)"
        )


def get_tensor_model_parallel_world_size() -> int:
    """Ranks per tensor-parallel group; 1 in a single process with nothing initialised."""
    if _STATE is None:
        _single_process_or_raise("get_tensor_model_parallel_world_size")
        return 1
    return _STATE.tensor_model_parallel_size


def get_tensor_model_parallel_rank() -> int:
    """This rank's index in its tensor-parallel group; 0 in an uninitialised single process."""
    if _STATE is None:
        _single_process_or_raise("get_tensor_model_parallel_rank")
        return 0
    return _STATE.tensor_model_parallel_ranks.index(dist.get_rank())


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of the first rank of this rank's tensor-parallel group (broadcast source)."""
    if _STATE is None:
        _single_process_or_raise("get_tensor_model_parallel_src_rank")
        return 0
    return _STATE.tensor_model_parallel_ranks[0]


def get_data_parallel_world_size() -> int:
    """Number of model replicas; 1 in an uninitialised single process."""
    if _STATE is None:
        _single_process_or_raise("get_data_parallel_world_size")
        return 1
    return _STATE.data_parallel_size


def get_data_parallel_rank() -> int:
    """This rank's index in its data-parallel group; 0 in an uninitialised single process."""
    if _STATE is None:
        _single_process_or_raise("get_data_parallel_rank")
        return 0
    return _STATE.data_parallel_ranks.index(dist.get_rank())


def resolve_tensor_model_parallel_group(
    process_group: Optional[dist.ProcessGroup] = None,
) -> Optional[dist.ProcessGroup]:
    """The group a layer should use: the one given, else the initialised tensor-parallel group.

    Returns ``None`` for "a group of one" when nothing is initialised in a single process.

    Raises:
        RuntimeError: when several processes run but no group was given or initialised (a
            silent fallback to unsharded layers would hide a launch mistake).
    """
    if process_group is not None:
        return process_group
    if _STATE is not None:
        return _STATE.tensor_model_parallel_group
    _single_process_or_raise("tensor-parallel layer without process_group")
    return None


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Size of ``group``; ``None`` stands for a group of one."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This process's rank in ``group``; ``None`` stands for a group of one."""
    return 0 if group is None else dist.get_rank(group)
