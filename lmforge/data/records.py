"""Reading the record files of fine-tuning and evaluation data: ``.jsonl``, ``.json`` and ``.csv``.

- ``.jsonl``: one JSON object per line; blank lines are ignored, and a line that does not parse stops the read or,
  with ``bad_lines="skip"``, is left out, counted and named in one warning.
- ``.json``: one JSON list of objects, read whole; errors name the line where the bad element starts.
- ``.csv``: a header row naming the columns, then one record per row (a quoted cell may span lines); a row with
  the wrong number of cells is a bad line as above.

The format is chosen by extension; files are only read, never written. Every :class:`Record` keeps its file and
1-based line, so the errors of whoever reads it (the SFT, classification and evaluation data) can name both.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.data.sources import CorpusError

log = logging.getLogger(__name__)

BadLines = Literal["error", "skip"]
FORMATS = (".jsonl", ".json", ".csv")
"""Every extension :func:`read_records` reads."""
JSON_FORMATS = (".jsonl", ".json")
"""The extensions accepted unless a reader allows more (records with nested fields: chat messages)."""
_MAX_LISTED = 5  # skipped line numbers named in the warning


@dataclass
class Record:
    """One record of a data file: its fields and where it came from (``line`` is 1-based)."""

    path: str
    line: int
    data: dict

    @property
    def where(self) -> str:
        """``file line N``, the start of an error message about this record."""
        return f"{self.path} line {self.line}"


def fields_of(names: Iterable[str]) -> str:
    """The field (or column) names of a record, quoted, for messages that say what a record does have."""
    return ", ".join(repr(k) for k in names) or "none"


@dataclass
class RecordFile:
    """What :func:`read_records` found in a file."""

    path: str
    records: list[Record]
    skipped: list[int]
    """Lines (CSV: records) left out by ``bad_lines="skip"``."""
    columns: list[str] | None = None
    """A CSV file's header."""


def check_file(
    path: str, prefix: str, formats: Sequence[str], wanted: str, missing: Callable[[str], Exception]
) -> Path:
    """The data file ``path`` names, once its extension is one of ``formats`` (else an error: ``wanted``, then the
    extensions, says what to give) and it is a file (else ``missing("not found")`` or ``missing("is a folder, not a
    file")``, raised)."""
    file = Path(path).expanduser()
    if file.suffix.lower() not in formats:
        raise CorpusError(
            f"{prefix}: {path}: unknown format {file.suffix or '(no extension)'!r}; {wanted} {' or '.join(formats)}"
        )
    if not file.is_file():
        raise missing("is a folder, not a file" if file.is_dir() else "not found")
    return file


def read_records(
    path: str,
    prefix: str,
    key: str,
    bad_lines: BadLines = "error",
    formats: Sequence[str] = JSON_FORMATS,
) -> RecordFile:
    """Read the records of a ``.jsonl``, ``.json`` (or, when allowed, ``.csv``) file.

    Args:
        path: The file.
        prefix: The start of error messages (``sft``, ``classify``).
        key: The config key that named the file, for the not-found message (``data.train``).
        bad_lines: ``error`` stops at a JSONL line (or CSV record) that does not parse; ``skip`` leaves it out,
            counts it and logs one warning.
        formats: The extensions accepted (some of :data:`FORMATS`).

    Returns:
        The records (a CSV row is a dict from column name to cell text), the skipped lines, the CSV header.
    """
    file = check_file(
        path,
        prefix,
        formats,
        "give a file ending in",
        lambda what: CorpusError(f"{prefix}: {path} {what}; check {key} (a path relative to the current directory)"),
    )
    suffix = file.suffix.lower()
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CorpusError(
            f"{prefix}: {path} line {line}: not valid UTF-8 (byte {err.start}); save the file as UTF-8"
        ) from None
    skipped: list[int] = []
    columns = None
    if suffix == ".jsonl":
        records = _read_jsonl(path, text, prefix, bad_lines, skipped)
    elif suffix == ".json":
        records = _read_json(path, text, prefix)
    else:
        records, columns = _read_csv(path, text, prefix, bad_lines, skipped)
    if skipped:
        listed = ", ".join(map(str, skipped[:_MAX_LISTED])) + (", ..." if len(skipped) > _MAX_LISTED else "")
        log.warning(
            "%s: %s: skipped %d bad line(s) (line %s); fix them or set data.bad_lines: error to stop at the first",
            prefix,
            path,
            len(skipped),
            listed,
        )
    if not records:
        more = f" ({len(skipped)} bad line(s) skipped)" if skipped else ""
        raise CorpusError(f"{prefix}: {path} has no records{more}; give a file with at least one")
    return RecordFile(str(path), records, skipped, columns)


def _read_jsonl(path: str, text: str, prefix: str, bad_lines: BadLines, skipped: list[int]) -> list[Record]:
    records: list[Record] = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid inside JSON
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            problem = None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"
        except json.JSONDecodeError as err:
            problem = f"not valid JSON ({err.msg})"
        if problem is None:
            records.append(Record(path, lineno, value))
        elif bad_lines == "skip":
            skipped.append(lineno)
        else:
            raise CorpusError(f"{prefix}: {path} line {lineno}: {problem}; fix the line or set data.bad_lines: skip")
    return records


def _read_json(path: str, text: str, prefix: str) -> list[Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorpusError(
            f"{prefix}: {path} line {err.lineno} column {err.colno}: not valid JSON ({err.msg}); "
            "fix the file (a .json file is read whole: data.bad_lines: skip applies to .jsonl lines)"
        ) from None
    if not isinstance(value, list):
        raise CorpusError(
            f"{prefix}: {path}: a JSON {type(value).__name__}, not a list of records; "
            "give a list of objects or one object per line in a .jsonl file"
        )
    lines = _element_lines(text, len(value))
    records = []
    for i, item in enumerate(value):
        where = f"line {lines[i]}" if lines else f"record {i + 1}"
        if not isinstance(item, dict):
            raise CorpusError(
                f"{prefix}: {path} {where}: a JSON {type(item).__name__}, not an object; each record is an object"
            )
        records.append(Record(path, lines[i] if lines else i + 1, item))
    return records


def _element_lines(text: str, n: int) -> list[int] | None:
    """The 1-based line where each element of a (valid) top-level JSON list starts."""
    decoder = json.JSONDecoder()
    newlines = [i for i, c in enumerate(text) if c == "\n"]
    starts: list[int] = []
    try:
        i = text.index("[") + 1
        while len(starts) < n:
            while text[i] in " \t\r\n,":
                i += 1
            starts.append(i)
            _, i = decoder.raw_decode(text, i)
    except (ValueError, IndexError):
        return None
    return [bisect.bisect_left(newlines, s) + 1 for s in starts]


def _read_csv(
    path: str, text: str, prefix: str, bad_lines: BadLines, skipped: list[int]
) -> tuple[list[Record], list[str] | None]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    records: list[Record] = []
    while True:
        start = reader.line_num + 1  # the physical line where the next record starts
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise CorpusError(f"{prefix}: {path} line {start}: not valid CSV ({err}); fix the line") from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if header is None:
            header = [h.strip() for h in row]
            continue
        if len(row) != len(header):
            if bad_lines == "skip":
                skipped.append(start)
                continue
            raise CorpusError(
                f"{prefix}: {path} line {start}: {len(row)} field(s), the header has {len(header)}; "
                "quote fields that contain commas, fix the line or set data.bad_lines: skip"
            )
        records.append(Record(path, start, dict(zip(header, row))))
    return records, header
