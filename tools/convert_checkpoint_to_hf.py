"""Export a Megatron BERT checkpoint (any TP size, or NVIDIA's release zip) to Hugging Face.

Example::

    python tools/convert_checkpoint_to_hf.py --load-dir runs/bert --save-dir runs/bert-hf
    python -c "from transformers import AutoTokenizer, MegatronBertForPreTraining as M; \\
        M.from_pretrained('runs/bert-hf'); AutoTokenizer.from_pretrained('runs/bert-hf')"

writes ``config.json`` (``MegatronBertForPreTraining``; ``...ForSequenceClassification`` with
``id2label`` or ``...ForMultipleChoice`` for finetuned GLUE/RACE checkpoints), a streamed
``model.safetensors``, and ``vocab.txt`` with the tokenizer config. The vocabulary padding is
stripped (``vocab_size`` = the tokenizer's) unless ``--keep-padded-vocab``. NVIDIA's
``megatron_bert_345m_v0_1_{cased,uncased}.zip`` is read directly; pass the matching
``--vocab-file`` (its files carry no args; 16 attention heads are assumed). Bad input stops the
tool with one line naming the file, key and shapes, and leaves nothing under ``--save-dir``.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpoint import CheckpointError  # noqa: E402
from megatron.checkpoint.hf import export_to_hf  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--load-dir", required=True,
                        help="save directory (with latest_checkpointed_iteration.txt) or .zip")
    parser.add_argument("--save-dir", required=True, help="the Hugging Face folder to create")
    parser.add_argument("--iteration", default=None,
                        help="iteration to export (default: the tracker's; 'release')")
    parser.add_argument("--keep-padded-vocab", action="store_true",
                        help="keep the vocabulary padding rows (vocab_size = padded size)")
    parser.add_argument("--vocab-file", default=None,
                        help="WordPiece vocabulary (default: the checkpoint's --vocab-file, or "
                             "vocab.txt beside the checkpoint)")
    parser.add_argument("--tokenizer-type", default=None,
                        choices=["BertWordPieceLowerCase", "BertWordPieceCase"],
                        help="default: the checkpoint's, else from the vocabulary's case")
    parser.add_argument("--num-attention-heads", type=int, default=None,
                        help="for checkpoints without args (default 16, NVIDIA's BERT-345M)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated class names of a classification head (default: "
                             "the checkpoint's args.label_names, else LABEL_0, LABEL_1, ...)")
    parser.add_argument("--quiet", action="store_true", help="only errors")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = get_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    return export_to_hf(
        args.load_dir, args.save_dir, iteration=args.iteration,
        keep_padded_vocab=args.keep_padded_vocab, vocab_file=args.vocab_file,
        tokenizer_type=args.tokenizer_type, num_attention_heads=args.num_attention_heads,
        labels=args.labels.split(",") if args.labels else None)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, OSError) as error:
        sys.exit(f"convert_checkpoint_to_hf.py: error: {error}")
