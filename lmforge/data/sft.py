"""Supervised fine-tuning data: prompt/completion or chat records -> token sequences with a loss mask.

Records
    A file holds records in one of two formats (``format: auto`` decides per file from its first record):

    - prompt/completion: ``{"prompt": "Sentence: ...\\nSubject:", "completion": " fox"}`` (field names set by
      ``prompt_field`` / ``completion_field``);
    - chat: ``{"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}]}``
      with roles ``system``, ``user`` and ``assistant`` and at least one assistant message.

    Files are ``.jsonl`` (one JSON object per line, blank lines ignored) or ``.json`` (a JSON list of objects),
    chosen by extension (read by :mod:`lmforge.data.records`). Files are only read, never written.

Tokens and loss mask
    A prompt/completion record becomes ``ids = [bos] + encode(prompt) + encode(completion) + [eos]`` (``bos`` only
    when the tokenizer has a ``bos_id`` that is not None; prompt and completion are encoded separately, so the
    boundary is exact). The model reads ``x = ids[:-1]`` and predicts ``y = ids[1:]``; every target that belongs
    to the prompt (or is the bos) is :data:`~lmforge.data.packing.IGNORE_INDEX`, so the loss covers exactly the
    completion and its EOS. A chat record is rendered by its chat template (``chat_template``: lmforge's own, the
    tokenizer's Jinja template or a .jinja file; see :mod:`lmforge.data.chat`) into masked and trained spans,
    encoded separately; with a Jinja template no bos is added when the text starts with the bos token.

Truncation (``max_length``: positions the model sees, ``len(ids) - 1``; default the model's ``block_size``)
    ``error`` stops with the file, line and lengths; ``truncate_prompt`` removes prompt tokens from the left (the
    bos is kept) until the example fits and, if the completion alone does not fit, cuts it on the right (it then
    has no EOS); ``drop`` leaves the example out. Truncated and dropped examples are counted and logged.

Splits and batches
    Without ``val``, a seeded permutation holds out ``val_fraction`` of the training records; ``test`` defaults to
    the validation set. Batches are right-padded with the EOS id, or, with ``packing``, rows of exactly
    ``max_length`` tokens packed with whole examples in a seeded order fixed at setup (see
    :mod:`lmforge.data.packing`); rows are shuffled each epoch.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch

from lmforge.data.chat import ChatEncoder, ChatTemplate, Span, check_messages, load_template, message_spans
from lmforge.data.examples import ExampleDataModule, bos_ids, check_choice, check_common, encode, split_off
from lmforge.data.packing import IGNORE_INDEX, Example, ExampleDataset, PackedDataset, PadCollator, pack
from lmforge.data.records import Record, fields_of, read_records
from lmforge.data.sources import CorpusError
from lmforge.errors import UserError

log = logging.getLogger(__name__)


class SFTDataModule(ExampleDataModule):
    """Supervised fine-tuning data: prompt/completion or chat records, loss on the answers only.

    Reads ``.jsonl`` / ``.json`` files of ``{"prompt": ..., "completion": ...}`` or ``{"messages": [...]}``
    records, tokenizes each once, masks the prompt (labels -100) so the loss covers the completion and its
    end-of-text token, and serves right-padded batches (or packed rows). The chat templates (lmforge's, the
    tokenizer's own Jinja template or a .jinja file), the truncation policies and the batch format are described
    in :mod:`lmforge.data.sft`. The tokenizer and max_length not given here come from the task
    (:meth:`~lmforge.data.examples.ExampleDataModule.connect`).
    """

    prefix = "sft"

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
            tokenizer: A tokenizer object (Python use); default: the task's (the base model's tokenizer).
        """
        check_common("sft", val_fraction, batch_size, max_length, bad_lines)
        check_choice("sft", "format", format, ("auto", "prompt_completion", "messages"))
        check_choice("sft", "truncation", truncation, ("error", "truncate_prompt", "drop"))
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise UserError(
                f"sft: data.chat_template={chat_template!r} must be lmforge, tokenizer or the path of a .jinja file"
            )
        super().__init__(tokenizer, max_length, batch_size, num_workers, seed)
        self.train_path, self.val_path, self.test_path = train, val, test
        self.val_fraction = val_fraction
        self.format = format
        self.prompt_field = prompt_field
        self.completion_field = completion_field
        self.chat_template = chat_template
        self._template: ChatTemplate | None = None
        self._encoder: ChatEncoder | None = None
        self.truncation = truncation
        self.packing = packing
        self.bad_lines = bad_lines
        self.stats: dict[str, Any] = {}
        self.examples: dict[str, list[Example]] = {}
        self._skipped = 0

    @property
    def num_examples(self) -> int:
        """Training examples after setup (after drops)."""
        return len(self.examples.get("train", []))

    # -- reading -------------------------------------------------------------------------------------------
    def _read(self, path: str, key: str) -> list[tuple[Record, list[Span], bool]]:
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

    def _spans(self, record: Record, fmt: str) -> list[Span]:
        if fmt == "messages":
            messages = check_messages(record)
            return message_spans(record, messages, self._chat_template())
        prompt = _text_field(record, self.prompt_field, "prompt", "prompt_field")
        completion = _text_field(record, self.completion_field, "completion", "completion_field")
        if not completion.strip():
            raise CorpusError(
                f"sft: {record.where}: the completion ({self.completion_field!r}) is empty; "
                "give every record a completion or remove the line"
            )
        return [(prompt, False), (completion, True), (None, True)]  # None: the EOS token

    def _chat_template(self) -> ChatTemplate | None:
        """The Jinja template that data.chat_template names (None: lmforge's own), loaded at the first chat record."""
        if self.chat_template == "lmforge" or self._template is not None:
            return self._template
        self._template = load_template(self.chat_template, self.tokenizer)
        self._encoder = ChatEncoder(self.tokenizer)
        return self._template

    # -- tokenizing ----------------------------------------------------------------------------------------
    def _tokenize(
        self, record: Record, spans: list[Span], templated: bool, tokenizer: Any, max_length: int,
        counts: dict[str, int],
    ) -> Example | None:  # fmt: skip
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

    # -- building the datasets -----------------------------------------------------------------------------
    def _build(self, tokenizer: Any, max_length: int) -> None:
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
        datasets = {}
        for name, examples in self.examples.items():
            if name == "test" and examples is self.examples["val"]:
                datasets[name] = datasets["val"]
            elif self.packing:
                if name == "train":
                    order = np.random.default_rng(self.seed).permutation(len(examples)).tolist()
                else:
                    order = None
                rows = pack([len(ex) for ex in examples], max_length, order)
                datasets[name] = PackedDataset(examples, rows, max_length, pad_id)
            else:
                datasets[name] = ExampleDataset(examples)
        self.datasets = datasets
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


def _text_field(record: Record, field: str, what: str, option: str) -> str:
    """The text in ``field`` of a prompt/completion record, or an error naming the option that sets the field."""
    if field not in record.data:
        raise CorpusError(
            f"sft: {record.where}: no field {field!r} (the record has {fields_of(record.data)}); "
            f"set data.{option} to the field holding the {what}"
        )
    value = record.data[field]
    if not isinstance(value, str):
        raise CorpusError(f"sft: {record.where}: field {field!r} is {type(value).__name__}, not text")
    return value
