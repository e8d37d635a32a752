"""What the fine-tuning data modules (SFT, classification) share: :class:`ExampleDataModule`, their base,
and the helpers that turn records into tokenized examples.

A fine-tuning data module tokenizes its records once, so it needs a tokenizer and a ``max_length`` before it
can build its datasets. The user may set both on the data module; whatever is left unset, the task hands down
through :meth:`ExampleDataModule.connect` (as LitGPT's data modules take theirs): the base's tokenizer and the
model's ``block_size``. The data module never reaches up into the trainer for them. Lightning runs the data
module's ``setup`` before the LightningModule's (which calls ``connect``), so a ``setup`` that comes too early
waits, and ``connect`` completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmforge.data.sampling import ResumableData
from lmforge.data.sources import CorpusError
from lmforge.errors import UserError


class ExampleDataModule(ResumableData, L.LightningDataModule):
    """Base of the fine-tuning data modules: tokenizer and max_length (set, or handed down by :meth:`connect`),
    a setup that waits for them, train/val/test DataLoaders over ``self.datasets`` (seeded, resumable
    shuffling for training, ``self.collate`` for batches) and the checkpointed data order.

    A subclass sets :attr:`prefix`, the paths ``train_path`` / ``val_path`` and ``collate``, and builds
    ``self.datasets`` (``train``, ``val``, ``test``) in :meth:`_build`.
    """

    prefix = "data"
    """The start of this module's messages (``sft``, ``classify``)."""

    def __init__(self, tokenizer: Any, max_length: int | None, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        """The tokenizer in use: the one given, else the one :meth:`connect` handed down (None: neither yet)."""
        self.max_length = max_length
        """Most tokens per example: the one given, else the one :meth:`connect` handed down."""
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}
        self._handed: set[str] = set()  # which of tokenizer / max_length connect() filled in (the user's win)
        self._waiting = False  # setup() came before a tokenizer and max_length: connect() completes it

    # -- what the task hands down ----------------------------------------------------------------------------
    def connect(self, tokenizer: Any = None, batch_size: int | None = None, max_seq_length: int | None = None) -> None:
        """Take what the task hands down, then finish a setup that was waiting for it.

        Args:
            tokenizer: The task's tokenizer (the base's); used when none was set on the data module.
            batch_size: Replaces ``batch_size`` when given.
            max_seq_length: The longest sequence the model reads (its ``block_size``); the ``max_length`` when
                none was set, and the most a set one may be.

        What the user set (``tokenizer=...``, ``max_length=...``, :meth:`set_tokenizer`) is kept. A value handed
        down earlier is replaced by a different one, and the datasets are then built again with it.
        """
        if batch_size is not None:
            self.batch_size = batch_size
        changed = False
        if tokenizer is not None and (self.tokenizer is None or "tokenizer" in self._handed):
            changed |= self._take("tokenizer", tokenizer, handed=True)
        if max_seq_length is not None:
            if self.max_length is None or "max_length" in self._handed:
                changed |= self._take("max_length", max_seq_length, handed=True)
            elif self.max_length > max_seq_length:
                raise UserError(
                    f"{self.prefix}: data.max_length={self.max_length} exceeds the model's "
                    f"block_size={max_seq_length}; lower data.max_length or raise the model's block_size (model_options)"
                )
        if self._waiting or (changed and self.datasets):
            self.datasets = {}
            self.setup()

    def set_tokenizer(self, tokenizer: Any, max_length: int | None = None) -> None:
        """Use ``tokenizer`` (and ``max_length``, when given) as if set on the data module, e.g. without a
        trainer; the next setup() re-tokenizes."""
        self._take("tokenizer", tokenizer, handed=False)
        if max_length is not None:
            self._take("max_length", max_length, handed=False)
        self.datasets = {}

    def _take(self, name: str, value: Any, handed: bool) -> bool:
        """Set ``tokenizer`` or ``max_length``, noting whether connect() handed it; whether it changed."""
        if name == "max_length" and value < 2:
            raise CorpusError(f"{self.prefix}: max_length={value} must be at least 2")
        if handed:
            self._handed.add(name)
        else:
            self._handed.discard(name)
        old = getattr(self, name)
        setattr(self, name, value)
        return old != value if name == "max_length" else old is not value

    def _unconnected(self) -> CorpusError:
        """The one-line error for datasets asked for before a tokenizer and max_length are known."""
        if self.tokenizer is None:
            return CorpusError(
                f"{self.prefix}: no tokenizer; pass tokenizer=..., call connect(tokenizer, max_seq_length=...), "
                "or train it with an lmforge task whose base has one"
            )
        return CorpusError(
            f"{self.prefix}: no max_length; set data.max_length (max_length=...), call connect(tokenizer, "
            "max_seq_length=...), or train it with an lmforge task (the model's block_size is the default)"
        )

    # -- LightningDataModule -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize every split once (whatever the stage); without a tokenizer or max_length yet,
        wait for :meth:`connect`."""
        if self.datasets:
            return
        if self.tokenizer is None or self.max_length is None:
            self._waiting = True
            return
        self._waiting = False
        self._build(self.tokenizer, int(self.max_length))

    def _build(self, tokenizer: Any, max_length: int) -> None:
        """Read the files and fill ``self.datasets`` and ``self.collate``."""
        raise NotImplementedError

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
            if not self.datasets:
                raise self._unconnected()
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

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def describe_data(self) -> dict:
        """What the run trains on, for the checkpoint and the model card (file names, not local paths)."""
        files = {k: Path(v).name for k, v in (("train", self.train_path), ("val", self.val_path)) if v}
        return {"files": files}

    def state_dict(self) -> dict:
        return {"data_order": self._data_order()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restore_data_order(state_dict)


# -- records to examples --------------------------------------------------------------------------------------


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


def bos_ids(tokenizer: Any) -> list[int]:
    """``[bos_id]`` when the tokenizer has a beginning-of-sequence token, else ``[]``."""
    bos = getattr(tokenizer, "bos_id", None)
    return [] if bos is None else [int(bos)]


def encode(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text`` as Python ints (tokenizers may return numpy or tensor ids)."""
    return [int(i) for i in tokenizer.encode(text)]


def check_choice(prefix: str, name: str, value: Any, choices: Sequence[str]) -> None:
    """Refuse a ``data.<name>`` that is not one of ``choices``, naming them."""
    if value not in choices:
        raise UserError(f"{prefix}: data.{name}={value!r} must be one of {', '.join(choices)}")


def check_common(prefix: str, val_fraction: float, batch_size: int, max_length: int | None, bad_lines: str) -> None:
    """Check the options every fine-tuning data module has, when it is built (before any file is read)."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"{prefix}: data.val_fraction={val_fraction} must be between 0 and 1")
    if batch_size < 1:
        raise UserError(f"{prefix}: data.batch_size={batch_size} must be positive")
    if max_length is not None and max_length < 2:
        raise UserError(f"{prefix}: data.max_length={max_length} must be at least 2")
    check_choice(prefix, "bad_lines", bad_lines, ("error", "skip"))
