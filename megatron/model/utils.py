"""Initialisers and small fused pieces shared by the model's modules."""

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "init_method_normal",
    "scaled_init_method_normal",
    "LayerNorm",
    "bias_gelu",
    "bias_dropout_add",
    "get_linear_layer",
]


def init_method_normal(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``N(0, sigma)`` initialisation (Megatron's default for BERT, sigma 0.02)."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=sigma)

    return init_


def scaled_init_method_normal(
    sigma: float, num_layers: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``N(0, sigma / sqrt(2 * num_layers))`` for the output projection of each sublayer."""
    return init_method_normal(sigma / math.sqrt(2.0 * num_layers))


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are computed in fp32 whatever the input dtype.

    Parameters stay in the model's dtype (as Megatron's mixed-precision LayerNorm); the result is
    cast back to the input's dtype. In fp32 this is exactly ``nn.LayerNorm``.
    """

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if input_.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.layer_norm(input_, self.normalized_shape, self.weight, self.bias, self.eps)
        output = F.layer_norm(input_.float(), self.normalized_shape, self.weight.float(),
                              self.bias.float(), self.eps)
        return output.to(input_.dtype)


def bias_gelu(bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)`` with the exact (erf) GeLU, as BERT and Hugging Face's ``gelu``."""
    return F.gelu(x + bias)


def bias_dropout_add(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, prob: float, training: bool
) -> torch.Tensor:
    """``residual + dropout(x + bias)``: the end of every sublayer."""
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=prob, training=training)


def get_linear_layer(
    rows: int, columns: int, init_method: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype = torch.float32, device=None,
) -> nn.Linear:
    """A replicated ``nn.Linear(rows, columns)`` with ``init_method`` weights and zero bias.

    Only ``init_method`` draws random numbers (``nn.Linear``'s own initialisation is skipped).

    The weight is drawn in fp32 on the CPU from the default generator (identical on every
    tensor-parallel rank) and then cast, like the parallel layers' master weights.
    """
    layer = nn.utils.skip_init(nn.Linear, rows, columns, dtype=dtype, device=device or "cpu")
    master = torch.empty(columns, rows, dtype=torch.float32)
    init_method(master)
    with torch.no_grad():
        layer.weight.copy_(master)
        layer.bias.zero_()
    return layer
