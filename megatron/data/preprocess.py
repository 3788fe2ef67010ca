"""Loose JSON -> Megatron indexed datasets: the library behind ``tools/preprocess_data.py``.

:func:`preprocess` reads one JSON object per line, tokenizes the text of each ``json_keys`` entry
(split into sentences, or whole documents) in ``workers`` processes, and writes
``{output_prefix}_{key}_{sentence|document}.bin/.idx``. Bad input raises
:class:`PreprocessError` naming the file and line (or is skipped and counted with
``skip_bad_lines``); empty documents are skipped and counted. Outputs are written under temporary
names and renamed only when every line has been read, so a failure leaves nothing behind.
"""

import contextlib
import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from megatron.data import indexed_dataset
from megatron.data.sentence_splitter import SPLITTERS, build_sentence_splitter
from megatron.tokenizer import TOKENIZER_TYPES, build_tokenizer

__all__ = ["PreprocessConfig", "PreprocessError", "PreprocessSummary", "preprocess",
           "output_prefixes"]

logger = logging.getLogger(__name__)

INVALID_UTF8_CHOICES = ("error", "replace")


class PreprocessError(ValueError):
    """Bad input or arguments; the message names the file and line at fault."""


@dataclasses.dataclass
class PreprocessConfig:
    """What to read, how to tokenize it and where to write it.

    Attributes:
        input: loose JSON file, one object per line.
        output_prefix: prefix of the output files.
        tokenizer_type: one of :data:`megatron.tokenizer.TOKENIZER_TYPES`.
        vocab_file: WordPiece vocabulary (BERT tokenizers).
        tokenizer_model: SentencePiece model (``SentencePieceTokenizer``).
        json_keys: keys whose text is tokenized, one dataset each.
        split_sentences: one sequence per sentence (``_sentence`` files) instead of per document.
        keep_newlines: keep paragraph newlines at the end of sentences.
        sentence_splitter: ``builtin`` or ``nltk``.
        dataset_impl: only ``mmap``.
        workers: tokenizer processes (1 tokenizes in this process).
        chunk_size: lines handed to a worker at a time.
        log_interval: report progress every this many documents.
        skip_bad_lines: skip and count malformed lines instead of failing.
        invalid_utf8: ``error`` (a line that is not UTF-8 is bad input) or ``replace`` (decode
            it with U+FFFD replacement characters, which the BERT tokenizers then drop).
        vocab_extra_ids: ``<extra_id_N>`` tokens added to the vocabulary.
    """

    input: str
    output_prefix: str
    tokenizer_type: str
    vocab_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    json_keys: Sequence[str] = ("text",)
    split_sentences: bool = False
    keep_newlines: bool = False
    sentence_splitter: str = "builtin"
    dataset_impl: str = "mmap"
    workers: int = 1
    chunk_size: int = 25
    log_interval: int = 100
    skip_bad_lines: bool = False
    invalid_utf8: str = "error"
    vocab_extra_ids: int = 0

    def __post_init__(self) -> None:
        self.json_keys = tuple(self.json_keys)
        checks = [
            (self.tokenizer_type in TOKENIZER_TYPES,
             f"unknown tokenizer type {self.tokenizer_type!r}; choose one of {TOKENIZER_TYPES}"),
            (self.dataset_impl == "mmap",
             f"dataset impl {self.dataset_impl!r} is not supported; use mmap"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}"),
            (self.log_interval >= 1, f"log_interval must be >= 1, got {self.log_interval}"),
            (len(self.json_keys) > 0, "json_keys is empty"),
            (len(set(self.json_keys)) == len(self.json_keys),
             f"json_keys has duplicates: {self.json_keys}"),
            (self.invalid_utf8 in INVALID_UTF8_CHOICES,
             f"invalid_utf8 {self.invalid_utf8!r} is not one of {INVALID_UTF8_CHOICES}"),
            (self.sentence_splitter in SPLITTERS,
             f"sentence splitter {self.sentence_splitter!r} is not one of {SPLITTERS}"),
            (os.path.isfile(self.input), f"input file {self.input} does not exist"),
            (os.path.isdir(os.path.dirname(os.path.abspath(self.output_prefix))),
             f"output directory of {self.output_prefix} does not exist"),
        ]
        for ok, message in checks:
            if not ok:
                raise PreprocessError(message)


