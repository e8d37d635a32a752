"""The masked-LM pretraining LightningModule: an :class:`~lmforge.encoder.Encoder` trained as BERT is, on the
masked tokens (and, optionally, next-sentence prediction), with masked-token accuracy and perplexity."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lmforge.encoder import Encoder, EncoderConfig
from lmforge.errors import UserError
from lmforge.task import _CorpusTaskModule

Batch = dict[str, Tensor]


class MaskedLMModule(_CorpusTaskModule):
    """Trains an :class:`~lmforge.encoder.Encoder` on masked-LM batches (:class:`lmforge.data.mlm.MLMDataModule`).

    The loss is the cross-entropy over the selected (masked) positions only; every selected token of an
    optimizer step weighs the same, over micro-batches and ranks (:class:`lmforge.task.LMForgeModule`). With
    next-sentence labels in the batch (``data.nsp: true``, ``model.config.nsp: true``) each micro-batch adds its
    mean NSP loss, weighted so that one micro-batch per step gives BERT's objective exactly: the mean masked-LM
    loss plus the mean NSP loss (with accumulation or several ranks, each micro-batch's NSP mean weighs by its
    share of the step's masked tokens).
    """

    _model_noun = "encoder"
    _task = "masked_lm"

    def __init__(
        self,
        config: EncoderConfig = EncoderConfig(),
        optimizer: dict[str, Any] = {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01, "betas": [0.9, 0.999]},
        scheduler: dict[str, Any] = {"name": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.0},
        compile: bool | dict[str, Any] = False,
        activation_checkpointing: bool | int = False,
    ) -> None:
        """
        Args:
            config: The encoder.
            optimizer: An optimizer plugin and its arguments: adamw, adam, sgd, muon, or any installed one.
            scheduler: A learning-rate schedule plugin and its arguments: cosine (warmup_steps, min_lr_ratio,
                decay_steps), constant (warmup_steps), or any installed one.
            compile: Compile the model's forward with torch.compile: true, or torch.compile's arguments.
            activation_checkpointing: Recompute each block's activations in the backward (true), or every n-th's.
        """
        super().__init__()
        self._build_model(EncoderConfig, Encoder, config, optimizer, scheduler, compile, activation_checkpointing)
        config = self.config.to_dict()  # hyperparameters hold plain values: checkpoints load with weights_only=True
        self.save_hyperparameters()
        self.eval_metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({k: MeanMetric() for k in ("loss", "acc", "nsp_loss", "nsp_acc")})
             for stage in ("val", "test")}
        )  # fmt: skip
        self._step_sums: Tensor | None = None  # (mlm loss, mlm correct, nsp loss, nsp correct, pairs) of the step

    # -- steps -------------------------------------------------------------------------------
    def _batch_targets(self, batch: Any) -> Tensor | None:
        return batch.get("labels") if isinstance(batch, dict) else None

    def _forward(self, batch: Batch, reduction: str):
        if "next_sentence_label" in batch and not self.config.nsp:
            raise UserError("data.nsp=true gives next-sentence labels but model.config.nsp=false has no head for them")
        return self.model(
            batch["input_ids"],
            batch.get("token_type_ids") if self.config.type_vocab_size else None,
            batch.get("attention_mask"),
            labels=batch["labels"],
            next_sentence_label=batch.get("next_sentence_label"),
            reduction=reduction,
            check_targets=not self._targets_checked,
        )

    def _train_loss(self, batch: Batch) -> tuple[Tensor, Tensor, float]:
        out = self._forward(batch, "sum")
        count = out.mlm_targets.float()
        loss_sum = out.mlm
        zero = out.mlm.detach().new_zeros(())
        nsp_sum, nsp_correct, pairs = zero, zero, zero
        if out.nsp is not None:
            pairs = out.nsp.new_tensor(float(batch["next_sentence_label"].numel()))
            loss_sum = loss_sum + out.nsp * (count.clamp(min=1.0) / pairs)  # the micro-batch's NSP mean, per token
            nsp_sum, nsp_correct = out.nsp.detach(), out.nsp_correct.float()
        sums = torch.stack([out.mlm.detach().float(), out.mlm_correct.float(), nsp_sum.float(), nsp_correct, pairs])
        self._step_sums = sums if self._step_sums is None else self._step_sums + sums
        return loss_sum, out.mlm_targets, float(batch["labels"].numel())

    def _extra_step_stats(self) -> list[Tensor]:
        sums, self._step_sums = self._step_sums, None
        return [] if sums is None else list(sums)

    def _log_extra_step_stats(self, sums: Tensor, targets: Tensor) -> None:
        if not len(sums):
            return
        targets = float(targets)
        self.log("train/mlm_acc", float(sums[1]) / targets)
        if float(sums[4]) > 0:
            mlm = float(sums[0]) / targets
            self.log("train/mlm_loss", mlm)
            self.log("train/mlm_ppl", math.exp(min(mlm, 80.0)))
            self.log("train/nsp_loss", float(sums[2]) / float(sums[4]))
            self.log("train/nsp_acc", float(sums[3]) / float(sums[4]))

    def _eval_step(self, batch: Batch, stage: str) -> None:
        out = self._forward(batch, "mean")
        metrics = self.eval_metrics[stage]
        count = out.mlm_targets.float()
        metrics["loss"].update(out.mlm, weight=count)
        metrics["acc"].update(out.mlm_correct.float() / count.clamp(min=1.0), weight=count)
        if out.nsp is not None:
            pairs = float(batch["next_sentence_label"].numel())
            metrics["nsp_loss"].update(out.nsp, weight=pairs)
            metrics["nsp_acc"].update(out.nsp_correct.float() / pairs, weight=pairs)

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        values = {}
        for name, metric in metrics.items():
            if metric.update_called:
                values[name] = float(metric.compute())  # reduced over the ranks already: plain numbers
            metric.reset()
        if "loss" not in values:
            return
        self.log(f"{stage}/loss", values["loss"], prog_bar=True)
        self.log(f"{stage}/ppl", math.exp(min(values["loss"], 80.0)))
        self.log(f"{stage}/mlm_acc", values["acc"], prog_bar=stage == "val")
        if "nsp_loss" in values:
            self.log(f"{stage}/nsp_loss", values["nsp_loss"])
            self.log(f"{stage}/nsp_acc", values["nsp_acc"])
