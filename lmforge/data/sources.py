"""Corpus sources: text files, folders and globs, JSONL with a text field, or the embedded corpus.

A :class:`Corpus` yields documents (strings) and has a content key: the same files with the same
bytes give the same key, whatever their paths, so the token cache is reused exactly when it is valid.

Undecodable bytes: text is read as UTF-8. With ``decode_errors="replace"`` (the default) each
invalid byte becomes U+FFFD and one warning per file names the file, the count and the first
offset; with ``"strict"`` the first invalid byte is an error naming the file and the offset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from lmforge.data.synthetic import SyntheticGrammar
from lmforge.errors import UserError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".jsonl"}
DecodeErrors = Literal["replace", "strict"]


class CorpusError(UserError):
    """A corpus that cannot be read; the message names the file (and line) and what to do."""


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand files, folders (recursively, text-like suffixes) and globs, in the order given.

    Each folder or glob contributes its files sorted by path; duplicates are kept once.
    """
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise CorpusError(f"corpus: folder {path} has no files ending in {', '.join(sorted(TEXT_SUFFIXES))}")
            files.extend(found)
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise CorpusError(f"corpus: pattern {pattern!r} matches no file")
            files.extend(found)
        else:
            raise CorpusError(f"corpus: {pattern} does not exist; give files, folders or glob patterns")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique


def _decode(data: bytes, path: Path, errors: DecodeErrors) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if errors == "strict":
            raise CorpusError(
                f"corpus: {path} is not valid UTF-8 at byte {err.start}; "
                "fix the file or set decode_errors: replace in data.dataset"
            ) from None
        text = data.decode("utf-8", errors="replace")
        log.warning(
            "corpus: %s has invalid UTF-8 (first at byte %d); %d character(s) replaced by U+FFFD",
            path,
            err.start,
            text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd"),
        )
        return text


@dataclass
class FileCorpus:
    """Documents from text files (one document per file) and JSONL files (one per line, ``text_field``)."""

    files: list[Path]
    text_field: str = "text"
    decode_errors: DecodeErrors = "replace"
    _key: str | None = field(default=None, init=False, repr=False, compare=False)

    def key(self) -> str:
        """A hash of the files' contents (read once per corpus: the run asks for it several times)."""
        if self._key is None:
            digest = hashlib.sha256(f"files-v1|{self.text_field}|{self.decode_errors}".encode())
            for path in self.files:
                file_hash = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        file_hash.update(chunk)
                digest.update(path.suffix.lower().encode() + b"|" + file_hash.digest())
            self._key = digest.hexdigest()[:32]
        return self._key

    def num_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def documents(self) -> Iterator[str]:
        for path in self.files:
            text = _decode(path.read_bytes(), path, self.decode_errors)
            if path.suffix.lower() == ".jsonl":
                yield from self._jsonl_documents(path, text)
            elif text:
                yield text

    def _jsonl_documents(self, path: Path, text: str) -> Iterator[str]:
        for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid in JSON
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(
                    f"corpus: {path}:{lineno}: not valid JSON ({err.msg}); fix or remove the line"
                ) from None
            if not isinstance(record, dict) or self.text_field not in record:
                raise CorpusError(
                    f"corpus: {path}:{lineno}: no field {self.text_field!r}; "
                    "set text_field in data.dataset to the field holding the text"
                )
            value = record[self.text_field]
            if not isinstance(value, str):
                raise CorpusError(
                    f"corpus: {path}:{lineno}: field {self.text_field!r} is {type(value).__name__}, not text"
                )
            if value:
                yield value


@dataclass
class EmbeddedCorpus:
    """The seeded synthetic corpus shipped with lmforge (see :mod:`lmforge.data.synthetic`)."""

    size_bytes: int = 2_000_000
    seed: int = 0
    branching: int = 6

    @property
    def grammar(self) -> SyntheticGrammar:
        return SyntheticGrammar(seed=self.seed, branching=self.branching)

    def key(self) -> str:
        spec = f"embedded-v1|{self.size_bytes}|{self.seed}|{self.branching}"
        return hashlib.sha256(spec.encode()).hexdigest()[:32]

    def num_bytes(self) -> int:
        return self.size_bytes

    def documents(self) -> Iterator[str]:
        text, _ = self.grammar.generate(self.size_bytes)
        yield text

    def describe(self) -> str:
        return (
            f"lmforge's embedded synthetic corpus: {self.size_bytes:,} bytes of English-like sentences from a seeded "
            f"grammar (seed {self.seed}, branching {self.branching}), entropy {self.entropy_nats_per_byte():.3f} "
            "nats per byte"
        )

    def entropy_nats_per_byte(self) -> float:
        """The exact entropy of the text: the lowest loss per byte any model can reach."""
        return self.grammar.entropy_nats_per_byte()


def public_spec(value):
    """A plugin spec as a model card may show it: every local path reduced to its file name (a card is
    shared; the folders of the machine that trained are nobody's business)."""
    if isinstance(value, dict):
        return {k: public_spec(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_spec(v) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value):
        path = Path(value).expanduser()
        if value.startswith(("/", ".", "~")) or glob.has_magic(value) or path.exists():  # not a Hub id
            return path.name or value
    return value


class Corpus(Protocol):
    """What the ``lmforge.datasets`` plugins return: documents, and a key that changes with them."""

    def key(self) -> str: ...
    def documents(self) -> Iterator[str]: ...
    def num_bytes(self) -> int: ...


# -- the built-in ``lmforge.datasets`` plugins: (**kwargs) -> Corpus ------------------------------------


def files(paths: list[str] | str, text_field: str = "text", decode_errors: DecodeErrors = "replace") -> FileCorpus:
    """``files``: text files (one document each), folders, globs and .jsonl files (one document per record)."""
    if decode_errors not in ("replace", "strict"):
        raise CorpusError(f"dataset files: decode_errors={decode_errors!r} must be replace or strict")
    return FileCorpus(resolve_files([paths] if isinstance(paths, str) else list(paths)), text_field, decode_errors)


def embedded(size_bytes: int = 2_000_000, seed: int = 0, branching: int = 6) -> EmbeddedCorpus:
    """``embedded``: lmforge's synthetic corpus of known entropy; nothing to download."""
    if size_bytes < 1:
        raise CorpusError(f"dataset embedded: size_bytes={size_bytes} must be positive")
    return EmbeddedCorpus(size_bytes, seed, branching)
