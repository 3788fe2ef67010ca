"""Import a Hugging Face ``MegatronBert*`` folder as a Megatron checkpoint at any TP size.

Example::

    python tools/convert_hf_to_megatron.py --hf-dir bert-hf --save-dir runs/bert_tp2 \\
        --target-tensor-parallel-size 2
    torchrun --nproc_per_node 2 pretrain_bert.py --load runs/bert_tp2 --finetune \\
        --tensor-model-parallel-size 2 ...

reads ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), checks every
tensor against the config, pads the vocabulary for the target size
(``--make-vocab-size-divisible-by`` x N) and writes a ``release`` checkpoint with args and the
vocabulary, ready for ``--finetune`` or ``--load`` (it starts at iteration 0). Bad input stops
the tool with one line naming the file, tensor and shapes, and leaves nothing under
``--save-dir``.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpoint import CheckpointError  # noqa: E402
from megatron.checkpoint.hf_import import import_from_hf  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--hf-dir", required=True, help="Hugging Face folder")
    parser.add_argument("--save-dir", required=True, help="new save directory")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--head", default=None,
                        choices=["pretraining", "classification", "multiple_choice"],
                        help="default: from config.json's architectures")
    parser.add_argument("--vocab-file", default=None,
                        help="vocabulary (default: vocab.txt in --hf-dir); its size is the real "
                             "vocabulary size")
    parser.add_argument("--quiet", action="store_true", help="only errors")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = get_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    if args.target_tensor_parallel_size < 1:
        raise CheckpointError("--target-tensor-parallel-size must be >= 1, got "
                              f"{args.target_tensor_parallel_size}")
    return import_from_hf(args.hf_dir, args.save_dir, args.target_tensor_parallel_size,
                          make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                          head=args.head, vocab_file=args.vocab_file)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, OSError) as error:
        sys.exit(f"convert_hf_to_megatron.py: error: {error}")
