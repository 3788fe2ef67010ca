"""The WordPiece tokenizers give Hugging Face's ids; SentencePiece gets BERT's special tokens."""

import json
from pathlib import Path

import pytest

from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.bert_tokenization import FullTokenizer, load_vocab

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCABS = {"uncased": DATA / "bert-large-uncased-vocab.txt",
          "cased": DATA / "bert-large-cased-vocab.txt"}
TYPES = {"uncased": "BertWordPieceLowerCase", "cased": "BertWordPieceCase"}

transformers = pytest.importorskip("transformers")

# Hard cases; each one is checked against both Hugging Face tokenizers.
TRICKY = [
    "Héllo, Wörld! naïve café RÉSUMÉ Ångström Ω",
    "中文字符和日本語のテキスト 한국어",
    "tab\there\nnew\rline\x00nul\x07bell\u200bzwsp\ufffd end",
    "a" * 101 + " " + "b" * 100 + " " + "supercalifragilisticexpialidocious",
    "\u2028sep\u2029para\xa0nbsp\u3000ideographic space",
    "emoji 😀👍🏽 and ℌ ﬁ ligature ½ ² ¾",
    "İstanbul ǅ ß straße",
    "$1.13bn (£600m) 76% -- 3.14; U.S.A. e.g. Mr. O'Neil's \"quoted\" [bracket]",
    "\u0300start combining \x85nel\x1cfs\x0bvt\x0cff",
    "",
    "   \n\t  ",
]
# Documented differences from Hugging Face (see megatron/tokenizer/bert_tokenization.py).
HF_DIFFERENT = {
    "special token text": "a [MASK] b [SEP]",  # BERT tokenizes it as text; HF as the special id
    "final sigma": "ΟΔΟΣ",  # the Rust tokenizer lower-cases per character
    "no NFC": "e\u0301",  # the Python HF tokenizer composes first (cased only)
}


def _hf_tokenizers(case):
    """Hugging Face's Rust-backed and pure-Python BERT tokenizers for ``case``."""
    lower = case == "uncased"
    vocab = str(VOCABS[case])
    try:  # transformers >= 5: BertTokenizer is Rust-backed, the Python one is "Legacy"
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

        fast = transformers.BertTokenizer(vocab=vocab, do_lower_case=lower)
        slow = BertTokenizerLegacy(vocab, do_lower_case=lower)
    except ImportError:  # transformers 4
        fast = transformers.BertTokenizerFast(vocab_file=vocab, do_lower_case=lower)
        slow = transformers.BertTokenizer(vocab_file=vocab, do_lower_case=lower)
    return fast, slow


@pytest.fixture(scope="module", params=["uncased", "cased"])
def pair(request):
    case = request.param
    ours = build_tokenizer(TYPES[case], vocab_file=str(VOCABS[case]))
    return case, ours, _hf_tokenizers(case)


def _hf_ids(tokenizer, texts):
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def test_tricky_strings_match_both_hugging_face_tokenizers(pair):
    _, ours, (fast, slow) = pair
    expected_fast, expected_slow = _hf_ids(fast, TRICKY), _hf_ids(slow, TRICKY)
    for text, ids_fast, ids_slow in zip(TRICKY, expected_fast, expected_slow):
        assert ours.tokenize(text) == ids_fast == ids_slow, repr(text)


def test_documented_differences_from_hugging_face(pair):
    case, ours, (fast, slow) = pair
    text = HF_DIFFERENT["special token text"]
    pieces = ours.tokenizer.tokenize(text)
    assert pieces[:2] == ["a", "["] and pieces[-1] == "]"  # brackets split off as punctuation
    assert ours.mask not in ours.tokenize(text) and ours.sep not in ours.tokenize(text)
    assert ours.mask in _hf_ids(fast, [text])[0]  # HF maps the literal string to the id
    if case == "uncased":  # str.lower() applies the final-sigma rule, as BERT's Python code
        assert ours.tokenizer.tokenize("ΟΔΟΣ") == slow.tokenize("ΟΔΟΣ")
    else:
        assert ours.tokenize("e\u0301") == _hf_ids(fast, ["e\u0301"])[0]


def test_shakespeare_tiny_matches_hugging_face(pair):
    _, ours, (fast, slow) = pair
    texts = [json.loads(line)["text"] for line in open(DATA / "shakespeare_tiny.jsonl")]
    assert len(texts) == 21
    ours_ids = [ours.tokenize(text) for text in texts]
    assert ours_ids == _hf_ids(fast, texts)
    assert ours_ids[:5] == _hf_ids(slow, texts[:5])


