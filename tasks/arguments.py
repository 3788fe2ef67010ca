"""Command line of ``tasks/main.py``: Megatron-LM's task flags on top of the training flags.

The model's shape comes from the checkpoint being finetuned (``--load`` when it holds a
checkpoint, else ``--pretrained-checkpoint``): number of layers, hidden and FFN sizes, heads,
positions, vocabulary padding, LayerNorm epsilon and the tokenizer. A shape flag given on the
command line that disagrees with the checkpoint is an error naming both values; the tokenizer
flags may override the checkpoint's (its vocabulary file may live elsewhere on this machine).
Without a checkpoint (training from random initialisation) the shape flags are required.
"""

import argparse
import logging
import os
from typing import Optional, Sequence, Set

import torch

from megatron.model.config import vocab_size_with_padding
from megatron.training import arguments
from megatron.training.arguments import ArgumentError
from megatron.training.checkpointing import CheckpointError, find_checkpoint, get_checkpoint_name

__all__ = ["ALL_TASKS", "ARCHITECTURE_KEYS", "TOKENIZER_KEYS", "add_task_args",
           "apply_checkpoint_architecture", "check_vocab_size", "explicit_flags",
           "parse_task_args", "read_checkpoint_args", "set_schedule", "validate_task_args"]

logger = logging.getLogger(__name__)

GLUE = ("MNLI", "QQP", "SST-2", "CoLA", "MRPC", "STS-B", "QNLI", "RTE", "WNLI")
ALL_TASKS = GLUE + ("RACE",)
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "max_position_embeddings", "make_vocab_size_divisible_by",
                     "layernorm_epsilon", "vocab_extra_ids")
TOKENIZER_KEYS = ("tokenizer_type", "vocab_file", "tokenizer_model")


def add_task_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's ``tasks/main.py`` flags."""
    group = parser.add_argument_group("tasks")
    group.add_argument("--task", default=None, help=f"one of {', '.join(ALL_TASKS)}")
    group.add_argument("--epochs", type=int, default=None,
                       help="passes over the training data (0: evaluate/predict only)")
    group.add_argument("--pretrained-checkpoint", default=None,
                       help="checkpoint directory to start from (its language model weights)")
    group.add_argument("--train-data", nargs="+", default=None,
                       help="training files (GLUE) or directories (RACE)")
    group.add_argument("--valid-data", nargs="*", default=None,
                       help="validation sets, each evaluated and reported on its own")
    group.add_argument("--test-data", nargs="*", default=None,
                       help="files to write predictions for (with --predict)")
    group.add_argument("--predict", action="store_true",
                       help="write predictions for --test-data in GLUE's submission layout "
                            "into SAVE/predictions/")
    group.add_argument("--eval-micro-batch-size", type=int, default=None,
                       help="samples per evaluation forward (default: --micro-batch-size)")
    return parser


def explicit_flags(argv: Sequence[str]) -> Set[str]:
    """Destinations of the flags that ``argv`` gives explicitly (not by default)."""
    parser = arguments.build_parser(add_task_args)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv))))


