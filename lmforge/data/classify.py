"""Text classification data: (text, label) records -> token sequences and class indices.

Files are ``.jsonl`` (one JSON object per line, blank lines ignored), ``.json`` (a JSON list of objects) or
``.csv`` (a header row naming the columns; ``text_field`` and ``label_field`` name the two used), chosen by
extension, and are only read, never written.

Labels are compared as strings (``1`` and ``"1"`` are the same label; surrounding spaces are ignored).
:attr:`ClassificationDataModule.label_names` are the distinct training labels, sorted (numerically when all
are integers, else as strings), or the ``labels`` given; a label's class index is its position there. A label in
the validation or test file that is not a training label is an error.

For a decoder's tokenizer a text becomes ``[bos] + encode(text)`` (``bos`` only when the tokenizer has a
``bos_id`` that is not None; no end-of-text token is appended), truncated to ``max_length`` tokens keeping the
beginning; truncations are counted and logged. A batch is ``{"input_ids": (B, T) long, "attention_mask": (B, T)
bool, "labels": (B,) long}``, right-padded with the EOS id to the longest text of the batch (attention_mask True on
real tokens).

An encoder's tokenizer (a WordPiece one, or any with ``cls_id``, ``sep_id`` and ``pad_id``) frames a text as BERT
does: ``[CLS] text [SEP]``, or with ``text_pair_field`` the pair ``[CLS] a [SEP] b [SEP]`` (token types 0 for
``[CLS] a [SEP]``, 1 for ``b [SEP]``). A longer one loses text tokens from its end, never the framing (for a pair,
one token at a time from the longer text, as transformers' ``longest_first``), so the last token stays [SEP].
Batches are right-padded with the tokenizer's ``pad_id`` and also carry ``"token_type_ids": (B, T) long``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from lmforge.data.examples import ExampleDataModule, bos_ids, check_common, encode, split_off
from lmforge.data.records import FORMATS, Record, RecordFile, fields_of, read_records
from lmforge.data.sources import CorpusError
from lmforge.errors import UserError

log = logging.getLogger(__name__)


def sort_labels(labels) -> list[str]:
    """Sorted label names: numerically when all are integers, else as strings."""
    labels = set(labels)
    if all(_is_int(x) for x in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def is_encoder_tokenizer(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` frames texts as BERT does: it has ``cls_id``, ``sep_id`` and ``pad_id``."""
    return all(getattr(tokenizer, name, None) is not None for name in ("cls_id", "sep_id", "pad_id"))


def encode_framed(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[int], list[int], bool]:
    """(ids, token types, truncated) of ``[CLS] a [SEP]`` (texts ``(a,)``) or ``[CLS] a [SEP] b [SEP]`` (``(a, b)``)
    in at most ``max_length`` tokens: text tokens are dropped from the end (for a pair, from the longer text first,
    ties from b, as transformers' ``longest_first``); the special tokens always stay."""
    a = encode(tokenizer, texts[0])
    b = encode(tokenizer, texts[1]) if len(texts) > 1 else None
    budget = max_length - (2 if b is None else 3)
    if budget < (1 if b is None else 2):
        raise CorpusError(f"classify: max_length={max_length} leaves no room for text between [CLS] and [SEP]")
    truncated = len(a) + len(b or ()) > budget
    if b is None:
        a = a[:budget]
    else:
        while len(a) + len(b) > budget:
            if len(a) > len(b):
                a.pop()
            else:
                b.pop()
    cls, sep = int(tokenizer.cls_id), int(tokenizer.sep_id)
    ids = [cls, *a, sep] + ([] if b is None else [*b, sep])
    types = [0] * (len(a) + 2) + ([] if b is None else [1] * (len(b) + 1))
    return ids, types, truncated


class TextLabelDataset(Dataset):
    """Tokenized texts and their class indices (and, for an encoder's framing, the token types)."""

    def __init__(self, ids: list[torch.Tensor], labels: list[int], types: list[torch.Tensor] | None = None) -> None:
        self.ids, self.labels, self.types = ids, labels, types

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple:
        if self.types is None:
            return self.ids[i], self.labels[i]
        return self.ids[i], self.labels[i], self.types[i]


