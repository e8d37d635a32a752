"""Optimizer and learning-rate schedule for pretraining.

Weight decay applies to the matrices of linear layers only: never to norms, biases or embeddings
(a tied output head is the embedding, so it is not decayed either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimizerSpec:
    """The optimizer and its keyword arguments."""

    name: Literal["adamw"] = "adamw"
    """Optimizer name."""
    lr: float = 6e-4
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = 0.1
    """Decoupled weight decay on linear-layer matrices."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""


@dataclass
class SchedulerSpec:
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` * lr."""

    warmup_steps: int = 100
    """Optimizer steps of linear warmup."""
    decay_steps: int | None = None
    """Steps until the end of the cosine; default: the trainer's max_steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: linear-layer weights (decayed) and everything else (not decayed)."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay_ids -= embedding_ids  # a tied head is the embedding table
    decay, no_decay = [], []
    for p in model.parameters():  # shared tensors are yielded once
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        param_groups(model, spec.weight_decay), lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, fused=fused or None
    )


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
