"""Checkpoints of older Megatron-LM versions: key names and the fused-QKV layout per version.

Megatron-LM stores ``checkpoint_version`` in every checkpoint since 2020; files without it are
version 0. The version decides the order of the fused query/key/value projection along its
output dimension, per tensor-parallel rank (``np`` heads on the rank, ``hn`` = head size)::

    0      [3, np, hn]    all queries, then all keys, then all values (split with stride 3)
    1.0    [np, hn, 3]    per head, q/k/v interleaved per channel
    2.0    [np, 3, hn]    per head: its query, its key, its value
    3.0    [np, 3, hn]    as 2.0; args say ``tensor_model_parallel_size``, not
                          ``model_parallel_size``; the encoder is saved as ``encoder``

Megatron-LM's ``fix_query_key_value_ordering`` reorders versions 0 and 1.0 to the 2.0 layout
after loading, rank by rank; so does :func:`normalize_model_state_dict`, before any resharding.
Key names changed too: ``language_model.transformer`` became ``language_model.encoder`` and
each layer's ``attention`` became ``self_attention`` (2021). NVIDIA's released Megatron-BERT 345M
checkpoints (``megatron_bert_345m_v0_1_{cased,uncased}.zip``) use the old names.
"""

import logging
import re
from typing import Dict, Optional

import torch

from megatron.model.bert_model import flat_state_dict

__all__ = ["CURRENT_VERSION", "DEFAULT_NUM_ATTENTION_HEADS", "SUPPORTED_VERSIONS",
           "check_version", "qkv_to_current_layout", "normalize_model_state_dict"]

logger = logging.getLogger(__name__)

CURRENT_VERSION = 3.0
# NVIDIA's released BERT-345M (24 layers, hidden 1024) has 16 heads; its files carry no args.
DEFAULT_NUM_ATTENTION_HEADS = 16
SUPPORTED_VERSIONS = (0.0, 1.0, 2.0, 3.0)
_OLD_ATTENTION = re.compile(r"^(language_model\.encoder\.layers\.\d+\.)attention\.")
_QKV = re.compile(r"\.(self_)?attention\.query_key_value\.(weight|bias)$")


def check_version(version, where: str) -> float:
    """``version`` as a float, or a ``ValueError`` naming ``where`` for an unknown one."""
    try:
        value = float(version)
    except (TypeError, ValueError):
        value = None
    if value not in SUPPORTED_VERSIONS:
        raise ValueError(f"{where}: unknown checkpoint_version {version!r}; this tool reads "
                         f"versions {', '.join(str(v) for v in SUPPORTED_VERSIONS)}")
    return value


def qkv_to_current_layout(tensor: torch.Tensor, version: float,
                          num_heads: int) -> torch.Tensor:
    """One rank's fused QKV weight or bias of ``version`` in the ``[np, 3, hn]`` layout.

    Args:
        tensor: ``[3 * np * hn, ...]``, this rank's shard.
        version: the checkpoint version (0, 1.0, 2.0 or 3.0).
        num_heads: heads on this rank (``np``).
    """
    rest = tuple(tensor.shape[1:])
    if version >= 2.0:
        return tensor
    if version == 1.0:
        per_head = tensor.reshape(num_heads, -1, 3, *rest).transpose(1, 2)  # [np, 3, hn, ...]
    else:
        per_head = tensor.reshape(3, num_heads, -1, *rest).transpose(0, 1)  # [np, 3, hn, ...]
    return per_head.reshape(-1, *rest).contiguous()


def normalize_model_state_dict(nested: dict, version: float,
                               num_heads_per_partition: Optional[int],
                               where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """One rank's saved ``model`` entry as our flat state dict of the current version.

    Renames ``transformer`` to ``encoder`` and ``attention`` to ``self_attention``, and puts
    the fused QKV tensors in the ``[np, 3, hn]`` layout.

    Args:
        nested: the ``model`` entry of the file (Megatron's nesting).
        version: its checkpoint version (see :func:`check_version`).
        num_heads_per_partition: attention heads on this rank; needed for versions below 2.0.
        where: the file, for messages.

    Raises:
        ValueError: when a version below 2.0 comes without a head count, or a QKV tensor does
            not split into that many heads.
    """
    if not isinstance(nested, dict):
        raise ValueError(f"{where}: 'model' is a {type(nested).__name__}, not a dict")
    flat = {}
    for key, value in flat_state_dict(nested).items():
        flat[_OLD_ATTENTION.sub(r"\1self_attention.", key)] = value
    if version >= 2.0:
        return flat
    if num_heads_per_partition is None:
        raise ValueError(f"{where}: checkpoint version {version:g} stores the fused QKV in an "
                         "older order; the number of attention heads is needed to reorder it "
                         "(--num-attention-heads)")
    for key in [k for k in flat if _QKV.search(k)]:
        value = flat[key]
        if value.shape[0] % (3 * num_heads_per_partition):
            raise ValueError(f"{where}: {key} of shape {tuple(value.shape)} does not split into "
                             f"3 x {num_heads_per_partition} heads")
        flat[key] = qkv_to_current_layout(value, version, num_heads_per_partition)
    logger.info("%s: reordered the fused QKV of checkpoint version %g to version %g", where,
                version, CURRENT_VERSION)
    return flat
