"""Tokenizers: exact byte-level (the default), Hugging Face ``tokenizers`` (loaded or trained BPE) and BERT's
WordPiece (trained, or a vocab.txt / tokenizer.json).

A tokenizer is saved beside every checkpoint and inside it, so a checkpoint is self-describing:
:func:`save_tokenizer` / :func:`load_tokenizer` write and read a folder, :func:`tokenizer_to_dict` /
:func:`tokenizer_from_dict` a checkpoint entry. A Hugging Face tokenizer also carries the model's Jinja chat
template when its folder has one (``chat_template`` in tokenizer_config.json, or ``chat_template.jinja``),
for fine-tuning on chat records with ``data.chat_template: tokenizer``.

Tokenizer plugins come back from checkpoints and folders too, without letting a checkpoint run code of its
choosing: lmforge records the tokenizer's class (``module:qualname``) beside its ``to_dict()``, and restores it
through that class's ``from_dict(values)`` classmethod only when the class belongs to the package of an
installed ``lmforge.tokenizers`` plugin (and third-party plugins are not switched off). The built-in ``bytes``
and ``hf`` entries keep their own format, so every checkpoint and folder written before still loads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lmforge.atomic import write_json, write_text
from lmforge.errors import MissingFileError, UserError

EOS_TOKEN = "<|endoftext|>"
META_FILE = "lmforge_tokenizer.json"
PLUGIN_TYPE = "plugin"
"""The ``type`` of a checkpoint (or folder) entry of a plugin's tokenizer: ``{type, class, values, ...}``."""
SAMPLE_TEXTS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "numbers 0 1 2 3 42 3.14 and punctuation: ;-) [x] {y} <z>",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "accents: café naïve Größe; CJK: 東京 北京; emoji: 😀 🎉",
    "",
    EOS_TOKEN,
)
"""Texts a tokenizer must encode the same way after a round trip through a checkpoint."""


