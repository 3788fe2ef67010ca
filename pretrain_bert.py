"""Pretrain BERT (masked LM + sentence order) with tensor and data parallelism.

    torchrun --nproc_per_node 8 pretrain_bert.py --tensor-model-parallel-size 8 \\
        --num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 512 ...

With no ``--data-path`` it runs a small demo: a tiny BERT on the Shakespeare sample and the
vocabulary that ship in ``data/`` (tokenized on first use into ``runs/demo/``, or
``$MEGATRON_DEMO_DIR``), a few hundred steps on CPU, saving a checkpoint at the end. Any flag
given still overrides the demo's values.
"""

import functools
import os
import sys

import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.data.dataset_utils import build_train_valid_test_datasets
from megatron.model import BertModel
from megatron.tokenizer import build_tokenizer
from megatron.training import arguments
from megatron.training.errors import exit_on_error
from megatron.training.training import pretrain
from megatron.training.utils import configure_console, print_rank_0

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DIR = os.environ.get("MEGATRON_DEMO_DIR", os.path.join(ROOT, "runs", "demo"))
DEMO_CORPUS = os.path.join(ROOT, "data", "shakespeare_tiny.jsonl")
DEMO_PREFIX = os.path.join(DEMO_DIR, "data", "shakespeare_text_sentence")
DEMO_DEFAULTS = dict(
    num_layers=2, hidden_size=128, num_attention_heads=4, seq_length=128,
    max_position_embeddings=128, micro_batch_size=16, train_iters=300, lr=1e-3, min_lr=1e-5,
    lr_warmup_fraction=0.05, lr_decay_style="linear", data_path=[DEMO_PREFIX], split="949,50,1",
    vocab_file=os.path.join(ROOT, "data", "bert-large-uncased-vocab.txt"),
    tokenizer_type="BertWordPieceLowerCase", save=os.path.join(DEMO_DIR, "checkpoints"),
    log_interval=25, eval_interval=100, eval_iters=4, num_workers=0)

BATCH_KEYS = ["text", "types", "labels", "is_random", "loss_mask", "padding_mask"]


def model_provider(args, vocab_size: int, pre_process: bool = True, post_process: bool = True):
    """This rank's shard of the BERT model."""
    config = arguments.bert_config_from_args(args, vocab_size)
    # Both sizes go into checkpoints: the tools strip the padding back to vocab_size.
    args.vocab_size, args.padded_vocab_size = vocab_size, config.padded_vocab_size
    return BertModel(config)


def get_batch(data_iterator, device: torch.device):
    """A micro-batch from tensor-parallel rank 0, broadcast to the other ranks of its group."""
    data = next(data_iterator) if data_iterator is not None else None
    batch = mpu.broadcast_data(BATCH_KEYS, data, torch.int64)
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    return (batch["text"], batch["types"], batch["is_random"], batch["loss_mask"].float(),
            batch["labels"], batch["padding_mask"])


def loss_func(loss_mask, sentence_order, binary_name: str, output_tensor):
    """Masked-LM loss over the masked positions, plus the binary (SOP/NSP) loss."""
    lm_loss_per_token, binary_logits = output_tensor
    lm_loss = torch.sum(lm_loss_per_token.float() * loss_mask) / loss_mask.sum().clamp(min=1)
    if binary_logits is None:
        return lm_loss, {"lm loss": lm_loss.detach()}
    binary_loss = F.cross_entropy(binary_logits.float(), sentence_order.view(-1))
    return lm_loss + binary_loss, {"lm loss": lm_loss.detach(),
                                   f"{binary_name} loss": binary_loss.detach()}


def forward_step(data_iterator, model, *, args):
    """Forward one micro-batch; return the output and the function that makes the loss."""
    device = next(model.parameters()).device
    tokens, types, sentence_order, loss_mask, lm_labels, padding_mask = get_batch(
        data_iterator, device)
    output = model(tokens, padding_mask, tokentype_ids=types if args.bert_binary_head else None,
                   lm_labels=lm_labels, loss_mask=loss_mask)
    return output, functools.partial(loss_func, loss_mask, sentence_order,
                                     args.bert_binary_head_mode)


def train_valid_test_datasets_provider(train_val_test_num_samples, *, args, tokenizer):
    """Train, valid and test BERT datasets (the demo tokenizes its corpus on first use)."""
    if args.data_path == [DEMO_PREFIX] and not os.path.exists(DEMO_PREFIX + ".idx"):
        from megatron.data.preprocess import PreprocessConfig, preprocess

        os.makedirs(os.path.dirname(DEMO_PREFIX), exist_ok=True)
        preprocess(PreprocessConfig(
            input=DEMO_CORPUS, output_prefix=DEMO_PREFIX[:-len("_text_sentence")],
            tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
            split_sentences=True))
        print_rank_0(f"demo: tokenized {DEMO_CORPUS} into {DEMO_PREFIX}.{{bin,idx}}")
    return build_train_valid_test_datasets(
        args.data_path, args.data_impl, args.split, train_val_test_num_samples,
        max_seq_length=args.seq_length, masked_lm_prob=args.mask_prob,
        short_seq_prob=args.short_seq_prob, seed=args.seed, skip_warmup=not args.mmap_warmup,
        binary_head=args.bert_binary_head, tokenizer=tokenizer,
        binary_head_mode=args.bert_binary_head_mode, cache_dir=args.data_cache_path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    demo = not any(arg == "--data-path" or arg.startswith("--data-path=") for arg in argv)
    args = arguments.parse_args(argv, defaults=DEMO_DEFAULTS if demo else None)
    configure_console()
    if demo:
        print_rank_0(f"demo: no --data-path given; training a tiny BERT on {DEMO_CORPUS}")
    tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file,
                                tokenizer_model=args.tokenizer_model,
                                vocab_extra_ids=args.vocab_extra_ids)
    result = pretrain(
        functools.partial(train_valid_test_datasets_provider, args=args, tokenizer=tokenizer),
        functools.partial(model_provider, args, tokenizer.vocab_size),
        functools.partial(forward_step, args=args), args)
    if demo and result.losses:
        first, last = result.losses[0]["lm loss"], result.losses[-1]["lm loss"]
        print_rank_0(f"demo: lm loss went from {first:.2f} to {last:.2f} in {len(result.losses)} "
                     f"iterations; checkpoint saved in {result.checkpoint}")
    return result


if __name__ == "__main__":
    with exit_on_error("pretrain_bert.py"):
        main()
