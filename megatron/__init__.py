"""megatron-bert: tensor-parallel BERT pretraining and finetuning in the style of Megatron-LM."""

__version__ = "0.1.0"
