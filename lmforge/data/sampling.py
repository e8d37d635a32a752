"""Training data order that a checkpoint can restore exactly.

A :class:`ResumableSampler` shuffles with its own generator, seeded by ``seed + epoch`` (never
torch's global random state, which ``seed_everything`` resets on resume), splits the order over the
data-parallel ranks as ``DistributedSampler`` does, and can start an epoch part-way through.
:class:`ResumableData` is the data-module side: its ``state_dict`` records the epoch, the seed and
how many batches of the epoch the run has consumed, so ``--ckpt_path`` continues with the next batch
of the same order instead of replaying the epoch from its first one.

The position comes from the trainer's own progress (batches whose training step finished), not from
the loader, which its worker processes and Lightning's one-batch prefetch run ahead of.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def default_seed() -> int:
    """The run's ``seed_everything`` value (Lightning puts it in PL_GLOBAL_SEED), else 0."""
    try:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))
    except ValueError:
        return 0


class ResumableSampler(DistributedSampler):
    """Per-epoch seeded shuffling over ``num_replicas`` ranks, able to skip an epoch's first batches.

    A ``DistributedSampler`` subclass, so Lightning leaves it in place under DDP/FSDP (it would wrap
    any other sampler) and calls :meth:`set_epoch` at each epoch start.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip: tuple[int, int] | None = None  # (epoch, samples of this rank to skip) for one resumed epoch

    def resume_at(self, epoch: int, samples: int) -> None:
        """Start epoch ``epoch`` after its first ``samples`` samples on this rank (once)."""
        self._skip = (epoch, samples) if samples > 0 else None

    def order(self) -> list[int]:
        """This rank's indices for the current epoch, in order."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=generator).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[: self.total_size]
        elif self.total_size > n:  # pad by repeating the start so every rank gets as many samples
            indices += (indices * math.ceil((self.total_size - n) / max(n, 1)))[: self.total_size - n]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self.order()
        if self._skip is not None:
            epoch, samples = self._skip
            self._skip = None
            if epoch == self.epoch:
                indices = indices[samples:]
        return iter(indices)


class ResumableData:
    """Mixin for data modules: a resumable training loader and the checkpoint state that restores it.

    The module sets ``self.seed`` (or leaves it None for the run's seed) and builds its training
    loader with :meth:`_train_loader`.
    """

    seed: int | None = None
    _resume: dict | None = None

    def _train_seed(self) -> int:
        return default_seed() if self.seed is None else int(self.seed)

    def _dp_world(self) -> tuple[int, int]:
        """(data-parallel ranks, this rank) from the trainer's strategy, (1, 0) without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))

    def _train_loader(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        drop_last: bool,
        num_workers: int,
        collate_fn: Callable | None = None,
    ) -> DataLoader:
        replicas, rank = self._dp_world()
        sampler = ResumableSampler(
            dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=self._train_seed(), drop_last=drop_last
        )
        if self._resume:
            sampler.set_epoch(self._resume["epoch"])
            sampler.resume_at(self._resume["epoch"], self._resume["samples"])
            self._resume = None
        self._train_batch_size = batch_size
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=collate_fn,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if num_workers > 0 else None,
            # workers' seeds from their own generator, not torch's global state (restored on resume)
            generator=torch.Generator().manual_seed(self._train_seed()),
        )

    def _data_order(self) -> dict[str, Any]:
        """Where the training data stands: the epoch, the seed and the batches of it consumed."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or getattr(trainer, "fit_loop", None) is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {
            "epoch": int(trainer.current_epoch),
            "seed": self._train_seed(),
            "batches": int(progress.processed),
            "batch_size": getattr(self, "_train_batch_size", None),
            "ranks": self._dp_world()[0],
        }

    def _restore_data_order(self, state: dict) -> None:
        order = state.get("data_order") if isinstance(state, dict) else None
        if not isinstance(order, dict) or "epoch" not in order:
            return
        from lmforge.errors import UserError

        if not isinstance(order.get("batches"), int) or order["batches"] < 0:
            raise UserError("--ckpt_path: the checkpoint's data order is damaged (no valid position); start without it")
        changed = []
        if order.get("seed") != self._train_seed():
            changed.append(f"data seed {self._train_seed()} (checkpoint: {order.get('seed')})")
        if order.get("ranks") not in (None, self._dp_world()[0]):
            changed.append(f"{self._dp_world()[0]} data-parallel ranks (checkpoint: {order.get('ranks')})")
        if changed:  # another order: the epoch's consumed samples cannot be told apart; say so
            print(
                "lmforge: --ckpt_path: the data order cannot continue where it stopped (" + ", ".join(changed)
                + "); the rest of this epoch is drawn from the new order",
                flush=True,
            )
            return
        batch_size = order.get("batch_size") or getattr(self, "batch_size", 1)
        self._resume = {"epoch": int(order["epoch"]), "samples": int(order["batches"]) * int(batch_size)}
