"""Throughput of tools/preprocess_data.py against Hugging Face's fast BERT tokenizer.

Usage::

    python bench/bench_preprocess.py [--rounds 3]

On ``../shared/data/pretrain/shakespeare.jsonl`` (4.7 MB, 821 documents), uncased vocabulary:

* ``preprocess``: ``tools/preprocess_data.py`` run as a command with 1 and 2 workers, per
  document (``_document``, comparable to a plain tokenizer) and with ``--split-sentences``
  (what BERT pretraining uses). MB/s and tokens/s come from the tool's own summary line (reading,
  JSON, splitting, tokenizing, writing; interpreter start-up and imports excluded); ``wall_s``
  is the whole command.
* ``tokenizer``: our pure-Python WordPiece on the same documents in this process (no I/O).
* ``hf_fast``: ``transformers.BertTokenizerFast`` on the same documents, one batch call (Rust,
  may use both cores) and one call per document.

Every measurement is repeated ``--rounds`` times, interleaved, and the median is reported. Then
the BERT samples mapping is built for the whole shared pretraining corpus (Shakespeare and BBC
News, sentence level): one epoch, and 1,000,000 samples, at sequence lengths 128 and 512.
Prints one JSON object on stdout; progress goes to stderr.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data" / "pretrain"
CORPUS = SHARED / "shakespeare.jsonl"
VOCAB = ROOT / "data" / "bert-large-uncased-vocab.txt"
SUMMARY = re.compile(r"Done: .*?; (\d+) (?:sentences|sequences), (\d+) tokens; .*?; "
                     r"([\d.]+) s \(")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_tool(input_path: Path, prefix: str, workers: int, split: bool) -> dict:
    command = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input",
               str(input_path), "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
               str(VOCAB), "--output-prefix", prefix, "--workers", str(workers),
               "--log-interval", "1000000"] + (["--split-sentences"] if split else [])
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    match = SUMMARY.search(result.stderr)
    if match is None:
        raise RuntimeError(f"no summary line in: {result.stderr[-500:]}")
    sequences, tokens, seconds = int(match[1]), int(match[2]), float(match[3])
    size = input_path.stat().st_size
    return {"mb_per_s": size / 1e6 / seconds, "tokens_per_s": tokens / seconds,
            "seconds": seconds, "wall_s": wall, "tokens": tokens, "sequences": sequences}


def _time_call(function, size: int, tokens_of) -> dict:
    started = time.perf_counter()
    output = function()
    seconds = time.perf_counter() - started
    tokens = tokens_of(output)
    return {"mb_per_s": size / 1e6 / seconds, "tokens_per_s": tokens / seconds,
            "seconds": seconds, "tokens": tokens}


def _median(runs: list) -> dict:
    result = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    result["runs"] = len(runs)
    return result


def _hf_fast():
    import transformers

    try:
        return transformers.BertTokenizerFast(vocab=str(VOCAB), do_lower_case=True)
    except TypeError:  # transformers 4 names the argument vocab_file
        return transformers.BertTokenizerFast(vocab_file=str(VOCAB), do_lower_case=True)


def bench_throughput(rounds: int, workdir: str) -> dict:
    from megatron.tokenizer import build_tokenizer

    texts = [json.loads(line)["text"] for line in open(CORPUS)]
    size = CORPUS.stat().st_size
    ours, hf = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB)), _hf_fast()
    configs = {f"{level}_workers{w}": (w, level == "sentence")
               for level in ("document", "sentence") for w in (1, 2)}
    runs = {name: [] for name in [*configs, "tokenizer", "hf_fast_batch", "hf_fast_per_doc"]}
    for round_index in range(rounds):
        for name, (workers, split) in configs.items():
            _log(f"round {round_index}: preprocess {name}")
            runs[name].append(_run_tool(CORPUS, os.path.join(workdir, name), workers, split))
        _log(f"round {round_index}: tokenizers")
        runs["tokenizer"].append(_time_call(lambda: [ours.tokenize(t) for t in texts], size,
                                            lambda out: sum(map(len, out))))
        runs["hf_fast_batch"].append(_time_call(
            lambda: hf(texts, add_special_tokens=False)["input_ids"], size,
            lambda out: sum(map(len, out))))
        runs["hf_fast_per_doc"].append(_time_call(
            lambda: [hf(t, add_special_tokens=False)["input_ids"] for t in texts], size,
            lambda out: sum(map(len, out))))
    results = {name: _median(values) for name, values in runs.items()}
    for name in runs:
        if name != "hf_fast_batch":
            results[name]["ratio_to_hf_fast_batch"] = (
                results[name]["mb_per_s"] / results["hf_fast_batch"]["mb_per_s"])
    return results


def bench_samples_mapping(workdir: str) -> dict:
    from megatron.data.indexed_dataset import MMapIndexedDataset
    from megatron.data.samples_mapping import build_samples_mapping

    corpus = Path(workdir) / "all.jsonl"
    with open(corpus, "wb") as handle:
        for name in ("shakespeare.jsonl", "bbc_news.jsonl"):
            handle.write((SHARED / name).read_bytes())
    _log("samples mapping: preprocessing the whole shared corpus")
    info = _run_tool(corpus, os.path.join(workdir, "all"), 2, split=True)
    dataset = MMapIndexedDataset(os.path.join(workdir, "all_text_sentence"), skip_warmup=True)
    results = {"corpus_mb": corpus.stat().st_size / 1e6, "documents": len(dataset.doc_idx) - 1,
               "sentences": len(dataset), "tokens": info["tokens"]}
    for seq_length in (128, 512):
        per_epoch = None
        for label, epochs, samples in (("1_epoch", 1, None), ("1M_samples", None, 1_000_000)):
            _log(f"samples mapping: seq {seq_length}, {label}")
            started = time.perf_counter()
            mapping = build_samples_mapping(dataset.doc_idx, dataset.sizes, epochs, samples,
                                            seq_length - 3, 0.1, 1234)
            seconds = time.perf_counter() - started
            per_epoch = per_epoch or len(mapping)
            results[f"seq{seq_length}_{label}"] = {
                "seconds": round(seconds, 3), "samples": len(mapping),
                "epochs": round(len(mapping) / per_epoch, 1)}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not CORPUS.exists():
        print(f"bench_preprocess.py: error: {CORPUS} not found (needs ../shared/data)",
              file=sys.stderr)
        return 1
    import transformers

    with tempfile.TemporaryDirectory() as workdir:
        report = {
            "corpus": str(CORPUS.relative_to(ROOT.parent)),
            "corpus_mb": CORPUS.stat().st_size / 1e6,
            "cpu_count": os.cpu_count(),
            "transformers": transformers.__version__,
            "throughput": bench_throughput(args.rounds, workdir),
            "samples_mapping": bench_samples_mapping(workdir),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
