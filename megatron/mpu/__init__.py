"""Tensor model parallelism (Megatron-LM's ``mpu``), depending on torch alone.

Parallel state, the four conjugate communication mappings, column/row-parallel linear layers, a
vocabulary-parallel embedding and cross-entropy, random-number streams with activation
checkpointing, batch broadcasting and gradient clipping.
"""

from megatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from megatron.mpu.data import broadcast_data
from megatron.mpu.grads import clip_grad_norm, get_grad_norm
from megatron.mpu.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_tensor_model_parallel_attributes,
    linear_with_grad_async_allreduce,
    param_is_not_tensor_parallel_duplicate,
    set_defaults_if_not_set_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
)
from megatron.mpu.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.mpu.parallel_state import (
    ParallelState,
    destroy_model_parallel,
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_parallel_state,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_ranks,
    get_tensor_model_parallel_src_rank,
    get_tensor_model_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
    tensor_and_data_parallel_ranks,
)
from megatron.mpu.random import (
    CudaRNGStatesTracker,
    RNGStatesTracker,
    checkpoint,
    get_cuda_rng_tracker,
    get_rng_tracker,
    model_parallel_cuda_manual_seed,
    model_parallel_manual_seed,
)
from megatron.mpu.utils import (
    VocabUtility,
    divide,
    ensure_divisibility,
    merge_partitions_with_stride,
    split_tensor_along_dim_with_stride,
    split_tensor_along_last_dim,
)

__all__ = [
    # parallel state
    "ParallelState",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "destroy_model_parallel",
    "get_parallel_state",
    "tensor_and_data_parallel_ranks",
    "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "get_tensor_model_parallel_src_rank",
    "get_tensor_model_parallel_ranks",
    "get_data_parallel_group",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
    # mappings
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    # layers
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "set_tensor_model_parallel_attributes",
    "set_defaults_if_not_set_tensor_model_parallel_attributes",
    "copy_tensor_model_parallel_attributes",
    "param_is_not_tensor_parallel_duplicate",
    "linear_with_grad_async_allreduce",
    # loss
    "vocab_parallel_cross_entropy",
    # random
    "RNGStatesTracker",
    "CudaRNGStatesTracker",
    "get_rng_tracker",
    "get_cuda_rng_tracker",
    "model_parallel_manual_seed",
    "model_parallel_cuda_manual_seed",
    "checkpoint",
    # data and gradients
    "broadcast_data",
    "clip_grad_norm",
    "get_grad_norm",
    # utilities
    "divide",
    "ensure_divisibility",
    "split_tensor_along_last_dim",
    "split_tensor_along_dim_with_stride",
    "merge_partitions_with_stride",
    "VocabUtility",
]
