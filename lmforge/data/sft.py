"""Supervised fine-tuning data: prompt/completion or chat records -> token sequences with a loss mask.

Records
    A file holds records in one of two formats (``format: auto`` decides per file from its first record):

    - prompt/completion: ``{"prompt": "Sentence: ...\\nSubject:", "completion": " fox"}`` (field names set by
      ``prompt_field`` / ``completion_field``);
    - chat: ``{"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}]}``
      with roles ``system``, ``user`` and ``assistant`` and at least one assistant message.

    Files are ``.jsonl`` (one JSON object per line, blank lines ignored) or ``.json`` (a JSON list of objects),
    chosen by extension. Files are only read, never written.

Tokens and loss mask
    A prompt/completion record becomes ``ids = [bos] + encode(prompt) + encode(completion) + [eos]`` (``bos`` only
    when the tokenizer has a ``bos_id`` that is not None; prompt and completion are encoded separately, so the
    boundary is exact). The model reads ``x = ids[:-1]`` and predicts ``y = ids[1:]``; every target that belongs
    to the prompt (or is the bos) is :data:`IGNORE_INDEX`, so the loss covers exactly the completion and its EOS.

Chat templates (``chat_template``)
    ``lmforge`` (the default): lmforge's own plain-text template, which any tokenizer encodes. Each message is
    rendered as ``"<|{role}|>\\n{content}\\n"``, except that an assistant message's content is followed by the EOS
    *token* (an id, not text) and then ``"\\n"``::

        <|system|>
        You name the subject.
        <|user|>
        The brave fox sees the river.
        <|assistant|>
        fox<EOS>

    The loss is computed only on the assistant contents and the EOS after each; the role headers, the system and
    user text and the newline after each EOS are masked. Text after the last assistant message carries no loss
    and is left out. Masked and trained spans are encoded separately (exact boundaries).

    ``tokenizer``: the model's own Jinja template (``chat_template`` in its tokenizer_config.json, or
    ``chat_template.jinja``; carried by :class:`lmforge.tokenizers.HFTokenizer` and its checkpoints), or a path to a
    ``.jinja`` file. It is rendered as transformers' ``apply_chat_template`` renders it: in a sandboxed Jinja
    environment (``ImmutableSandboxedEnvironment``, ``trim_blocks`` and ``lstrip_blocks``) with ``messages``,
    ``add_generation_prompt``, the tokenizer's ``bos_token`` / ``eos_token``, ``raise_exception`` and
    ``strftime_now``. For each assistant message ``i``, ``messages[:i]`` is rendered with
    ``add_generation_prompt=True`` (the prompt the model would be given) and ``messages[:i+1]`` without; the
    assistant part is the text the second adds to the first, so the loss covers the assistant's text exactly as
    the template writes it, its end-of-turn token (``<|im_end|>``, ``<|eot_id|>``...) and whatever else the template
    puts in that turn. The pieces are encoded separately and concatenated (exact masks); special tokens written in
    the text become their ids. lmforge adds no EOS (the template decides), and no bos when the text starts with the
    bos token. A template whose render of ``messages[:i]`` does not start its render of ``messages[:i+1]`` (one that
    rewrites earlier turns) cannot be masked this way and is an error naming the record.

Truncation (``max_length``: positions the model sees, ``len(ids) - 1``; default the model's ``block_size``)
    ``error`` stops with the file, line and lengths; ``truncate_prompt`` removes prompt tokens from the left (the
    bos is kept) until the example fits and, if the completion alone does not fit, cuts it on the right (it then
    has no EOS); ``drop`` leaves the example out. Truncated and dropped examples are counted and logged.

Splits and batches
    Without ``val``, a seeded permutation holds out ``val_fraction`` of the training records; ``test`` defaults to
    the validation set. A batch is ``{"input_ids", "labels", "attention_mask"}`` of shape (B, T), right-padded
    with the EOS id to the longest example of the batch (labels :data:`IGNORE_INDEX` on padding, attention_mask
    True on real tokens). With ``packing``, whole examples are packed (best fit, in a seeded order fixed at setup)
    into rows of exactly ``max_length`` tokens, and the batch also has ``segment_ids`` (1, 2, ... per example in
    a row, 0 on padding) and ``position_ids`` (restarting at 0 for each example); rows are shuffled each epoch.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmforge.data.sampling import ResumableData
from lmforge.data.sources import CorpusError
from lmforge.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""The label of positions that carry no loss (``torch.nn.functional.cross_entropy``'s default ignore_index)."""

