"""The ``wordlevel`` tokenizer: whole words (with their leading space), punctuation and whitespace as tokens,
the most frequent pieces of the corpus as the vocabulary; plain Python, no dependency.

A tokenizer plugin is a factory ``(corpus, cache_dir, **kwargs) -> Tokenizer``. What lmforge uses (see
plugins/README.md for each member's contract):

- ``vocab_size`` and ``eos_id`` (the end-of-text id, in range);
- ``encode(text) -> list[int]``, ``encode_batch(texts)`` (a sequence of int sequences or arrays), and
  ``decode(ids) -> str``, which must take any id below vocab_size: generation can produce any of them;
- ``fingerprint() -> str``: changes whenever the encoding would (it keys lmforge's token cache);
- ``to_dict() -> dict`` of plain JSON values, and the classmethod ``from_dict(values)`` that rebuilds the
  same tokenizer from it: checkpoints store ``to_dict()`` with the class's name and restore the tokenizer
  through ``from_dict`` (lmforge checks the round trip when the plugin is built);
- ``save(directory)``: the plugin's own files (lmforge adds its record, lmforge_tokenizer.json, after it).

Optional members that fine-tuning and exporters read when present: ``eos_token`` (the text of the EOS),
``bos_id`` / ``bos_token``, ``chat_template`` and ``special_tokens() -> dict[str, int]``.

Words never seen in training become ``<unk>``: this tokenizer is lossy on new words, which is fine for a
template and shows why ``decode`` must handle every id.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmforge.atomic import write_json
from lmforge.errors import UserError

UNK, EOS = "<unk>", "<|endoftext|>"
PIECES = re.compile(r" ?\w+| ?[^\w\s]|\s")
"""A word or a punctuation mark with the space before it, or one whitespace character: joined back, the
pieces are the text again."""
VOCAB_FILE = "wordlevel.json"


class WordLevelTokenizer:
    """Ids 0 and 1 are ``<unk>`` and ``<|endoftext|>``; then the vocabulary's pieces, most frequent first."""

    eos_id = 1
    eos_token = EOS
    unk_id = 0

    def __init__(self, pieces: Sequence[str], lowercase: bool = False) -> None:
        self.pieces = [UNK, EOS, *(p for p in pieces if p not in (UNK, EOS))]
        self.lowercase = lowercase
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.vocab_size = len(self.pieces)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 1, lowercase: bool = False):
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(PIECES.findall(text.lower() if lowercase else text))
        ranked = sorted((p for p, n in counts.items() if n >= min_frequency), key=lambda p: (-counts[p], p))
        return cls(ranked[: vocab_size - 2], lowercase)

    def encode(self, text: str) -> list[int]:
        text = text.lower() if self.lowercase else text
        return [self.ids.get(p, self.unk_id) for p in PIECES.findall(text)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The pieces joined; the end-of-text token and ids outside the vocabulary are dropped."""
        size = len(self.pieces)
        return "".join(self.pieces[i] for i in map(int, ids) if 0 <= i < size and i != self.eos_id)

    def special_tokens(self) -> dict[str, int]:
        return {UNK: self.unk_id, EOS: self.eos_id}

    def fingerprint(self) -> str:
        return "wordlevel-" + hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        return {"pieces": self.pieces[2:], "lowercase": self.lowercase}

    @classmethod
    def from_dict(cls, values: dict) -> WordLevelTokenizer:
        return cls(values["pieces"], bool(values.get("lowercase", False)))

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / VOCAB_FILE, self.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> WordLevelTokenizer:
        return cls.from_dict(json.loads((Path(directory) / VOCAB_FILE).read_text(encoding="utf-8")))


def wordlevel(
    corpus, cache_dir: Path, vocab_size: int = 4096, min_frequency: int = 1, lowercase: bool = False
) -> WordLevelTokenizer:
    """A word-level vocabulary trained on the corpus once, then cached (keyed by the corpus content).

    Args:
        vocab_size: At most this many tokens, <unk> and <|endoftext|> included.
        min_frequency: Pieces seen fewer times become <unk>.
        lowercase: Lowercase the text before splitting it.
    """
    if vocab_size < 3:
        raise UserError(f"tokenizer wordlevel: vocab_size={vocab_size} must be at least 3")
    folder = Path(cache_dir) / f"wordlevel-{corpus.key()}-{vocab_size}-{min_frequency}-{int(lowercase)}"
    if (folder / VOCAB_FILE).is_file():
        return WordLevelTokenizer.load(folder)
    tokenizer = WordLevelTokenizer.train(corpus.documents(), vocab_size, min_frequency, lowercase)
    tokenizer.save(folder)
    return tokenizer
