"""The pretraining LightningModule: next-token loss, perplexity, optimizer and LR-schedule plugins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

import lmforge
from lmforge import callbacks, plugins
from lmforge.model import GPT, GPTConfig


class LMForgeModule(L.LightningModule):
    """What every lmforge task shares: optimizer and LR-schedule plugins (from ``hparams.optimizer``
    and ``hparams.scheduler``), train/eval modes of schedule-free optimizers, and the data module."""

    def _optimized_module(self) -> torch.nn.Module:
        """The module whose trainable parameters the optimizer plugin groups."""
        return self.model

    def configure_optimizers(self):
        optimizer = plugins.build("optimizer", self.hparams.optimizer, self._optimized_module())
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        scheduler = plugins.build("scheduler", self.hparams.scheduler, optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Optimizers with train()/eval() modes (schedule-free ones) follow the module's mode.
    def _optimizer_mode(self, mode: str) -> None:
        for optimizer in self.trainer.optimizers:
            switch = getattr(optimizer, mode, None)
            if callable(switch):
                switch()

    def on_train_start(self) -> None:
        self._optimizer_mode("train")

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self._optimizer_mode("eval")

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit":
            self._optimizer_mode("train")

    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None


class PretrainModule(LMForgeModule):
    """Trains a :class:`~lmforge.model.GPT` on next-token prediction."""

    def __init__(
        self,
        config: GPTConfig = GPTConfig(),
        optimizer: dict[str, Any] = {"name": "adamw", "lr": 6e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        scheduler: dict[str, Any] = {"name": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.1},
        compile: bool = False,
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
            compile: Compile the model with torch.compile.
            max_new_tokens: For predict: tokens generated after each prompt.
            temperature: For predict: sampling temperature (0 is greedy).
            top_k: For predict: sample among the k most likely tokens only.
        """
        super().__init__()
        if isinstance(config, dict):
            config = GPTConfig(**config)
        self.save_hyperparameters()
        self.config = config
        plugins.validate("optimizer", optimizer)
        plugins.validate("scheduler", scheduler)
        self.model = GPT(config)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def configure_model(self) -> None:
        if self.hparams.compile and not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            self.model = torch.compile(self.model)

    # -- steps -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.model.loss(x, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", loss.detach().exp())
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], metric: MeanMetric) -> None:
        x, y = batch
        metric.update(self.model.loss(x, y), weight=y.numel())

    def _eval_epoch_end(self, stage: str, metric: MeanMetric) -> None:
        loss = metric.compute()
        metric.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{stage}/ppl", loss.exp())
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

        tokenizer = self._tokenizer()
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
    def _tokenizer(self):
        return getattr(self._datamodule(), "tokenizer", None)

    def _corpus_entropy(self) -> float | None:
        fn = getattr(self._datamodule(), "entropy_nats_per_token", None)
        return fn() if fn is not None else None

    def on_fit_start(self) -> None:
        tokenizer = self._tokenizer()
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"model.config.vocab_size={self.config.vocab_size} is smaller than the tokenizer's "
                f"{tokenizer.vocab_size} tokens; raise it (a multiple of 64 at least {tokenizer.vocab_size})"
            )
        n = self.model.num_parameters()
        if self.trainer.is_global_zero:  # before the progress bar exists, so a plain print
            print(f"lmforge: model has {n:,} parameters ({n / 1e6:.1f}M)", flush=True)
        ckpt = self.trainer.checkpoint_callback
        if tokenizer is not None and ckpt is not None and ckpt.dirpath and self.trainer.is_global_zero:
            tokenizer.save(Path(ckpt.dirpath) / "tokenizer")

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        tokenizer = self._tokenizer()
        checkpoint["lmforge"] = {
            "version": lmforge.__version__,
            "model_config": self.config.to_dict(),
            "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
            "run": callbacks.run_facts(self._trainer),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = (checkpoint.get("lmforge") or {}).get("model_config")
        if saved is None:
            return
        before, now = GPTConfig.from_dict(saved).shape(), self.config.shape()
        diffs = [f"{k}={before[k]!r} (config: {now[k]!r})" for k in now if before[k] != now[k]]
        if diffs:
            raise ValueError(
                "checkpoint was trained with a different model shape: "
                + ", ".join(diffs)
                + "; use the model config it was trained with or start without --ckpt_path"
            )
