"""Preference data: ``prompt`` / ``chosen`` / ``rejected`` records -> pairs of token sequences with a response mask.

Records
    ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` (strings; field names set by ``prompt_field``,
    ``chosen_field``, ``rejected_field``), or with ``format: messages`` (``auto``: when ``chosen`` is a list)
    message lists as in chat data: ``prompt`` a list of ``{role, content}`` (earlier turns, assistant turns
    included), ``chosen`` and ``rejected`` the answer: a string or a list of assistant messages. Files are
    ``.jsonl`` or ``.json`` (:mod:`lmforge.data.records`), only read.

Tokens
    Each answer is tokenized after its prompt exactly as SFT data is (:mod:`lmforge.data.sft`: ``[bos] + prompt +
    answer + [eos]``, or the chat template's render), so a preference-tuned model reads what it was fine-tuned
    on; the labels are -100 everywhere but the answer's tokens (and its EOS): the log-probability of a response
    is the sum over exactly those tokens. Truncation follows ``data.truncation`` for each answer.

Batches
    ``batch_size`` pairs: ``input_ids`` and ``labels`` of shape (2B, T), the B chosen answers first and their B
    rejected answers after them (row i and row B + i are one pair), right-padded with the EOS id, so one forward
    serves both; ``index`` (B,) the pairs' positions in their split (for reference log-probabilities computed
    once before training).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from lmforge.data.chat import check_messages, message_spans
from lmforge.data.examples import check_choice, split_off
from lmforge.data.packing import IGNORE_INDEX, Example
from lmforge.data.records import Record, fields_of, read_records
from lmforge.data.sft import SFTDataModule
from lmforge.data.sources import CorpusError


class PairDataset(Dataset):
    """(chosen, rejected, index) per preference pair."""

    def __init__(self, pairs: list[tuple[Example, Example]]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Example, Example, int]:
        chosen, rejected = self.pairs[i]
        return chosen, rejected, i


class PairCollator:
    """Right-pads the chosen answers, then the rejected ones, into one (2B, T) batch."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[Example, Example, int]]) -> dict[str, torch.Tensor]:
        rows = [c for c, _, _ in items] + [r for _, r, _ in items]
        T = max(len(ex.input_ids) for ex in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for b, ex in enumerate(rows):
            input_ids[b, : len(ex.input_ids)] = ex.input_ids
            labels[b, : len(ex.labels)] = ex.labels
        return {"input_ids": input_ids, "labels": labels, "index": torch.tensor([i for _, _, i in items])}


class PreferenceDataModule(SFTDataModule):
    """Preference pairs (prompt, chosen, rejected) for :class:`lmforge.preference.PreferenceModule`; see
    :mod:`lmforge.data.preference` for the records, tokens and batches. The tokenizer and max_length not given
    here come from the task (the base model's)."""

    prefix = "preference"

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        val_fraction: float = 0.1,
        format: Literal["auto", "prompt_completion", "messages"] = "auto",
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        chat_template: str = "lmforge",
        max_length: int | None = None,
        truncation: Literal["error", "truncate_prompt", "drop"] = "error",
        bad_lines: Literal["error", "skip"] = "error",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: Any = None,
    ) -> None:
        """
        Args:
            train: Training pairs: a .jsonl or .json file of {"prompt", "chosen", "rejected"} records.
            val: Held-out pairs in the same format (evaluation: loss, preference accuracy, rewards); default:
                val_fraction of the training pairs.
            test: Test pairs; default: the validation set.
            val_fraction: Without val, the fraction of training pairs held out (seeded by seed).
            format: prompt_completion (strings), messages (message lists), or auto (messages when chosen is a list).
            prompt_field: The field holding the prompt.
            chosen_field: The field holding the preferred answer.
            rejected_field: The field holding the dispreferred answer.
            chat_template: For message lists: lmforge, tokenizer (the model's Jinja template) or a .jinja file.
            max_length: Most tokens the model reads per answer (prompt included); default the model's block_size.
            truncation: For an answer longer than max_length: error, truncate_prompt or drop (the pair).
            bad_lines: For a .jsonl line that is not valid JSON: error, or skip it.
            batch_size: Pairs per batch (the model reads twice as many rows).
            num_workers: DataLoader worker processes.
            seed: Seeds the validation split and the shuffling.
            tokenizer: A tokenizer object (Python use); default: the task's (the base model's).
        """
        super().__init__(train, val, test, val_fraction, format, prompt_field, chosen_field, chat_template,
                         max_length, truncation, False, bad_lines, batch_size, num_workers, seed, tokenizer)  # fmt: skip
        for name, value in (("chosen_field", chosen_field), ("rejected_field", rejected_field)):
            if not isinstance(value, str) or not value:
                raise CorpusError(f"preference: data.{name}={value!r} must be a field name")
        if chosen_field == rejected_field:
            raise CorpusError(f"preference: data.chosen_field and data.rejected_field are both {chosen_field!r}")
        self.chosen_field, self.rejected_field = chosen_field, rejected_field
        self.pairs: dict[str, list[tuple[Example, Example]]] = {}

    @property
    def num_examples(self) -> int:
        """Training pairs after setup (after drops)."""
        return len(self.pairs.get("train", []))

    # -- reading -------------------------------------------------------------------------------------------
    def _read_pairs(self, path: str, key: str) -> list[tuple[Record, list, list, bool]]:
        """(record, chosen spans, rejected spans, whether a Jinja template rendered them) per record."""
        found = read_records(path, self.prefix, key, self.bad_lines)
        self._skipped += len(found.skipped)
        out = []
        for record in found.records:
            for name in (self.prompt_field, self.chosen_field, self.rejected_field):
                if name not in record.data and not (name == self.prompt_field and self.format == "messages"):
                    raise CorpusError(
                        f"preference: {record.where}: no field {name!r} (the record has {fields_of(record.data)}); "
                        "give every record prompt, chosen and rejected, or set data.prompt_field / chosen_field / "
                        "rejected_field"
                    )
            fmt = self.format
            if fmt == "auto":
                fmt = "messages" if isinstance(record.data[self.chosen_field], list) else "prompt_completion"
            spans = [self._answer_spans(record, field, fmt) for field in (self.chosen_field, self.rejected_field)]
            out.append((record, *spans, fmt == "messages" and self.chat_template != "lmforge"))
        return out

    def _answer_spans(self, record: Record, field: str, fmt: str) -> list:
        answer = record.data[field]
        if fmt != "messages":
            prompt = record.data.get(self.prompt_field)
            for name, value in ((self.prompt_field, prompt), (field, answer)):
                if not isinstance(value, str):
                    raise CorpusError(
                        f"preference: {record.where}: field {name!r} is {type(value).__name__}, not text; "
                        "message lists need data.format: messages (or auto)"
                    )
            if not answer.strip():
                raise CorpusError(f"preference: {record.where}: the answer {field!r} is empty")
            return [(prompt, False), (answer, True), (None, True)]
        prompt = record.data.get(self.prompt_field) or []
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        if not isinstance(prompt, list) or not isinstance(answer, list):
            raise CorpusError(f"preference: {record.where}: prompt and {field!r} must be message lists or strings")
        if not answer or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in answer):
            raise CorpusError(f"preference: {record.where}: {field!r} must hold assistant messages only")
        messages = check_messages(Record(record.path, record.line, {"messages": [*prompt, *answer]}))
        spans = message_spans(record, messages, self._chat_template())
        earlier = sum(1 for m in prompt if isinstance(m, dict) and m.get("role") == "assistant")
        return _untrain_first_answers(spans, earlier)  # the loss is on this answer, not on the prompt's turns

    # -- building the datasets -----------------------------------------------------------------------------
    def _build(self, tokenizer: Any, max_length: int) -> None:
        self._template = self._encoder = None
        self._skipped = 0
        check_choice(self.prefix, "truncation", self.truncation, ("error", "truncate_prompt", "drop"))
        train = self._read_pairs(self.train_path, "data.train")
        if self.val_path is None:
            train, val = split_off(train, self.val_fraction, self.seed, self.prefix, self.train_path)
        else:
            val = self._read_pairs(self.val_path, "data.val")
        splits = {"train": train, "val": val}
        if self.test_path is not None:
            splits["test"] = self._read_pairs(self.test_path, "data.test")
        counts = {"truncated": 0, "completion_cut": 0, "dropped": 0}
        self.pairs = {}
        for name, items in splits.items():
            pairs = []
            for record, chosen, rejected, templated in items:
                c = self._tokenize(record, chosen, templated, tokenizer, max_length, counts)
                r = self._tokenize(record, rejected, templated, tokenizer, max_length, counts)
                if c is not None and r is not None:  # a pair with an answer dropped is dropped whole
                    pairs.append((c, r))
            if not pairs:
                raise CorpusError(
                    f"preference: no {name} pairs left: all {len(items)} are longer than max_length={max_length} "
                    "and were dropped; raise data.max_length or set data.truncation: truncate_prompt"
                )
            self.pairs[name] = pairs
        self.pairs.setdefault("test", self.pairs["val"])
        self.collate = PairCollator(int(tokenizer.eos_id))
        self.datasets = {name: PairDataset(pairs) for name, pairs in self.pairs.items()}
        self.examples = {name: [ex for pair in pairs for ex in pair] for name, pairs in self.pairs.items()}
        n = len(self.pairs["train"])
        self.stats = {"pairs": n, "val_pairs": len(self.pairs["val"]), "test_pairs": len(self.pairs["test"]),
                      **counts, "skipped_lines": self._skipped}  # fmt: skip


def _untrain_first_answers(spans: list, count: int) -> list:
    """``spans`` with the trained spans of the first ``count`` assistant turns masked (a turn's trained spans
    follow a masked one)."""
    out, turn, previous = [], -1, False
    for text, train in spans:
        if train and not previous:
            turn += 1
        out.append((text, train and turn >= count))
        previous = train
    return out
