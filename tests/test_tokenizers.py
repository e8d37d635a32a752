"""Byte and Hugging Face tokenizers: exact round trips, saving, loading and fingerprints."""

from __future__ import annotations

import json
import re
import sys

import pytest

from lmforge import plugins, tokenizers
from lmforge.errors import UserError
from lmforge.tokenizers import (
    EOS_TOKEN,
    META_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

SAMPLES = [
    "plain ASCII text, with punctuation!\n\tand a tab",
    "accents: café, naïve, Größe, señor, Ångström, œuvre",
    "CJK: 東京は日本の首都です。北京欢迎你。서울특별시",
    "emoji: 😀 🎉 👩‍👩‍👧 🇫🇷 and a flag",
    "",
]

TRAIN_CORPUS = [
    "Grüße aus München! Die schöne Straße führt über die Brücke zum Fluss.",
    "Ça va très bien, merci beaucoup. Le garçon mange une crêpe à côté de la fenêtre.",
    "東京は日本の首都です。大阪は食べ物が美味しい。京都には古いお寺がたくさんあります。",
    "Привет, как дела? Сегодня хорошая погода, и мы идём в парк.",
    "El niño comió paella en la playa de Valencia con su familia.",
    "Καλημέρα! Η θάλασσα είναι γαλάζια σήμερα.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
] * 40

UNSEEN = [
    "Ελληνικά, עברית and हिन्दी were never in the training text 🐍🚀",
    "  leading spaces, trailing spaces  \n\n\r\nand CRLF\r\n",
    "Zürich → Tōkyō ≠ Kraków ✓ \u00a0nbsp \u200bzwsp",
    "数学: ∑_{i=1}^n i² = n(n+1)/2",
]


class ListCorpus:
    """A minimal corpus (the ``lmforge.datasets`` protocol) that counts how often it is read."""

    def __init__(self, texts: list[str], key: str = "list-corpus") -> None:
        self.texts, self._key, self.reads = texts, key, 0

    def key(self) -> str:
        return self._key

    def documents(self):
        self.reads += 1
        return iter(self.texts)

    def num_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return HFTokenizer.train_bpe(TRAIN_CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def other_bpe() -> HFTokenizer:
    return HFTokenizer.train_bpe(TRAIN_CORPUS[:3] * 3, vocab_size=300)


# -- bytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_constants_and_eos():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert isinstance(tok, Tokenizer)
    assert tok.decode([104, 105, 256, 33, 256]) == "hi!"
    assert [list(ids) for ids in tok.encode_batch(["ab", "é"])] == [[97, 98], [0xC3, 0xA9]]
    assert tok.fingerprint() == "bytes-v1"


def test_byte_tokenizer_save_load(tmp_path):
    ByteTokenizer().save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / META_FILE).read_text()) == {"type": "bytes"}
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, ByteTokenizer)
    assert isinstance(tokenizer_from_dict(ByteTokenizer().to_dict()), ByteTokenizer)


# -- trained BPE -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES + UNSEEN + TRAIN_CORPUS[:7])
def test_bpe_exact_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.eos_id not in ids
    assert bpe.decode(ids) == text


def test_bpe_vocabulary(bpe):
    assert isinstance(bpe, Tokenizer)
    assert 257 <= bpe.vocab_size <= 320
    assert bpe.eos_id == bpe._tok.token_to_id(EOS_TOKEN)
    assert EOS_TOKEN in bpe._tok.get_vocab(with_added_tokens=True)
    # It learned merges: the training text takes fewer tokens than bytes.
    text = TRAIN_CORPUS[0]
    assert len(bpe.encode(text)) < 0.8 * len(text.encode("utf-8"))
    # decode drops the end-of-text token
    assert bpe.decode(bpe.encode("ab") + [bpe.eos_id] + bpe.encode("cd")) == "abcd"
    assert bpe.encode_batch(UNSEEN[:2]) == [bpe.encode(UNSEEN[0]), bpe.encode(UNSEEN[1])]


@pytest.mark.parametrize("vocab_size", [0, 100, 256])
def test_bpe_vocab_too_small(vocab_size):
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size}.*257"):
        HFTokenizer.train_bpe(TRAIN_CORPUS, vocab_size=vocab_size)


