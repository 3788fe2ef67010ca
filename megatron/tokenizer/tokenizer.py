"""Megatron-LM's tokenizer interface: ``build_tokenizer`` and the tokenizers it builds.

Every tokenizer exposes Megatron's attribute names: ``vocab_size``, ``vocab`` (token -> id),
``inv_vocab`` (id -> token), ``tokenize(text) -> ids``, ``detokenize(ids) -> text`` and the special
ids ``cls``, ``sep``, ``pad``, ``mask``, ``unk`` (plus ``eod`` where the tokenizer has one).
Nothing here reads global arguments: :func:`build_tokenizer` takes explicit parameters.
"""

import abc
import logging
from typing import Dict, List, Optional, Sequence

from megatron.tokenizer.bert_tokenization import FullTokenizer

__all__ = ["AbstractTokenizer", "build_tokenizer", "TOKENIZER_TYPES",
           "_BertWordPieceTokenizer", "_SentencePieceTokenizer"]

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("BertWordPieceLowerCase", "BertWordPieceCase", "SentencePieceTokenizer")


class AbstractTokenizer(abc.ABC):
    """What the data pipeline and the model need from a tokenizer."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (the embedding needs at least this many rows)."""

    @property
    @abc.abstractmethod
    def vocab(self) -> Dict[str, int]:
        """Token string -> id."""

    @property
    @abc.abstractmethod
    def inv_vocab(self) -> Dict[int, str]:
        """Id -> token string."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> List[int]:
        """Ids of ``text``, without special tokens."""

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` (approximate inverse of :meth:`tokenize`)."""
        raise NotImplementedError(f"{self.name} tokenizer has no detokenizer")

    def _missing(self, what: str):
        raise NotImplementedError(f"{what} is not provided by the {self.name} tokenizer")

    @property
    def cls(self) -> int:
        return self._missing("CLS")

    @property
    def sep(self) -> int:
        return self._missing("SEP")

    @property
    def pad(self) -> int:
        return self._missing("PAD")

    @property
    def eod(self) -> int:
        return self._missing("EOD")

    @property
    def mask(self) -> int:
        return self._missing("MASK")

    @property
    def unk(self) -> int:
        return self._missing("UNK")


class _VocabTableTokenizer(AbstractTokenizer):
    """A tokenizer whose vocabulary is held in ``self._vocab`` and ``self._inv_vocab``."""

    _vocab: Dict[str, int]
    _inv_vocab: Dict[int, str]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self._inv_vocab


class _BertWordPieceTokenizer(_VocabTableTokenizer):
    """BERT's WordPiece tokenizer (original Google rules; see ``bert_tokenization``).

    Args:
        vocab_file: WordPiece vocabulary.
        lower_case: ``True`` for the uncased vocabularies (lower-case and strip accents).
        vocab_extra_ids: number of ``<extra_id_N>`` tokens appended to the vocabulary.
    """

    def __init__(self, vocab_file: str, lower_case: bool = True, vocab_extra_ids: int = 0) -> None:
        super().__init__("BERT Lower Case" if lower_case else "BERT Upper Case")
        self.tokenizer = FullTokenizer(vocab_file, do_lower_case=lower_case)
        self._vocab = dict(self.tokenizer.vocab)
        self._inv_vocab = dict(self.tokenizer.inv_vocab)
        for token in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"):
            if token not in self._vocab:
                raise ValueError(f"{vocab_file}: the vocabulary lacks the special token {token}")
        self.cls_id = self._vocab["[CLS]"]
        self.sep_id = self._vocab["[SEP]"]
        self.pad_id = self._vocab["[PAD]"]
        self.mask_id = self._vocab["[MASK]"]
        self.unk_id = self._vocab["[UNK]"]
        self._additional_special_tokens: List[str] = []
        for index in range(vocab_extra_ids):
            self._add_token(f"<extra_id_{index}>")

    def _add_token(self, token: str) -> None:
        if token not in self._vocab:
            index = len(self._vocab)
            self._vocab[token] = index
            self._inv_vocab[index] = token
            self._additional_special_tokens.append(token)

    def tokenize(self, text: str) -> List[int]:
        return self.tokenizer.encode(text)

    def decode_token_ids(self, token_ids: Sequence[int]) -> str:
        """Text of ids, dropping ``[PAD]`` and ``[CLS]`` and writing ``[SEP]`` as a newline."""
        tokens = [self._inv_vocab[int(index)] for index in token_ids]
        words = []
        for token in tokens:
            if token in ("[PAD]", "[CLS]"):
                continue
            words.append("\n" if token == "[SEP]" else token)
        return FullTokenizer.convert_tokens_to_string(words).replace(" \n ", "\n").strip()

    def detokenize(self, token_ids: Sequence[int]) -> str:
        tokens = [self._inv_vocab[int(index)] for index in token_ids]
        return FullTokenizer.convert_tokens_to_string(tokens)

    @property
    def cls(self) -> int:
        return self.cls_id

    @property
    def sep(self) -> int:
        return self.sep_id

    @property
    def pad(self) -> int:
        return self.pad_id

    @property
    def mask(self) -> int:
        return self.mask_id

    @property
    def unk(self) -> int:
        return self.unk_id

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        return [self._vocab[token] for token in self._additional_special_tokens]