@runtime_checkable
class Tokenizer(Protocol):
    """What lmforge needs from a tokenizer (plugins/README.md says what each member must do).

    Its class also needs a ``from_dict(values) -> Tokenizer`` classmethod, rebuilding the tokenizer from what
    ``to_dict()`` returned (plain JSON values), so that checkpoints and export folders restore it. Optional
    members that fine-tuning and exporters use when present: ``bos_id`` / ``bos_token``, ``eos_token``,
    ``chat_template`` and ``special_tokens() -> dict[str, int]``.
    """

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> Sequence[Sequence[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def fingerprint(self) -> str: ...
    def to_dict(self) -> dict: ...
    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus ``<|endoftext|>`` = 256. Lossless on any text."""

    vocab_size = 257
    eos_id = 256
    eos_token = EOS_TOKEN
    """The text that stands for the EOS id (``encode`` reads it as bytes; chat templates map it to the id)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """One uint8 array per text: no Python list of ints, so megabytes tokenize in milliseconds."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes-v1"

    def to_dict(self) -> dict:
        return {"type": "bytes"}

    @classmethod
    def from_dict(cls, values: dict) -> ByteTokenizer:
        return cls()

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / META_FILE, self.to_dict())


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (tokenizer.json) with an end-of-text token (and, optionally, a
    beginning-of-text token and the model's Jinja chat template)."""

    def __init__(
        self,
        tokenizer,
        eos_token: str = EOS_TOKEN,
        bos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tokenizer
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise UserError(f"tokenizer has no end-of-text token {eos_token!r}; set tokenizer.eos_token to one it has")
        self.eos_token = eos_token
        self.eos_id = eos_id
        self.bos_token = bos_token
        """When set, fine-tuning data starts every sequence with this token (as Llama tokenizers do)."""
        self.bos_id = None if bos_token is None else tokenizer.token_to_id(bos_token)
        if bos_token is not None and self.bos_id is None:
            raise UserError(f"tokenizer has no beginning-of-text token {bos_token!r}")
        if chat_template is not None and not isinstance(chat_template, str):
            raise UserError(f"tokenizer: chat_template must be a Jinja template string, not {type(chat_template)}")
        self.chat_template = chat_template
        """The model's Jinja chat template (as in tokenizer_config.json), or None."""
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path, eos_token: str = EOS_TOKEN) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise MissingFileError(f"tokenizer: no tokenizer.json at {path}; give a folder holding one or the file")
        try:
            return cls(_Tok.from_file(str(file)), eos_token)
        except Exception as err:  # the Rust error type is not importable
            raise UserError(f"tokenizer: {file} is not a valid tokenizer.json: {err}") from None

    @classmethod
    def from_pretrained_folder(cls, folder: str | Path) -> HFTokenizer | None:
        """The tokenizer of a Hugging Face model folder (tokenizer.json, or GPT-2's vocab.json + merges.txt).

        The end-of-text token comes from tokenizer_config.json / special_tokens_map.json (else
        config.json's eos_token_id); a beginning-of-text token is kept when the tokenizer's own
        post-processor adds one. The chat template is ``chat_template.jinja`` or else tokenizer_config.json's
        ``chat_template`` (a string, or a list of ``{name, template}`` of which the one named ``default`` is
        taken), as transformers reads them. None when the folder has no tokenizer files.
        """
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers

        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            tok = _Tok.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = _Tok(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            return None
        special: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                special.update({k: v for k, v in json.loads((folder / name).read_text()).items() if v is not None})

        def token(key: str, id_key: str) -> str | None:
            value = special.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None and (folder / "config.json").is_file():
                ids = json.loads((folder / "config.json").read_text()).get(id_key)
                ids = ids[0] if isinstance(ids, list) and ids else ids
                value = tok.id_to_token(ids) if isinstance(ids, int) else None
            return value

        eos = token("eos_token", "eos_token_id")
        if eos is None:
            raise UserError(f"tokenizer in {folder}: no end-of-text token (eos_token) in its files")
        bos = token("bos_token", "bos_token_id")
        bos_id = tok.token_to_id(bos) if bos is not None else None
        probe = tok.encode("a", add_special_tokens=True).ids
        adds_bos = bos_id is not None and len(probe) > 1 and probe[0] == bos_id
        return cls(tok, eos, bos if adds_bos else None, read_chat_template(folder))

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
        """Train a byte-level BPE (GPT-2 style) of ``vocab_size`` tokens, the end-of-text token included."""
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise UserError(f"tokenizer: vocab_size={vocab_size} is too small for byte-level BPE (at least 257)")
        tok = _Tok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def fingerprint(self) -> str:
        return "hf-" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:32]

    def special_tokens(self) -> dict[str, int]:
        """The text of each special token (added tokens marked special, the EOS and the bos) and its id."""
        found = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        found[self.eos_token] = self.eos_id
        if self.bos_token is not None:
            found[self.bos_token] = self.bos_id
        return found

    def to_dict(self) -> dict:
        values = {"type": "hf", "eos_token": self.eos_token, "tokenizer_json": self._tok.to_str()}
        return self._optional(values)

    @classmethod
    def from_dict(cls, values: dict) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        return cls(
            _Tok.from_str(values["tokenizer_json"]),
            values.get("eos_token", EOS_TOKEN),
            values.get("bos_token"),
            values.get("chat_template"),
        )

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        write_text(directory / "tokenizer.json", self._tok.to_str(pretty=True))
        write_json(directory / META_FILE, self._optional({"type": "hf", "eos_token": self.eos_token}))

    def _optional(self, values: dict) -> dict:
        """``values`` plus the bos token and the chat template, each only when set (older entries lack them)."""
        if self.bos_token is not None:
            values["bos_token"] = self.bos_token
        if self.chat_template is not None:
            values["chat_template"] = self.chat_template
        return values


WORDPIECE_SPECIALS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]",
                      "unk_token": "[UNK]"}  # fmt: skip