@dataclasses.dataclass
class PreprocessSummary:
    """Counts of one run.

    Attributes:
        documents: input lines read (documents, bad and blank lines included).
        written: documents written, per key.
        sentences: sequences written over all keys.
        tokens: token ids written over all keys.
        skipped_bad: malformed lines skipped (``skip_bad_lines``).
        skipped_empty: (document, key) pairs skipped because they had no tokens.
        bytes: input bytes read.
        seconds: wall time.
        max_sentences: the most sentences any written document has.
        outputs: the ``.bin`` and ``.idx`` files written.
    """

    documents: int = 0
    written: Dict[str, int] = dataclasses.field(default_factory=dict)
    sentences: int = 0
    tokens: int = 0
    skipped_bad: int = 0
    skipped_empty: int = 0
    bytes: int = 0
    seconds: float = 0.0
    max_sentences: int = 0
    outputs: List[str] = dataclasses.field(default_factory=list)

    @property
    def docs_per_second(self) -> float:
        return self.documents / max(self.seconds, 1e-9)

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def output_prefixes(config: PreprocessConfig) -> Dict[str, str]:
    """``{key: "{output_prefix}_{key}_{sentence|document}"}``."""
    level = "sentence" if config.split_sentences else "document"
    return {key: f"{config.output_prefix}_{key}_{level}" for key in config.json_keys}


class _Encoded(NamedTuple):
    """One input line after tokenization (sent back from a worker)."""

    line: int
    nbytes: int
    docs: Dict[str, Tuple[np.ndarray, np.ndarray]]  # key -> (all ids, sentence lengths)
    empty: int  # keys without tokens
    error: Optional[str]


