"""Schedule-free AdamW as an lmforge optimizer plugin.

Schedule-free AdamW (Defazio et al., 2024) replaces the learning-rate decay schedule with iterate
averaging: train with ``scheduler: {name: constant}``. It keeps two sets of weights and must be
told whether the model is training or evaluating; lmforge's training module calls the optimizer's
``train()`` and ``eval()`` around validation, so nothing else is needed.
"""

from __future__ import annotations

from torch import nn

from lmforge.optim import param_groups

__version__ = "0.1.0"


def adamw_schedulefree(
    model: nn.Module,
    lr: float = 2.5e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_steps: int = 100,
    eps: float = 1e-8,
):
    """AdamWScheduleFree with lmforge's weight-decay groups (linear matrices only)."""
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(
        param_groups(model, weight_decay), lr=lr, betas=tuple(betas), warmup_steps=warmup_steps, eps=eps
    )
