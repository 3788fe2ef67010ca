"""BERT's WordPiece tokenization, implemented for speed without changing a single id.

The algorithm is the one of Google's original BERT ``tokenization.py`` (which Megatron-LM ships as
``bert_tokenization.py``):

1. *Clean*: drop NUL, U+FFFD and control characters (Unicode category ``C*`` other than tab,
   newline and carriage return); map whitespace (those three, space and category ``Zs``) to a
   space.
2. *CJK*: put spaces around every CJK ideograph, so each one becomes a word.
3. Split on whitespace (Python's ``str.split()``).
4. Uncased vocabularies only: lower-case each word, then strip accents (NFD, drop ``Mn``).
5. Split each word around punctuation (ASCII symbols and Unicode category ``P*``).
6. WordPiece each piece: greedy longest-match-first against the vocabulary, continuation pieces
   prefixed with ``##``; a word with no full match, or longer than 100 characters, is ``[UNK]``.

Steps 1-5 are per character or per word, so they are done on the whole text at once with
``str.translate`` tables that grow lazily (each new character is classified with ``unicodedata``
exactly once) and ``str.lower`` (which, like the reference, applies the Greek final-sigma rule
per word: whitespace is neither cased nor case-ignorable, so a word boundary ends the context).
Step 6 is memoised per word. The result is identical to the reference, word for word.

Known differences from Hugging Face's tokenizers, none of which occurs in ordinary text (tests
pin each one): literal special-token strings such as ``"[MASK]"`` in the text are tokenized as
text (``[``, ``mask``, ``]``), as in the original BERT, where Hugging Face maps them to the special
id; Hugging Face's Python tokenizer applies NFC before tokenizing (visible with the cased
vocabulary on decomposed accents) and its Rust tokenizer lower-cases character by character (no
Greek final sigma); here, as in the original, neither.
"""

import collections
import unicodedata
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["FullTokenizer", "load_vocab", "is_whitespace", "is_control", "is_punctuation",
           "is_chinese_char", "MAX_INPUT_CHARS_PER_WORD"]

MAX_INPUT_CHARS_PER_WORD = 100
_CACHE_LIMIT = 1 << 20  # words memoised before the cache is reset (bounds memory)


def load_vocab(vocab_file: str) -> "collections.OrderedDict[str, int]":
    """Read a WordPiece vocabulary: one token a line, the id is the line number.

    Raises:
        FileNotFoundError: if ``vocab_file`` does not exist.
        ValueError: if the file is empty or not UTF-8.
    """
    vocab: "collections.OrderedDict[str, int]" = collections.OrderedDict()
    try:
        with open(vocab_file, encoding="utf-8") as handle:
            for index, line in enumerate(handle):
                token = line.rstrip("\n").rstrip("\r").strip()
                vocab.setdefault(token, index)
    except UnicodeDecodeError as error:
        raise ValueError(f"{vocab_file}: not a UTF-8 vocabulary file ({error})") from None
    if not vocab:
        raise ValueError(f"{vocab_file}: empty vocabulary file")
    return vocab


def is_whitespace(char: str) -> bool:
    """Space, tab, newline, carriage return, or Unicode category ``Zs``."""
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def is_control(char: str) -> bool:
    """Unicode category ``C*`` except tab, newline and carriage return (which are whitespace)."""
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def is_punctuation(char: str) -> bool:
    """Every non-alphanumeric printable ASCII character, and Unicode category ``P*``."""
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def is_chinese_char(char: str) -> bool:
    """A code point of the CJK Unified Ideographs blocks BERT isolates (not Hangul or kana)."""
    cp = ord(char)
    return any(low <= cp <= high for low, high in _CJK_RANGES)


class _LazyTable:
    """A ``str.translate`` table filled on demand: ``classify(char)`` decides each new char."""

    def __init__(self, classify, ascii_chars: bool = True) -> None:
        self._classify = classify
        self.table: Dict[int, Optional[str]] = {}
        self._seen = set()
        if ascii_chars:
            self.update("".join(map(chr, range(128))))

    def update(self, text: str) -> None:
        new = set(text).difference(self._seen)
        for char in new:
            mapped = self._classify(char)
            if mapped != char:
                self.table[ord(char)] = mapped
        self._seen.update(new)