class _SentencePieceTokenizer(_VocabTableTokenizer):
    """A SentencePiece model with BERT's special tokens added.

    ``<CLS>``, ``<SEP>``, ``<EOD>``, ``<MASK>`` and ``<PAD>`` (and ``<BOS>``/``<EOS>`` when the
    model has no such pieces) take the model's id when the model defines the piece (for example as
    a user-defined symbol) and new ids after the model's pieces otherwise, as in Megatron-LM.
    Special-token strings that occur in the text are tokenized as text.

    Args:
        model_file: a trained SentencePiece ``.model`` file.
        vocab_extra_ids: number of ``<extra_id_N>`` tokens appended.
    """

    def __init__(self, model_file: str, vocab_extra_ids: int = 0) -> None:
        super().__init__("SentencePieceTokenizer")
        import sentencepiece

        self.tokenizer = sentencepiece.SentencePieceProcessor()
        try:
            self.tokenizer.Load(model_file)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{model_file}: cannot load the SentencePiece model ({error})") \
                from None
        self._model_size = self.tokenizer.GetPieceSize()
        self._vocab = {self.tokenizer.IdToPiece(i): i for i in range(self._model_size)}
        self._inv_vocab = {i: piece for piece, i in self._vocab.items()}
        self._special: Dict[str, int] = {}
        self.cls_id = self._add_special("<CLS>")
        self.sep_id = self._add_special("<SEP>")
        self.eod_id = self._add_special("<EOD>")
        self.mask_id = self._add_special("<MASK>")
        self.pad_id = self._add_special(self._model_piece(self.tokenizer.pad_id(), "<PAD>"))
        self.bos_id = self._add_special(self._model_piece(self.tokenizer.bos_id(), "<BOS>"))
        self.eos_id = self._add_special(self._model_piece(self.tokenizer.eos_id(), "<EOS>"))
        self.unk_id = self.tokenizer.unk_id()
        for index in range(vocab_extra_ids):
            self._add_special(f"<extra_id_{index}>")
        self._special_ids = {index: token for token, index in self._special.items()
                             if index >= self._model_size}

    def _model_piece(self, index: int, default: str) -> str:
        return self.tokenizer.IdToPiece(index) if 0 <= index < self._model_size else default

    def _add_special(self, token: str) -> int:
        if token not in self._vocab:
            index = len(self._vocab)
            self._vocab[token] = index
            self._inv_vocab[index] = token
        self._special[token] = self._vocab[token]
        return self._vocab[token]

    def tokenize(self, text: str) -> List[int]:
        return self.tokenizer.EncodeAsIds(text)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        text, run = [], []
        for index in map(int, token_ids):
            if index in self._special_ids:
                text.append(self.tokenizer.DecodeIds(run))
                text.append(self._special_ids[index])
                run = []
            else:
                run.append(index)
        text.append(self.tokenizer.DecodeIds(run))
        return "".join(text)

    @property
    def cls(self) -> int:
        return self.cls_id

    @property
    def sep(self) -> int:
        return self.sep_id

    @property
    def pad(self) -> int:
        return self.pad_id

    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def mask(self) -> int:
        return self.mask_id

    @property
    def unk(self) -> int:
        return self.unk_id

    @property
    def bos(self) -> int:
        return self.bos_id

    @property
    def eos(self) -> int:
        return self.eos_id


def build_tokenizer(tokenizer_type: str, *, vocab_file: Optional[str] = None,
                    tokenizer_model: Optional[str] = None,
                    vocab_extra_ids: int = 0) -> AbstractTokenizer:
    """Build the tokenizer Megatron's ``--tokenizer-type`` names.

    Args:
        tokenizer_type: ``BertWordPieceLowerCase``, ``BertWordPieceCase`` or
            ``SentencePieceTokenizer``.
        vocab_file: WordPiece vocabulary (the BERT types).
        tokenizer_model: SentencePiece model file (``SentencePieceTokenizer``).
        vocab_extra_ids: ``<extra_id_N>`` tokens to append.

    Returns:
        The tokenizer.

    Raises:
        ValueError: for an unknown type or a missing file argument.
    """
    if tokenizer_type in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        if not vocab_file:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs --vocab-file")
        tokenizer = _BertWordPieceTokenizer(
            vocab_file, lower_case=tokenizer_type == "BertWordPieceLowerCase",
            vocab_extra_ids=vocab_extra_ids)
    elif tokenizer_type == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise ValueError("--tokenizer-type SentencePieceTokenizer needs --tokenizer-model")
        tokenizer = _SentencePieceTokenizer(tokenizer_model, vocab_extra_ids=vocab_extra_ids)
    else:
        raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; "
                         f"choose one of {', '.join(TOKENIZER_TYPES)}")
    logger.info("built %s tokenizer, vocabulary size %d", tokenizer.name, tokenizer.vocab_size)
    return tokenizer