def parse_task_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` (no validation yet); ``args.explicit`` holds the flags given."""
    args = arguments.parse_args(list(argv), add_task_args, validate=False)
    args.explicit = explicit_flags(argv)
    if args.task is None:
        raise ArgumentError(f"missing required argument: --task (one of {', '.join(ALL_TASKS)})")
    if args.task not in ALL_TASKS:
        raise ArgumentError(f"unknown --task {args.task!r}; choose one of {', '.join(ALL_TASKS)}")
    return args


def read_checkpoint_args(load_dir: str, iteration: Optional[int] = None
                         ) -> Optional[argparse.Namespace]:
    """The arguments stored in the latest checkpoint of ``load_dir`` (``None``: no tracker).

    ``iteration`` reads that iteration instead (``--ckpt-step``).

    Only the stored args are read: the file is memory-mapped, so its tensors are not loaded.

    Raises:
        CheckpointError: for a broken tracker, an unreadable file or a file without args.
    """
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint directory {load_dir} does not exist")
    found = find_checkpoint(load_dir, iteration)
    if found is None:
        return None
    iteration, release, _ = found
    path = get_checkpoint_name(load_dir, iteration, release, 0)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # truncated or foreign files raise many kinds of errors
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(error).__name__}: "
                              f"{error}") from error
    saved = state.get("args") if isinstance(state, dict) else None
    if saved is None:
        raise CheckpointError(f"{path} stores no args: the model's shape is unknown; give the "
                              "shape flags and load its weights with --load --finetune")
    return saved


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def apply_checkpoint_architecture(args: argparse.Namespace, saved: argparse.Namespace,
                                  source: str) -> None:
    """Take the model's shape and tokenizer from ``saved`` (a checkpoint's args), in place.

    Raises:
        ArgumentError: for a shape flag given explicitly with another value than the checkpoint's.
    """
    for key in ARCHITECTURE_KEYS:
        value = getattr(saved, key, None)
        if value is None:
            continue
        if key in args.explicit and getattr(args, key) != value:
            raise ArgumentError(f"{_flag(key)} {getattr(args, key)} disagrees with the checkpoint "
                                f"{source}, which has {key} {value}; leave the flag out")
        setattr(args, key, value)
    for key in TOKENIZER_KEYS:
        value = getattr(saved, key, None)
        if key in args.explicit:
            if value is not None and getattr(args, key) != value:
                logger.warning("%s %s overrides the checkpoint's %s", _flag(key),
                               getattr(args, key), value)
        elif value is not None:
            setattr(args, key, value)
    args.checkpoint_vocab_size = getattr(saved, "vocab_size", None)
    args.checkpoint_padded_vocab_size = getattr(saved, "padded_vocab_size", None)
    args.checkpoint_tensor_model_parallel_size = getattr(saved, "tensor_model_parallel_size", 1)
    if args.vocab_file and not os.path.isfile(args.vocab_file):
        raise ArgumentError(f"--vocab-file {args.vocab_file} (from the checkpoint {source}) does "
                            "not exist here; give --vocab-file")


def check_vocab_size(args: argparse.Namespace, vocab_size: int) -> None:
    """The tokenizer must have the vocabulary the checkpoint was trained with.

    Raises:
        ArgumentError: when the padded sizes differ.
    """
    exact = getattr(args, "checkpoint_vocab_size", None)
    if exact is not None and exact != vocab_size:
        raise ArgumentError(f"the tokenizer ({args.tokenizer_type}, {args.vocab_file}) has "
                            f"{vocab_size} tokens; the checkpoint was trained with {exact}: use "
                            "the checkpoint's vocabulary")
    saved = getattr(args, "checkpoint_padded_vocab_size", None)
    if saved is None:
        return
    padded = vocab_size_with_padding(vocab_size, args.make_vocab_size_divisible_by,
                                     args.checkpoint_tensor_model_parallel_size)
    if padded != saved:
        raise ArgumentError(f"the tokenizer ({args.tokenizer_type}, {args.vocab_file}) has "
                            f"{vocab_size} tokens (padded {padded}); the checkpoint's embedding "
                            f"has {saved} rows: use the checkpoint's vocabulary")


def validate_task_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check the task flags and run the training flags' validation (before reading data).

    Args:
        args: parsed arguments with the architecture already applied.

    Raises:
        ArgumentError: naming the flag and value at fault.
    """
    if args.epochs is None:
        raise ArgumentError("missing required argument: --epochs")
    if args.epochs < 0:
        raise ArgumentError(f"--epochs must be >= 0, got {args.epochs}")
    if args.epochs > 0 and not args.train_data:
        raise ArgumentError("--epochs > 0 needs --train-data")
    if args.predict and not args.test_data:
        raise ArgumentError("--predict needs --test-data")
    if args.predict and not args.save:
        raise ArgumentError("--predict needs --save DIR (predictions go to DIR/predictions)")
    if args.eval_micro_batch_size is not None and args.eval_micro_batch_size < 1:
        raise ArgumentError(f"--eval-micro-batch-size must be > 0, got "
                            f"{args.eval_micro_batch_size}")
    if args.epochs == 0 and args.lr is None:
        args.lr = 0.0  # evaluation and prediction only: no optimizer is built
    for key in ("train_iters", "train_samples"):
        if key in args.explicit:
            raise ArgumentError(f"{_flag(key)} does not apply to finetuning: use --epochs")
    if "data_path" in args.explicit:
        raise ArgumentError("--data-path does not apply to finetuning: use --train-data and "
                            "--valid-data")
    # The schedule's length is set by set_schedule once the training set is read.
    arguments.validate_args(args, needs_data_path=False, needs_length=False)
    if args.eval_micro_batch_size is None:
        args.eval_micro_batch_size = args.micro_batch_size
    return args


def set_schedule(args: argparse.Namespace, train_samples: int) -> None:
    """``iterations_per_epoch`` and ``train_iters`` from the training set's size and --epochs.

    Raises:
        ArgumentError: for a training set smaller than one global batch, or a warm-up longer
            than the schedule.
    """
    args.iterations_per_epoch = train_samples // args.global_batch_size
    if args.epochs > 0 and args.iterations_per_epoch == 0:
        raise ArgumentError(f"the training data has {train_samples} samples, fewer than one "
                            f"global batch ({args.global_batch_size})")
    args.train_iters = args.epochs * args.iterations_per_epoch
    if args.train_iters and args.lr_warmup_iters > (args.lr_decay_iters or args.train_iters):
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} is longer than the "
                            f"{args.train_iters} iterations of {args.epochs} epoch(s)")