class _Encoder:
    """Tokenizes lines; one per worker process (built by :func:`_init_worker`)."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self.tokenizer = build_tokenizer(config.tokenizer_type, vocab_file=config.vocab_file,
                                         tokenizer_model=config.tokenizer_model,
                                         vocab_extra_ids=config.vocab_extra_ids)
        self.splitter = None
        if config.split_sentences:
            self.splitter = build_sentence_splitter(config.sentence_splitter,
                                                    config.keep_newlines)

    def _parse(self, raw: bytes) -> dict:
        errors = "strict" if self.config.invalid_utf8 == "error" else "replace"
        try:
            text = raw.decode("utf-8", errors=errors)
        except UnicodeDecodeError as error:
            raise ValueError(f"invalid UTF-8 at byte {error.start} of the line "
                             f"({error.reason}); use --invalid-utf8 replace to decode it "
                             "with replacement characters") from None
        try:
            record = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as error:
            raise ValueError(f"malformed JSON ({error.msg}, column {error.colno})") from None
        except RecursionError:
            raise ValueError("malformed JSON (nested too deeply)") from None
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        return record

    def _tokenize(self, text: str) -> Tuple[np.ndarray, np.ndarray]:
        pieces = self.splitter.tokenize(text) if self.splitter else [text]
        sentences = [ids for ids in map(self.tokenizer.tokenize, pieces) if ids]
        lengths = np.fromiter(map(len, sentences), dtype=np.int32, count=len(sentences))
        flat = np.fromiter(itertools.chain.from_iterable(sentences), dtype=np.int32,
                           count=int(lengths.sum()))
        return flat, lengths

    def encode(self, item: Tuple[int, bytes]) -> _Encoded:
        line, raw = item
        if not raw.strip():
            return _Encoded(line, len(raw), {}, len(self.config.json_keys), None)
        try:
            record = self._parse(raw)
            docs, empty = {}, 0
            for key in self.config.json_keys:
                if key not in record:
                    raise ValueError(f"missing key {key!r} (keys: {sorted(record)[:10]})")
                if not isinstance(record[key], str):
                    raise ValueError(f"key {key!r} is a {type(record[key]).__name__}, "
                                     "not a string")
                flat, lengths = self._tokenize(record[key])
                if len(lengths):
                    docs[key] = (flat, lengths)
                else:
                    empty += 1
        except ValueError as error:
            return _Encoded(line, len(raw), {}, 0, str(error))
        return _Encoded(line, len(raw), docs, empty, None)


_WORKER_ENCODER: Optional[_Encoder] = None


def _init_worker(config: PreprocessConfig) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(config)


def _encode_in_worker(item: Tuple[int, bytes]) -> _Encoded:
    return _WORKER_ENCODER.encode(item)


def _encoded_lines(config: PreprocessConfig, encoder: _Encoder, handle) -> Iterator[_Encoded]:
    lines = enumerate(handle, start=1)
    if config.workers == 1:
        yield from map(encoder.encode, lines)
        return
    # Hand the pool a bounded window of lines at a time: Pool.imap would otherwise read the
    # whole input into its task queue when the workers are slower than the reader.
    window = config.workers * config.chunk_size * 16
    with multiprocessing.Pool(config.workers, initializer=_init_worker,
                              initargs=(config,)) as pool:
        while True:
            batch = list(itertools.islice(lines, window))
            if not batch:
                return
            yield from pool.imap(_encode_in_worker, batch, config.chunk_size)


def preprocess(config: PreprocessConfig,
               progress: Optional[Callable[[PreprocessSummary], None]] = None
               ) -> PreprocessSummary:
    """Tokenize ``config.input`` into indexed datasets.

    Args:
        config: the run's configuration.
        progress: called with the running summary every ``config.log_interval`` documents.

    Returns:
        The final counts; the outputs exist when this returns.

    Raises:
        PreprocessError: for bad input (file and line named) or when no document has tokens;
            no output file is left behind.
    """
    try:
        encoder = _Encoder(config)
    except (ValueError, OSError) as error:
        raise PreprocessError(str(error)) from None
    prefixes = output_prefixes(config)
    builders = {}
    try:
        for key, prefix in prefixes.items():
            builders[key] = indexed_dataset.make_builder(
                indexed_dataset.data_file_path(prefix), config.dataset_impl,
                vocab_size=encoder.tokenizer.vocab_size)
        summary = _run(config, encoder, builders, progress)
        for key, prefix in prefixes.items():
            builders[key].finalize(indexed_dataset.index_file_path(prefix))
            summary.outputs += [indexed_dataset.data_file_path(prefix),
                                indexed_dataset.index_file_path(prefix)]
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    return summary


def _run(config: PreprocessConfig, encoder: _Encoder, builders: Dict, progress) -> \
        PreprocessSummary:
    summary = PreprocessSummary(written={key: 0 for key in config.json_keys})
    start = time.perf_counter()
    # closing(): stop the worker pool as soon as an error leaves the loop.
    with open(config.input, "rb") as handle, \
            contextlib.closing(_encoded_lines(config, encoder, handle)) as results:
        for result in results:
            summary.documents += 1
            summary.bytes += result.nbytes
            if result.error is not None:
                where = f"{config.input}:{result.line}: {result.error}"
                if not config.skip_bad_lines:
                    raise PreprocessError(where + " (use --skip-bad-lines to skip such lines)")
                logger.warning("skipped %s", where)
                summary.skipped_bad += 1
                continue
            summary.skipped_empty += result.empty
            for key, (flat, lengths) in result.docs.items():
                builders[key].add_doc(flat, lengths)
                summary.written[key] += 1
                summary.sentences += len(lengths)
                summary.tokens += len(flat)
                summary.max_sentences = max(summary.max_sentences, len(lengths))
            if progress is not None and summary.documents % config.log_interval == 0:
                summary.seconds = time.perf_counter() - start
                progress(summary)
    summary.seconds = time.perf_counter() - start
    if summary.tokens == 0:
        raise PreprocessError(f"{config.input}: no document has any tokens "
                              f"({summary.documents} lines, {summary.skipped_bad} bad, "
                              f"{summary.skipped_empty} empty); nothing written")
    return summary