"""BERT's special tokens, by the names the ``wordpiece`` plugin's and WordPieceTokenizer's arguments give them."""


class WordPieceTokenizer(HFTokenizer):
    """BERT's WordPiece (Hugging Face ``tokenizers``): the BERT normaliser (lowercasing and accent stripping,
    each optional), BERT's pre-tokeniser, ``##`` continuation pieces and the [CLS]/[SEP]/[PAD]/[MASK]/[UNK]
    tokens. ``encode`` adds no special tokens (as every lmforge tokenizer); :meth:`encode_pair` gives BERT's
    ``[CLS] a [SEP] b [SEP]`` with token types 0/1. The end-of-text id is [SEP]'s, which separates the documents
    of a token cache. Built by the ``wordpiece`` tokenizer plugin: trained on the corpus, or a folder's vocab.txt
    or tokenizer.json."""

    def __init__(
        self,
        tokenizer,
        cls_token: str = "[CLS]",
        sep_token: str = "[SEP]",
        pad_token: str = "[PAD]",
        mask_token: str = "[MASK]",
        unk_token: str = "[UNK]",
    ) -> None:
        super().__init__(tokenizer, eos_token=sep_token)
        self.names = {"cls_token": cls_token, "sep_token": sep_token, "pad_token": pad_token,
                      "mask_token": mask_token, "unk_token": unk_token}  # fmt: skip
        ids = {}
        for key, token in self.names.items():
            ids[key] = tokenizer.token_to_id(token)
            if ids[key] is None:
                raise UserError(f"tokenizer: the WordPiece vocabulary has no {key} {token!r}; add it to the vocabulary")
        self.cls_id, self.sep_id, self.pad_id = ids["cls_token"], ids["sep_token"], ids["pad_token"]
        self.mask_id, self.unk_id = ids["mask_token"], ids["unk_token"]
        self._continuation: np.ndarray | None = None

    @staticmethod
    def _pipeline(tok, lowercase: bool, strip_accents: bool | None) -> None:
        """BERT's normaliser, pre-tokeniser and ``##`` decoder (what BertTokenizerFast builds from a vocab.txt)."""
        from tokenizers import decoders, normalizers, pre_tokenizers

        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")

    @classmethod
    def _finish(cls, tok, names: dict[str, str]) -> WordPieceTokenizer:
        """Mark the special tokens (matched in text before normalisation) and add BERT's pair template."""
        from tokenizers import AddedToken, processors

        names = {**WORDPIECE_SPECIALS, **names}
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names.values()])
        cls_t, sep_t = names["cls_token"], names["sep_token"]
        cls_id, sep_id = tok.token_to_id(cls_t), tok.token_to_id(sep_t)
        if cls_id is not None and sep_id is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{cls_t}:0 $A:0 {sep_t}:0",
                pair=f"{cls_t}:0 $A:0 {sep_t}:0 $B:1 {sep_t}:1",
                special_tokens=[(cls_t, cls_id), (sep_t, sep_id)],
            )
        return cls(tok, **names)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        lowercase: bool = True,
        strip_accents: bool | None = None,
    ) -> WordPieceTokenizer:
        """Train a WordPiece vocabulary of at most ``vocab_size`` tokens (the five special tokens first: ids 0-4)."""
        from tokenizers import Tokenizer as _Tok
        from tokenizers import models, trainers

        specials = [WORDPIECE_SPECIALS[k] for k in ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")]
        if vocab_size <= len(specials):
            raise UserError(f"tokenizer: vocab_size={vocab_size} is too small for WordPiece (more than 5)")
        tok = _Tok(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        cls._pipeline(tok, lowercase, strip_accents)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            continuing_subword_prefix="##", show_progress=False,
        )  # fmt: skip
        tok.train_from_iterator(texts, trainer=trainer)
        return cls._finish(tok, {})

    @classmethod
    def from_vocab(
        cls, vocab_file: str | Path, lowercase: bool = True, strip_accents: bool | None = None, **names: str
    ) -> WordPieceTokenizer:
        """BERT's vocab.txt (one token per line, the line number its id), as BertTokenizerFast reads it."""
        from tokenizers import Tokenizer as _Tok
        from tokenizers import models

        lines = Path(vocab_file).read_text(encoding="utf-8").splitlines()
        vocab = {token: i for i, token in enumerate(lines)}
        unk = names.get("unk_token", WORDPIECE_SPECIALS["unk_token"])
        tok = _Tok(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##", max_input_chars_per_word=100))
        cls._pipeline(tok, lowercase, strip_accents)
        return cls._finish(tok, names)

    @classmethod
    def from_file(
        cls, path: str | Path, lowercase: bool = True, strip_accents: bool | None = None, **names: str
    ) -> WordPieceTokenizer:
        """A folder's tokenizer.json (its own normaliser, options ignored) or vocab.txt, or either file itself."""
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if path.is_dir():
            found = [path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).is_file()]
            if not found:
                raise MissingFileError(f"tokenizer: {path} has neither tokenizer.json nor vocab.txt")
            path = found[0]
        if not path.is_file():
            raise MissingFileError(
                f"tokenizer: no WordPiece vocabulary at {path}; give a folder, vocab.txt or tokenizer.json"
            )
        if path.suffix != ".json":
            return cls.from_vocab(path, lowercase, strip_accents, **names)
        try:
            tok = _Tok.from_file(str(path))
        except Exception as err:  # the Rust error type is not importable
            raise UserError(f"tokenizer: {path} is not a valid tokenizer.json: {err}") from None
        return cls(tok, **names)

    @classmethod
    def from_pretrained_folder(cls, folder: str | Path) -> WordPieceTokenizer | None:
        """A Hugging Face BERT folder's tokenizer (tokenizer.json or vocab.txt); None when it has neither."""
        folder = Path(folder)
        if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
            return None
        return cls.from_file(folder)

    def encode_pair(self, a: str, b: str | None = None) -> tuple[list[int], list[int]]:
        """(ids, token types) of ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` (types 0 for a, 1 for b)."""
        enc = self._tok.encode(a, b, add_special_tokens=True)
        return enc.ids, enc.type_ids

    def continuation_mask(self) -> np.ndarray:
        """(vocab_size,) bool: True for pieces that continue a word (``##...``), which whole-word masking keeps
        with the piece before them."""
        if self._continuation is None:
            mask = np.zeros(self.vocab_size, dtype=bool)
            for token, i in self._tok.get_vocab(with_added_tokens=True).items():
                mask[i] = token.startswith("##") and len(token) > 2
            self._continuation = mask
        return self._continuation

    def fingerprint(self) -> str:
        return "wordpiece-" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        return {"type": "wordpiece", **self.names, "tokenizer_json": self._tok.to_str()}

    @classmethod
    def from_dict(cls, values: dict) -> WordPieceTokenizer:
        from tokenizers import Tokenizer as _Tok

        names = {k: values[k] for k in WORDPIECE_SPECIALS if k in values}
        return cls(_Tok.from_str(values["tokenizer_json"]), **names)

    def save(self, directory: str | Path) -> None:
        """vocab.txt (BERT's format, one token per line by id), tokenizer.json and lmforge's record."""
        directory = Path(directory)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        write_text(directory / "vocab.txt", "".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
        write_text(directory / "tokenizer.json", self._tok.to_str(pretty=True))
        write_json(directory / META_FILE, {"type": "wordpiece", **self.names})


def read_chat_template(folder: str | Path) -> str | None:
    """The chat template of a Hugging Face tokenizer folder: ``chat_template.jinja`` (which transformers prefers), else
    tokenizer_config.json's ``chat_template`` (a string, or the entry named ``default`` of a list of
    ``{name, template}``); None when there is none."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not (folder / "tokenizer_config.json").is_file():
        return None
    value = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


# -- the built-in ``lmforge.tokenizers`` plugins: (corpus, cache_dir, **kwargs) -> Tokenizer ---------------


def byte_level(corpus, cache_dir: Path) -> ByteTokenizer:
    """``bytes``: exact UTF-8 bytes, 257 ids; needs no training and no files."""
    return ByteTokenizer()


def bpe(corpus, cache_dir: Path, vocab_size: int = 4096, min_frequency: int = 2) -> HFTokenizer:
    """``bpe``: a byte-level BPE trained on the corpus once, then cached (keyed by corpus content)."""
    folder = Path(cache_dir) / f"bpe-{corpus.key()}-{vocab_size}-{min_frequency}"
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer.from_file(folder)
    tokenizer = HFTokenizer.train_bpe(corpus.documents(), vocab_size, min_frequency)
    tokenizer.save(folder)
    return tokenizer


def hf(corpus, cache_dir: Path, path: str, eos_token: str = EOS_TOKEN) -> HFTokenizer:
    """``hf``: a Hugging Face tokenizer.json, from a folder holding one or the file itself."""
    return HFTokenizer.from_file(path, eos_token)


def wordpiece(
    corpus,
    cache_dir: Path,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    path: str | None = None,
    lowercase: bool = True,
    strip_accents: bool | None = None,
) -> WordPieceTokenizer:
    """``wordpiece``: BERT's WordPiece, trained on the corpus once and cached (keyed by corpus content and the
    options), or, with ``path``, a folder's (or the file's) vocab.txt or tokenizer.json. ``strip_accents`` None
    follows ``lowercase``, as BERT's."""
    if path is not None:
        return WordPieceTokenizer.from_file(path, lowercase, strip_accents)
    folder = Path(cache_dir) / f"wordpiece-{corpus.key()}-{vocab_size}-{min_frequency}-{lowercase:d}-{strip_accents}"
    if (folder / "tokenizer.json").is_file():
        return WordPieceTokenizer.from_file(folder / "tokenizer.json")
    tokenizer = WordPieceTokenizer.train(corpus.documents(), vocab_size, min_frequency, lowercase, strip_accents)
    tokenizer.save(folder)
    return tokenizer