def test_bpe_save_load_round_trip(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "tok" / META_FILE).read_text()) == {"type": "hf", "eos_token": EOS_TOKEN}
    assert not list((tmp_path / "tok").glob("*.tmp")) and not list((tmp_path / "tok").glob(".*"))
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, HFTokenizer)
    assert loaded.fingerprint() == bpe.fingerprint()
    assert (loaded.vocab_size, loaded.eos_id) == (bpe.vocab_size, bpe.eos_id)
    for text in UNSEEN + SAMPLES:
        assert loaded.encode(text) == bpe.encode(text)
    # A folder holding only tokenizer.json (e.g. from the Hub) loads too.
    (tmp_path / "tok" / META_FILE).unlink()
    assert load_tokenizer(tmp_path / "tok").fingerprint() == bpe.fingerprint()
    # from_file takes the folder or the file itself
    assert HFTokenizer.from_file(tmp_path / "tok" / "tokenizer.json").fingerprint() == bpe.fingerprint()


def test_bpe_to_dict_round_trip(bpe):
    values = bpe.to_dict()
    assert values["type"] == "hf" and values["eos_token"] == EOS_TOKEN
    rebuilt = tokenizer_from_dict(json.loads(json.dumps(values)))  # as stored in a checkpoint
    assert rebuilt.fingerprint() == bpe.fingerprint()
    for text in UNSEEN + SAMPLES:
        assert rebuilt.encode(text) == bpe.encode(text)


def test_fingerprints_differ_between_tokenizers(bpe, other_bpe):
    assert bpe.fingerprint().startswith("hf-")
    assert bpe.fingerprint() != other_bpe.fingerprint()
    assert bpe.fingerprint() != ByteTokenizer().fingerprint()
    # deterministic: training again on the same text gives the same tokenizer
    assert HFTokenizer.train_bpe(TRAIN_CORPUS, vocab_size=320).fingerprint() == bpe.fingerprint()


