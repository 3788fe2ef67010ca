"""Pre-LayerNorm transformer encoder built from tensor-parallel layers.

Shapes are batch-first: ``[b, s, h]`` for the residual stream. Per layer and per direction the
only communication is one all-reduce after attention and one after the MLP (row-parallel
outputs), plus their conjugates for the column-parallel inputs in backward.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron import mpu
from megatron.model.config import BertConfig
from megatron.model.utils import LayerNorm, bias_dropout_add, bias_gelu

__all__ = ["ParallelMLP", "ParallelAttention", "ParallelTransformerLayer", "ParallelTransformer"]

InitMethod = Callable[[torch.Tensor], torch.Tensor]


class ParallelMLP(nn.Module):
    """``h -> ffn`` (column-parallel) -> GeLU -> ``ffn -> h`` (row-parallel).

    Returns the output before its bias, and the bias, so the caller fuses bias, dropout and
    residual in one expression.
    """

    def __init__(self, config: BertConfig, init_method: InitMethod,
                 output_layer_init_method: InitMethod, process_group=None) -> None:
        super().__init__()
        common = dict(params_dtype=config.params_dtype, process_group=process_group)
        self.dense_h_to_4h = mpu.ColumnParallelLinear(
            config.hidden_size, config.ffn_hidden_size, gather_output=False,
            init_method=init_method, skip_bias_add=True, **common)
        self.dense_4h_to_h = mpu.RowParallelLinear(
            config.ffn_hidden_size, config.hidden_size, input_is_parallel=True,
            init_method=output_layer_init_method, skip_bias_add=True, **common)

    def forward(self, hidden_states: torch.Tensor):
        intermediate, bias = self.dense_h_to_4h(hidden_states)  # [b, s, ffn/p]
        intermediate = bias_gelu(bias, intermediate)
        return self.dense_4h_to_h(intermediate)  # ([b, s, h], bias)


class ParallelAttention(nn.Module):
    """Self-attention over this rank's heads, with one fused QKV projection.

    The QKV weight's output dimension is laid out per head, ``[num_heads, 3, head_dim]``
    (Megatron's checkpoint version 3.0), so a contiguous split over ranks gives each rank whole
    heads with their query, key and value together.
    """

    def __init__(self, config: BertConfig, init_method: InitMethod,
                 output_layer_init_method: InitMethod, process_group=None) -> None:
        super().__init__()
        group = mpu.parallel_state.resolve_tensor_model_parallel_group(process_group)
        world_size = mpu.parallel_state.group_size(group)
        self.num_attention_heads_per_partition = mpu.divide(
            config.num_attention_heads, world_size,
            "num_attention_heads / tensor_model_parallel_size")
        self.hidden_size_per_attention_head = config.kv_channels
        self.attention_dropout = config.attention_dropout
        common = dict(params_dtype=config.params_dtype, process_group=group)
        self.query_key_value = mpu.ColumnParallelLinear(
            config.hidden_size, 3 * config.hidden_size, gather_output=False,
            init_method=init_method, **common)
        self.dense = mpu.RowParallelLinear(
            config.hidden_size, config.hidden_size, input_is_parallel=True,
            init_method=output_layer_init_method, skip_bias_add=True, **common)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                first_query_only: bool = False):
        """``attention_mask``: ``[b, 1, 1, s]`` boolean, True where a key may be attended.

        ``first_query_only``: attend from position 0 only (every position is still a key and a
        value); the output is ``[b, 1, h]``. What a classifier needs of the last layer.
        """
        B, S, _ = hidden_states.shape
        heads = self.num_attention_heads_per_partition
        head_dim = self.hidden_size_per_attention_head
        mixed, _ = self.query_key_value(hidden_states)  # [b, s, 3h/p]
        query, key, value = mixed.view(B, S, heads, 3, head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        # query, key, value: [b, heads/p, s, head_dim]
        if first_query_only:
            query, S = query[:, :, :1], 1  # [b, heads/p, 1, head_dim]
        if self.training and self.attention_dropout > 0.0:
            with mpu.get_rng_tracker().fork():  # this rank's heads get their own dropout masks
                context = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=attention_mask, dropout_p=self.attention_dropout)
        else:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        context = context.transpose(1, 2).reshape(B, S, heads * head_dim)  # [b, s, h/p]
        return self.dense(context)  # ([b, s, h], bias)


class ParallelTransformerLayer(nn.Module):
    """``x + attn(ln(x))`` then ``x + mlp(ln(x))``, each with dropout on the sublayer output."""

    def __init__(self, config: BertConfig, init_method: InitMethod,
                 output_layer_init_method: InitMethod, process_group=None) -> None:
        super().__init__()
        ln = dict(eps=config.layernorm_epsilon, dtype=config.params_dtype)
        self.input_layernorm = LayerNorm(config.hidden_size, **ln)
        self.self_attention = ParallelAttention(config, init_method, output_layer_init_method,
                                                process_group)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, **ln)
        self.mlp = ParallelMLP(config, init_method, output_layer_init_method, process_group)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                first_token_only: bool = False):
        """``[b, s, h]`` -> ``[b, s, h]`` (``[b, 1, h]``, position 0 only, with
        ``first_token_only``)."""
        attention_output, attention_bias = self.self_attention(
            self.input_layernorm(hidden_states), attention_mask, first_query_only=first_token_only)
        if first_token_only:
            hidden_states = hidden_states[:, :1]  # [b, 1, h]
        hidden_states = bias_dropout_add(attention_output, attention_bias, hidden_states,
                                         self.hidden_dropout, self.training)
        mlp_output, mlp_bias = self.mlp(self.post_attention_layernorm(hidden_states))
        return bias_dropout_add(mlp_output, mlp_bias, hidden_states, self.hidden_dropout,
                                self.training)


class ParallelTransformer(nn.Module):
    """A stack of :class:`ParallelTransformerLayer` and a final LayerNorm.

    With ``config.recompute_activations`` each layer runs under :func:`megatron.mpu.checkpoint`
    in training: only its input is kept, and it is recomputed (with the same dropout masks) in
    backward.
    """

    def __init__(self, config: BertConfig, init_method: InitMethod,
                 output_layer_init_method: InitMethod, process_group=None) -> None:
        super().__init__()
        self.recompute_activations = config.recompute_activations
        self.layers = nn.ModuleList(
            ParallelTransformerLayer(config, init_method, output_layer_init_method, process_group)
            for _ in range(config.num_layers)
        )
        self.final_layernorm = LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                         dtype=config.params_dtype)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                first_token_only: bool = False):
        """``[b, s, h]`` -> ``[b, s, h]``.

        ``first_token_only``: return ``[b, 1, h]``, the output at position 0 only. The last
        layer then computes its attention query, output projection and MLP for that position
        alone (its keys and values still cover every position), which is all a ``[CLS]``
        classifier reads; the result at position 0 is the same.
        """
        recompute = self.recompute_activations and self.training and torch.is_grad_enabled()
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            first = first_token_only and index == last
            if recompute:
                hidden_states = mpu.checkpoint(layer, hidden_states, attention_mask, first)
            else:
                hidden_states = layer(hidden_states, attention_mask, first)
        return self.final_layernorm(hidden_states)