class ClassifyCollator:
    """Right-pads texts with ``pad_id``; returns input_ids, attention_mask and labels (and token_type_ids, padded
    with 0, when the items carry token types)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        T = max(len(item[0]) for item in items)
        input_ids = torch.full((len(items), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), T), dtype=torch.bool)
        for b, (ids, *_) in enumerate(items):
            input_ids[b, : len(ids)] = ids
            mask[b, : len(ids)] = True
        labels = torch.tensor([item[1] for item in items], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if len(items[0]) > 2:
            batch["token_type_ids"] = torch.zeros((len(items), T), dtype=torch.long)
            for b, (_, _, types) in enumerate(items):
                batch["token_type_ids"][b, : len(types)] = types
        return batch


class ClassificationDataModule(ExampleDataModule):
    """Text classification data: texts with labels from .jsonl, .json or .csv files.

    Each text is tokenized once (truncated to max_length, keeping the beginning); labels are class indices
    into :attr:`label_names`. Batches are right-padded (see :mod:`lmforge.data.classify`). The tokenizer and
    max_length not given here come from the task (:meth:`~lmforge.data.examples.ExampleDataModule.connect`).
    """

    prefix = "classify"

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        val_fraction: float = 0.1,
        text_field: str = "text",
        label_field: str = "label",
        text_pair_field: str | None = None,
        labels: list[str] | None = None,
        max_length: int | None = None,
        bad_lines: Literal["error", "skip"] = "error",
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: Any = None,
    ) -> None:
        """
        Args:
            train: Training records: a .csv file with a header row, a .jsonl file (one JSON object per line)
                or a .json file (a list of objects), each with a text and a label.
            val: Validation records in the same form; default: val_fraction of the training records.
            test: Test records; default: the validation set.
            val_fraction: Without val, the fraction of training records held out (a permutation seeded by seed).
            text_field: The field (CSV: column) holding the text.
            label_field: The field (CSV: column) holding the label (text or integer, compared as text).
            text_pair_field: For sentence-pair tasks: the field (CSV: column) holding the second text, read as
                ``[CLS] text [SEP] pair [SEP]``; needs an encoder's tokenizer ([CLS]/[SEP]).
            labels: The label names in class-index order; default: the distinct training labels, sorted.
            max_length: Most tokens per text (longer texts keep their beginning; an encoder's [CLS] and [SEP]
                always stay); default the model's config.block_size (an encoder's max_positions).
            bad_lines: For a .jsonl line that is not valid JSON (or a CSV record with the wrong number of
                fields): error, or skip it (counted, one warning).
            batch_size: Texts per batch.
            num_workers: DataLoader worker processes.
            seed: Seeds the validation split and the shuffling.
            tokenizer: A tokenizer object (Python use); default: the task's (the base model's tokenizer).
        """
        check_common("classify", val_fraction, batch_size, max_length, bad_lines)
        if labels is not None:
            names = [str(x).strip() for x in labels]
            duplicates = sorted(x for x, n in Counter(names).items() if n > 1)
            if not names or duplicates or "" in names:
                why = f"repeats {', '.join(map(repr, duplicates))}" if duplicates else "has an empty name"
                raise UserError(f"classify: data.labels {why if names else 'is empty'}; give distinct label names")
            labels = names
        super().__init__(tokenizer, max_length, batch_size, num_workers, seed)
        self.train_path, self.val_path, self.test_path = train, val, test
        self.val_fraction = val_fraction
        self.text_field = text_field
        self.label_field = label_field
        self.text_pair_field = text_pair_field
        self.labels = labels
        self.bad_lines = bad_lines
        self.stats: dict[str, Any] = {}
        self._train_file: list[tuple[Record, str, str]] | None = None
        self._label_names: list[str] | None = None
        self._skipped = 0

    # -- labels --------------------------------------------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        """The class names in index order: ``labels`` if given, else the sorted distinct training labels.

        Reads the training file only (once); needs no tokenizer and no setup.
        """
        if self._label_names is None:
            rows = self._train_rows()
            if self.labels is not None:
                known = set(self.labels)
                for record, _, label in rows:
                    if label not in known:
                        raise CorpusError(
                            f"classify: {record.where}: label {label!r} is not in data.labels "
                            f"({', '.join(self.labels)}); add it to data.labels or fix the record"
                        )
                self._label_names = list(self.labels)
            else:
                self._label_names = sort_labels(label for _, _, label in rows)
        return self._label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def num_examples(self) -> int:
        """Training examples (after setup; before, the records of the training file)."""
        if "train" in self.datasets:
            return len(self.datasets["train"])
        return len(self._train_rows())

    # -- reading -------------------------------------------------------------------------------------------
    def _train_rows(self) -> list[tuple[Record, tuple[str, ...], str]]:
        if self._train_file is None:
            self._train_file = self._read(self.train_path, "data.train")
        return self._train_file

    def _read(self, path: str, key: str) -> list[tuple[Record, tuple[str, ...], str]]:
        """(record, texts, label) for each record of a file: texts the text, or the text and its pair."""
        found: RecordFile = read_records(path, "classify", key, self.bad_lines, FORMATS)
        self._skipped += len(found.skipped)
        if found.columns is not None:
            options = [(self.text_field, "text_field"), (self.label_field, "label_field")]
            if self.text_pair_field is not None:
                options.append((self.text_pair_field, "text_pair_field"))
            for field, option in options:
                if field not in found.columns:
                    raise CorpusError(
                        f"classify: {path}: no column {field!r} (the columns are {fields_of(found.columns)}); "
                        f"set data.{option} to the column holding the {option.split('_')[0]}s"
                    )
        return [(r, self._texts(r), self._label(r)) for r in found.records]

    def _field(self, record: Record, field: str, option: str) -> Any:
        if field not in record.data:
            raise CorpusError(
                f"classify: {record.where}: no field {field!r} (the record has {fields_of(record.data)}); "
                f"set data.{option} to the field holding the {option.split('_')[0]}"
            )
        return record.data[field]

    def _texts(self, record: Record) -> tuple[str, ...]:
        texts = (self._text(record, self.text_field, "text_field"),)
        if self.text_pair_field is None:
            return texts
        return (*texts, self._text(record, self.text_pair_field, "text_pair_field"))

    def _text(self, record: Record, field: str, option: str) -> str:
        text = self._field(record, field, option)
        if not isinstance(text, str):
            raise CorpusError(f"classify: {record.where}: field {field!r} is {type(text).__name__}, not text")
        if not text.strip():
            raise CorpusError(f"classify: {record.where}: the text ({field!r}) is empty; give it a text or remove it")
        return text

    def _label(self, record: Record) -> str:
        value = self._field(record, self.label_field, "label_field")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise CorpusError(
                f"classify: {record.where}: label {value!r} is {type(value).__name__}; give a text or an integer"
            )
        label = str(value).strip()
        if not label:
            raise CorpusError(f"classify: {record.where}: the label ({self.label_field!r}) is empty; give one")
        return label

    # -- building the datasets -----------------------------------------------------------------------------
    def _build(self, tokenizer: Any, max_length: int) -> None:
        names = self.label_names
        index = {name: i for i, name in enumerate(names)}
        train = self._train_rows()
        if self.val_path is None:
            train, val = split_off(train, self.val_fraction, self.seed, "classify", self.train_path)
        else:
            val = self._read(self.val_path, "data.val")
        splits = {"train": train, "val": val}
        if self.test_path is not None:
            splits["test"] = self._read(self.test_path, "data.test")
        framed = is_encoder_tokenizer(tokenizer)
        if self.text_pair_field is not None and not framed:
            raise UserError(
                "classify: data.text_pair_field needs an encoder's tokenizer ([CLS]/[SEP], e.g. BERT's WordPiece); "
                "this base's tokenizer has none"
            )
        bos = bos_ids(tokenizer)
        truncated = 0
        datasets: dict[str, Dataset] = {}
        for name, rows in splits.items():
            all_ids, labels, all_types = [], [], []
            for record, texts, label in rows:
                if label not in index:
                    source = "data.labels" if self.labels is not None else "the training labels"
                    raise CorpusError(
                        f"classify: {record.where}: label {label!r} is not among {source} ({', '.join(names)}); "
                        "fix the label or add training examples with it"
                    )
                if framed:
                    ids, types, cut = encode_framed(tokenizer, texts, max_length)
                    all_types.append(torch.tensor(types, dtype=torch.long))
                else:
                    ids = bos + encode(tokenizer, texts[0])
                    cut = len(ids) > max_length
                    ids = ids[:max_length]
                truncated += cut
                all_ids.append(torch.tensor(ids, dtype=torch.long))
                labels.append(index[label])
            datasets[name] = TextLabelDataset(all_ids, labels, all_types if framed else None)
        datasets.setdefault("test", datasets["val"])
        self.collate = ClassifyCollator(int(tokenizer.pad_id if framed else tokenizer.eos_id))
        self.datasets = datasets
        train_set = datasets["train"]
        lengths = [len(ids) for ids in train_set.ids]
        counts = Counter(train_set.labels)
        self.stats = {
            "examples": len(train_set),
            "val_examples": len(self.datasets["val"]),
            "test_examples": len(self.datasets["test"]),
            "tokens": sum(lengths),
            "mean_length": sum(lengths) / len(lengths),
            "longest": max(lengths),
            "truncated": truncated,
            "skipped_lines": self._skipped,
            "label_counts": {names[i]: counts.get(i, 0) for i in range(len(names))},
        }
        s = self.stats
        held = (
            f" ({self.val_fraction:g} of {self.train_path} held out, seed {self.seed})" if self.val_path is None else ""
        )
        log.info(
            "classify: %d training examples, %d validation%s, %d test; %d labels (%s); %d tokens (mean %.1f, max %d "
            "of max_length=%d)",
            s["examples"],
            s["val_examples"],
            held,
            s["test_examples"],
            len(names),
            ", ".join(f"{k}: {v}" for k, v in s["label_counts"].items()),
            s["tokens"],
            s["mean_length"],
            s["longest"],
            max_length,
        )
        if truncated:
            log.warning(
                "classify: %d text(s) longer than max_length=%d truncated (beginning kept)", truncated, max_length
            )
