"""Helpers for tests that run ``pretrain_bert.py``: a tokenized sample corpus and tiny flags."""

import importlib.util
import os
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "shakespeare_tiny.jsonl"
VOCAB = ROOT / "data" / "bert-large-uncased-vocab.txt"


def preprocess_sample_corpus(directory) -> str:
    """Tokenize the shipped Shakespeare sample into ``directory``; return the dataset prefix."""
    from megatron.data.preprocess import PreprocessConfig, preprocess

    prefix = os.path.join(str(directory), "shakespeare")
    if not os.path.exists(prefix + "_text_sentence.idx"):
        preprocess(PreprocessConfig(input=str(CORPUS), output_prefix=prefix,
                                    tokenizer_type="BertWordPieceLowerCase",
                                    vocab_file=str(VOCAB), split_sentences=True))
    return prefix + "_text_sentence"


def tiny_argv(data_prefix: str, *extra: str, train_iters: int = 20, dropout: bool = False,
              micro_batch_size: int = 4, global_batch_size: int = 8) -> List[str]:
    """Flags of the tiny test model (2 layers, hidden 64) on ``data_prefix``."""
    argv = [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64",
        "--micro-batch-size", str(micro_batch_size), "--global-batch-size",
        str(global_batch_size), "--train-iters", str(train_iters), "--lr", "1e-3",
        "--min-lr", "1e-5", "--lr-warmup-iters", "2", "--lr-decay-style", "linear",
        "--data-path", data_prefix, "--split", "949,50,1", "--vocab-file", str(VOCAB),
        "--tokenizer-type", "BertWordPieceLowerCase", "--log-interval", "10",
        "--eval-interval", "1000", "--eval-iters", "2", "--num-workers", "0",
        "--distributed-backend", "gloo", "--seed", "1234",
    ]
    if not dropout:
        argv += ["--hidden-dropout", "0.0", "--attention-dropout", "0.0"]
    return argv + list(extra)


def load_pretrain_bert():
    """The ``pretrain_bert`` module of the repository root (an entry script, not a package)."""
    spec = importlib.util.spec_from_file_location("pretrain_bert", ROOT / "pretrain_bert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_pretrain(argv: List[str]):
    """``pretrain_bert.main(argv)`` in this process; returns its ``TrainingResult``."""
    return load_pretrain_bert().main(argv)