def _builtin(tokenizer: Tokenizer) -> bool:
    """lmforge's own tokenizers, stored in their own format (``{"type": "bytes"}``, ``{"type": "hf", ...}``,
    ``{"type": "wordpiece", ...}``)."""
    return type(tokenizer) in (ByteTokenizer, HFTokenizer, WordPieceTokenizer)


def class_path(cls: type) -> str:
    """``module:qualname``, as a plugin tokenizer's class is recorded."""
    return f"{cls.__module__}:{cls.__qualname__}"


def tokenizer_to_dict(tokenizer: Tokenizer) -> dict:
    """What a checkpoint stores of ``tokenizer`` (:func:`tokenizer_from_dict` rebuilds it).

    lmforge's tokenizers: their ``to_dict()``. A plugin's: ``{"type": "plugin", "class": "module:qualname",
    "values": to_dict(), "distribution": ..., "version": ...}`` (the distribution only for messages).
    """
    if _builtin(tokenizer):
        return tokenizer.to_dict()
    from lmforge import plugins

    cls = type(tokenizer)
    record = {"type": PLUGIN_TYPE, "class": class_path(cls), "values": tokenizer.to_dict()}
    info = plugins.packages("tokenizer").get(cls.__module__.split(".")[0])
    if info is not None:
        record.update(distribution=info.distribution, version=info.version)
    return record


