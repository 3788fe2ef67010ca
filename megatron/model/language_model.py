"""Embeddings, the transformer encoder and the pooler: the trunk shared by every BERT head."""

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from megatron import mpu
from megatron.model.config import BertConfig
from megatron.model.transformer import ParallelTransformer
from megatron.model.utils import get_linear_layer

__all__ = ["Embedding", "Pooler", "TransformerLanguageModel", "parallel_lm_logits"]

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def _real_rows_init(init_method: InitMethod, vocab_size: int) -> InitMethod:
    """Draw only the ``vocab_size`` real rows; padding rows are zero.

    The random stream then advances by the same amount at every tensor-parallel size (whose
    padded sizes differ), so every later parameter is drawn identically too.
    """

    def init_(master: torch.Tensor) -> torch.Tensor:
        init_method(master[:vocab_size])
        master[vocab_size:].zero_()
        return master

    return init_


def _replicated_embedding(num: int, dim: int, init_method: InitMethod, dtype) -> nn.Embedding:
    embedding = nn.utils.skip_init(nn.Embedding, num, dim, dtype=dtype)
    master = torch.empty(num, dim, dtype=torch.float32)
    init_method(master)
    with torch.no_grad():
        embedding.weight.copy_(master)
    return embedding


def parallel_lm_logits(
    input_: torch.Tensor, word_embeddings_weight: torch.Tensor, bias: Optional[torch.Tensor],
    process_group=None,
) -> torch.Tensor:
    """Logits against the (vocabulary-parallel) word embeddings: ``[*, h] -> [*, V/p]``.

    The input is replicated; its gradient is all-reduced over the group in backward, overlapped
    with the weight-gradient matmul.
    """
    return mpu.linear_with_grad_async_allreduce(input_, word_embeddings_weight, bias,
                                                process_group)


class Embedding(nn.Module):
    """Word (vocabulary-parallel), learned position and token-type embeddings, then dropout."""

    def __init__(self, config: BertConfig, init_method: InitMethod, process_group=None) -> None:
        super().__init__()
        dtype = config.params_dtype
        self.word_embeddings = mpu.VocabParallelEmbedding(
            config.padded_vocab_size, config.hidden_size,
            init_method=_real_rows_init(init_method, config.vocab_size),
            params_dtype=dtype, process_group=process_group)
        self.position_embeddings = _replicated_embedding(
            config.max_position_embeddings, config.hidden_size, init_method, dtype)
        self.tokentype_embeddings = (
            _replicated_embedding(config.num_tokentypes, config.hidden_size, init_method, dtype)
            if config.num_tokentypes > 0 else None)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.max_position_embeddings = config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                tokentype_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S = input_ids.shape
        if S > self.max_position_embeddings:
            raise ValueError(f"sequence length {S} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).unsqueeze(0)  # [1, s]
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if self.tokentype_embeddings is not None:
            if tokentype_ids is None:  # as Hugging Face: segment 0 everywhere
                embeddings = embeddings + self.tokentype_embeddings.weight[0]
            else:
                embeddings = embeddings + self.tokentype_embeddings(tokentype_ids)
        elif tokentype_ids is not None:
            raise ValueError("tokentype_ids given but the model has num_tokentypes=0")
        return self.embedding_dropout(embeddings)  # [b, s, h]


class Pooler(nn.Module):
    """``tanh(dense(hidden[:, 0]))``: the representation of the ``[CLS]`` token."""

    def __init__(self, hidden_size: int, init_method: InitMethod, dtype=torch.float32) -> None:
        super().__init__()
        self.dense = get_linear_layer(hidden_size, hidden_size, init_method, dtype)

    def forward(self, hidden_states: torch.Tensor, sequence_index: int = 0) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, sequence_index, :]))  # [b, h]


class TransformerLanguageModel(nn.Module):
    """Embedding -> pre-LN transformer encoder -> (optional) pooler.

    Args:
        config: the model configuration.
        init_method: initialiser of most weights.
        output_layer_init_method: initialiser of each sublayer's output projection.
        add_pooler: build the pooler.
        process_group: tensor-parallel group (default: the initialised one, or none).
    """

    def __init__(self, config: BertConfig, init_method: InitMethod,
                 output_layer_init_method: InitMethod, add_pooler: bool,
                 process_group=None) -> None:
        super().__init__()
        self.embedding = Embedding(config, init_method, process_group)
        self.encoder = ParallelTransformer(config, init_method, output_layer_init_method,
                                           process_group)
        self.pooler = (Pooler(config.hidden_size, init_method, config.params_dtype)
                       if add_pooler else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                tokentype_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, first_token_only: bool = False,
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Encode ``[b, s]`` token ids; ``attention_mask`` ``[b, s]`` is 1 for tokens, 0 for pads.

        ``first_token_only``: the caller reads position 0 only (the pooled ``[CLS]``), so the
        last layer computes that position alone and ``hidden_states`` is ``[b, 1, h]``.

        Returns:
            ``(hidden_states [b, s, h], pooled_output [b, h] or None)``.
        """
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s]: keys to attend
        hidden_states = self.embedding(input_ids, position_ids, tokentype_ids)
        hidden_states = self.encoder(hidden_states, mask, first_token_only=first_token_only)
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        return hidden_states, pooled
