"""The ``csv`` dataset: one document per row of a CSV file, from its text column.

A dataset plugin is a factory ``(**kwargs) -> Corpus``; the corpus has three members:

- ``key() -> str``: names lmforge's token cache (and a tokenizer's cache, ``wordlevel-{key}-...``), so it
  must change when the documents do, stay the same when they do not, and be a short file-name-safe string
  (letters, digits, ``.``, ``_``, ``-``; at most 128 characters): here a hash of the file's bytes and the
  arguments;
- ``documents() -> Iterator[str]``: the texts, read again from the start on every call;
- ``num_bytes() -> int``: the size in bytes (an estimate is fine: it drives progress bars).

Optional: ``describe() -> str`` (a line for model cards) and ``hub_dataset`` (a Hugging Face dataset id,
or None). Bad arguments raise :class:`lmforge.errors.UserError`, which lmforge prints as one line.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import MissingFileError, UserError


@dataclass
class CSVCorpus:
    """The rows of one CSV file, one document per non-empty ``text_column`` cell."""

    path: Path
    text_column: str = "text"
    delimiter: str = ","
    max_rows: int | None = None
    hub_dataset = None
    """Not from the Hugging Face Hub (a Hub-backed corpus gives the dataset id, for model cards)."""

    def key(self) -> str:
        digest = hashlib.sha256(f"csv-v1|{self.text_column}|{self.delimiter}|{self.max_rows}|".encode())
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()[:32]

    def documents(self) -> Iterator[str]:
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=self.delimiter)
            if self.text_column not in (reader.fieldnames or []):
                columns = ", ".join(reader.fieldnames or []) or "none"
                raise UserError(
                    f"dataset csv: {self.path} has no column {self.text_column!r} (columns: {columns}); set text_column"
                )
            for i, row in enumerate(reader):
                if self.max_rows is not None and i >= self.max_rows:
                    return
                text = row.get(self.text_column) or ""
                if text:
                    yield text

    def num_bytes(self) -> int:
        return self.path.stat().st_size

    def describe(self) -> str:
        return f"the {self.text_column!r} column of {self.path.name}"


def csv_corpus(path: str, text_column: str = "text", delimiter: str = ",", max_rows: int | None = None) -> CSVCorpus:
    """A CSV file as an lmforge corpus.

    Args:
        path: The CSV file (with a header row).
        text_column: The column holding the text.
        delimiter: The field separator.
        max_rows: Read at most this many rows.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingFileError(f"dataset csv: {file} does not exist; give path: <a .csv file>")
    if len(delimiter) != 1:
        raise UserError(f"dataset csv: delimiter={delimiter!r} must be one character")
    return CSVCorpus(file, text_column, delimiter, max_rows)


def _example_args(folder: Path) -> dict:
    """Sample arguments for `lmforge plugins check` (lmforge.testing): a small CSV file written into ``folder``."""
    file = folder / "sample.csv"
    with open(file, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, f"Row {i}: the fox jumps over the fence, {i} times."] for i in range(20))
    return {"path": str(file)}


csv_corpus.example_args = _example_args
