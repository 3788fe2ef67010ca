"""Tokenize a loose-JSON corpus into Megatron indexed datasets (Megatron-LM's flags).

Example::

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text --split-sentences \\
        --tokenizer-type BertWordPieceLowerCase --vocab-file data/bert-large-uncased-vocab.txt \\
        --output-prefix my-bert --dataset-impl mmap --workers 2

writes ``my-bert_text_sentence.bin`` and ``my-bert_text_sentence.idx`` (``_document`` without
``--split-sentences``). Progress and the summary go to stderr. Bad input (malformed JSON, a
missing key, invalid UTF-8) stops the run with a one-line message naming the file and line and
exit status 1, leaving no output file; ``--skip-bad-lines`` skips and counts such lines instead.
Blank lines and documents without tokens are skipped and counted.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.preprocess import (  # noqa: E402
    INVALID_UTF8_CHOICES,
    PreprocessConfig,
    PreprocessError,
    PreprocessSummary,
    preprocess,
)
from megatron.data.sentence_splitter import SPLITTERS  # noqa: E402
from megatron.tokenizer import TOKENIZER_TYPES  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True, help="loose JSON, one object a line")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract from the JSON objects")
    group.add_argument("--split-sentences", action="store_true",
                       help="one sequence per sentence (needed for BERT's sentence-order head)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="keep paragraph newlines at the end of sentences")
    group.add_argument("--sentence-splitter", choices=SPLITTERS, default="builtin",
                       help="built-in rules (default) or NLTK punkt (needs its data)")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip and count malformed lines instead of failing")
    group.add_argument("--invalid-utf8", choices=INVALID_UTF8_CHOICES, default="error",
                       help="a line that is not UTF-8 is an error (default) or is decoded with "
                            "replacement characters")

    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--vocab-file", type=str, default=None, help="WordPiece vocabulary")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="SentencePiece model file")
    group.add_argument("--vocab-extra-ids", type=int, default=0)

    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True)
    group.add_argument("--dataset-impl", type=str, default="mmap", choices=["mmap"])

    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--chunk-size", type=int, default=25, help="lines per worker task")
    group.add_argument("--log-interval", type=int, default=100,
                       help="report progress every this many documents")
    return parser.parse_args(argv)


def _report(summary: PreprocessSummary) -> None:
    print(f"Processed {summary.documents} documents ({summary.docs_per_second:.1f} docs/s, "
          f"{summary.mb_per_second:.2f} MB/s).", file=sys.stderr, flush=True)


def _print_summary(config: PreprocessConfig, summary: PreprocessSummary) -> None:
    written = ", ".join(f"{key}: {n}" for key, n in summary.written.items())
    print(f"Done: {summary.documents} documents read, written {written}; "
          f"{summary.sentences} {'sentences' if config.split_sentences else 'sequences'}, "
          f"{summary.tokens} tokens; skipped {summary.skipped_bad} bad and "
          f"{summary.skipped_empty} empty; {summary.seconds:.3f} s "
          f"({summary.docs_per_second:.1f} docs/s, {summary.mb_per_second:.2f} MB/s, "
          f"{summary.tokens / max(summary.seconds, 1e-9):.0f} tokens/s).", file=sys.stderr)
    for path in summary.outputs:
        print(f"  wrote {path}", file=sys.stderr)
    if summary.max_sentences <= 1:
        print("Warning: every document is a single sequence; a BERT dataset with the binary "
              "(sentence-order) head needs documents of two or more sentences: use "
              "--split-sentences, or train with --bert-no-binary-head.", file=sys.stderr)


def main(argv=None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        config = PreprocessConfig(
            input=args.input, output_prefix=args.output_prefix,
            tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
            tokenizer_model=args.tokenizer_model, json_keys=args.json_keys,
            split_sentences=args.split_sentences, keep_newlines=args.keep_newlines,
            sentence_splitter=args.sentence_splitter, dataset_impl=args.dataset_impl,
            workers=args.workers, chunk_size=args.chunk_size, log_interval=args.log_interval,
            skip_bad_lines=args.skip_bad_lines, invalid_utf8=args.invalid_utf8,
            vocab_extra_ids=args.vocab_extra_ids)
        summary = preprocess(config, progress=_report)
    except (PreprocessError, OSError) as error:
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; no output written", file=sys.stderr)
        return 130
    _print_summary(config, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