def test_from_file_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        HFTokenizer.from_file(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        HFTokenizer.from_file(empty)


def test_tokenizer_json_without_eos(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    folder = tmp_path / "noeos"
    folder.mkdir()
    RustTokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer.from_file(folder)
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(folder)
    # naming a token it has works
    tok = HFTokenizer.from_file(folder, eos_token="[UNK]")
    assert tok.eos_id == 0 and tok.vocab_size == 2


def test_invalid_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        HFTokenizer.from_file(tmp_path)


def test_unknown_type_in_checkpoint():
    with pytest.raises(ValueError, match="'sentencepiece'"):
        tokenizer_from_dict({"type": "sentencepiece"})


# -- the ``lmforge.tokenizers`` plugins: (corpus, cache_dir, **kwargs) -> Tokenizer --------------------


def test_byte_level_factory(tmp_path):
    corpus = ListCorpus(TRAIN_CORPUS)
    tok = tokenizers.byte_level(corpus, tmp_path / "cache")
    assert isinstance(tok, ByteTokenizer)
    assert corpus.reads == 0 and not (tmp_path / "cache").exists()  # needs no training and no files
    assert isinstance(plugins.build("tokenizer", {"name": "bytes"}, corpus, tmp_path / "cache"), ByteTokenizer)


def test_bpe_factory_trains_once_and_caches(bpe, tmp_path):
    corpus = ListCorpus(TRAIN_CORPUS)
    tok = tokenizers.bpe(corpus, tmp_path, vocab_size=320)
    folder = tmp_path / "bpe-list-corpus-320-2"  # keyed by corpus content, vocabulary and min_frequency
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert (folder / "tokenizer.json").is_file()
    assert json.loads((folder / META_FILE).read_text()) == {"type": "hf", "eos_token": EOS_TOKEN}
    assert corpus.reads == 1
    assert tok.fingerprint() == bpe.fingerprint()  # the same as training directly with the same settings

    # A second call loads the cached tokenizer: the corpus is not read again, nothing is rewritten.
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    again = tokenizers.bpe(corpus, tmp_path, vocab_size=320)
    assert corpus.reads == 1
    assert again.fingerprint() == tok.fingerprint() and (again.vocab_size, again.eos_id) == (tok.vocab_size, tok.eos_id)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp

    # another corpus key, vocabulary or frequency threshold: another folder
    tokenizers.bpe(ListCorpus(TRAIN_CORPUS[:3] * 3, key="other"), tmp_path, vocab_size=300, min_frequency=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe-list-corpus-320-2", "bpe-other-300-1"]

    # through the plugin registry
    built = plugins.build("tokenizer", {"name": "bpe", "vocab_size": 320}, corpus, tmp_path)
    assert corpus.reads == 1 and built.fingerprint() == bpe.fingerprint()


def test_bpe_factory_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=256.*257"):
        tokenizers.bpe(ListCorpus(TRAIN_CORPUS), tmp_path, vocab_size=256)
    assert not list(tmp_path.iterdir())  # no half-written cache folder


def test_hf_factory(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    corpus = ListCorpus(TRAIN_CORPUS)
    cache = tmp_path / "cache"
    tok = tokenizers.hf(corpus, cache, path=str(tmp_path / "tok"))
    assert isinstance(tok, HFTokenizer) and tok.eos_token == EOS_TOKEN
    assert tok.fingerprint() == bpe.fingerprint()
    # the file itself works too
    assert (
        tokenizers.hf(corpus, cache, path=str(tmp_path / "tok" / "tokenizer.json")).fingerprint() == bpe.fingerprint()
    )
    assert corpus.reads == 0 and not cache.exists()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        tokenizers.hf(corpus, cache, path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="'<missing>'.*eos_token"):
        tokenizers.hf(corpus, cache, path=str(tmp_path / "tok"), eos_token="<missing>")
    built = plugins.build("tokenizer", {"name": "hf", "path": str(tmp_path / "tok")}, corpus, cache)
    assert built.fingerprint() == bpe.fingerprint()


# -- chat templates ---------------------------------------------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_folder(path, config: dict | None = None, jinja: str | None = None):
    """A Hugging Face tokenizer folder: a tiny byte-level BPE with ChatML special tokens."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS_TOKEN, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_CORPUS[:20], trainer=trainer)
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", **(config or {})}))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "config, jinja, expected",
    [
        ({}, None, None),
        ({"chat_template": CHATML}, None, CHATML),
        (
            {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML}]},
            None,
            CHATML,
        ),
        ({"chat_template": [{"name": "tool_use", "template": "T"}]}, None, None),
        ({"chat_template": "from the config"}, CHATML, CHATML),  # the .jinja file wins, as in transformers
        ({}, CHATML, CHATML),
    ],
)
def test_chat_template_read_from_folder(tmp_path, config, jinja, expected):
    tokenizer = HFTokenizer.from_pretrained_folder(chatml_folder(tmp_path / "tok", config, jinja))
    assert tokenizer.chat_template == expected
    assert ("chat_template" in tokenizer.to_dict()) == (expected is not None)


def test_chat_template_round_trips(tmp_path):
    tokenizer = HFTokenizer.from_pretrained_folder(chatml_folder(tmp_path / "tok", jinja=CHATML))
    values = tokenizer.to_dict()
    assert values["chat_template"] == CHATML and values["eos_token"] == "<|im_end|>"
    rebuilt = tokenizer_from_dict(json.loads(json.dumps(values)))  # as stored in a checkpoint
    assert rebuilt.chat_template == CHATML and rebuilt.fingerprint() == tokenizer.fingerprint()
    tokenizer.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / META_FILE).read_text())["chat_template"] == CHATML
    loaded = load_tokenizer(tmp_path / "saved")
    assert loaded.chat_template == CHATML and loaded.eos_token == "<|im_end|>"
    assert loaded.to_dict() == values


def test_no_chat_template_leaves_entries_unchanged(bpe, tmp_path):
    """Older checkpoints (and the tests comparing them) have no chat_template key: none is written when unset."""
    assert bpe.chat_template is None and "chat_template" not in bpe.to_dict()
    bpe.save(tmp_path / "tok")
    assert "chat_template" not in json.loads((tmp_path / "tok" / META_FILE).read_text())
    assert load_tokenizer(tmp_path / "tok").chat_template is None
    assert tokenizer_from_dict(bpe.to_dict()).chat_template is None


def test_special_tokens_in_text_are_single_ids(tmp_path):
    tokenizer = HFTokenizer.from_pretrained_folder(chatml_folder(tmp_path / "tok", jinja=CHATML))
    start, end = tokenizer._tok.token_to_id("<|im_start|>"), tokenizer._tok.token_to_id("<|im_end|>")
    assert tokenizer.special_tokens() == {EOS_TOKEN: 0, "<|im_start|>": start, "<|im_end|>": end}
    assert tokenizer.eos_id == end
    ids = tokenizer.encode("<|im_start|>user\nThe fox.<|im_end|>\n")
    assert ids[0] == start and ids.count(start) == 1 and ids.count(end) == 1
    assert ids[1:] == [*tokenizer.encode("user\nThe fox."), end, *tokenizer.encode("\n")]


# -- tokenizer plugins: restored from checkpoints and folders by their class, and nothing else ---------------------

WORDTOK = '''
import json, os
from pathlib import Path


class WordTok:
    """Whitespace-separated words; ids 0 (unknown) and 1 (EOS), then the corpus's words."""

    eos_id = 1

    def __init__(self, words):
        self.words = ["<unk>", "<eos>", *words]
        self.vocab_size = len(self.words)

    def encode(self, text):
        index = {w: i for i, w in enumerate(self.words)}
        return [index.get(w, 0) for w in text.split()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids if 1 < i < self.vocab_size)

    def fingerprint(self):
        return "wordtok-" + str(len(self.words)) + "-" + self.words[-1]

    def to_dict(self):
        return {"words": self.words[2:]}

    @classmethod
    def from_dict(cls, values):
        return cls(values["words"])

    def save(self, directory):
        (Path(directory) / "words.txt").write_text("\\n".join(self.words))


class NoFromDict(WordTok):
    from_dict = None


class NotJSON(WordTok):
    def to_dict(self):
        return {"words": set(self.words[2:])}


class Tuples(WordTok):
    def to_dict(self):
        return {"words": tuple(self.words[2:])}


class Forgetful(WordTok):
    @classmethod
    def from_dict(cls, values):
        return cls(sorted(values["words"])[:3])


def words_of(corpus):
    return sorted({w for doc in corpus.documents() for w in doc.split()})


def build(corpus, cache_dir, kind="WordTok"):
    return globals()[kind](words_of(corpus))


def broken(corpus, cache_dir, kind="NoFromDict"):
    return globals()[kind](words_of(corpus))
'''

EVIL = """
import os
open(os.environ["LMFORGE_TEST_MARK"], "w").close()
class Anything:
    @classmethod
    def from_dict(cls, values):
        return cls()
"""


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """An installed tokenizer plugin distribution (lmforge-wordtok 0.2, module wordtok) and, beside it on sys.path,
    a module that is no plugin (evil_module: it leaves a mark file when imported)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "wordtok.py").write_text(WORDTOK)
    (site / "evil_module.py").write_text(EVIL)
    info = site / "lmforge_wordtok-0.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmforge-wordtok\nVersion: 0.2\n")
    (info / "entry_points.txt").write_text(
        "[lmforge.tokenizers]\nwords = wordtok:build\nbroken_words = wordtok:broken\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("LMFORGE_TEST_MARK", str(tmp_path / "evil-imported"))
    monkeypatch.delenv(plugins.AUTOLOAD_ENV, raising=False)
    monkeypatch.setattr(plugins, "autoload_override", None)
    yield site
    for name in ("wordtok", "evil_module"):
        sys.modules.pop(name, None)


WORDS = ListCorpus(["the fox jumps over the dog", "a dog sleeps"])
TEXTS = ["the dog jumps", "a fox sleeps over the cat", ""]


def test_plugin_tokenizer_round_trips_through_a_checkpoint(plugin_site, tmp_path):
    import torch

    from lmforge.checkpoint import torch_load

    tok = plugins.build("tokenizer", {"name": "words"}, WORDS, tmp_path)
    record = tokenizers.tokenizer_to_dict(tok)
    assert record == {
        "type": "plugin", "class": "wordtok:WordTok", "values": {"words": tok.words[2:]},
        "distribution": "lmforge-wordtok", "version": "0.2",
    }  # fmt: skip
    torch.save({"lmforge": {"tokenizer": record}}, tmp_path / "t.ckpt")  # as lmforge fit saves it
    rebuilt = tokenizer_from_dict(torch_load(tmp_path / "t.ckpt")["lmforge"]["tokenizer"])
    assert type(rebuilt).__name__ == "WordTok" and rebuilt.fingerprint() == tok.fingerprint()
    assert [rebuilt.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_plugin_tokenizer_round_trips_through_a_folder(plugin_site, tmp_path):
    tok = plugins.build("tokenizer", {"name": "words"}, WORDS, tmp_path)
    tokenizers.save_tokenizer(tok, tmp_path / "saved")
    assert (tmp_path / "saved" / "words.txt").is_file()  # the plugin's own save ran
    meta = json.loads((tmp_path / "saved" / META_FILE).read_text())
    assert meta["type"] == "plugin" and meta["class"] == "wordtok:WordTok"  # lmforge's record, written after it
    loaded = load_tokenizer(tmp_path / "saved")
    assert loaded.fingerprint() == tok.fingerprint() and loaded.encode(TEXTS[1]) == tok.encode(TEXTS[1])


@pytest.mark.parametrize(
    "target,message",
    [
        ("evil_module:Anything", "comes from package evil_module, which is not an installed lmforge.tokenizers plugin"),
        ("os:system", "comes from package os, which is not an installed lmforge.tokenizers plugin"),
        ("lmforge.tokenizers:ByteTokenizer", "comes from package lmforge, which is not an installed"),
        ("wordtok:Path", "is not a tokenizer class of lmforge-wordtok"),  # imported there, from pathlib
        ("wordtok:os.system", "is not a tokenizer class of lmforge-wordtok"),
        ("wordtok:words_of.<locals>", "is not a 'module:qualname' of a tokenizer plugin"),
        ("wordtok", "is not a 'module:qualname' of a tokenizer plugin"),
        ("wordtok:WordTok.__class__", "is not a 'module:qualname' of a tokenizer plugin"),
    ],
)
def test_a_checkpoint_cannot_name_other_code(plugin_site, tmp_path, target, message):
    with pytest.raises(UserError, match=re.escape(message)):
        tokenizer_from_dict({"type": "plugin", "class": target, "values": {}})
    assert not (tmp_path / "evil-imported").exists()  # refused before importing anything outside the plugins


def test_plugin_tokenizer_of_an_uninstalled_or_disabled_plugin(plugin_site, monkeypatch):
    record = {
        "type": "plugin",
        "class": "gone_pkg.tok:Tok",
        "values": {},
        "distribution": "lmforge-gone",
        "version": "1.0",
    }
    with pytest.raises(
        UserError, match=r"comes from lmforge-gone 1\.0, which is not an installed .*install the plugin"
    ):
        tokenizer_from_dict(record)
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "1")
    with pytest.raises(UserError, match="third-party plugins are off"):
        tokenizer_from_dict({"type": "plugin", "class": "wordtok:WordTok", "values": {"words": []}})


@pytest.mark.parametrize(
    "kind,message",
    [
        ("NoFromDict", "its class NoFromDict has no from_dict classmethod; add `@classmethod def from_dict"),
        ("NotJSON", "NotJSON.to_dict() is not JSON-serialisable (Object of type set is not JSON serializable)"),
        ("Tuples", "Tuples.to_dict() changes through JSON (tuples become lists"),
        ("Forgetful", "Forgetful.from_dict(Forgetful.to_dict()) has vocab_size=5, not 9"),
    ],
)
def test_plugin_tokenizer_that_cannot_round_trip_fails_when_built(plugin_site, tmp_path, kind, message):
    with pytest.raises(plugins.PluginError) as err:
        plugins.build("tokenizer", {"name": "broken_words", "kind": kind}, WORDS, tmp_path)
    text = str(err.value)
    assert text.startswith("tokenizer plugin 'broken_words' (wordtok:broken) from lmforge-wordtok 0.2 cannot be saved")
    assert message in text and "\n" not in text


def test_fit_with_a_tokenizer_that_cannot_round_trip_stops_before_training(plugin_site, tmp_path):
    import os
    import subprocess
    import sys as _sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(plugin_site), "LMFORGE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [_sys.executable, "-m", "lmforge", "fit", "-c", str(root / "configs" / "gpt-tiny.yaml"),
         "--data.tokenizer", "{name: broken_words}", "--data.dataset.size_bytes", "20000", "--data.num_workers", "0",
         "--trainer.default_root_dir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "lmforge: error: tokenizer plugin 'broken_words' (wordtok:broken) from lmforge-wordtok 0.2 cannot be saved "
            "in checkpoints: its class NoFromDict has no from_dict classmethod"
        )
    )
    assert "Traceback" not in proc.stderr and not list((tmp_path / "run").rglob("*.ckpt"))


def test_builtin_entries_keep_their_format(bpe, tmp_path):
    """Checkpoints and folders written before plugin records existed still load, and lmforge's own tokenizers are
    still written the old way."""
    assert tokenizers.tokenizer_to_dict(ByteTokenizer()) == {"type": "bytes"}
    assert tokenizers.tokenizer_to_dict(bpe) == bpe.to_dict()
    assert tokenizers.round_trip_problem(bpe) is None and tokenizers.round_trip_problem(ByteTokenizer()) is None
    old = {"type": "hf", "eos_token": EOS_TOKEN, "tokenizer_json": bpe._tok.to_str()}
    assert tokenizer_from_dict(old).fingerprint() == bpe.fingerprint()
    tokenizers.save_tokenizer(bpe, tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / META_FILE).read_text()) == {"type": "hf", "eos_token": EOS_TOKEN}
    tokenizers.save_tokenizer(ByteTokenizer(), tmp_path / "bytes")
    assert json.loads((tmp_path / "bytes" / META_FILE).read_text()) == {"type": "bytes"}
    assert isinstance(load_tokenizer(tmp_path / "bytes"), ByteTokenizer)


def test_entry_of_a_plugin_from_before_records_is_explained():
    with pytest.raises(UserError, match=r"unknown tokenizer type 'wordlevel' in checkpoint; .*retrain with the plugin"):
        tokenizer_from_dict({"type": "wordlevel", "pieces": ["a"]})