ROLES = ("system", "user", "assistant")
BadLines = Literal["error", "skip"]
_MAX_LISTED = 5  # skipped line numbers named in the warning


# -- reading record files (shared with lmforge.data.classify) ------------------------------------------------


@dataclass
class Record:
    """One record of a data file: its fields and where it came from (``line`` is 1-based)."""

    path: str
    line: int
    data: dict

    @property
    def where(self) -> str:
        return f"{self.path} line {self.line}"


def fields_of(record: dict) -> str:
    return ", ".join(repr(k) for k in record) or "none"


@dataclass
class RecordFile:
    """What :func:`read_records` found in a file."""

    path: str
    records: list[Record]
    skipped: list[int]
    """Lines (CSV: records) left out by ``bad_lines="skip"``."""
    columns: list[str] | None = None
    """A CSV file's header."""


def read_records(
    path: str,
    prefix: str,
    key: str,
    bad_lines: BadLines = "error",
    formats: Sequence[str] = (".jsonl", ".json"),
) -> RecordFile:
    """Read the records of a ``.jsonl``, ``.json`` (or, when allowed, ``.csv``) file.

    Args:
        path: The file.
        prefix: The start of error messages (``sft``, ``classify``).
        key: The config key that named the file, for the not-found message (``data.train``).
        bad_lines: ``error`` stops at a JSONL line (or CSV record) that does not parse; ``skip`` leaves it out,
            counts it and logs one warning.
        formats: The extensions accepted.

    Returns:
        The records (a CSV row is a dict from column name to cell text), the skipped lines, the CSV header.
    """
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in formats:
        raise CorpusError(
            f"{prefix}: {path}: unknown format {file.suffix or '(no extension)'!r}; "
            f"give a file ending in {' or '.join(formats)}"
        )
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "not found"
        raise CorpusError(f"{prefix}: {path} {what}; check {key} (a path relative to the current directory)")
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


def split_off(items: list, fraction: float, seed: int, prefix: str, path: str) -> tuple[list, list]:
    """(train, held out): ``fraction`` of ``items`` chosen by a permutation seeded with ``seed``."""
    n = len(items)
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise CorpusError(
            f"{prefix}: {path} has {n} record(s): too few to hold out data.val_fraction={fraction} for validation; "
            "add records or give a validation file in data.val"
        )
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def resolve_tokenizer(datamodule: L.LightningDataModule, prefix: str) -> tuple[Any, int]:
    """The tokenizer and max_length given, or else those of the trainer's LightningModule."""
    module = None
    trainer = getattr(datamodule, "trainer", None)
    if trainer is not None:
        module = getattr(trainer, "lightning_module", None)
    tokenizer = datamodule.tokenizer
    if tokenizer is None and module is not None:
        tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None:
        raise CorpusError(
            f"{prefix}: no tokenizer; give the data module one (tokenizer=..., or set_tokenizer()) "
            "or train a model that has one (model.tokenizer, e.g. loaded from a checkpoint)"
        )
    max_length = datamodule.max_length
    if max_length is None and module is not None:
        config = getattr(module, "config", None)
        max_length = getattr(config, "block_size", None)
    if max_length is None:
        raise CorpusError(
            f"{prefix}: no max_length; set data.max_length, pass max_length to set_tokenizer(), "
            "or train a model (its config.block_size is the default)"
        )
    if max_length < 2:
        raise CorpusError(f"{prefix}: max_length={max_length} must be at least 2")
    return tokenizer, int(max_length)


def bos_ids(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_id", None)
    return [] if bos is None else [int(bos)]


def encode(tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text)]


