"""WordPiece: the same ids as transformers' BertTokenizerFast on a vocab.txt, training, caching, round trips."""

from __future__ import annotations

import json

import pytest

from lmforge import plugins
from lmforge.data.sources import embedded
from lmforge.errors import UserError
from lmforge.tokenizers import (
    SAMPLE_TEXTS,
    WordPieceTokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
    tokenizer_to_dict,
    tokenizers_differ,
)

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "quick", "brown", "fox", "jump", "##s", "##ed", "over",
    "lazy", "dog", "cafe", "nai", "##ve", "un", "##believ", "##able", "!", ",", ".", "?", "'", "a", "b", "c", "e",
    "f", "##e", "##f", "hello", "world", "é", "i", "##i",
]  # fmt: skip

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, WORLD! Café naïve?",
    "unbelievable jumped foxes, zebra's xylophone",
    "  spaces\tand\nnew lines  ",
    "[MASK] fox [SEP] dog",
    "",
]
PAIRS = [("The quick fox.", "A lazy dog!"), ("Café", "naïve unknownword"), ("hello", "WORLD, fox")]


@pytest.fixture
def vocab_dir(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("lowercase", [True, False])
def test_matches_bert_tokenizer_fast(vocab_dir, lowercase):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.BertTokenizerFast.from_pretrained(str(vocab_dir), do_lower_case=lowercase)
    ours = WordPieceTokenizer.from_file(vocab_dir, lowercase=lowercase)
    assert (ours.cls_id, ours.sep_id, ours.pad_id, ours.mask_id, ours.unk_id) == (2, 3, 0, 4, 1)
    assert ours.vocab_size == len(VOCAB)
    for text in SENTENCES:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode_pair(text) == tuple(
            theirs(text)[k] for k in ("input_ids", "token_type_ids")
        ), text  # fmt: skip
    for a, b in PAIRS:
        enc = theirs(a, b)
        assert ours.encode_pair(a, b) == (enc["input_ids"], enc["token_type_ids"]), (a, b)
    assert ours.decode(ours.encode("The quick fox jumps")) == theirs.decode(
        theirs("The quick fox jumps", add_special_tokens=False)["input_ids"], skip_special_tokens=True
    )


def test_accents_and_unknown_words(vocab_dir):
    ours = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt")
    ids = ours.encode("Café naïve zebra")
    assert ids == [VOCAB.index("cafe"), VOCAB.index("nai"), VOCAB.index("##ve"), ours.unk_id]
    keep = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt", lowercase=True, strip_accents=False)
    assert keep.encode("é") == [VOCAB.index("é")]


def test_continuation_mask(vocab_dir):
    tok = WordPieceTokenizer.from_file(vocab_dir)
    mask = tok.continuation_mask()
    assert mask.shape == (tok.vocab_size,)
    assert {VOCAB[i] for i in mask.nonzero()[0]} == {t for t in VOCAB if t.startswith("##")}


def test_round_trips_and_save(vocab_dir, tmp_path):
    tok = WordPieceTokenizer.from_file(vocab_dir)
    record = json.loads(json.dumps(tokenizer_to_dict(tok)))
    assert record["type"] == "wordpiece"
    assert tokenizers_differ(tok, tokenizer_from_dict(record), "from_dict", [*SAMPLE_TEXTS, *SENTENCES]) is None
    out = tmp_path / "saved"
    save_tokenizer(tok, out)
    assert (out / "vocab.txt").read_text(encoding="utf-8").splitlines() == VOCAB
    assert (out / "tokenizer.json").is_file()
    assert tokenizers_differ(tok, load_tokenizer(out), "load_tokenizer", SENTENCES) is None
    from_vocab = WordPieceTokenizer.from_file(out / "vocab.txt")
    assert [from_vocab.encode(t) for t in SENTENCES] == [tok.encode(t) for t in SENTENCES]


def test_plugin_trains_and_caches(tmp_path):
    corpus = embedded(size_bytes=50_000)
    tok = plugins.build("tokenizer", {"name": "wordpiece", "vocab_size": 300}, corpus, tmp_path)
    assert isinstance(tok, WordPieceTokenizer)
    assert tok.vocab_size <= 300 and (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.eos_id == tok.sep_id
    text = "Every quiet fox follows the lantern."
    assert tok.decode(tok.encode(text)) == text.lower()
    folders = list(tmp_path.glob("wordpiece-*"))
    assert len(folders) == 1 and (folders[0] / "vocab.txt").is_file()
    again = plugins.build("tokenizer", {"name": "wordpiece", "vocab_size": 300}, corpus, tmp_path)
    assert again.fingerprint() == tok.fingerprint()
    loaded = plugins.build("tokenizer", {"name": "wordpiece", "path": str(folders[0] / "vocab.txt")}, corpus, tmp_path)
    assert loaded.encode(text) == tok.encode(text)


def test_missing_special_tokens(tmp_path):
    """A vocab.txt without [MASK] gets it appended (as transformers does); a tokenizer.json without it is refused."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", encoding="utf-8")
    tok = WordPieceTokenizer.from_file(tmp_path)
    assert tok.mask_id == transformers.BertTokenizerFast.from_pretrained(str(tmp_path)).mask_token_id == 5
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordPiece({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hi": 4}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match=r"has no mask_token '\[MASK\]'; add it to the vocabulary"):
        WordPieceTokenizer.from_file(tmp_path / "tokenizer.json")
