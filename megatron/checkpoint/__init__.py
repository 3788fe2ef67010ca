"""Checkpoint tools: change the tensor-parallel size, convert to and from Hugging Face.

* :func:`load_model_state_dict`: one rank's weights from a checkpoint of any TP size (for
  ``--pretrained-checkpoint``);
* :func:`reshard_checkpoint`: a whole checkpoint (weights, optimizer, args, RNG) at another TP
  size, streamed with bounded memory (``tools/checkpoint_util.py``);
* :func:`reshard_states` and friends: the same as pure functions on loaded state dicts;
* :mod:`megatron.checkpoint.hf`: export to / import from Hugging Face ``MegatronBert*``;
* :mod:`megatron.checkpoint.legacy`: older checkpoint versions and NVIDIA's released zips.

Every function raises :class:`megatron.training.checkpointing.CheckpointError` with a message
naming the file, key and shapes at fault.
"""

from megatron.checkpoint.reader import CheckpointSource
from megatron.checkpoint.reshard import (
    load_model_state_dict,
    merge_model_state_dicts,
    reshard_checkpoint,
    reshard_model_state_dicts,
    reshard_states,
)
from megatron.training.checkpointing import CheckpointError

__all__ = [
    "CheckpointError",
    "CheckpointSource",
    "load_model_state_dict",
    "merge_model_state_dicts",
    "reshard_checkpoint",
    "reshard_model_state_dicts",
    "reshard_states",
]