def check_choice(prefix: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{prefix}: data.{name}={value!r} must be one of {', '.join(choices)}")


def check_common(prefix: str, val_fraction: float, batch_size: int, max_length: int | None, bad_lines: str) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"{prefix}: data.val_fraction={val_fraction} must be between 0 and 1")
    if batch_size < 1:
        raise UserError(f"{prefix}: data.batch_size={batch_size} must be positive")
    if max_length is not None and max_length < 2:
        raise UserError(f"{prefix}: data.max_length={max_length} must be at least 2")
    check_choice(prefix, "bad_lines", bad_lines, ("error", "skip"))


# -- SFT examples -----------------------------------------------------------------------------------------


@dataclass
class Example:
    """A tokenized example: the model reads ``input_ids`` and is trained on ``labels`` (same length)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)


class ExampleDataset(Dataset):
    """Tokenized examples, one per item (a dict of 1-D tensors)."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


class PackedDataset(Dataset):
    """Rows of exactly ``length`` tokens, each holding whole examples (see :func:`pack`)."""

    def __init__(self, examples: list[Example], rows: list[list[int]], length: int, pad_id: int) -> None:
        self.rows = rows
        n = len(rows)
        self.input_ids = torch.full((n, length), pad_id, dtype=torch.long)
        self.labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        self.attention_mask = torch.zeros((n, length), dtype=torch.bool)
        self.segment_ids = torch.zeros((n, length), dtype=torch.long)
        self.position_ids = torch.zeros((n, length), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for segment, i in enumerate(row, start=1):
                ex = examples[i]
                end = at + len(ex)
                self.input_ids[r, at:end] = ex.input_ids
                self.labels[r, at:end] = ex.labels
                self.attention_mask[r, at:end] = True
                self.segment_ids[r, at:end] = segment
                self.position_ids[r, at:end] = torch.arange(len(ex))
                at = end

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "labels": self.labels[i],
            "attention_mask": self.attention_mask[i],
            "segment_ids": self.segment_ids[i],
            "position_ids": self.position_ids[i],
        }


