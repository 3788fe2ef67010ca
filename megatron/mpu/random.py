"""Random-number streams for tensor parallelism, and activation checkpointing that replays them.

Two streams matter:

* the *default* generator, seeded identically on every tensor-parallel rank. Weight
  initialisation draws full master weights from it (so every TP size starts identical), and
  dropout outside tensor-parallel regions (on replicated activations) uses it, so it is identical
  on every rank of a group.
* the ``model-parallel-rng`` stream of the tracker, seeded differently on every tensor-parallel
  rank. Dropout inside a tensor-parallel region (on sharded activations such as attention
  probabilities of this rank's heads) runs under ``get_rng_tracker().fork()`` so each shard gets
  its own mask.

Both streams cover the CPU generator and, when an accelerator is present, the current
accelerator's generator; nothing here names a particular device type.
"""

import contextlib
import logging
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from megatron.mpu.parallel_state import get_tensor_model_parallel_rank

__all__ = [
    "RNGStatesTracker",
    "CudaRNGStatesTracker",
    "get_rng_tracker",
    "get_cuda_rng_tracker",
    "model_parallel_manual_seed",
    "model_parallel_cuda_manual_seed",
    "checkpoint",
    "CheckpointFunction",
]

logger = logging.getLogger(__name__)

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
# Offset between the data-parallel seed and the tensor-parallel stream (Megatron's value), so
# that the tensor-parallel stream of rank 0 never equals the default stream.
_TENSOR_PARALLEL_SEED_OFFSET = 2718

RNGState = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _accelerator_module():
    """The ``torch.<device>`` module of the current accelerator, or ``None`` on CPU-only hosts."""
    if torch.accelerator.is_available():
        return torch.get_device_module(torch.accelerator.current_accelerator())
    return None


def _get_rng_state() -> RNGState:
    """Snapshot of the default CPU generator and the current accelerator's generator."""
    module = _accelerator_module()
    return torch.get_rng_state(), (module.get_rng_state() if module is not None else None)


def _set_rng_state(state: RNGState) -> None:
    cpu_state, accel_state = state
    torch.set_rng_state(cpu_state)
    module = _accelerator_module()
    if module is not None and accel_state is not None:
        module.set_rng_state(accel_state)


def _seeded_rng_state(seed: int) -> RNGState:
    """The generator states that ``seed`` produces, without disturbing the current ones."""
    saved = _get_rng_state()
    torch.manual_seed(seed)
    state = _get_rng_state()
    _set_rng_state(saved)
    return state


class RNGStatesTracker:
    """Named random-number streams that can be entered with :meth:`fork`.

    Each stream remembers where it stopped, so successive forks continue the same sequence while
    the default stream outside is left exactly where it was.
    """

    def __init__(self) -> None:
        self.states: Dict[str, RNGState] = {}
        self.seeds: set = set()

    def reset(self) -> None:
        """Forget every stream."""
        self.states = {}
        self.seeds = set()

    def get_states(self) -> Dict[str, RNGState]:
        """A copy of the streams' states (for checkpoints)."""
        return dict(self.states)

    def set_states(self, states: Dict[str, RNGState]) -> None:
        """Replace the streams' states (from :meth:`get_states`)."""
        self.states = dict(states)

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed``.

        Raises:
            ValueError: if the name or the seed is already in use.
        """
        if seed in self.seeds:
            raise ValueError(f"seed {seed} already exists in the RNG tracker")
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists in the RNG tracker")
        self.seeds.add(seed)
        self.states[name] = _seeded_rng_state(seed)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the block with stream ``name`` as the default generator, then switch back.

        Raises:
            KeyError: if no stream of that name was added (seed with
                :func:`model_parallel_manual_seed`).
        """
        if name not in self.states:
            raise KeyError(
                f"RNG state {name!r} is not in the tracker; call "
                "megatron.mpu.model_parallel_manual_seed(seed) first"
            )
        outside = _get_rng_state()
        _set_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_rng_state()
            _set_rng_state(outside)


# Megatron-LM's name for the same class.
CudaRNGStatesTracker = RNGStatesTracker

_RNG_STATE_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker."""
    return _RNG_STATE_TRACKER


get_cuda_rng_tracker = get_rng_tracker


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default generator with ``seed`` and the tensor-parallel stream per rank.

    Every rank's default generator gets ``seed`` (identical across the tensor-parallel group, so
    initialisation and replicated dropout agree); the tracker's ``model-parallel-rng`` stream gets
    ``seed + 2718 + tensor_model_parallel_rank``. Data-parallel replicas that should see different
    data draws are seeded by the caller with different ``seed`` values if needed.

    Args:
        seed: the base seed.
    """
    tensor_parallel_seed = seed + _TENSOR_PARALLEL_SEED_OFFSET + get_tensor_model_parallel_rank()
    logger.debug("default seed %d, tensor-parallel seed %d", seed, tensor_parallel_seed)
    torch.manual_seed(seed)
    _RNG_STATE_TRACKER.reset()
    _RNG_STATE_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, tensor_parallel_seed)


model_parallel_cuda_manual_seed = model_parallel_manual_seed


class CheckpointFunction(torch.autograd.Function):
    """Run ``function`` without keeping its activations; recompute them in backward.

    The default generator and every tracker stream are saved before the forward and restored for
    the recomputation, so dropout masks are the same both times and gradients are exact.
    """

    @staticmethod
    def forward(ctx, function, *args):
        ctx.function = function
        ctx.rng_state = _get_rng_state()
        ctx.tracker_states = _RNG_STATE_TRACKER.get_states()
        with torch.no_grad():
            outputs = function(*args)
        tensor_indices = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.tensor_indices = tensor_indices
        ctx.inputs = [None if torch.is_tensor(a) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in tensor_indices))
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "mpu.checkpoint is incompatible with torch.autograd.grad(); use .backward()"
            )
        inputs = list(ctx.inputs)
        for index, tensor in zip(ctx.tensor_indices, ctx.saved_tensors):
            detached = tensor.detach()
            detached.requires_grad_(tensor.requires_grad)
            inputs[index] = detached

        # Replay the forward's random streams, then put back the ones backward started with.
        outside_rng = _get_rng_state()
        outside_tracker = _RNG_STATE_TRACKER.get_states()
        _set_rng_state(ctx.rng_state)
        _RNG_STATE_TRACKER.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.function(*inputs)
        finally:
            _set_rng_state(outside_rng)
            _RNG_STATE_TRACKER.set_states(outside_tracker)

        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, grad_outputs)
            if torch.is_tensor(out) and out.requires_grad and grad is not None
        ]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        grads = tuple(
            inp.grad if torch.is_tensor(inp) and inp.requires_grad else None for inp in inputs
        )
        return (None,) + grads


def checkpoint(function, *args: Any):
    """Activation checkpointing: ``function(*args)`` now, recomputed during backward.

    Args:
        function: a callable of tensors (and other arguments) returning a tensor or a tuple.
        *args: its arguments; tensors among them are saved, activations inside are not.

    Returns:
        What ``function`` returns.
    """
    if torch.is_grad_enabled() and not any(torch.is_tensor(a) and a.requires_grad for a in args):
        # Same caveat as torch.utils.checkpoint(use_reentrant=True): backward would never reach
        # this node, so parameters used inside would silently get no gradient.
        logger.warning("mpu.checkpoint: no input requires grad; parameters inside get no gradient")
    return CheckpointFunction.apply(function, *args)
