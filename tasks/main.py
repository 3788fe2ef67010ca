"""Finetune and evaluate BERT on GLUE and RACE, with Megatron-LM's ``tasks/main.py`` flags.

    python tasks/main.py --task SST-2 --train-data glue/SST-2/train.tsv \\
        --valid-data glue/SST-2/dev.tsv --pretrained-checkpoint checkpoints/bert \\
        --epochs 3 --micro-batch-size 32 --lr 2e-5 --lr-warmup-fraction 0.1 --seq-length 128 \\
        --save checkpoints/sst2

The model's shape and tokenizer come from the checkpoint (see ``tasks/arguments.py``); under
torchrun any tensor-parallel size works, with data parallelism over the remaining ranks.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.tokenizer import build_tokenizer  # noqa: E402
from megatron.training.checkpointing import CheckpointError  # noqa: E402
from megatron.training.errors import exit_on_error  # noqa: E402
from megatron.training.utils import configure_console, print_rank_0  # noqa: E402
from tasks import arguments  # noqa: E402
from tasks.finetune_utils import finetune  # noqa: E402


def _task_module(name: str):
    if name == "RACE":
        from tasks.race import finetune as module
    else:
        from tasks.glue import finetune as module
    return module


def _architecture_source(args):
    """``(saved args, source)`` of the checkpoint giving the model's shape, or ``(None, None)``."""
    if args.load is not None and os.path.isdir(args.load):
        saved = arguments.read_checkpoint_args(args.load, args.ckpt_step)
        if saved is not None:
            return saved, args.load
    if args.pretrained_checkpoint is not None:
        saved = arguments.read_checkpoint_args(args.pretrained_checkpoint)
        if saved is None:
            raise CheckpointError(f"--pretrained-checkpoint {args.pretrained_checkpoint} has no "
                                  "latest_checkpointed_iteration.txt")
        return saved, args.pretrained_checkpoint
    return None, None


def _datasets(module, args, tokenizer):
    """Train, validation and test datasets (every rank reads and tokenizes them)."""
    build = module.build_dataset
    train = (build(args.task, args.train_data, tokenizer, args.seq_length, name="train")
             if args.train_data and args.epochs else None)
    valid = [build(args.task, [path], tokenizer, args.seq_length)
             for path in args.valid_data or []]
    names = [dataset.name for dataset in valid]
    for dataset, path in zip(valid, args.valid_data or []):
        if names.count(dataset.name) > 1:  # dev/middle and dev/high are both called like that
            dataset.name = os.path.normpath(path)
    test = ([build(args.task, [path], tokenizer, args.seq_length, labeled=False)
             for path in args.test_data] if args.predict else [])
    return train, valid, test


def main(argv=None):
    """Parse ``argv``, build the task's data and run :func:`tasks.finetune_utils.finetune`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = arguments.parse_task_args(argv)
    configure_console()
    saved, source = _architecture_source(args)
    if saved is not None:
        arguments.apply_checkpoint_architecture(args, saved, source)
    arguments.validate_task_args(args)
    tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file,
                                tokenizer_model=args.tokenizer_model,
                                vocab_extra_ids=args.vocab_extra_ids)
    arguments.check_vocab_size(args, tokenizer.vocab_size)
    module = _task_module(args.task)
    train, valid, test = _datasets(module, args, tokenizer)
    arguments.set_schedule(args, len(train) if train is not None else 0)
    print_rank_0(f"{args.task}: {len(train) if train else 0} training samples, "
                 f"{args.iterations_per_epoch} iterations per epoch, {args.train_iters} in all; "
                 + ", ".join(f"{d.name}: {len(d)}" for d in valid + test))
    return finetune(module.get_task(args.task), args, vocab_size=tokenizer.vocab_size,
                    train_dataset=train, valid_datasets=valid, test_datasets=test)


if __name__ == "__main__":
    with exit_on_error("tasks/main.py"):  # TaskDataError is a ValueError
        main()
