"""The pretraining LightningModule: next-token loss, perplexity, optimizer and LR-schedule plugins."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lmforge.model import GPT, GPTConfig
from lmforge.task import _CorpusTaskModule


class PretrainModule(_CorpusTaskModule):
    """Trains a :class:`~lmforge.model.GPT` on next-token prediction; the tokenizer comes from the data
    module, built from its corpus (:class:`lmforge.task._CorpusTaskModule`: checked, saved with checkpoints)."""

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
        self._build_model(GPTConfig, GPT, config, optimizer, scheduler, compile, activation_checkpointing)
        config = self.config.to_dict()  # hyperparameters hold plain values: checkpoints load with weights_only=True
        self.save_hyperparameters()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # -- steps -------------------------------------------------------------------------------
    def _batch_targets(self, batch: Any) -> Tensor | None:
        return batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None

    def _train_loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, float]:
        x, y = batch
        loss_sum = self.model(x, y, reduction="sum", check_targets=not self._targets_checked)
        return loss_sum, (y != -100).sum(), y.numel()

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        metric: MeanMetric = getattr(self, f"{stage}_loss")
        metric.update(self.model(x, y, check_targets=not self._targets_checked), weight=y.numel())

    def _eval_epoch_end(self, stage: str) -> None:
        metric: MeanMetric = getattr(self, f"{stage}_loss")
        loss = metric.compute()
        metric.reset()
        loss = float(loss)  # the metric already reduced over the ranks: a plain number, nothing to sync again
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", math.exp(min(loss, 80.0)))
        entropy = self._corpus_entropy()
        if entropy is not None:
            self.log(f"{stage}/gap_to_entropy", loss - entropy, prog_bar=stage == "val")

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
    def _corpus_entropy(self) -> float | None:
        fn = getattr(self._datamodule(), "entropy_nats_per_token", None)
        return fn() if fn is not None else None