def tokenizer_from_dict(values: dict) -> Tokenizer:
    """Rebuild a tokenizer from :func:`tokenizer_to_dict` (as stored in checkpoints and folders).

    A plugin's class is imported only from the package of an installed ``lmforge.tokenizers`` plugin, and
    rebuilt only through its ``from_dict`` classmethod: a checkpoint cannot name any other code to run.
    """
    kind = values.get("type") if isinstance(values, dict) else None
    if kind == "bytes":
        return ByteTokenizer.from_dict(values)
    if kind == "hf":
        return HFTokenizer.from_dict(values)
    if kind == "wordpiece":
        return WordPieceTokenizer.from_dict(values)
    if kind == PLUGIN_TYPE:
        return _plugin_from_dict(values)
    raise UserError(
        f"unknown tokenizer type {kind!r} in checkpoint; lmforge restores bytes, hf, wordpiece and tokenizer plugins' "
        "entries (type 'plugin', written since lmforge recorded a plugin's class): retrain with the plugin installed"
    )


def _plugin_from_dict(record: dict) -> Tokenizer:
    from lmforge import plugins

    target = record.get("class")
    module_name, _, qualname = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not module_name or not qualname or "<" in qualname or any(p.startswith("__") for p in qualname.split(".")):
        raise UserError(f"checkpoint tokenizer: class {target!r} is not a 'module:qualname' of a tokenizer plugin")
    package = module_name.split(".")[0]
    allowed = plugins.packages("tokenizer")
    origin = " ".join(str(record[k]) for k in ("distribution", "version") if record.get(k)) or f"package {package}"
    if package not in allowed or package == plugins.HOST_DISTRIBUTION:  # lmforge's own are stored by type
        off = (
            ""
            if plugins.autoload_enabled()
            else f" (third-party plugins are off: {plugins.AUTOLOAD_ENV} or plugin_autoload)"
        )
        raise UserError(
            f"checkpoint tokenizer {target} comes from {origin}, which is not an installed lmforge.tokenizers "
            f"plugin{off}; install the plugin it was trained with to use this checkpoint"
        )
    info = allowed[package]
    try:
        cls = plugins.import_target(target)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 (a broken plugin is a one-line error, as in plugins.load)
        raise UserError(
            f"checkpoint tokenizer {target} ({info.distribution} {info.version}) cannot be imported: "
            f"{plugins.error_text(err)}"
        ) from err
    if not isinstance(cls, type) or cls.__module__.split(".")[0] != package:
        raise UserError(f"checkpoint tokenizer {target} is not a tokenizer class of {info.distribution}")
    from_dict = getattr(cls, "from_dict", None)
    if not callable(from_dict):
        raise UserError(
            f"checkpoint tokenizer {target} ({info.distribution} {info.version}) has no from_dict classmethod; "
            "upgrade the plugin to one that restores its tokenizers"
        )
    values = record.get("values")
    try:
        tokenizer = from_dict(values)
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"checkpoint tokenizer: {cls.__qualname__}.from_dict failed: {plugins.error_text(err)}"
        ) from err
    missing = [m for m in plugins.TOKENIZER_MEMBERS if not hasattr(tokenizer, m)]
    if missing:
        raise UserError(
            f"checkpoint tokenizer: {cls.__qualname__}.from_dict returned an object without {', '.join(missing)}"
        )
    return tokenizer