def _clean_char(char: str, split_cjk: bool) -> Optional[str]:
    if char == "\x00" or char == "\ufffd" or is_control(char):
        return None
    if is_whitespace(char):
        return " "
    if split_cjk and is_chinese_char(char):
        return f" {char} "
    return char


def _accent_char(char: str) -> Optional[str]:
    return None if unicodedata.category(char) == "Mn" else char


def _punct_char(char: str) -> str:
    return f" {char} " if is_punctuation(char) else char


class FullTokenizer:
    """Basic tokenization followed by WordPiece, with BERT's exact rules.

    Args:
        vocab_file: WordPiece vocabulary, one token a line.
        do_lower_case: lower-case and strip accents (the uncased vocabularies).
        unk_token: token for words that cannot be split into vocabulary pieces.
        tokenize_chinese_chars: isolate CJK ideographs (BERT does).
    """

    def __init__(self, vocab_file: str, do_lower_case: bool = True, unk_token: str = "[UNK]",
                 tokenize_chinese_chars: bool = True) -> None:
        self.vocab = load_vocab(vocab_file)
        self.inv_vocab = {index: token for token, index in self.vocab.items()}
        self.do_lower_case = do_lower_case
        if unk_token not in self.vocab:
            raise ValueError(f"{vocab_file}: the vocabulary has no unknown token {unk_token!r}")
        self.unk_token = unk_token
        self.unk_id = self.vocab[unk_token]
        self._clean = _LazyTable(lambda c: _clean_char(c, tokenize_chinese_chars))
        self._accents = _LazyTable(_accent_char)
        self._punct = _LazyTable(_punct_char)
        self._cache: Dict[str, Tuple[int, ...]] = {}

    # ----------------------------------------------------------------------- basic tokenization

    def basic_tokenize(self, text: str) -> List[str]:
        """Steps 1-5 of the module docstring: the words and punctuation marks of ``text``."""
        if not text.isascii():
            self._clean.update(text)
        text = text.translate(self._clean.table)
        if self.do_lower_case:
            text = text.lower()
            if not text.isascii():
                text = unicodedata.normalize("NFD", text)
                self._accents.update(text)
                text = text.translate(self._accents.table)
        if not text.isascii():
            self._punct.update(text)
        return text.translate(self._punct.table).split()

    # -------------------------------------------------------------------------------- WordPiece

    def _wordpiece(self, word: str) -> Tuple[int, ...]:
        if len(word) > MAX_INPUT_CHARS_PER_WORD:
            return (self.unk_id,)
        vocab = self.vocab
        ids = []
        start, length = 0, len(word)
        while start < length:
            end = length
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                index = vocab.get(piece)
                if index is not None:
                    ids.append(index)
                    break
                end -= 1
            else:
                return (self.unk_id,)
            start = end
        return tuple(ids)

    def word_ids(self, word: str) -> Tuple[int, ...]:
        """WordPiece ids of one basic token (memoised)."""
        ids = self._cache.get(word)
        if ids is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            ids = self._cache[word] = self._wordpiece(word)
        return ids

    # ----------------------------------------------------------------------------- public API

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no special tokens added)."""
        cache = self._cache
        ids: List[int] = []
        extend = ids.extend
        for word in self.basic_tokenize(text):
            pieces = cache.get(word)
            if pieces is None:
                pieces = self.word_ids(word)
            extend(pieces)
        return ids

    def tokenize(self, text: str) -> List[str]:
        """Token strings of ``text`` (``##`` marks continuation pieces)."""
        return self.convert_ids_to_tokens(self.encode(text))

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> List[int]:
        """Ids of vocabulary tokens.

        Raises:
            KeyError: naming the first token that is not in the vocabulary.
        """
        try:
            return [self.vocab[token] for token in tokens]
        except KeyError as error:
            raise KeyError(f"token {error.args[0]!r} is not in the vocabulary") from None

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> List[str]:
        """Vocabulary tokens of ids.

        Raises:
            KeyError: naming the first id outside the vocabulary.
        """
        try:
            return [self.inv_vocab[int(index)] for index in ids]
        except KeyError as error:
            raise KeyError(f"id {error.args[0]} is not in the vocabulary "
                           f"(size {len(self.vocab)})") from None

    @staticmethod
    def convert_tokens_to_string(tokens: Sequence[str]) -> str:
        """Join tokens with spaces and glue ``##`` continuation pieces to their word."""
        return " ".join(tokens).replace(" ##", "").strip()
