"""The ``adafactor`` optimizer: ``torch.optim.Adafactor`` (factored second moments: memory per matrix grows
with rows + columns, not rows x columns), with lmforge's weight-decay groups.

An optimizer plugin is a factory ``(model, **kwargs) -> torch.optim.Optimizer``: it gets the module to
train, so it chooses the parameter groups. lmforge steps it as Lightning does (``step(closure)``),
saves its ``state_dict()`` in checkpoints and reads them back with ``torch.load(weights_only=True)``:
the state must hold only tensors, numbers, strings and plain containers (torch's optimizers do).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.optim import param_groups


def adafactor(
    model: nn.Module, lr: float = 1e-2, beta2_decay: float = -0.8, weight_decay: float = 0.0, clip: float = 1.0
) -> torch.optim.Adafactor:
    """Adafactor; weight decay on linear matrices only (lmforge.optim.param_groups).

    Args:
        lr: The learning rate (Adafactor scales each update by the parameter's RMS).
        beta2_decay: The decay exponent of the second-moment average.
        weight_decay: Decoupled weight decay of the linear layers' matrices.
        clip: The update clipping threshold (Adafactor's d).
    """
    return torch.optim.Adafactor(param_groups(model, weight_decay), lr=lr, beta2_decay=beta2_decay, d=clip)
