"""Command-line arguments with Megatron-LM's flag names, and their validation.

Only entry scripts call :func:`parse_args`; everything below them receives the resulting
namespace (or values taken from it) explicitly. :func:`validate_args` fills in derived values the
way Megatron-LM does (``data_parallel_size``, ``global_batch_size``, ``ffn_hidden_size``, ...) and
raises :class:`ArgumentError` naming the flags and values at fault.
"""

import argparse
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["ArgumentError", "build_parser", "parse_args", "validate_args", "world_from_env"]


class ArgumentError(ValueError):
    """A command-line value that cannot work; the message names the flag and the value."""


def _network(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network size")
    group.add_argument("--num-layers", type=int, default=None, help="transformer layers")
    group.add_argument("--hidden-size", type=int, default=None, help="transformer hidden size")
    group.add_argument("--ffn-hidden-size", type=int, default=None,
                       help="MLP hidden size (default 4 * hidden size)")
    group.add_argument("--num-attention-heads", type=int, default=None, help="attention heads")
    group.add_argument("--max-position-embeddings", type=int, default=None,
                       help="position embeddings (default: --seq-length)")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="pad the vocabulary to a multiple of this times the TP size")
    group.add_argument("--layernorm-epsilon", type=float, default=1e-12,
                       help="LayerNorm epsilon (BERT's 1e-12, as Hugging Face's MegatronBert)")
    group.add_argument("--init-method-std", type=float, default=0.02,
                       help="standard deviation of the normal weight initialisation")
    group.add_argument("--hidden-dropout", type=float, default=0.1)
    group.add_argument("--attention-dropout", type=float, default=0.1)
    group.add_argument("--bert-no-binary-head", action="store_false", dest="bert_binary_head",
                       help="train without the sentence-order (or next-sentence) head")
    group.add_argument("--bert-binary-head-mode", choices=("sop", "nsp"), default="sop",
                       help="binary task: sentence order (Megatron) or next sentence (BERT)")


def _training(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=int, default=None,
                       help="samples per forward/backward on one data-parallel rank")
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="samples per optimizer step (default: micro batch x DP size)")
    group.add_argument("--train-iters", type=int, default=None, help="iterations to train")
    group.add_argument("--train-samples", type=int, default=None,
                       help="samples to train (instead of --train-iters)")
    group.add_argument("--recompute-activations", "--checkpoint-activations",
                       action="store_true", dest="recompute_activations",
                       help="recompute each transformer layer in backward to save memory")
    group.add_argument("--exit-interval", type=int, default=None,
                       help="exit after the iteration that is a multiple of this")
    group.add_argument("--exit-duration-in-mins", type=float, default=None,
                       help="save and exit after this many minutes of training")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="on SIGTERM, finish the iteration on every rank, save and exit 0")
    group.add_argument("--check-for-nan-in-loss-and-grad", action="store_true", default=True,
                       dest="check_for_nan_in_loss_and_grad",
                       help="stop on a NaN/inf loss or gradient (fp32/bf16; the default)")
    group.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false",
                       dest="check_for_nan_in_loss_and_grad",
                       help="skip such iterations instead (counted as nan iterations)")
    group.add_argument("--max-consecutive-skipped-iterations", type=int, default=100,
                       help="fp16: stop after this many overflowing iterations in a row "
                            "(loss-scale collapse); 0: never")
    group.add_argument("--dataloader-type", choices=("single", "cyclic"), default="single")
    group.add_argument("--num-workers", type=int, default=2, help="data loader workers")


def _optimization(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimizer and learning rate")
    group.add_argument("--lr", type=float, default=None, help="peak learning rate")
    group.add_argument("--min-lr", type=float, default=0.0, help="learning rate floor")
    group.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"),
                       default="linear")
    group.add_argument("--lr-decay-iters", type=int, default=None,
                       help="iterations to decay over (default: --train-iters)")
    group.add_argument("--lr-decay-samples", type=int, default=None,
                       help="samples to decay over (default: --train-samples)")
    group.add_argument("--lr-warmup-fraction", type=float, default=None,
                       help="fraction of the decay steps spent warming up")
    group.add_argument("--lr-warmup-iters", type=int, default=0)
    group.add_argument("--lr-warmup-samples", type=int, default=0)
    group.add_argument("--lr-warmup-init", type=float, default=0.0,
                       help="learning rate at the start of warm-up")
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--clip-grad", type=float, default=1.0,
                       help="clip the global gradient 2-norm to this (0: no clipping)")
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.999)
    group.add_argument("--adam-eps", type=float, default=1e-8)
    group.add_argument("--override-opt_param-scheduler", action="store_true",
                       help="take scheduler values from the flags, not from the checkpoint")
    group.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                       help="take scheduler values from the checkpoint")


