"""Tokenized SFT examples into batches: padded one example per row, or packed several per row.

A batch is ``{"input_ids", "labels", "attention_mask"}`` of shape (B, T), right-padded with the pad id (the EOS)
to the longest example of the batch: labels :data:`IGNORE_INDEX` on padding, attention_mask True on real tokens.
Packed, whole examples share rows of exactly ``length`` tokens (best fit, :func:`pack`; none is split), and the
batch also has ``segment_ids`` (1, 2, ... per example in a row, 0 on padding) and ``position_ids`` (restarting at
0 for each example), so attention stays within an example and the loss is that of the padded batches.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100
"""The label of positions that carry no loss (``torch.nn.functional.cross_entropy``'s default ignore_index)."""


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