def round_trip_problem(tokenizer: Tokenizer) -> str | None:
    """None when ``tokenizer`` comes back from a checkpoint as it is, else what its plugin must implement.

    Called when a tokenizer plugin is built (:func:`lmforge.plugins.build`), so a run that could not be used
    after training fails before it starts: the class needs a ``from_dict`` classmethod, ``to_dict()`` plain JSON
    values (what a folder's lmforge_tokenizer.json holds), and the rebuilt tokenizer must encode
    :data:`SAMPLE_TEXTS` the same way, with the same vocab_size, eos_id and fingerprint.
    """
    if _builtin(tokenizer):
        return None
    cls = type(tokenizer)
    name = cls.__qualname__
    if "<" in name or cls.__module__ == "__main__":
        return (
            f"its class {class_path(cls)} is not importable by name; define it at the top level of the plugin's package"
        )
    if not callable(getattr(cls, "from_dict", None)):
        return (
            f"its class {name} has no from_dict classmethod; add `@classmethod def from_dict(cls, values: dict)` "
            "that rebuilds the tokenizer from what to_dict() returns"
        )
    try:
        values = tokenizer.to_dict()
        if not isinstance(values, dict):
            return f"{name}.to_dict() returned {type(values).__name__}, not a dict"
        text = json.dumps(values, allow_nan=False)
    except (TypeError, ValueError) as err:
        return (
            f"{name}.to_dict() is not JSON-serialisable ({err}); return only str, int, float, bool, None, "
            "lists and dicts with str keys"
        )
    if json.loads(text) != values:
        return (
            f"{name}.to_dict() changes through JSON (tuples become lists, non-str keys become str); "
            "return only str, int, float, bool, None, lists and dicts with str keys"
        )
    try:
        record = json.loads(json.dumps(tokenizer_to_dict(tokenizer)))
        rebuilt = tokenizer_from_dict(record)
    except UserError as err:
        return str(err)
    return tokenizers_differ(tokenizer, rebuilt, f"{name}.from_dict({name}.to_dict())")