def _mixed_precision(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mixed precision")
    group.add_argument("--fp16", action="store_true", help="float16 with fp32 master weights")
    group.add_argument("--bf16", action="store_true", help="bfloat16 with fp32 master weights")
    group.add_argument("--loss-scale", type=float, default=None,
                       help="static loss scale (fp16); default: dynamic loss scaling")
    group.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    group.add_argument("--min-loss-scale", type=float, default=1.0)
    group.add_argument("--loss-scale-window", type=int, default=1000,
                       help="clean iterations before the dynamic scale grows")
    group.add_argument("--hysteresis", type=int, default=2,
                       help="overflowing iterations before the dynamic scale backs off")


def _data(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and tokenizer")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="a dataset prefix, or weight prefix weight prefix ... to blend")
    group.add_argument("--split", default="969, 30, 1",
                       help="train, valid, test proportions of the documents")
    group.add_argument("--data-impl", choices=("mmap", "infer"), default="mmap")
    group.add_argument("--data-cache-path", default=None,
                       help="where sample-index caches go (default: next to the data)")
    group.add_argument("--mmap-warmup", action="store_true", help="pre-read the data files")
    group.add_argument("--seq-length", type=int, default=None, help="tokens per sample")
    group.add_argument("--mask-prob", type=float, default=0.15)
    group.add_argument("--short-seq-prob", type=float, default=0.1)
    group.add_argument("--vocab-file", default=None)
    group.add_argument("--tokenizer-type", default="BertWordPieceLowerCase")
    group.add_argument("--tokenizer-model", default=None, help="SentencePiece model file")
    group.add_argument("--vocab-extra-ids", type=int, default=0)


def _checkpointing(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpointing")
    group.add_argument("--save", default=None, help="directory to save checkpoints to")
    group.add_argument("--save-interval", type=int, default=None,
                       help="save every this many iterations")
    group.add_argument("--no-save-optim", action="store_true")
    group.add_argument("--no-save-rng", action="store_true")
    group.add_argument("--load", default=None, help="directory to load a checkpoint from")
    group.add_argument("--no-load-optim", action="store_true")
    group.add_argument("--no-load-rng", action="store_true")
    group.add_argument("--finetune", action="store_true",
                       help="load model weights only, start at iteration 0")
    group.add_argument("--ckpt-step", type=int, default=None,
                       help="load this iteration of --load instead of the latest")
    group.add_argument("--keep-last-n-checkpoints", type=int, default=None,
                       help="keep only the newest N checkpoints of --save (default: all)")


def _logging(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging and evaluation")
    group.add_argument("--log-interval", type=int, default=100)
    group.add_argument("--eval-interval", type=int, default=1000)
    group.add_argument("--eval-iters", type=int, default=100)
    group.add_argument("--tensorboard-dir", default=None)
    group.add_argument("--tensorboard-log-interval", type=int, default=1)
    group.add_argument("--tensorboard-queue-size", type=int, default=1000)


def _distributed(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                       help="default: nccl when CUDA is available, else gloo")
    group.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    group.add_argument("--local-rank", "--local_rank", type=int, default=None,
                       dest="local_rank", help=argparse.SUPPRESS)
    group.add_argument("--seed", type=int, default=1234)


def build_parser(extra_args_provider: Optional[Callable] = None,
                 description: str = "Megatron-BERT") -> argparse.ArgumentParser:
    """The argument parser: Megatron-LM's flags, plus those ``extra_args_provider`` adds."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for add in (_network, _training, _optimization, _mixed_precision, _data, _checkpointing,
                _logging, _distributed):
        add(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser) or parser
    return parser


def world_from_env(environ=None) -> Dict[str, int]:
    """``rank``, ``world_size`` and ``local_rank`` from torchrun's environment variables."""
    environ = os.environ if environ is None else environ
    values = {}
    for key, name, default in (("RANK", "rank", 0), ("WORLD_SIZE", "world_size", 1),
                               ("LOCAL_RANK", "local_rank", 0)):
        raw = environ.get(key, str(default))
        try:
            values[name] = int(raw)
        except ValueError:
            raise ArgumentError(f"environment variable {key}={raw!r} is not an integer") from None
    return values


def parse_args(argv: Optional[Sequence[str]] = None, extra_args_provider: Optional[Callable] = None,
               defaults: Optional[dict] = None, *, world_size: Optional[int] = None,
               validate: bool = True) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) and validate the result.

    Args:
        argv: the arguments.
        extra_args_provider: ``f(parser) -> parser`` adding script-specific flags.
        defaults: new defaults (flags given in ``argv`` still win), as Megatron's
            ``args_defaults``.
        world_size: number of processes (default: ``WORLD_SIZE`` from the environment, or the
            initialised process group's size).
        validate: run :func:`validate_args`.

    Raises:
        ArgumentError: for values that cannot work.
        SystemExit: for unknown flags or malformed values (argparse's own message).
    """
    parser = build_parser(extra_args_provider)
    if defaults:
        unknown = sorted(set(defaults) - {action.dest for action in parser._actions})
        if unknown:
            raise ArgumentError(f"defaults for unknown arguments: {unknown}")
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
        else:
            world_size = world_from_env()["world_size"]
    args.world_size = world_size
    if validate:
        validate_args(args)
    return args


def _require(args: argparse.Namespace, names: Sequence[str]) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is None]
    if missing:
        raise ArgumentError(f"missing required argument(s): {', '.join(missing)}")


def _positive(args: argparse.Namespace, names: Sequence[str], allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            bound = ">= 0" if allow_zero else "> 0"
            raise ArgumentError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


def _check_model(args: argparse.Namespace) -> None:
    tp = args.tensor_model_parallel_size
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.hidden_size % args.num_attention_heads:
        raise ArgumentError(f"--hidden-size {args.hidden_size} is not divisible by "
                            f"--num-attention-heads {args.num_attention_heads}")
    if args.num_attention_heads % tp:
        raise ArgumentError(f"--num-attention-heads {args.num_attention_heads} is not divisible "
                            f"by --tensor-model-parallel-size {tp}")
    if args.ffn_hidden_size % tp:
        raise ArgumentError(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
    if args.seq_length > args.max_position_embeddings:
        raise ArgumentError(f"--seq-length {args.seq_length} is longer than "
                            f"--max-position-embeddings {args.max_position_embeddings}")
    for name in ("hidden_dropout", "attention_dropout", "mask_prob", "short_seq_prob"):
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")


def _check_batch(args: argparse.Namespace) -> None:
    if args.world_size % args.tensor_model_parallel_size:
        raise ArgumentError(f"world size {args.world_size} is not divisible by "
                            f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    args.data_parallel_size = args.world_size // args.tensor_model_parallel_size
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_micro_batches = args.global_batch_size // per_step


def _check_schedule(args: argparse.Namespace) -> None:
    """The run's length and the schedule's parts measured against it."""
    if (args.train_iters is None) == (args.train_samples is None):
        raise ArgumentError("give exactly one of --train-iters and --train-samples, got "
                            f"--train-iters {args.train_iters} --train-samples "
                            f"{args.train_samples}")
    by_iters = args.train_iters is not None
    wrong = (("lr_decay_samples", "lr_warmup_samples") if by_iters
             else ("lr_decay_iters", "lr_warmup_iters"))
    for name in wrong:
        if getattr(args, name):
            unit = "--train-iters" if by_iters else "--train-samples"
            raise ArgumentError(f"--{name.replace('_', '-')} does not go with {unit}")
    if args.train_samples is not None and args.train_samples < args.global_batch_size:
        raise ArgumentError(f"--train-samples {args.train_samples} is smaller than one global "
                            f"batch ({args.global_batch_size})")
    if args.train_iters is None:
        args.train_iters = args.train_samples // args.global_batch_size
    if by_iters and args.lr_warmup_iters > (args.lr_decay_iters or args.train_iters):
        decay = ("--lr-decay-iters", args.lr_decay_iters) if args.lr_decay_iters else (
            "--train-iters", args.train_iters)
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} is longer than "
                            f"{decay[0]} {decay[1]}")
    if not by_iters and args.lr_warmup_samples > (args.lr_decay_samples or args.train_samples):
        decay = ("--lr-decay-samples", args.lr_decay_samples) if args.lr_decay_samples else (
            "--train-samples", args.train_samples)
        raise ArgumentError(f"--lr-warmup-samples {args.lr_warmup_samples} is longer than "
                            f"{decay[0]} {decay[1]}")


def _check_optimizer(args: argparse.Namespace) -> None:
    """Learning rates, warm-up and Adam: what does not depend on the run's length."""
    if args.lr_warmup_fraction is not None:
        if not 0.0 <= args.lr_warmup_fraction <= 1.0:
            raise ArgumentError(
                f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")
        if args.lr_warmup_iters or args.lr_warmup_samples:
            raise ArgumentError("give only one of --lr-warmup-fraction and "
                                "--lr-warmup-iters/--lr-warmup-samples")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be in [0, 1), "
                                f"got {getattr(args, name)}")


def _check_precision(args: argparse.Namespace) -> None:
    if args.fp16 and args.bf16:
        raise ArgumentError("--fp16 and --bf16 cannot both be given")
    if args.loss_scale is not None and args.loss_scale <= 0:
        raise ArgumentError(f"--loss-scale must be > 0, got {args.loss_scale}")
    if args.min_loss_scale > args.initial_loss_scale:
        raise ArgumentError(f"--min-loss-scale {args.min_loss_scale} is larger than "
                            f"--initial-loss-scale {args.initial_loss_scale}")
    args.params_dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"


def _check_paths(args: argparse.Namespace, needs_data_path: bool = True) -> None:
    if not args.data_path and needs_data_path:
        raise ArgumentError("missing required argument: --data-path PREFIX "
                            "(make one with tools/preprocess_data.py)")
    if args.data_path and len(args.data_path) > 1:
        if len(args.data_path) % 2:
            raise ArgumentError("--data-path with several datasets takes weight-prefix pairs, "
                                f"got {len(args.data_path)} values: {args.data_path}")
        for weight in args.data_path[0::2]:
            try:
                float(weight)
            except ValueError:
                raise ArgumentError(f"--data-path weight {weight!r} is not a number "
                                    f"(pairs are: weight prefix)") from None
    if args.tokenizer_type.startswith("BertWordPiece"):
        if not args.vocab_file:
            raise ArgumentError(f"--tokenizer-type {args.tokenizer_type} needs --vocab-file")
        if not os.path.isfile(args.vocab_file):
            raise ArgumentError(f"--vocab-file {args.vocab_file} does not exist")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.load is not None and os.path.exists(args.load) and not os.path.isdir(args.load):
        raise ArgumentError(f"--load {args.load} is not a directory")
    if args.ckpt_step is not None and args.load is None:
        raise ArgumentError(f"--ckpt-step {args.ckpt_step} needs --load DIR")
    if args.keep_last_n_checkpoints is not None and args.save is None:
        raise ArgumentError("--keep-last-n-checkpoints needs --save DIR")


def validate_args(args: argparse.Namespace, *, needs_data_path: bool = True,
                  needs_length: bool = True) -> argparse.Namespace:
    """Check ``args`` and fill in derived values, in place (and return it).

    Args:
        args: the parsed flags.
        needs_data_path: ``--data-path`` is required (pretraining; finetuning reads its own
            task files).
        needs_length: one of ``--train-iters``/``--train-samples`` is required (finetuning
            derives the length from ``--epochs`` and the training set, then checks it).

    Raises:
        ArgumentError: naming the flag(s) and value(s) at fault.
    """
    _require(args, ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                    "micro_batch_size", "lr"))
    _positive(args, ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "micro_batch_size", "global_batch_size", "tensor_model_parallel_size",
                     "train_iters", "train_samples", "log_interval", "eval_interval",
                     "save_interval", "exit_interval", "exit_duration_in_mins",
                     "make_vocab_size_divisible_by", "ffn_hidden_size", "max_position_embeddings",
                     "loss_scale_window", "hysteresis", "distributed_timeout_minutes",
                     "adam_eps", "init_method_std", "layernorm_epsilon", "lr_decay_iters",
                     "lr_decay_samples", "tensorboard_log_interval",
                     "keep_last_n_checkpoints"))
    _positive(args, ("lr", "min_lr", "weight_decay", "clip_grad", "eval_iters", "num_workers",
                     "ckpt_step", "max_consecutive_skipped_iterations",
                     "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_init",
                     "vocab_extra_ids"), allow_zero=True)
    _check_model(args)
    _check_batch(args)
    _check_optimizer(args)
    if needs_length or args.train_iters is not None or args.train_samples is not None:
        _check_schedule(args)
    _check_precision(args)
    _check_paths(args, needs_data_path)
    return args


def flag_names(extra_args_provider: Optional[Callable] = None) -> List[str]:
    """Every option string the parser accepts, sorted (the command-line surface)."""
    parser = build_parser(extra_args_provider)
    return sorted(option for action in parser._actions for option in action.option_strings)


def bert_config_from_args(args: argparse.Namespace, vocab_size: int, **overrides):
    """The :class:`megatron.model.BertConfig` the flags describe (``overrides`` win)."""
    from megatron.model import BertConfig

    values = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, vocab_size=vocab_size,
        ffn_hidden_size=args.ffn_hidden_size,
        max_position_embeddings=args.max_position_embeddings,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        layernorm_epsilon=args.layernorm_epsilon, init_method_std=args.init_method_std,
        add_binary_head=args.bert_binary_head, fp16=args.fp16, bf16=args.bf16,
        recompute_activations=args.recompute_activations)
    values.update(overrides)
    return BertConfig(**values)
