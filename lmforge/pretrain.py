"""The pretraining LightningModule: next-token loss, perplexity, optimizer and LR-schedule plugins."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lmforge import parallel, plugins
from lmforge.errors import UserError
from lmforge.model import GPT, GPTConfig
from lmforge.task import LMForgeModule
from lmforge.tokenizers import save_tokenizer, tokenizer_to_dict


class PretrainModule(LMForgeModule):
    """Trains a :class:`~lmforge.model.GPT` on next-token prediction."""

    def __init__(
        self,
        config: GPTConfig = GPTConfig(),
        optimizer: dict[str, Any] = {"name": "adamw", "lr": 6e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        scheduler: dict[str, Any] = {"name": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.1},
        compile: bool | dict[str, Any] = False,
        activation_checkpointing: bool | int = False,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 40,
    ) -> None:
        """
        Args:
            config: The model.
            optimizer: An optimizer plugin and its arguments: adamw, adam, sgd, muon, or any installed one.
            scheduler: A learning-rate schedule plugin and its arguments: cosine (warmup_steps, min_lr_ratio,
                decay_steps), constant (warmup_steps), or any installed one.
            compile: Compile the training step with torch.compile: true, or torch.compile's arguments
                ({backend, mode, fullgraph, dynamic, options}), e.g. {mode: max-autotune}.
            activation_checkpointing: Recompute each block's activations in the backward (true), or every
                n-th block's (n), to trade compute for memory.
            max_new_tokens: For predict: tokens generated after each prompt.
            temperature: For predict: sampling temperature (0 is greedy).
            top_k: For predict: sample among the k most likely tokens only.
        """
        super().__init__()
        self.config = GPTConfig(**config) if isinstance(config, dict) else config
        config = self.config.to_dict()  # hyperparameters hold plain values: checkpoints load with weights_only=True
        self.save_hyperparameters()
        plugins.validate("optimizer", optimizer)
        plugins.validate("scheduler", scheduler)
        parallel.compile_settings(compile)  # a bad setting fails now, not after data preparation
        parallel.checkpoint_every(activation_checkpointing)  # a bad setting fails now
        # built on the meta device (no memory); configure_model shards it, materialises it on the run's
        # device and initialises it there (lmforge.parallel). Outside a Trainer call configure_model().
        with torch.device("meta"):
            self.model = GPT(self.config)
        self.tokenizer = None  # the data module's, taken at setup
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # -- steps -------------------------------------------------------------------------------
    def _batch_targets(self, batch: Any) -> Tensor | None:
        return batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None

    def _train_loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, float]:
        x, y = batch
        loss_sum = self.model(x, y, reduction="sum", check_targets=not self._targets_checked)
        return loss_sum, (y != -100).sum(), y.numel()

    def _eval_step(self, batch: tuple[Tensor, Tensor], metric: MeanMetric) -> None:
        x, y = batch
        metric.update(self.model(x, y, check_targets=not self._targets_checked), weight=y.numel())

    def _eval_epoch_end(self, stage: str, metric: MeanMetric) -> None:
        loss = metric.compute()
        metric.reset()
        loss = float(loss)  # the metric already reduced over the ranks: a plain number, nothing to sync again
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", math.exp(min(loss, 80.0)))
        entropy = self._corpus_entropy()
        if entropy is not None:
            self.log(f"{stage}/gap_to_entropy", loss - entropy, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_loss)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_loss)

    @torch.no_grad()
    def predict_step(self, batch: Tensor, batch_idx: int) -> str:
        """Continue a prompt (1, T) with key/value-cache sampling (lmforge.generate); prints and returns the text."""
        from lmforge.generate import generate_ids

        tokenizer = self.tokenizer
        prompt = batch[0].tolist()[-(self.config.block_size - 1) :]
        new = generate_ids(
            self.model,
            [prompt],
            max_new_tokens=min(self.hparams.max_new_tokens, self.config.block_size - len(prompt)),
            temperature=self.hparams.temperature,
            top_k=self.hparams.top_k,
            eos_id=tokenizer.eos_id if tokenizer is not None else None,
            vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
        )[0]
        ids = prompt + new
        text = tokenizer.decode(ids) if tokenizer is not None else str(ids)
        self.print(text)
        return text

    # -- data-aware helpers ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Connect the data module, then take the tokenizer it built from its corpus: pretraining is the one
        task whose tokenizer comes from the data (saved beside checkpoints and in them)."""
        super().setup(stage)
        self.tokenizer = getattr(self._datamodule(), "tokenizer", None)

    def _corpus_entropy(self) -> float | None:
        fn = getattr(self._datamodule(), "entropy_nats_per_token", None)
        return fn() if fn is not None else None

    def on_fit_start(self) -> None:
        tokenizer = self.tokenizer
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise UserError(
                f"model.config.vocab_size={self.config.vocab_size} is smaller than the tokenizer's "
                f"{tokenizer.vocab_size} tokens; raise it (a multiple of 64 at least {tokenizer.vocab_size})"
            )
        n = self.model.num_parameters()
        if self.trainer.is_global_zero:  # before the progress bar exists, so a plain print
            print(f"lmforge: model has {n:,} parameters ({n / 1e6:.1f}M)", flush=True)
        ckpt = self.trainer.checkpoint_callback
        if tokenizer is not None and ckpt is not None and ckpt.dirpath and self.trainer.is_global_zero:
            save_tokenizer(tokenizer, Path(ckpt.dirpath) / "tokenizer")

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        tokenizer = self.tokenizer
        checkpoint["lmforge"] = {
            **self._run_metadata(),
            "model_config": self.config.to_dict(),
            "tokenizer": tokenizer_to_dict(tokenizer) if tokenizer is not None else None,
        }
        self._save_rng(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        diffs = [f"model.config.{k}={now!r} (checkpoint: {old!r})" for k, old, now in self._shape_changes(checkpoint)]
        if diffs:
            raise UserError(
                "--ckpt_path: the config's model shape differs from the checkpoint's: "
                + ", ".join(diffs)
                + "; use the model config it was trained with, or start without --ckpt_path"
            )
        super().on_load_checkpoint(checkpoint)