def pack(lengths: Sequence[int], capacity: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Best-fit packing: rows of example indices whose lengths sum to at most ``capacity``; none is split.

    Examples are placed in ``order`` (default: as given), each in the open row with the least room that
    still fits it, or in a new row.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order if order is not None else range(len(lengths)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} of {n} tokens does not fit a row of {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            room -= n
        else:
            r, room = len(rows), capacity - n
            rows.append([i])
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


class PadCollator:
    """Stacks items into a batch, right-padding ``input_ids`` with ``pad_id`` and labels with IGNORE_INDEX."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if "attention_mask" in items[0]:  # packed rows: all the same length
            return {k: torch.stack([it[k] for it in items]) for k in items[0]}
        T = max(len(it["input_ids"]) for it in items)
        B = len(items)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.bool)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n] = it["input_ids"]
            labels[b, :n] = it["labels"]
            mask[b, :n] = True
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _text_field(record: Record, field: str, what: str, option: str) -> str:
    if field not in record.data:
        raise CorpusError(
            f"sft: {record.where}: no field {field!r} (the record has {fields_of(record.data)}); "
            f"set data.{option} to the field holding the {what}"
        )
    value = record.data[field]
    if not isinstance(value, str):
        raise CorpusError(f"sft: {record.where}: field {field!r} is {type(value).__name__}, not text")
    return value


# -- chat templates ---------------------------------------------------------------------------------------


class ChatTemplate:
    """A Jinja chat template, rendered as transformers' ``apply_chat_template`` renders it, in a sandbox.

    Args:
        source: The template text.
        name: How messages name it (``the tokenizer's chat template``, a file path).
        tokenizer: Gives the ``bos_token`` / ``eos_token`` variables (when it has them).
    """

    def __init__(self, source: str, name: str, tokenizer) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(jinja2.ext.Extension):
            """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders its body."""

            tags = {"generation"}

            def parse(self, parser):
                next(parser.stream)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        class Namespace(jinja2.utils.Namespace):
            """``namespace()`` that refuses underscore attributes, as transformers' does."""

            def __init__(*args, **kwargs):
                self, args = args[0], args[1:]
                attrs = dict(*args, **kwargs)
                for key in attrs:
                    Namespace._check(key)
                jinja2.utils.Namespace.__init__(self, attrs)

            def __setitem__(self, key, value):
                Namespace._check(key)
                jinja2.utils.Namespace.__setitem__(self, key, value)

            @staticmethod
            def _check(key):
                if isinstance(key, str) and key.startswith("_"):
                    raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r} starts with an underscore")

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' filter: Jinja's own escapes HTML characters
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        now = datetime.now()  # one instant per setup, so the renders of a record (and of all records) agree

        def strftime_now(format):
            return now.strftime(format)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        env.globals["namespace"] = Namespace
        self.name = name
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise CorpusError(
                f"sft: {name}: not a valid Jinja template (line {err.lineno}: {_one_line(err.message)}); fix it or "
                "set data.chat_template: lmforge"
            ) from None
        self.variables = {}
        for key in ("bos_token", "eos_token"):
            value = getattr(tokenizer, key, None)
            if isinstance(value, str):
                self.variables[key] = value
        if "bos_token" in source and "bos_token" not in self.variables:
            log.warning(
                "sft: %s uses bos_token, but the tokenizer adds no beginning-of-text token: it renders as empty",
                name,
            )

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.variables,
        )


def _one_line(text: str | None) -> str:
    return " ".join(str(text).split())


class ChatEncoder:
    """Encodes rendered chat text piece by piece, as the whole text would be encoded.

    Special tokens written in the text (the tokenizer's added special tokens, its EOS and bos) become their ids:
    a Hugging Face tokenizer splits its added tokens off itself, and any that ``encode`` would spell out as
    ordinary text (the byte tokenizer's ``<|endoftext|>``) are split off here. A piece that continues the text is
    encoded after a newline that is then removed (as transformers encodes chat pieces), for tokenizers that treat
    the start of a text differently (SentencePiece's prefix space); other tokenizers encode it as it is.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        special = dict(tokenizer.special_tokens()) if hasattr(tokenizer, "special_tokens") else {}
        for key in ("eos", "bos"):
            text, i = getattr(tokenizer, f"{key}_token", None), getattr(tokenizer, f"{key}_id", None)
            if isinstance(text, str) and text and i is not None:
                special.setdefault(text, int(i))
        self.special = {t: int(i) for t, i in special.items() if t and encode(tokenizer, t) != [int(i)]}
        longest_first = sorted(self.special, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if self.special else None
        self.newline = encode(tokenizer, "\n")
        if "\n" not in tokenizer.decode(self.newline):  # a tokenizer that cannot spell a newline: no trick
            self.newline = []
        self.mid_text = any(self._after_newline(p) not in (None, encode(tokenizer, p)) for p in ("a", "Hello"))

    def _after_newline(self, text: str) -> list[int] | None:
        ids = encode(self.tokenizer, "\n" + text)
        n = len(self.newline)
        return ids[n:] if n and ids[:n] == self.newline else None

    def encode(self, text: str, start: bool) -> list[int]:
        """The ids of ``text``; ``start``: it begins the sequence (else it continues the text before it)."""
        ids: list[int] = []
        parts = self.split.split(text) if self.split is not None else [text]
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special[part])
            elif part:
                after = None if (start and k == 0) or not self.mid_text else self._after_newline(part)
                ids += encode(self.tokenizer, part) if after is None else after
        return ids


class ExampleLoaders(ResumableData):
    """train/val/test DataLoaders over ``self.datasets`` (shared by the SFT and classification data
    modules): seeded shuffling for training, ``self.collate`` for batches."""

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        if shuffle:  # seeded per epoch, resumable mid-epoch (lmforge.data.sampling)
            return self._train_loader(
                self.datasets[name], self.batch_size, drop_last=False, num_workers=self.num_workers,
                collate_fn=self.collate,
            )  # fmt: skip
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(0),  # worker seeds: never drawn from torch's global state
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def describe_data(self) -> dict:
        """What the run trains on, for the checkpoint and the model card (file names, not local paths)."""
        files = {k: Path(v).name for k, v in (("train", self.train_path), ("val", self.val_path)) if v}
        return {"files": files}

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def state_dict(self) -> dict:
        return {"data_order": self._data_order()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restore_data_order(state_dict)


class SFTDataModule(ExampleLoaders, L.LightningDataModule):
    """Supervised fine-tuning data: prompt/completion or chat records, loss on the answers only.

    Reads ``.jsonl`` / ``.json`` files of ``{"prompt": ..., "completion": ...}`` or ``{"messages": [...]}``
    records, tokenizes each once, masks the prompt (labels -100) so the loss covers the completion and its
    end-of-text token, and serves right-padded batches (or packed rows). The chat templates (lmforge's, the
    tokenizer's own Jinja template or a .jinja file), the truncation policies and the batch format are described
    in :mod:`lmforge.data.sft`.
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        val_fraction: float = 0.1,
        format: Literal["auto", "prompt_completion", "messages"] = "auto",
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        chat_template: str = "lmforge",
        max_length: int | None = None,
        truncation: Literal["error", "truncate_prompt", "drop"] = "error",
        packing: bool = False,
        bad_lines: Literal["error", "skip"] = "error",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: Any = None,
    ) -> None:
        """
        Args:
            train: Training records: a .jsonl file (one JSON object per line) or a .json file (a list of
                objects), each {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}]}.
            val: Validation records in the same format; default: val_fraction of the training records.
            test: Test records; default: the validation set.
            val_fraction: Without val, the fraction of training records held out (a permutation seeded by seed).
            format: prompt_completion, messages (chat), or auto: decided per file from its first record.
            prompt_field: The field holding the prompt (prompt_completion format).
            completion_field: The field holding the completion (prompt_completion format).
            chat_template: How chat records become text: lmforge (lmforge's plain-text template, the loss on the
                assistant contents and an EOS after each), tokenizer (the model's own Jinja template, from its
                tokenizer_config.json or chat_template.jinja; the loss on each assistant turn as the template
                renders it, end-of-turn token included), or the path of a .jinja template file.
            max_length: Most tokens the model reads per example; default the model's config.block_size.
            truncation: For an example longer than max_length: error (stop, naming it), truncate_prompt (drop
                prompt tokens from the left; cut the completion on the right if it alone is too long), or drop
                (leave it out). Truncated and dropped examples are counted and logged.
            packing: Pack whole examples into rows of exactly max_length tokens; batches then also have
                segment_ids and position_ids (restarting per example).
            bad_lines: For a .jsonl line that is not valid JSON: error, or skip it (counted, one warning).
            batch_size: Examples (or packed rows) per batch.
            num_workers: DataLoader worker processes.
            seed: Seeds the validation split, the packing order and the shuffling.
            tokenizer: A tokenizer object (Python use); default: the model's tokenizer (model.tokenizer).
        """
        super().__init__()
        check_common("sft", val_fraction, batch_size, max_length, bad_lines)
        check_choice("sft", "format", format, ("auto", "prompt_completion", "messages"))
        check_choice("sft", "truncation", truncation, ("error", "truncate_prompt", "drop"))
        self.train_path, self.val_path, self.test_path = train, val, test
        self.val_fraction = val_fraction
        self.format = format
        self.prompt_field = prompt_field
        self.completion_field = completion_field
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise UserError(
                f"sft: data.chat_template={chat_template!r} must be lmforge, tokenizer or the path of a .jinja file"
            )
        self.chat_template = chat_template
        self._template: ChatTemplate | None = None
        self._encoder: ChatEncoder | None = None
        self.max_length = max_length
        self.truncation = truncation
        self.packing = packing
        self.bad_lines = bad_lines
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = tokenizer
        self.stats: dict[str, Any] = {}
        self.datasets: dict[str, Dataset] = {}
        self.examples: dict[str, list[Example]] = {}

    def set_tokenizer(self, tokenizer, max_length: int | None = None) -> None:
        """Use ``tokenizer`` (and ``max_length``, when given) without a trainer; the next setup() re-tokenizes."""
        self.tokenizer = tokenizer
        if max_length is not None:
            self.max_length = max_length
        self.datasets = {}

    @property
    def num_examples(self) -> int:
        """Training examples after setup (after drops)."""
        return len(self.examples.get("train", []))

    # -- reading -------------------------------------------------------------------------------------------
    def _read(self, path: str, key: str) -> list[tuple[Record, list[tuple[str | None, bool]], bool]]:
        """The records of one file as spans of text, each with whether it is trained (None stands for the EOS),
        and whether a Jinja chat template wrote them."""
        found = read_records(path, "sft", key, self.bad_lines)
        records = found.records
        self._skipped += len(found.skipped)
        fmt = self.format
        if fmt == "auto":
            first = records[0].data
            fmt = "messages" if "messages" in first and self.prompt_field not in first else "prompt_completion"
        templated = fmt == "messages" and self.chat_template != "lmforge"
        return [(r, self._spans(r, fmt), templated) for r in records]

    def _spans(self, record: Record, fmt: str) -> list[tuple[str | None, bool]]:
        if fmt == "prompt_completion":
            prompt = _text_field(record, self.prompt_field, "prompt", "prompt_field")
            completion = _text_field(record, self.completion_field, "completion", "completion_field")
            if not completion.strip():
                raise CorpusError(
                    f"sft: {record.where}: the completion ({self.completion_field!r}) is empty; "
                    "give every record a completion or remove the line"
                )
            return [(prompt, False), (completion, True), (None, True)]  # None: the EOS token
        messages = self._messages(record)
        template = self._chat_template()
        if template is not None:
            return self._template_spans(record, messages, template)
        spans: list[tuple[str | None, bool]] = []
        masked = ""
        for msg in messages:
            role, content = msg["role"], msg["content"]
            masked += f"<|{role}|>\n"
            if role == "assistant":
                spans += [(masked, False), (content, True), (None, True)]
                masked = "\n"
            else:
                masked += f"{content}\n"
        return spans

    def _messages(self, record: Record) -> list[dict]:
        """The record's messages, checked: roles, text contents, non-empty answers, at least one answer."""
        if "messages" not in record.data:
            raise CorpusError(
                f"sft: {record.where}: no field 'messages' (the record has {fields_of(record.data)}); "
                'give chat records as {"messages": [{"role": ..., "content": ...}]} or set data.format'
            )
        messages = record.data["messages"]
        if not isinstance(messages, list) or not messages:
            raise CorpusError(f"sft: {record.where}: 'messages' must be a non-empty list of {{role, content}} objects")
        has_answer = False
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                got = fields_of(msg) if isinstance(msg, dict) else type(msg).__name__
                raise CorpusError(f"sft: {record.where}: messages[{i}] needs 'role' and 'content' (it has {got})")
            role, content = msg["role"], msg["content"]
            if role not in ROLES:
                raise CorpusError(
                    f"sft: {record.where}: messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}"
                )
            if not isinstance(content, str):
                raise CorpusError(f"sft: {record.where}: messages[{i}] content is {type(content).__name__}, not text")
            if role == "assistant":
                if not content.strip():
                    raise CorpusError(
                        f"sft: {record.where}: messages[{i}] (assistant) is empty; "
                        "give every assistant message a content or remove the record"
                    )
                has_answer = True
        if not has_answer:
            raise CorpusError(
                f"sft: {record.where}: no assistant message; the loss is on assistant messages, give at least one"
            )
        return messages

    def _chat_template(self) -> ChatTemplate | None:
        """The Jinja template that data.chat_template names (None: lmforge's own), loaded at the first chat record."""
        if self.chat_template == "lmforge" or self._template is not None:
            return self._template
        tokenizer = self.tokenizer
        if self.chat_template == "tokenizer":
            source = getattr(tokenizer, "chat_template", None)
            if not isinstance(source, str) or not source.strip():
                raise CorpusError(
                    "sft: data.chat_template: tokenizer, but the tokenizer has no chat template (none in its "
                    "tokenizer_config.json or chat_template.jinja); give the path of a .jinja file in "
                    "data.chat_template or set data.chat_template: lmforge"
                )
            name = "the tokenizer's chat template"
        else:
            file = Path(self.chat_template).expanduser()
            if not file.is_file():
                raise CorpusError(
                    f"sft: data.chat_template={self.chat_template!r} is not lmforge, tokenizer or an existing file; "
                    "give the path of a .jinja template (relative to the current directory)"
                )
            source, name = file.read_text(encoding="utf-8"), f"chat template {self.chat_template}"
        self._template = ChatTemplate(source, name, tokenizer)
        self._encoder = ChatEncoder(tokenizer)
        return self._template

    def _template_spans(self, record: Record, messages: list[dict], template: ChatTemplate) -> list[tuple[str, bool]]:
        """Masked and trained text: for each answer, what the prompt render adds, then what the answer adds."""

        def render(i: int, prompt: bool) -> str:
            try:
                return template.render(messages[:i], add_generation_prompt=prompt)
            except Exception as err:  # the template's own code failed (raise_exception, a bad key, a type...)
                raise CorpusError(
                    f"sft: {record.where}: {template.name} fails on messages[:{i}]: "
                    f"{type(err).__name__}: {_one_line(str(err))}"
                ) from None

        spans: list[tuple[str, bool]] = []
        done = ""  # the text so far: the render up to the previous answer
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt, full = render(i, True), render(i + 1, False)
            if not prompt.startswith(done):
                raise CorpusError(
                    f"sft: {record.where}: {template.name} renders messages[:{i}] (with the generation prompt) as text "
                    "that does not extend its render up to the previous assistant message (it rewrites earlier "
                    "turns), so the answers cannot be masked; use data.chat_template: lmforge or another template"
                )
            if not full.startswith(prompt) or full == prompt:
                raise CorpusError(
                    f"sft: {record.where}: {template.name} renders messages[:{i + 1}] as text that does not "
                    f"{'add to' if full == prompt else 'start with'} its render of messages[:{i}] with "
                    f"add_generation_prompt, so the assistant part of messages[{i}] cannot be told apart; "
                    "use data.chat_template: lmforge or another template"
                )
            spans += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        return [(text, train) for text, train in spans if text]

    # -- tokenizing ----------------------------------------------------------------------------------------
    def _tokenize(
        self, record: Record, spans, templated: bool, tokenizer, max_length: int, counts: dict[str, int]
    ) -> Example | None:
        ids = bos_ids(tokenizer)
        chat = self._encoder if templated else None
        if chat is not None:  # rendered by a Jinja template: it writes the end-of-turn tokens, maybe the bos too
            bos_text = getattr(tokenizer, "bos_token", None)
            if ids and isinstance(bos_text, str) and bos_text and spans[0][0].startswith(bos_text):
                ids = []
        trained = [False] * len(ids)
        n_bos = len(ids)
        for k, (text, train) in enumerate(spans):
            if text is None:
                piece = [int(tokenizer.eos_id)]
            else:
                piece = chat.encode(text, start=k == 0) if chat is not None else encode(tokenizer, text)
            ids += piece
            trained += [train] * len(piece)
        bos = getattr(tokenizer, "bos_id", None)
        if chat is not None and not n_bos and bos is not None and ids[:1] == [int(bos)]:
            n_bos = 1  # the template's own bos: kept by truncate_prompt too
        if len(ids) - 1 > max_length:
            first = trained.index(True)
            prompt_len = first - n_bos
            if self.truncation == "error":
                raise CorpusError(
                    f"sft: {record.where}: {len(ids)} tokens ({prompt_len} before the first answer token), the "
                    f"model would read {len(ids) - 1} > max_length={max_length}; shorten it, raise data.max_length "
                    "(at most the model's block_size), or set data.truncation: truncate_prompt or drop"
                )
            if self.truncation == "drop":
                counts["dropped"] += 1
                return None
            excess = len(ids) - 1 - max_length
            cut = min(excess, prompt_len)
            del ids[n_bos : n_bos + cut], trained[n_bos : n_bos + cut]
            counts["truncated"] += 1
            if len(ids) - 1 > max_length:
                del ids[max_length + 1 :], trained[max_length + 1 :]
                counts["completion_cut"] += 1
        labels = [t if train else IGNORE_INDEX for t, train in zip(ids[1:], trained[1:])]
        return Example(torch.tensor(ids[:-1], dtype=torch.long), torch.tensor(labels, dtype=torch.long))

    # -- LightningDataModule -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        tokenizer, max_length = resolve_tokenizer(self, "sft")
        self.tokenizer = tokenizer
        self._template = self._encoder = None  # loaded again for this tokenizer at the first chat record
        self._skipped = 0
        train = self._read(self.train_path, "data.train")
        if self.val_path is None:
            train, val = split_off(train, self.val_fraction, self.seed, "sft", self.train_path)
        else:
            val = self._read(self.val_path, "data.val")
        test = self._read(self.test_path, "data.test") if self.test_path is not None else None
        counts = {"truncated": 0, "completion_cut": 0, "dropped": 0}
        splits = {"train": train, "val": val}
        if test is not None:
            splits["test"] = test
        self.examples = {}
        for name, items in splits.items():
            examples = [self._tokenize(r, spans, t, tokenizer, max_length, counts) for r, spans, t in items]
            self.examples[name] = [ex for ex in examples if ex is not None]
            if not self.examples[name]:
                raise CorpusError(
                    f"sft: no {name} examples left: all {len(items)} are longer than max_length={max_length} "
                    "and were dropped; raise data.max_length or set data.truncation: truncate_prompt"
                )
        if "test" not in self.examples:
            self.examples["test"] = self.examples["val"]
        pad_id = int(tokenizer.eos_id)
        self.collate = PadCollator(pad_id)
        self.datasets = {}
        for name, examples in self.examples.items():
            if name == "test" and examples is self.examples["val"]:
                self.datasets[name] = self.datasets["val"]
            elif self.packing:
                if name == "train":
                    order = np.random.default_rng(self.seed).permutation(len(examples)).tolist()
                else:
                    order = None
                rows = pack([len(ex) for ex in examples], max_length, order)
                self.datasets[name] = PackedDataset(examples, rows, max_length, pad_id)
            else:
                self.datasets[name] = ExampleDataset(examples)
        self.max_length_used = max_length
        self._summarize(counts, max_length)

    def _summarize(self, counts: dict[str, int], max_length: int) -> None:
        train = self.examples["train"]
        lengths = [len(ex) for ex in train]
        loss_tokens = sum(int((ex.labels != IGNORE_INDEX).sum()) for ex in train)
        self.stats = {
            "examples": len(train),
            "val_examples": len(self.examples["val"]),
            "test_examples": len(self.examples["test"]),
            "tokens": sum(lengths),
            "loss_tokens": loss_tokens,
            "mean_length": sum(lengths) / len(lengths),
            "longest": max(lengths),
            "truncated": counts["truncated"],
            "completion_cut": counts["completion_cut"],
            "dropped": counts["dropped"],
            "skipped_lines": self._skipped,
        }
        if self.packing:
            self.stats["packed_rows"] = len(self.datasets["train"])
        s = self.stats
        held = (
            f" ({self.val_fraction:g} of {self.train_path} held out, seed {self.seed})" if self.val_path is None else ""
        )
        line = (
            f"sft: {s['examples']} training examples, {s['val_examples']} validation{held}, "
            f"{s['test_examples']} test; {s['tokens']} tokens (mean {s['mean_length']:.1f}, max {s['longest']} "
            f"of max_length={max_length}), loss on {loss_tokens}"
        )
        if self.packing:
            line += f"; packed into {s['packed_rows']} rows"
        log.info(line)
        if counts["truncated"] or counts["dropped"]:
            log.warning(
                "sft: %d example(s) longer than max_length=%d: %d truncated (%d with the completion cut, no EOS), "
                "%d dropped",
                counts["truncated"] + counts["dropped"],
                max_length,
                counts["truncated"],
                counts["completion_cut"],
                counts["dropped"],
            )