@pytest.mark.skipif(not (SHARED / "pretrain").is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("corpus", ["tiny", "shakespeare", "bbc_news"])
def test_shared_corpora_match_hugging_face(pair, corpus):
    """Every document of the shared corpora: ours == HF Rust; == HF Python on the uncased vocab.

    The pure-Python HF tokenizer takes ~15 s per 10 MB, so the cased vocabulary is compared
    with it on the small corpus only (the Rust one checks all of it).
    """
    case, ours, (fast, slow) = pair
    texts = [json.loads(line)["text"] for line in open(SHARED / "pretrain" / f"{corpus}.jsonl")]
    ours_ids = [ours.tokenize(text) for text in texts]
    assert ours_ids == _hf_ids(fast, texts)
    if case == "uncased" or corpus == "tiny":
        assert ours_ids == _hf_ids(slow, texts)


def test_bert_attributes_and_detokenize():
    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCABS["uncased"]))
    assert tokenizer.vocab_size == 30522
    assert (tokenizer.pad, tokenizer.unk, tokenizer.cls, tokenizer.sep, tokenizer.mask) == \
        (0, 100, 101, 102, 103)
    assert tokenizer.inv_vocab[101] == "[CLS]" and tokenizer.vocab["[MASK]"] == 103
    ids = tokenizer.tokenize("Unaffable people, naturally!")
    assert [tokenizer.inv_vocab[i] for i in ids] == \
        ["una", "##ffa", "##ble", "people", ",", "naturally", "!"]
    assert tokenizer.detokenize(ids) == "unaffable people , naturally !"
    assert tokenizer.tokenize("x" * 101) == [tokenizer.unk]
    assert tokenizer.tokenize("x" * 100) != [tokenizer.unk]
    cased = build_tokenizer("BertWordPieceCase", vocab_file=str(VOCABS["cased"]),
                            vocab_extra_ids=2)
    assert cased.vocab_size == 28996 + 2 and cased.inv_vocab[28997] == "<extra_id_1>"
    assert cased.tokenize("Hello") != tokenizer.tokenize("hello")


def test_word_cache_does_not_change_results():
    tokenizer = FullTokenizer(str(VOCABS["uncased"]))
    text = "The quick brown fox jumps over the lazy dog; the dog sleeps."
    first = tokenizer.encode(text)
    assert tokenizer.encode(text) == first
    tokenizer._cache.clear()
    assert tokenizer.encode(text) == first


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'GPT2BPE'"):
        build_tokenizer("GPT2BPE", vocab_file=str(VOCABS["uncased"]))
    with pytest.raises(ValueError, match="needs --vocab-file"):
        build_tokenizer("BertWordPieceLowerCase")
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(FileNotFoundError):
        build_tokenizer("BertWordPieceLowerCase", vocab_file=str(tmp_path / "missing.txt"))
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\nhello\n")
    with pytest.raises(ValueError, match="no unknown token"):
        build_tokenizer("BertWordPieceLowerCase", vocab_file=str(bad))
    bad.write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match="lacks the special token"):
        build_tokenizer("BertWordPieceLowerCase", vocab_file=str(bad))
    bad.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match="not a UTF-8 vocabulary"):
        load_vocab(str(bad))
    garbage = tmp_path / "model.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load the SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(garbage))


def train_sentencepiece(directory: Path) -> str:
    """Train a small unigram model on the Shakespeare sample; returns the model file."""
    import sentencepiece

    corpus = directory / "corpus.txt"
    with open(DATA / "shakespeare_tiny.jsonl") as source, open(corpus, "w") as handle:
        handle.writelines(json.loads(line)["text"] + "\n" for line in source)
    prefix = directory / "shakespeare"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=800, model_type="unigram",
        character_coverage=1.0, num_threads=1, minloglevel=2)
    return str(prefix) + ".model"


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


def test_sentencepiece_tokenizer(sentencepiece_model):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor()
    reference.Load(sentencepiece_model)
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sentencepiece_model)
    text = "To be, or not to be: that is the question."
    ids = tokenizer.tokenize(text)
    assert ids == reference.EncodeAsIds(text)
    assert tokenizer.detokenize(ids) == text
    # BERT's special tokens come after the model's 800 pieces (the model has <unk>, <s>, </s>).
    specials = [tokenizer.cls, tokenizer.sep, tokenizer.eod, tokenizer.mask, tokenizer.pad]
    assert specials == [800, 801, 802, 803, 804]
    assert [tokenizer.inv_vocab[i] for i in specials] == \
        ["<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>"]
    assert tokenizer.unk == reference.unk_id() and tokenizer.bos == reference.bos_id()
    assert tokenizer.vocab_size == 805 == len(tokenizer.inv_vocab)
    assert tokenizer.detokenize([tokenizer.cls] + ids + [tokenizer.sep]) == \
        f"<CLS>{text}<SEP>"
