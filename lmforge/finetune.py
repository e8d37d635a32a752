"""Fine-tuning: start from an lmforge checkpoint or a Hugging Face model, train all weights or LoRA adapters.

Two tasks, each a LightningModule that ``lmforge fit`` runs with its data module:

- :class:`SFTModule` (with :class:`lmforge.data.sft.SFTDataModule`): supervised fine-tuning on
  prompt/completion or chat data; the loss covers the completion tokens only.
- :class:`ClassifierModule` (with :class:`lmforge.data.classify.ClassificationDataModule`): a
  sequence-classification head, as transformers' ``*ForSequenceClassification`` does: on a decoder a linear
  ``score`` on the last real token; on an encoder (BERT, DistilBERT) ``classifier`` on the pooled [CLS]
  output, or ``pre_classifier`` + ReLU + ``classifier`` on the [CLS] hidden state where there is no pooler;
  accuracy, macro F1, the confusion matrix and a per-class report.

``base`` names where the weights come from: a ``.ckpt`` written by ``lmforge fit``, a folder written
by ``lmforge export`` (lmforge's safetensors format), or a Hugging Face model (a local folder, or a
Hub id fetched with huggingface_hub, from the local cache when offline). The tokenizer comes with it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from lmforge import parallel, plugins
from lmforge.atomic import write_json
from lmforge.checkpoint import load_base
from lmforge.encoder import EncoderConfig
from lmforge.errors import UserError
from lmforge.families import ModelConfig, build_model, config_from_dict
from lmforge.task import LMForgeModule
from lmforge.tokenizers import tokenizer_to_dict

log = logging.getLogger("lmforge")

# Fine-tuning defaults: a small learning rate, no weight decay, a short warmup.
DEFAULT_OPTIMIZER = {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999]}
DEFAULT_SCHEDULER = {"name": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.1}

# Options of a base model that may change when fine-tuning; everything else fixes the weights' shapes. The last
# one shortens the context (a decoder's block_size, an encoder's max_positions): learned positions are cut.
RUNTIME_OPTIONS = ("dropout", "attention", "loss", "block_size")
ENCODER_RUNTIME_OPTIONS = ("dropout", "attention", "loss", "max_positions")


def runtime_options(config: ModelConfig) -> tuple[str, ...]:
    """The options of ``config`` that ``model_options`` may change: :data:`RUNTIME_OPTIONS` for a decoder,
    :data:`ENCODER_RUNTIME_OPTIONS` for an encoder."""
    return ENCODER_RUNTIME_OPTIONS if isinstance(config, EncoderConfig) else RUNTIME_OPTIONS


class FinetuneModule(LMForgeModule):
    """Shared by the fine-tuning tasks: the base model, LoRA, checkpoints that describe themselves."""

    task = "finetune"

    def __init__(
        self,
        base: str,
        revision: str | None = None,
        lora: dict[str, Any] | None = None,
        optimizer: dict[str, Any] = DEFAULT_OPTIMIZER,
        scheduler: dict[str, Any] = DEFAULT_SCHEDULER,
        model_options: dict[str, Any] = {},
        compile: bool | dict[str, Any] = False,
        activation_checkpointing: bool | int = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        parallel.compile_settings(compile)
        parallel.checkpoint_every(activation_checkpointing)  # a bad setting fails now
        plugins.validate("optimizer", optimizer)
        plugins.validate("scheduler", scheduler)
        self.model, self.tokenizer, self.base_info = load_base(base, revision)
        if model_options:
            self._apply_model_options(model_options)
        self.config: ModelConfig = self.model.config
        self.lora_names: list[str] = []
        if lora is not None:
            from lmforge import lora as lora_lib

            settings = {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"], **lora}
            unknown = set(settings) - {"r", "alpha", "dropout", "targets", "train_also"}
            if unknown:
                raise UserError(
                    f"model.lora: unknown key {sorted(unknown)[0]!r}; "
                    "the keys are r, alpha, dropout, targets, train_also"
                )
            self.lora_settings = settings
            self.lora_names = lora_lib.apply_lora(
                self.model, settings["r"], settings["alpha"], settings["dropout"], list(settings["targets"])
            )
            self._train_also(list(settings.get("train_also") or []))
            self.strict_loading = False  # LoRA checkpoints hold the adapters (and head) only
        else:
            self.lora_settings = None

    def _train_also(self, names: list[str]) -> None:
        """Unfreeze base parameters next to the adapters (PEFT's modules_to_save): each name is a
        parameter or module name, or a module's last part (wte, wpe, ln_f, ln_1, ...). They train fully
        and are saved in the checkpoint with the adapters."""
        params = {k: p for k, p in self.model.named_parameters() if "lora_" not in k}
        for name in names:
            hits = [k for k in params if k == name or k.startswith(f"{name}.") or f".{name}." in f".{k}"]
            if not hits:
                kinds = sorted({k.rsplit(".", 2)[-2] if "." in k else k for k in params})
                raise UserError(
                    f"model.lora.train_also: {name!r} matches no parameter of the base model; "
                    f"module names are {', '.join(kinds)}"
                )
            for key in hits:
                params[key].requires_grad_(True)

    def _apply_model_options(self, options: dict[str, Any]) -> None:
        config = self.model.config
        allowed = runtime_options(config)
        unknown = set(options) - set(allowed)
        if unknown:
            raise UserError(
                f"model.model_options: {sorted(unknown)[0]!r} cannot change when fine-tuning (it fixes the weights); "
                f"allowed: {', '.join(allowed)}"
            )
        length = allowed[-1]  # block_size or max_positions
        learned = isinstance(config, EncoderConfig) or config.pos_encoding == "learned"
        if length in options and learned and options[length] > getattr(config, length):
            raise UserError(
                f"model.model_options.{length}={options[length]} exceeds the "
                f"{getattr(config, length)} learned positions of the base model"
            )
        new = build_model(config_from_dict({**config.to_dict(), **options}))
        state = self.model.state_dict()
        if getattr(new, "wpe", None) is not None:
            state["wpe.weight"] = state["wpe.weight"][: new.config.block_size]
        new.load_state_dict(state, strict=True)
        self.model = new

    # -- summary ---------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if not self.trainer.is_global_zero:
            return
        from lmforge import lora as lora_lib

        source = self.base_info["source"]
        print(f"lmforge: fine-tuning {source} ({self.base_info['kind']}, {self.base_info.get('family') or 'custom'})")
        trainable, total = lora_lib.count_parameters(self)
        print(
            f"lmforge: trainable parameters {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
            + (f" in {len(self.lora_names)} LoRA modules" if self.lora_names else ""),
            flush=True,
        )

    # -- checkpoints -------------------------------------------------------------------------
    def _metadata(self) -> dict:
        metrics = {}
        if self._trainer is not None:
            for key, value in self.trainer.callback_metrics.items():
                if isinstance(value, Tensor) and value.numel() == 1:
                    metrics[key] = float(value)
        return {
            **self._run_metadata(),
            "task": self.task,
            "model_config": self.config.to_dict(),
            "tokenizer": tokenizer_to_dict(self.tokenizer),
            "base": {k: v for k, v in self.base_info.items() if k != "architectures"},
            "lora": self.lora_settings,
            "lora_base_saved": self.lora_settings is None,
            "metrics": metrics,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lmforge"] = self._metadata()
        self._save_rng(checkpoint)
        if self.lora_settings is not None:  # only what was trained: adapters (and a head); the base is reloaded
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("lmforge") or {}
        if meta.get("task") not in (None, self.task):
            raise UserError(
                f"checkpoint is a {meta['task']!r} run, not {self.task!r}; use the config it was trained with"
            )
        if (meta.get("lora") is None) != (self.lora_settings is None) or (
            meta.get("lora") and meta["lora"] != self.lora_settings
        ):
            raise UserError(
                f"checkpoint was trained with lora={meta.get('lora')!r}, the config says lora={self.lora_settings!r}; "
                "use the same model.lora settings"
            )
        lengths = ("block_size", "max_positions")  # may be shortened by model_options
        diffs = [f"{k}={old!r} (base: {now!r})" for k, old, now in self._shape_changes(checkpoint, lengths)]
        if diffs:
            raise UserError(
                "checkpoint was fine-tuned from a model of another architecture: "
                + ", ".join(diffs)
                + "; set model.base to the model it started from"
            )
        super().on_load_checkpoint(checkpoint)

    # -- results -----------------------------------------------------------------------------
    def _results_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def _write_results(self, stage: str, values: dict) -> None:
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        write_json(self._results_dir() / f"{stage}_results.json", values)


class SFTModule(FinetuneModule):
    """Supervised fine-tuning of a causal LM: next-token loss on completion tokens only."""

    task = "sft"

    def __init__(
        self,
        base: str,
        revision: str | None = None,
        lora: dict[str, Any] | None = None,
        optimizer: dict[str, Any] = DEFAULT_OPTIMIZER,
        scheduler: dict[str, Any] = DEFAULT_SCHEDULER,
        model_options: dict[str, Any] = {},
        compile: bool | dict[str, Any] = False,
        activation_checkpointing: bool | int = False,
    ) -> None:
        """
        Args:
            base: Where to start: an lmforge .ckpt, a folder written by ``lmforge export``, or a Hugging Face
                model (local folder or Hub id, e.g. gpt2).
            revision: For Hub ids: a branch, tag or commit.
            lora: Train LoRA adapters instead of all weights: {r, alpha, dropout, targets}, targets by
                lmforge or Hugging Face module name (q_proj, v_proj, c_attn, o_proj, up_proj, ...).
            optimizer: An optimizer plugin and its arguments.
            scheduler: A learning-rate schedule plugin and its arguments.
            model_options: Settings of the base model that may change: dropout, attention, loss, block_size
                (an encoder's: max_positions).
            compile: Compile the training step with torch.compile: true, or torch.compile's arguments.
            activation_checkpointing: Recompute each block's activations in the backward (true), or every n-th's.
        """
        super().__init__(base, revision, lora, optimizer, scheduler, model_options, compile, activation_checkpointing)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def _batch_targets(self, batch: Any) -> Tensor | None:
        return batch.get("labels") if isinstance(batch, dict) else None

    def _loss(self, batch: dict[str, Tensor], reduction: str = "mean") -> Tensor:
        # Right padding needs no attention mask: with causal attention no real token sees a pad.
        return self.model(
            batch["input_ids"],
            batch["labels"],
            segment_ids=batch.get("segment_ids"),
            position_ids=batch.get("position_ids"),
            reduction=reduction,
            check_targets=not self._targets_checked,
        )

    def _train_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, float]:
        labels = batch["labels"]
        return self._loss(batch, reduction="sum"), (labels != -100).sum(), labels.numel()

    def _eval_step(self, batch: dict[str, Tensor], metric: MeanMetric) -> None:
        n = (batch["labels"] != -100).sum()
        if n > 0:  # a token-weighted mean over the whole split
            metric.update(self._loss(batch, reduction="sum") / n, weight=n)

    def _eval_end(self, stage: str, metric: MeanMetric) -> None:
        loss = metric.compute()
        metric.reset()
        loss = loss.float()
        self.log(f"{stage}/loss", float(loss), prog_bar=True)  # reduced over the ranks by the metric already
        self.log(f"{stage}/ppl", float(loss.exp()))
        if self.trainer.state.fn != "fit":
            self._write_results(stage, {f"{stage}/loss": float(loss), f"{stage}/ppl": float(loss.exp())})

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val", self.val_loss)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test", self.test_loss)


class ClassifierModule(FinetuneModule):
    """Sequence classification, with transformers' heads (and their names, which the exporter keeps):

    - a decoder: the last real token's hidden state through a bias-free linear ``score``;
    - an encoder with a pooler (BERT): ``classifier(dropout(pooled))``, the pooler's tanh(dense) of [CLS];
    - an encoder without one (DistilBERT): ``classifier(dropout(relu(pre_classifier(h[CLS]))))``.

    An encoder reads its batch with ``attention_mask`` as the key-padding mask and ``token_type_ids`` (when it
    has token types); the dropout is the model's ``dropout``. Its masked-LM and next-sentence heads are dropped
    (a classifier does not use them), as a decoder's untied LM head is.
    """

    task = "classify"

    def __init__(
        self,
        base: str,
        revision: str | None = None,
        labels: list[str] | None = None,
        lora: dict[str, Any] | None = None,
        optimizer: dict[str, Any] = DEFAULT_OPTIMIZER,
        scheduler: dict[str, Any] = DEFAULT_SCHEDULER,
        model_options: dict[str, Any] = {},
        compile: bool | dict[str, Any] = False,
        activation_checkpointing: bool | int = False,
    ) -> None:
        """
        Args:
            base: Where to start: an lmforge .ckpt, a folder written by ``lmforge export``, or a Hugging Face
                model (local folder or Hub id).
            revision: For Hub ids: a branch, tag or commit.
            labels: Class names in id order; default: taken from the data module (its training labels).
            lora: Train LoRA adapters (and the head) instead of all weights: {r, alpha, dropout, targets}.
            optimizer: An optimizer plugin and its arguments.
            scheduler: A learning-rate schedule plugin and its arguments.
            model_options: Settings of the base model that may change: dropout, attention, loss, block_size
                (an encoder's: max_positions).
            compile: Compile the training step with torch.compile: true, or torch.compile's arguments.
            activation_checkpointing: Recompute each block's activations in the backward (true), or every n-th's.
        """
        super().__init__(base, revision, lora, optimizer, scheduler, model_options, compile, activation_checkpointing)
        # A classifier has no LM head (as transformers' *ForSequenceClassification); unused heads would also leave
        # parameters without gradients, which DDP refuses.
        self.is_encoder = isinstance(self.config, EncoderConfig)
        if self.is_encoder:
            self.model.mlm_head = None
            self.model.nsp_head = None
        elif not self.config.tie_embeddings:
            self.model.lm_head = None
        self.labels: list[str] | None = None
        self.score: nn.Linear | None = None  # decoders
        self.classifier: nn.Linear | None = None  # encoders
        self.pre_classifier: nn.Linear | None = None  # encoders without a pooler
        if labels is not None:
            self._build_head(list(labels))

    def _build_head(self, labels: list[str]) -> None:
        if len(labels) < 2:
            raise UserError(f"classification needs at least 2 labels, got {labels!r}")
        if len(set(labels)) != len(labels):
            raise UserError(f"model.labels has duplicates: {labels!r}")
        self.labels = [str(x) for x in labels]
        n, width = len(labels), self.config.n_embd
        if not self.is_encoder:
            self.score = _init_linear(nn.Linear(width, n, bias=False))
        else:
            if not self.config.pooler:
                self.pre_classifier = _init_linear(nn.Linear(width, width))
            self.classifier = _init_linear(nn.Linear(width, n))
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {
                        "acc": MulticlassAccuracy(n, average="micro"),
                        "f1": MulticlassF1Score(n, average="macro"),
                        "confusion": MulticlassConfusionMatrix(n),
                        "precision": MulticlassPrecision(n, average=None),
                        "recall": MulticlassRecall(n, average=None),
                        "per_class_f1": MulticlassF1Score(n, average=None),
                    }
                )
                for stage in ("val", "test")
            }
        )
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        names = getattr(self._datamodule(), "label_names", None)
        if self.labels is None:
            if names is None:
                raise UserError("model.labels is not set and the data module does not provide label names")
            self._build_head(list(names))
        elif names is not None and list(names) != self.labels:
            raise UserError(
                f"data labels {list(names)!r} differ from the model's {self.labels!r}; "
                "set data.labels to the model's labels (same order)"
            )

    def _optimized_module(self) -> nn.Module:
        return self  # the backbone (or its adapters) and the head

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Class logits (B, num_labels): a decoder's at each row's last real (non-padding) token, an encoder's from
        its [CLS] position (``token_type_ids`` default 0; a decoder ignores them)."""
        if self.is_encoder:
            return self._encoder_logits(input_ids, attention_mask, token_type_ids)
        h = self.model(input_ids, output="hidden")  # right padding: no real token attends to a pad
        if attention_mask is None:
            last = torch.full((input_ids.size(0),), input_ids.size(1) - 1, device=input_ids.device)
        else:
            last = attention_mask.long().sum(dim=1) - 1
        pooled = h[torch.arange(h.size(0), device=h.device), last]  # (B, C)
        return self.score(pooled)

    def _encoder_logits(
        self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None
    ) -> Tensor:
        mask = None if attention_mask is None else attention_mask.bool()
        types = token_type_ids if self.config.type_vocab_size else None  # None: all type 0
        p = self.config.dropout
        if self.config.pooler:  # BertForSequenceClassification
            pooled = self.model(input_ids, types, mask, output="pooled")  # (B, C): tanh(pooler(h[:, 0]))
            return self.classifier(F.dropout(pooled, p, self.training))
        h0 = self.model(input_ids, types, mask, output="hidden")[:, 0]  # (B, C); DistilBertForSequenceClassification
        return self.classifier(F.dropout(F.relu(self.pre_classifier(h0)), p, self.training))

    def _batch_logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def _train_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, float]:
        logits = self._batch_logits(batch)
        y = batch["labels"]
        right = (logits.detach().argmax(-1) == y).sum()
        self._acc_right = right if self._acc_right is None else self._acc_right + right
        return F.cross_entropy(logits.float(), y, reduction="sum"), torch.ones_like(y).sum(), y.numel()

    _acc_right: Tensor | None = None

    def _extra_step_stats(self) -> list[Tensor]:
        right, self._acc_right = self._acc_right, None
        return [right.float()] if right is not None else []

    def _log_extra_step_stats(self, sums: Tensor, targets: Tensor) -> None:
        if sums.numel():
            self.log("train/acc", float(sums[0] / targets), prog_bar=True)

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        logits = self._batch_logits(batch)
        y = batch["labels"]
        getattr(self, f"{stage}_loss").update(F.cross_entropy(logits.float(), y), weight=y.numel())
        for metric in self.metrics[stage].values():
            metric.update(logits, y)

    def _eval_end(self, stage: str) -> None:
        loss_metric = getattr(self, f"{stage}_loss")
        metrics = self.metrics[stage]
        values = {f"{stage}/loss": loss_metric.compute(), f"{stage}/acc": metrics["acc"].compute()}
        values[f"{stage}/f1_macro"] = metrics["f1"].compute()
        self.log_dict({k: float(v) for k, v in values.items()}, prog_bar=True)  # metrics reduced over ranks already
        report = self._report(stage)
        for metric in (*metrics.values(), loss_metric):
            metric.reset()
        if self.trainer.state.fn != "fit" and not self.trainer.sanity_checking:
            self.print(format_report(report))
            self._write_results(stage, {**{k: float(v) for k, v in values.items()}, "report": report})

    def _report(self, stage: str) -> dict:
        m = self.metrics[stage]
        confusion = m["confusion"].compute().long()
        precision, recall, f1 = m["precision"].compute(), m["recall"].compute(), m["per_class_f1"].compute()
        support = confusion.sum(dim=1)
        return {
            "labels": self.labels,
            "per_class": {
                label: {
                    "precision": float(precision[i]),
                    "recall": float(recall[i]),
                    "f1": float(f1[i]),
                    "support": int(support[i]),
                }
                for i, label in enumerate(self.labels)
            },
            "confusion_matrix": confusion.tolist(),
        }

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> list[dict]:
        probs = self._batch_logits(batch).float().softmax(-1)
        return [{"label": self.labels[int(p.argmax())], "probs": p.tolist()} for p in probs]

    def _metadata(self) -> dict:
        return {**super()._metadata(), "labels": self.labels}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = (checkpoint.get("lmforge") or {}).get("labels")
        if saved is not None and self.labels is None:  # load_from_checkpoint(path) without labels=: the saved ones
            self._build_head(list(saved))
        elif saved is not None and list(saved) != self.labels:
            raise UserError(f"checkpoint was trained with labels {saved!r}, this run has {self.labels!r}")


def _init_linear(layer: nn.Linear) -> nn.Linear:
    """transformers' initialisation of a head: weights N(0, 0.02), biases zero."""
    nn.init.normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def format_report(report: dict) -> str:
    """A per-class table (precision, recall, F1, support) and the confusion matrix, as text."""
    labels = report["labels"]
    width = max(8, *(len(x) for x in labels))
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    for label in labels:
        r = report["per_class"][label]
        lines.append(f"{label:<{width}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:6.3f}  {r['support']:7d}")
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "  " + "  ".join(f"{x[:8]:>8}" for x in labels))
    for label, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>8d}" for v in row))
    return "\n".join(lines)
