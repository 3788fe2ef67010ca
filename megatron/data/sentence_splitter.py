"""Sentence splitting for ``tools/preprocess_data.py --split-sentences``, with no downloads.

Megatron-LM splits with NLTK's punkt model, whose data must be downloaded. The built-in splitter
here needs nothing and handles the usual traps well enough for BERT's sentence-order task:

* a newline always ends a sentence (the loose-JSON corpora put one paragraph, title or speech per
  line); with ``keep_newlines`` the newline stays at the end of the sentence's text;
* a sentence ends at ``.``, ``!``, ``?`` or an ellipsis, with any closing quotes or brackets
  after it, followed by whitespace and a word that does not start with a lower-case letter;
* a period does not end a sentence after a title (``Mr.``, ``Dr.``, ``St.``, ...), after a Latin
  abbreviation (``e.g.``, ``i.e.``, ``vs.``), after an initial (``J. K. Rowling``) or a dotted
  acronym (``U.S.``), nor after ``No.``/``Vol.``/``Fig.``/... before a number; decimals such as
  ``3.14`` never split because no space follows the period.

``build_sentence_splitter("nltk")`` uses punkt instead, where NLTK and its data are installed.
"""

import re
from typing import List, Optional

__all__ = ["SentenceSplitter", "build_sentence_splitter", "SPLITTERS"]

SPLITTERS = ("builtin", "nltk")

# A candidate end: terminal punctuation, closing quotes/brackets, then whitespace.
_CANDIDATE = re.compile(r"(?:\.\.\.|…|[.!?])+[\"'”’»)\]]*(?=\s)")
_LAST_WORD = re.compile(r"[^\s\"'“‘«(\[]+$")
_OPENERS = "\"'“‘«(["

TITLES = frozenset("""
    mr mrs ms messrs mme mlle dr prof rev fr st sr jr gen col maj lt sgt capt cpt cmdr adm gov
    sen rep hon pres supt insp det mt ft
""".split())
LATIN = frozenset("e.g i.e cf vs viz approx ca al".split())
NUMBER_ABBREVIATIONS = frozenset("no nos vol vols pp p fig figs art sec ch eq ed op".split())


class SentenceSplitter:
    """Rule-based splitter (see the module docstring); ``tokenize(text)`` gives the sentences.

    Args:
        keep_newlines: keep each paragraph's trailing newline on its last sentence.
    """

    def __init__(self, keep_newlines: bool = False) -> None:
        self.keep_newlines = keep_newlines

    def tokenize(self, text: str) -> List[str]:
        """The sentences of ``text``, stripped of surrounding whitespace; none are empty."""
        sentences: List[str] = []
        lines = text.split("\n")
        for number, line in enumerate(lines):
            parts = self.split_paragraph(line)
            if parts and self.keep_newlines and number < len(lines) - 1:
                parts[-1] += "\n"
            sentences.extend(parts)
        return sentences

    def split_paragraph(self, paragraph: str) -> List[str]:
        """The sentences of one line of text."""
        sentences = []
        start = 0
        for match in _CANDIDATE.finditer(paragraph):
            if self._ends_sentence(paragraph, match):
                sentence = paragraph[start:match.end()].strip()
                if sentence:
                    sentences.append(sentence)
                start = match.end()
        tail = paragraph[start:].strip()
        if tail:
            sentences.append(tail)
        return sentences

    @staticmethod
    def _ends_sentence(text: str, match: "re.Match") -> bool:
        following = text[match.end():].lstrip()
        if not following:
            return True
        first = following.lstrip(_OPENERS)[:1] or following[:1]
        if first.islower() or first in ",;:":
            return False
        mark = match.group().rstrip("\"'”’»)]")
        if mark != ".":
            return True  # "!", "?", ellipses: only a lower-case continuation keeps going
        word = _LAST_WORD.search(text, 0, match.start())
        if word is None:
            return True
        word = word.group()
        lower = word.lower()
        if lower in TITLES or lower in LATIN:
            return False
        if lower in NUMBER_ABBREVIATIONS and first.isdigit():
            return False
        if len(word) == 1 and word.isupper():
            return False  # an initial: "J. K. Rowling"
        if re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", word):
            return False  # a dotted acronym: "U.S.", "a.m."
        return True


class _NltkSplitter:
    """NLTK's punkt, applied line by line like the built-in splitter."""

    def __init__(self, keep_newlines: bool) -> None:
        try:
            import nltk

            self._punkt = nltk.data.load("tokenizers/punkt/english.pickle")
        except (ImportError, LookupError, OSError) as error:
            raise ValueError("--sentence-splitter nltk needs the nltk package and its punkt "
                             f"data ({type(error).__name__}); use the built-in splitter") from None
        self.keep_newlines = keep_newlines

    def tokenize(self, text: str) -> List[str]:
        sentences: List[str] = []
        lines = text.split("\n")
        for number, line in enumerate(lines):
            parts = [s.strip() for s in self._punkt.tokenize(line) if s.strip()]
            if parts and self.keep_newlines and number < len(lines) - 1:
                parts[-1] += "\n"
            sentences.extend(parts)
        return sentences


def build_sentence_splitter(kind: str = "builtin", keep_newlines: bool = False,
                            language: Optional[str] = None):
    """A splitter with a ``tokenize(text) -> sentences`` method.

    Args:
        kind: ``"builtin"`` (no dependencies) or ``"nltk"`` (punkt; needs its data).
        keep_newlines: keep paragraph newlines on the sentences.
        language: unused; reserved for punkt models of other languages.

    Raises:
        ValueError: for an unknown kind, or ``nltk`` when NLTK or punkt is not installed.
    """
    del language
    if kind == "builtin":
        return SentenceSplitter(keep_newlines=keep_newlines)
    if kind == "nltk":
        return _NltkSplitter(keep_newlines)
    raise ValueError(f"unknown sentence splitter {kind!r}; choose one of {SPLITTERS}")
