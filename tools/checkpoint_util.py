"""Change the tensor-parallel size of a Megatron BERT checkpoint (Megatron-LM's tool and flags).

Example::

    python tools/checkpoint_util.py --load-dir runs/bert_tp1 --save-dir runs/bert_tp4 \\
        --target-tensor-parallel-size 4

reads the latest checkpoint of ``--load-dir`` (any TP size, or NVIDIA's released
``megatron_bert_345m_v0_1_*.zip`` directly) and writes it to ``--save-dir`` at the new size:
weights re-split (fused QKV by whole heads), vocabulary re-padded for the new size, Adam moments
and fp32 master weights re-split the same way (``--no-optimizer`` drops them), iteration, args
and scheduler state carried over, the tensor-parallel RNG streams regenerated. Training then
resumes with ``pretrain_bert.py --load B --tensor-model-parallel-size N``.

Memory: one target rank's state plus the slices of one tensor (source files are memory-mapped
and their pages released tensor by tensor). Bad input stops the tool with one line naming the
file, key and shapes, and leaves nothing under ``--save-dir``.
"""

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpoint import CheckpointError, reshard_checkpoint  # noqa: E402
from megatron.checkpoint.hf import vocab_size_of_file  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--model-type", choices=["BERT"], default="BERT",
                        help="only BERT checkpoints (kept for Megatron-LM's command line)")
    parser.add_argument("--loader", choices=["megatron"], default="megatron")
    parser.add_argument("--saver", choices=["megatron"], default="megatron")
    parser.add_argument("--load-dir", required=True,
                        help="save directory (with latest_checkpointed_iteration.txt) or .zip")
    parser.add_argument("--save-dir", required=True, help="new save directory")
    parser.add_argument("--target-tensor-parallel-size", type=int, required=True)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1, choices=[1],
                        help="pipeline parallelism is not supported (1 only)")
    parser.add_argument("--iteration", default=None,
                        help="iteration to read (default: the tracker's; 'release')")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="drop the optimizer and scheduler state (weights, args, RNG only)")
    parser.add_argument("--vocab-file", default=None,
                        help="vocabulary of the tokenizer: its size decides the padding (default:"
                             " the checkpoint's args.vocab_size, else its zero padding rows)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="the tokenizer's vocabulary size, instead of --vocab-file")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                        help="default: the checkpoint's value, else 128")
    parser.add_argument("--num-attention-heads", type=int, default=None,
                        help="for checkpoints without args (NVIDIA's BERT-345M has 16)")
    parser.add_argument("--quiet", action="store_true", help="only errors")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = get_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    if args.target_tensor_parallel_size < 1:
        raise CheckpointError("--target-tensor-parallel-size must be >= 1, got "
                              f"{args.target_tensor_parallel_size}")
    vocab_size = args.vocab_size
    if args.vocab_file is not None:
        vocab_size = vocab_size_of_file(args.vocab_file)
    start = time.time()
    written = reshard_checkpoint(
        args.load_dir, args.save_dir, args.target_tensor_parallel_size,
        iteration=args.iteration, no_optimizer=args.no_optimizer, vocab_size=vocab_size,
        num_attention_heads=args.num_attention_heads,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    logging.getLogger(__name__).info(
        "wrote %s at tensor-parallel size %d in %.1f s", written,
        args.target_tensor_parallel_size, time.time() - start)
    return written


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, OSError) as error:
        sys.exit(f"checkpoint_util.py: error: {error}")
