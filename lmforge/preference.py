"""Preference tuning: DPO, IPO, SimPO and ORPO on (prompt, chosen, rejected) pairs, full or LoRA.

:class:`PreferenceModule` (with :class:`lmforge.data.preference.PreferenceDataModule`) starts from a base model as
the other fine-tuning tasks do (``model.base``: an lmforge checkpoint, an lmforge export, a Hugging Face folder or
Hub id; usually the SFT example's result). One forward reads the batch's chosen and rejected answers together
(rows i and B + i are a pair) and the log-probability of an answer is the sum over its tokens only
(:func:`sequence_logps`: the head's logits a chunk of rows at a time, recomputed in the backward, so at most one
chunk of them is held).

The losses, per pair (``pc``, ``pr``: the policy's log-probabilities of the chosen and rejected answer; ``rc``,
``rr``: the reference's; ``nc``, ``nr``: their token counts; ``s`` = ``label_smoothing``):

- ``dpo`` (Rafailov et al. 2023; with ``s`` > 0 the conservative cDPO):
  ``-(1 - s) log sigmoid(beta d) - s log sigmoid(-beta d)``, ``d = (pc - rc) - (pr - rr)``.
- ``ipo`` (Azar et al. 2023), length-normalised as TRL (its authors' choice):
  ``((pc - rc) / nc - (pr - rr) / nr - 1 / (2 beta))^2``.
- ``simpo`` (Meng et al. 2024), reference-free: ``-log sigmoid(beta (pc / nc - pr / nr) - gamma)`` (smoothed as DPO).
- ``orpo`` (Hong et al. 2024), reference-free: ``pc``'s mean token NLL ``- orpo_lambda log sigmoid(log odds)``,
  ``log odds = log(p / (1 - p))`` of the chosen minus that of the rejected, ``p`` the mean-token probability.

References: DPO and IPO need the reference model's log-probabilities. For LoRA they come from the same model with
the adapters switched off (:func:`lmforge.lora.adapters_disabled`: no second copy in memory); for full
fine-tuning from a frozen copy of the base. ``precompute_reference: true`` computes them once before training
(and for the validation pairs before the first validation), after which a full fine-tune's copy is freed.

Every pair of an optimizer step weighs the same, over micro-batches and ranks (:class:`lmforge.task.LMForgeModule`):
gradient accumulation and DDP give the update of one big batch. Logged: ``loss``, ``rewards/chosen`` and
``rewards/rejected`` (``beta`` times the answer's log-ratio to the reference; for the reference-free losses
``beta`` times its mean token log-probability, as TRL reports them), ``rewards/margin``, ``rewards/accuracy`` (the
share of pairs whose chosen reward is the larger) and ``kl``: the mean of ``(log pi - log pi_ref)`` over both
answers of a pair, summed over their tokens (the KL to the reference estimated on the preference data, not on
samples of the policy).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lmforge.errors import UserError
from lmforge.finetune import DEFAULT_SCHEDULER, FinetuneModule

LOSSES = ("dpo", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
DEFAULT_OPTIMIZER = {"name": "adamw", "lr": 5e-6, "weight_decay": 0.0, "betas": [0.9, 0.999]}
_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "kl")


def sequence_logps(
    model: nn.Module, input_ids: Tensor, labels: Tensor, check_targets: bool = True
) -> tuple[Tensor, Tensor]:
    """(sum of log-probabilities of each row's labelled tokens (R,), their counts (R,)) under a GPT.

    The hidden states come from one forward; the head's logits are computed a chunk of rows at a time (at most
    :data:`LOGIT_CHUNK` elements) and, when gradients are needed, recomputed in the backward
    (``torch.utils.checkpoint``), so at most one chunk of (tokens, vocab) logits is ever held.
    """
    if check_targets:
        from lmforge.kernels.utils import check_target_range

        check_target_range(labels, model.config.vocab_size, -100)
    h = model(input_ids, output="hidden")  # (R, T, C)
    head = model.lm_head
    merged = getattr(head, "merged_weight", None)  # a LoRA head: W + scaling * B @ A
    weight = merged() if merged is not None else head.weight
    R, T = labels.shape
    step = max(1, LOGIT_CHUNK // max(1, T * weight.shape[0]))
    parts = []
    for start in range(0, R, step):
        rows = slice(start, start + step)
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            parts.append(
                torch.utils.checkpoint.checkpoint(_row_logps, h[rows], weight, labels[rows], use_reentrant=False)
            )
        else:
            parts.append(_row_logps(h[rows], weight, labels[rows]))
    return torch.cat(parts), (labels != -100).sum(dim=1)


LOGIT_CHUNK = 1 << 25
"""Most logits (rows x tokens x vocab) :func:`sequence_logps` builds at once (128 MiB in fp32)."""


def _row_logps(h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """(rows,) summed log-probabilities of the labelled tokens, in fp32."""
    logits = F.linear(h, weight).float()  # (rows, T, V)
    keep = labels != -100
    picked = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    return (picked * keep).sum(dim=1)


def preference_losses(
    loss: str,
    policy: tuple[Tensor, Tensor],
    reference: tuple[Tensor, Tensor] | None,
    counts: tuple[Tensor, Tensor],
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
) -> dict[str, Tensor]:
    """Per-pair ``loss``, ``chosen`` and ``rejected`` rewards and ``kl`` (B,) from the answers' summed
    log-probabilities (``policy``, ``reference``: (chosen, rejected), each (B,)) and token counts (see the module
    docstring for the formulas)."""
    pc, pr = policy
    nc, nr = (n.clamp(min=1).to(pc.dtype) for n in counts)
    s = label_smoothing
    kl = torch.zeros_like(pc)
    if loss in ("dpo", "ipo"):
        rc, rr = reference
        lc, lr = pc - rc, pr - rr  # the log-ratios to the reference
        kl = (lc + lr).detach() / 2
        if loss == "dpo":
            d = beta * (lc - lr)
            per_pair = -(1 - s) * F.logsigmoid(d) - s * F.logsigmoid(-d)
        else:
            per_pair = (lc / nc - lr / nr - 1 / (2 * beta)) ** 2
        chosen, rejected = beta * lc.detach(), beta * lr.detach()
    elif loss == "simpo":
        mc, mr = pc / nc, pr / nr
        d = beta * (mc - mr) - simpo_gamma
        per_pair = -(1 - s) * F.logsigmoid(d) - s * F.logsigmoid(-d)
        chosen, rejected = beta * mc.detach(), beta * mr.detach()
    elif loss == "orpo":
        mc, mr = pc / nc, pr / nr
        log_odds = (mc - mr) - (_log1mexp(mc) - _log1mexp(mr))
        per_pair = -mc - orpo_lambda * F.logsigmoid(log_odds)
        chosen, rejected = beta * mc.detach(), beta * mr.detach()
    else:
        raise UserError(f"model.loss={loss!r} is not one of {', '.join(LOSSES)}")
    return {"loss": per_pair, "chosen": chosen, "rejected": rejected, "kl": kl}


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for x < 0, accurately on both sides of -log 2."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class PreferenceModule(FinetuneModule):
    """Preference tuning of a causal LM (DPO, IPO, SimPO, ORPO); see :mod:`lmforge.preference`."""

    task = "preference"

    def __init__(
        self,
        base: str,
        revision: str | None = None,
        loss: str = "dpo",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        orpo_lambda: float = 0.1,
        precompute_reference: bool = False,
        lora: dict[str, Any] | None = None,
        optimizer: dict[str, Any] = DEFAULT_OPTIMIZER,
        scheduler: dict[str, Any] = DEFAULT_SCHEDULER,
        model_options: dict[str, Any] = {},
        compile: bool | dict[str, Any] = False,
        activation_checkpointing: bool | int = False,
    ) -> None:
        """
        Args:
            base: Where to start (usually an SFT result): an lmforge .ckpt, an lmforge export or a Hugging Face model.
            revision: For Hub ids: a branch, tag or commit.
            loss: dpo, ipo (with a reference), simpo or orpo (reference-free).
            beta: The inverse temperature (DPO, IPO's regulariser, SimPO's scale; the reward scale for ORPO).
            label_smoothing: The assumed share of flipped preference labels (cDPO; DPO and SimPO), in [0, 0.5).
            simpo_gamma: SimPO's target reward margin.
            orpo_lambda: ORPO's weight of the odds-ratio term.
            precompute_reference: Compute the reference log-probabilities once before training instead of at
                every step (for a full fine-tune the reference copy is freed afterwards).
            lora: Train LoRA adapters instead of all weights: {r, alpha, dropout, targets}; the reference is the
                model with its adapters switched off.
            optimizer: An optimizer plugin and its arguments (preference tuning wants a small learning rate).
            scheduler: A learning-rate schedule plugin and its arguments.
            model_options: Settings of the base model that may change: dropout, attention, loss, block_size.
            compile: Compile the training step with torch.compile: true, or torch.compile's arguments.
            activation_checkpointing: Recompute each block's activations in the backward (true), or every n-th's.
        """
        if loss not in LOSSES:
            raise UserError(f"model.loss={loss!r} is not one of {', '.join(LOSSES)}")
        if not (isinstance(beta, (int, float)) and beta > 0):
            raise UserError(f"model.beta={beta!r} must be a positive number")
        if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 0.5):
            raise UserError(f"model.label_smoothing={label_smoothing!r} must be in [0, 0.5)")
        if label_smoothing and loss in ("ipo", "orpo"):
            raise UserError(f"model.label_smoothing applies to dpo and simpo, not {loss}; leave it 0")
        super().__init__(base, revision, lora, optimizer, scheduler, model_options, compile, activation_checkpointing)
        self.loss_name, self.beta, self.label_smoothing = loss, float(beta), float(label_smoothing)
        self.simpo_gamma, self.orpo_lambda = float(simpo_gamma), float(orpo_lambda)
        self.precompute_reference = bool(precompute_reference)
        self.uses_reference = loss not in REFERENCE_FREE
        if self.uses_reference and self.lora_settings is None:  # a frozen copy of the base, outside the module tree
            reference = copy.deepcopy(self.model).requires_grad_(False).eval()
            self.__dict__["_reference"] = reference  # not a submodule: not trained, not saved, not wrapped by DDP
        else:
            self.__dict__["_reference"] = None
        self._precomputed: dict[str, Tensor] = {}
        self.eval_metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({k.replace("/", "_"): MeanMetric() for k in _METRICS}) for stage in ("val", "test")}
        )
        self._step_sums: Tensor | None = None

    # -- the reference -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, Tensor], split: str) -> Tensor:
        """(2B,) reference log-probabilities of the batch's rows: precomputed, the frozen copy's, or the model's
        own with the LoRA adapters switched off."""
        if split in self._precomputed:
            index = batch["index"].to(self._precomputed[split].device)
            table = self._precomputed[split][index]  # (B, 2): chosen, rejected
            return torch.cat([table[:, 0], table[:, 1]])
        reference = self.__dict__["_reference"]
        if reference is not None:
            return sequence_logps(reference, batch["input_ids"], batch["labels"], check_targets=False)[0]
        from lmforge.lora import adapters_disabled

        was_training = self.model.training
        self.model.eval()  # no dropout in the reference, as in a frozen copy
        try:
            with adapters_disabled(self.model):
                return sequence_logps(self.model, batch["input_ids"], batch["labels"], check_targets=False)[0]
        finally:
            self.model.train(was_training)

    def _move_reference(self) -> None:
        reference = self.__dict__["_reference"]
        if reference is not None and next(reference.parameters()).device != self.device:
            reference.to(self.device)

    def _precompute(self, split: str) -> None:
        """Reference log-probabilities of every pair of ``split``, once (each rank computes all of them)."""
        from torch.utils.data import DataLoader

        dm = self._datamodule()
        dataset = dm.datasets[split]
        loader = DataLoader(dataset, batch_size=dm.batch_size, shuffle=False, collate_fn=dm.collate)
        table = torch.empty(len(dataset), 2, device=self.device)
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logps = self._reference_logps(batch, "none")
            B = batch["index"].numel()
            table[batch["index"]] = torch.stack([logps[:B], logps[B:]], dim=1)
        self._precomputed[split] = table

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._move_reference()
        if self.trainer.is_global_zero:
            ref = ("none (reference-free)" if not self.uses_reference else "the base with its LoRA adapters off"
                   if self.lora_settings is not None else "a frozen copy of the base")  # fmt: skip
            print(f"lmforge: preference loss {self.loss_name} (beta {self.beta:g}); reference: {ref}", flush=True)
        if self.uses_reference and self.precompute_reference:
            for split in ("train", "val"):
                self._precompute(split)
            if self.__dict__["_reference"] is not None:
                self.__dict__["_reference"] = None  # no longer needed: free its memory

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._move_reference()

    def on_test_start(self) -> None:
        self._move_reference()

    # -- the loss ------------------------------------------------------------------------------------------
    def _batch_targets(self, batch: Any) -> Tensor | None:
        return batch.get("labels") if isinstance(batch, dict) else None

    def _pair_losses(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor]:
        logps, counts = sequence_logps(self.model, batch["input_ids"], batch["labels"], not self._targets_checked)
        B = logps.size(0) // 2
        reference = None
        if self.uses_reference:
            ref = self._reference_logps(batch, split)
            reference = (ref[:B], ref[B:])
        return preference_losses(
            self.loss_name, (logps[:B], logps[B:]), reference, (counts[:B], counts[B:]), self.beta,
            self.label_smoothing, self.simpo_gamma, self.orpo_lambda,
        )  # fmt: skip

    def _train_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, float]:
        out = self._pair_losses(batch, "train")
        pairs = out["loss"].numel()
        margin = out["chosen"] - out["rejected"]
        sums = torch.stack([out["chosen"].sum(), out["rejected"].sum(), margin.sum(), (margin > 0).float().sum(),
                            out["kl"].sum()]).float()  # fmt: skip
        self._step_sums = sums if self._step_sums is None else self._step_sums + sums
        return out["loss"].sum(), torch.tensor(pairs, device=out["loss"].device), float(pairs)

    def _extra_step_stats(self) -> list[Tensor]:
        sums, self._step_sums = self._step_sums, None
        return [] if sums is None else list(sums)

    def _log_extra_step_stats(self, sums: Tensor, targets: Tensor) -> None:
        if not len(sums):
            return
        pairs = float(targets)
        for name, value in zip(("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"), sums):
            self.log(f"train/{name}", float(value) / pairs, prog_bar=name == "rewards/accuracy")
        if self.uses_reference:
            self.log("train/kl", float(sums[4]) / pairs)

    # -- evaluation ----------------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        out = self._pair_losses(batch, stage if stage in self._precomputed else "none")
        metrics = self.eval_metrics[stage]
        margin = out["chosen"] - out["rejected"]
        values = {"loss": out["loss"], "rewards_chosen": out["chosen"], "rewards_rejected": out["rejected"],
                  "rewards_margin": margin, "rewards_accuracy": (margin > 0).float(), "kl": out["kl"]}  # fmt: skip
        for name, value in values.items():
            metrics[name].update(value.float().mean(), weight=value.numel())

    def _eval_end(self, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        values = {}
        for key in _METRICS:
            metric = metrics[key.replace("/", "_")]
            if metric.update_called:
                values[f"{stage}/{key}"] = float(metric.compute())
            metric.reset()
        if not self.uses_reference:
            values.pop(f"{stage}/kl", None)
        if not values:
            return
        self.log_dict(values, prog_bar=False)
        self.log(f"{stage}/accuracy", values[f"{stage}/rewards/accuracy"], prog_bar=True)
        if self.trainer.state.fn != "fit" and not self.trainer.sanity_checking:
            self._write_results(stage, values)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # -- checkpoints -----------------------------------------------------------------------------------
    def _metadata(self) -> dict:
        method = {"loss": self.loss_name, "beta": self.beta, "label_smoothing": self.label_smoothing,
                  "reference": "none" if not self.uses_reference else "lora-disabled" if self.lora_settings else "frozen-copy"}  # fmt: skip
        if self.loss_name == "simpo":
            method["simpo_gamma"] = self.simpo_gamma
        if self.loss_name == "orpo":
            method["orpo_lambda"] = self.orpo_lambda
        return {**super()._metadata(), "preference": method}
