"""What every lmforge task shares: :class:`LMForgeModule` (the training step, exact loss accounting,
optimizer and LR-schedule plugins, schedule-free train/eval modes, resuming with the config's settings,
target checks on the host) and the random-state capture that makes resumed runs repeat."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

import lmforge
from lmforge import callbacks, parallel, plugins
from lmforge.errors import UserError
from lmforge.tokenizers import save_tokenizer, tokenizer_to_dict

# LMForgeModule checks each batch's targets in on_before_batch_transfer. A data module that defines that
# hook itself wins (Lightning calls one of the two) and the loss then checks the targets instead; Lightning
# warns about the module's hook whenever any data module is passed, which is expected here.
warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in"
)


class LMForgeModule(L.LightningModule):
    """What every lmforge task shares: optimizer and LR-schedule plugins (from ``hparams.optimizer``
    and ``hparams.scheduler``), train/eval modes of schedule-free optimizers, the data module, and
    resuming with the config's settings.

    On ``--ckpt_path`` the config is what the run uses, never silently the checkpoint's: a model shape that
    differs is an error naming the key (subclasses check it); a different optimizer is refused (its state
    cannot be restored into another); changed optimizer arguments (lr, betas, weight decay, ...) and
    schedule arguments are applied from the resumed step, and the run prints each difference.
    """

    @staticmethod
    def _check_settings(
        optimizer: dict, scheduler: dict, compile: bool | dict, activation_checkpointing: bool | int
    ) -> None:
        """Check the optimizer and schedule plugins' arguments, the compile and activation-checkpointing
        settings, so that a bad one fails on construction, not after data preparation."""
        plugins.validate("optimizer", optimizer)
        plugins.validate("scheduler", scheduler)
        parallel.compile_settings(compile)
        parallel.checkpoint_every(activation_checkpointing)

    def _optimized_module(self) -> torch.nn.Module:
        """The module whose trainable parameters the optimizer plugin groups."""
        return self.model

    # -- placement ---------------------------------------------------------------------------------
    def cpu(self):
        """As ``nn.Module.cpu``; a model not yet materialised (a run that failed before ``configure_model``,
        whose teardown moves the module to the CPU) stays on the meta device instead of failing."""
        if not parallel.is_meta(self):
            return super().cpu()
        return self._apply(lambda t: t if t.is_meta else t.cpu())

    def configure_model(self) -> None:
        """Activation checkpointing, FSDP2 sharding (``trainer.strategy: fsdp2``), materialising a
        meta-device model on the run's device, compilation: see :mod:`lmforge.parallel`."""
        parallel.prepare(
            self,
            self.model,
            compile=self.hparams.get("compile"),
            activation_checkpointing=self.hparams.get("activation_checkpointing", False),
        )

    # -- the targets of a batch, checked on the host -------------------------------------------------
    _targets_checked = False  # the last batch's targets were checked by on_before_batch_transfer

    def _batch_targets(self, batch: Any) -> Tensor | None:
        """The next-token targets of a batch (None: the task has none, e.g. class labels)."""
        return None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Check the batch's targets against the vocabulary while they are still on the host, so the
        loss on the GPU need not read them back (a device sync per step); see GPT.forward."""
        targets = self._batch_targets(batch)
        self._targets_checked = targets is not None and targets.device.type == "cpu"
        if self._targets_checked:
            from lmforge.kernels.utils import check_target_range

            try:
                check_target_range(targets, self.model.config.vocab_size, -100)
            except ValueError as err:
                raise UserError(f"a batch of the data: {err}; the tokenizer and the model disagree on the "
                                "vocabulary (check model.vocab_size against the tokenizer)") from None  # fmt: skip
        return batch

    # -- the loss of an optimizer step ---------------------------------------------------------------
    def _train_loss(self, batch: Any) -> tuple[Tensor, Tensor, float]:
        """(sum of the micro-batch's per-target losses, number of targets, a fixed normaliser from its
        shape) — subclasses define what a target is (a token, an example)."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Exact loss over the optimizer step: each target weighs the same, whatever micro-batch or rank it is in.

        The backward runs on ``loss_sum / unit`` (``unit`` a constant of the run, so micro-batches add up);
        before the optimizer step :meth:`on_before_optimizer_step` rescales the summed gradients by
        ``ranks * accumulate_grad_batches * unit / targets_in_the_step`` (undoing Lightning's division by
        the accumulation count and DDP/FSDP's mean over ranks), so the update is that of the mean over
        every target of the step, as one big batch would give. No host synchronisation here.
        """
        loss_sum, count, unit = self._train_loss(batch)
        if self._loss_unit is None:
            self._loss_unit = float(max(unit, 1))
        count = count.to(torch.float32)
        detached = loss_sum.detach().float()
        self._acc_sum = detached if self._acc_sum is None else self._acc_sum + detached
        self._acc_count = count if self._acc_count is None else self._acc_count + count
        if self._one_micro_batch_per_step():  # the step is this batch: its own mean is exact, no rescale pass
            return loss_sum / count.clamp(min=1.0)
        return loss_sum / self._loss_unit

    def _one_micro_batch_per_step(self) -> bool:
        return self.trainer.accumulate_grad_batches == 1 and self._data_parallel_size() == 1

    _loss_unit: float | None = None
    _acc_sum: Tensor | None = None
    _acc_count: Tensor | None = None

    def _data_parallel_size(self) -> int:
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("num_replicas", 1))

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._acc_count is None:
            return
        stats = torch.stack([self._acc_sum, self._acc_count, *self._extra_step_stats()])
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        total = stats[1].clamp(min=1.0)
        scale = (self._data_parallel_size() * self.trainer.accumulate_grad_batches * self._loss_unit) / total
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not self._one_micro_batch_per_step():
            try:
                torch._foreach_mul_(grads, scale)
            except (RuntimeError, NotImplementedError, TypeError):  # e.g. sharded (DTensor) gradients
                for g in grads:
                    g.mul_(scale)
        self._acc_sum = self._acc_count = None
        if self._should_log():  # one host synchronisation per logging interval, not per step
            loss = float(stats[0] / total)
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/ppl", math.exp(min(loss, 80.0)))
            self.log("train/lr", float(optimizer.param_groups[0]["lr"]))
            self.log("train/targets", float(stats[1]))
            self._log_extra_step_stats(stats[2:], total)

    def _extra_step_stats(self) -> list[Tensor]:
        """A task's own per-step sums (float scalars), reduced over the ranks with the loss's; then reset."""
        return []

    def _log_extra_step_stats(self, sums: Tensor, targets: Tensor) -> None:
        """Log what :meth:`_extra_step_stats` summed, on logging steps; ``targets`` is the step's target count."""

    def _should_log(self) -> bool:
        trainer = self.trainer
        if trainer.logger is None and not trainer.progress_bar_callback:
            return False
        n = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
        return n % max(1, trainer.log_every_n_steps) == 0 or trainer.should_stop or n == 1

    # -- random state ------------------------------------------------------------------------------
    def _save_rng(self, checkpoint: dict) -> None:
        """Every rank's random states go into the checkpoint (rank 0 writes it)."""
        states = rng_states()
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            states_by_rank = gathered
        else:
            states_by_rank = [states]
        checkpoint.setdefault("lmforge", {})["rng"] = states_by_rank
        checkpoint["lmforge"]["loss_unit"] = self._loss_unit

    def _load_rng(self, checkpoint: dict) -> None:
        meta = checkpoint.get("lmforge") or {}
        by_rank = meta.get("rng")
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if isinstance(by_rank, list) and len(by_rank) > rank:
            self._pending_rng = by_rank[rank]
        if meta.get("loss_unit"):
            self._loss_unit = float(meta["loss_unit"])

    _pending_rng: dict | None = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # the resumed run's random states, set right before its first step: nothing Lightning does on
        # start-up (loaders, workers, sanity checks) draws on them in between
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None

    def configure_optimizers(self):
        optimizer = plugins.build("optimizer", self.hparams.optimizer, self._optimized_module())
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        scheduler = plugins.build("scheduler", self.hparams.scheduler, optimizer, total)
        self._schedule_steps = total
        # what the config asks of each group, kept to re-apply after a checkpoint's optimizer state replaces it
        self._configured_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Optimizers with train()/eval() modes (schedule-free ones) follow the module's mode.
    def _optimizer_mode(self, mode: str) -> None:
        for optimizer in self.trainer.optimizers:
            switch = getattr(optimizer, mode, None)
            if callable(switch):
                switch()

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path and getattr(self, "_configured_groups", None):
            self._apply_configured_settings()
        self._optimizer_mode("train")

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self._optimizer_mode("eval")

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit":
            self._optimizer_mode("train")

    def setup(self, stage: str) -> None:
        """Hand the data module what the task decides (LitGPT's ``connect``): the task's tokenizer, when it
        has one (a fine-tune's base), and the longest sequence the model reads. The data module never
        reaches up into the trainer or this module; what the user set in the data config wins."""
        datamodule = self._datamodule()
        connect = getattr(datamodule, "connect", None)
        if callable(connect):
            connect(tokenizer=getattr(self, "tokenizer", None), max_seq_length=self.model.config.block_size)

    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    # -- resuming ----------------------------------------------------------------------------------
    def _model_config_dict(self) -> dict:
        return self.config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Compare the config with the checkpoint's: refuse what cannot apply, note what will."""
        saved = checkpoint.get("hyper_parameters") or {}
        meta = checkpoint.get("lmforge") or {}
        notes: list[str] = []
        for key in ("optimizer", "scheduler"):
            old, new = saved.get(key), self.hparams.get(key)
            if not isinstance(old, dict) or not isinstance(new, dict) or old == new:
                continue
            if key == "optimizer" and old.get("name") != new.get("name"):
                raise UserError(
                    f"--ckpt_path: the checkpoint was trained with optimizer {old.get('name')!r}, whose state cannot "
                    f"be restored into {new.get('name')!r}; resume with model.optimizer.name: {old.get('name')} "
                    "or start without --ckpt_path"
                )
            for arg in dict.fromkeys([*old, *new]):
                if old.get(arg) != new.get(arg):
                    notes.append(f"model.{key}.{arg}={new.get(arg)!r} (checkpoint: {old.get(arg)!r})")
        config = meta.get("model_config")
        if isinstance(config, dict):
            now = self._model_config_dict()
            shape = set(self.config.shape())
            notes += [
                f"model.config.{k}={now[k]!r} (checkpoint: {config[k]!r})"
                for k in now
                if k not in shape and k in config and config[k] != now[k]
            ]
        steps = meta.get("schedule_steps")
        if steps is not None and self._trainer is not None and self.trainer.max_steps not in (None, -1, steps):
            keeps = (self.hparams.get("scheduler") or {}).get("decay_steps") is not None
            notes.append(
                f"trainer.max_steps={self.trainer.max_steps} (checkpoint's run: {steps}): "
                + (
                    "the schedule's decay_steps fix it, so it does not change"
                    if keeps
                    else f"the schedule now spans {self.trainer.max_steps} steps (to keep the checkpoint's schedule "
                    f"and extend the run at its final rate, set model.scheduler.decay_steps: {steps})"
                )
            )
        self._resume_notes = notes
        self._load_rng(checkpoint)

    def _shape_changes(self, checkpoint: dict, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
        """(key, checkpoint's value, this module's value) for each weight-shaping config field that differs."""
        saved = (checkpoint.get("lmforge") or {}).get("model_config")
        if saved is None:
            return []
        before, now = type(self.config).from_dict(saved).shape(), self.config.shape()
        return [(k, before[k], now[k]) for k in now if k not in ignore and before[k] != now[k]]

    def _refuse_shape_changes(
        self, checkpoint: dict, describe: Callable[[str, Any, Any], str], message: str, ignore: tuple[str, ...] = ()
    ) -> None:
        """Raise ``message`` (its ``{}`` the ``describe(key, checkpoint's value, this module's value)`` of each
        weight-shaping field that differs, comma-separated) when :meth:`_shape_changes` finds any."""
        diffs = [describe(key, old, now) for key, old, now in self._shape_changes(checkpoint, ignore)]
        if diffs:
            raise UserError(message.format(", ".join(diffs)))

    def _apply_configured_settings(self) -> None:
        """After Lightning restored the optimizer and scheduler state: put back what the config changed."""
        optimizer = self.trainer.optimizers[0]
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        if len(optimizer.param_groups) != len(self._configured_groups):
            return
        for i, (group, wanted) in enumerate(zip(optimizer.param_groups, self._configured_groups)):
            for key, value in wanted.items():
                if key not in ("lr", "initial_lr") and key in group and not _same(group[key], value):
                    group[key] = value
            if (
                "initial_lr" in wanted
                and "initial_lr" in group
                and not _same(group["initial_lr"], wanted["initial_lr"])
            ):
                scale = group["lr"] / group["initial_lr"] if group["initial_lr"] else 1.0  # where the schedule is
                group["initial_lr"] = wanted["initial_lr"]
                group["lr"] = wanted["initial_lr"] * scale
                for scheduler in schedulers:
                    if hasattr(scheduler, "base_lrs") and i < len(scheduler.base_lrs):
                        scheduler.base_lrs[i] = wanted["initial_lr"]
        before = optimizer.param_groups[0]["lr"]
        for scheduler in schedulers:  # a LambdaLR now follows the configured schedule at the resumed step
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * fn(scheduler.last_epoch)
                scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        notes = list(getattr(self, "_resume_notes", []))
        after = optimizer.param_groups[0]["lr"]
        if notes and not math.isclose(before, after, rel_tol=1e-9, abs_tol=0.0):
            notes.append(
                f"the learning rate at this step goes from {before:.4g} (checkpoint's schedule) to {after:.4g}"
            )
        if notes and self.trainer.is_global_zero:
            print(
                f"lmforge: resuming at step {self.trainer.global_step} with the config's settings where they differ "
                f"from the checkpoint's, applied from this step: {'; '.join(notes)}",
                flush=True,
            )

    def _run_metadata(self) -> dict:
        """What every lmforge checkpoint records about its run (beside the task's own entries)."""
        return {
            "version": lmforge.__version__,
            "run": callbacks.run_facts(self._trainer),
            "schedule_steps": getattr(self, "_schedule_steps", None),
            "data": _data_facts(self._datamodule()),
        }


class _CorpusTaskModule(LMForgeModule):
    """A task trained from scratch on a corpus (pretraining, masked-LM pretraining): its tokenizer is the one its
    data module built from the corpus, checked against the model's vocabulary, saved beside the checkpoints and
    in them; resuming refuses a model shape other than the checkpoint's.

    Private (a leading underscore), so the command line's list of model classes leaves it out.
    """

    _model_noun = "model"
    """What the parameter count at the start of a fit names ("model", "encoder")."""
    _task: str | None = None
    """The checkpoint's ``lmforge.task`` entry (None: the entry is left out, as pretraining's checkpoints have it)."""

    def _build_model(
        self,
        config_class: type,
        model_class: type[torch.nn.Module],
        config: Any,
        optimizer: dict,
        scheduler: dict,
        compile: bool | dict,
        activation_checkpointing: bool | int,
    ) -> None:
        """What ``__init__`` does before saving the hyperparameters: ``self.config`` (from a dict or a config),
        the settings checked (:meth:`_check_settings`), ``self.model`` built on the meta device (no memory;
        configure_model shards it, materialises it on the run's device and initialises it there, see
        :mod:`lmforge.parallel`; outside a Trainer call configure_model()), and no tokenizer yet (the data
        module's, taken at setup)."""
        self.config = config_class(**config) if isinstance(config, dict) else config
        self._check_settings(optimizer, scheduler, compile, activation_checkpointing)  # a bad one fails now
        with torch.device("meta"):
            self.model = model_class(self.config)
        self.tokenizer = None

    # -- evaluation: the task's _eval_step and _eval_epoch_end, for "val" and "test" --------------------
    def _eval_step(self, batch: Any, stage: str) -> None:
        """Add the batch's losses (and metrics) to the ``stage``'s running ones."""
        raise NotImplementedError

    def _eval_epoch_end(self, stage: str) -> None:
        """Log the ``stage``'s losses (and metrics) and reset them."""
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # -- the tokenizer, from the data ------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Connect the data module, then take the tokenizer it built from its corpus (saved with checkpoints)."""
        super().setup(stage)
        self.tokenizer = getattr(self._datamodule(), "tokenizer", None)

    def on_fit_start(self) -> None:
        tokenizer = self.tokenizer
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise UserError(
                f"model.config.vocab_size={self.config.vocab_size} is smaller than the tokenizer's "
                f"{tokenizer.vocab_size} tokens; raise it (a multiple of 64 at least {tokenizer.vocab_size})"
            )
        n = self.model.num_parameters()
        if self.trainer.is_global_zero:  # before the progress bar exists, so a plain print
            print(f"lmforge: {self._model_noun} has {n:,} parameters ({n / 1e6:.1f}M)", flush=True)
        ckpt = self.trainer.checkpoint_callback
        if tokenizer is not None and ckpt is not None and ckpt.dirpath and self.trainer.is_global_zero:
            save_tokenizer(tokenizer, Path(ckpt.dirpath) / "tokenizer")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        tokenizer = self.tokenizer
        checkpoint["lmforge"] = {
            **self._run_metadata(),
            **({"task": self._task} if self._task is not None else {}),
            "model_config": self.config.to_dict(),
            "tokenizer": tokenizer_to_dict(tokenizer) if tokenizer is not None else None,
        }
        self._save_rng(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._refuse_shape_changes(
            checkpoint,
            lambda key, old, now: f"model.config.{key}={now!r} (checkpoint: {old!r})",
            "--ckpt_path: the config's model shape differs from the checkpoint's: {}; "
            "use the model config it was trained with, or start without --ckpt_path",
        )
        super().on_load_checkpoint(checkpoint)


def rng_states() -> dict:
    """torch's (CPU and CUDA), numpy's and Python's random states, as weights-only-loadable values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_version, list(py_internal), py_gauss],
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        n = states["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _data_facts(datamodule) -> dict:
    """What the run trained on, for model cards: the data module's own description, when it gives one."""
    describe = getattr(datamodule, "describe_data", None)
    return describe() if callable(describe) else {}