def tokenizers_differ(
    tokenizer: Tokenizer, rebuilt: Tokenizer, what: str, texts: Iterable[str] = SAMPLE_TEXTS
) -> str | None:
    """None when ``rebuilt`` is ``tokenizer`` again (class, vocab_size, eos_id, fingerprint, encodings of ``texts``),
    else the first difference, as "``what`` ..."."""
    if type(rebuilt) is not type(tokenizer):
        return f"{what} returned a {type(rebuilt).__name__}, not a {type(tokenizer).__name__}"
    for member in ("vocab_size", "eos_id"):
        if getattr(rebuilt, member) != getattr(tokenizer, member):
            return f"{what} has {member}={getattr(rebuilt, member)!r}, not {getattr(tokenizer, member)!r}"
    for text in texts:
        before, after = [int(i) for i in tokenizer.encode(text)], [int(i) for i in rebuilt.encode(text)]
        if before != after:
            return (
                f"{what} encodes {text[:40]!r} as {after[:12]} instead of {before[:12]}; from_dict must rebuild "
                "the same vocabulary and settings"
            )
    if rebuilt.fingerprint() != tokenizer.fingerprint():
        return f"{what} has the fingerprint {rebuilt.fingerprint()!r}, not {tokenizer.fingerprint()!r}"
    return None


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> None:
    """Save ``tokenizer`` into ``directory`` so that :func:`load_tokenizer` restores it.

    lmforge's tokenizers write their own files. A plugin's ``save`` runs first (its files, for people and
    other tools), then lmforge writes its record (lmforge_tokenizer.json: the class and ``to_dict()``), from
    which :func:`load_tokenizer` restores it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory)
    if not _builtin(tokenizer):
        write_json(directory / META_FILE, tokenizer_to_dict(tokenizer))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load the tokenizer saved in ``directory`` by :func:`save_tokenizer` (or a folder holding a tokenizer.json)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        if (directory / "tokenizer.json").is_file():
            return HFTokenizer.from_file(directory)
        raise MissingFileError(f"tokenizer: {directory} has neither {META_FILE} nor tokenizer.json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"tokenizer: {meta_path} is not valid JSON ({err}); save the tokenizer again") from None
    if not isinstance(meta, dict):
        raise UserError(f"tokenizer: {meta_path} does not hold an lmforge tokenizer record")
    if meta.get("type") == "bytes":
        return ByteTokenizer()
    if meta.get("type") == PLUGIN_TYPE:
        return tokenizer_from_dict(meta)
    if meta.get("type") == "wordpiece":
        names = {k: v for k, v in meta.items() if k != "type"}
        return WordPieceTokenizer.from_file(directory / "tokenizer.json", **names)
    tokenizer = HFTokenizer.from_file(directory, meta.get("eos_token", EOS_TOKEN))
    if meta.get("bos_token") or meta.get("chat_template"):
        tokenizer = HFTokenizer(tokenizer._tok, tokenizer.eos_token, meta.get("bos_token"), meta.get("chat_template"))
    return tokenizer
