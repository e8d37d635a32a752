"""The ``linear`` learning-rate schedule: linear warmup from 0, then linear decay to ``final_lr_ratio`` * lr at
the run's last step.

A scheduler plugin is a factory ``(optimizer, total_steps, **kwargs) ->
torch.optim.lr_scheduler.LRScheduler``, stepped once per optimizer step; ``total_steps`` is the run's
number of optimizer steps. Its ``state_dict()`` goes into checkpoints, read back with
``torch.load(weights_only=True)``: a LambdaLR of a module-level function (or a functools.partial of one)
keeps it to plain numbers.
"""

from __future__ import annotations

from functools import partial

from torch.optim.lr_scheduler import LambdaLR

from lmforge.errors import UserError


def linear_multiplier(step: int, warmup_steps: int, total_steps: int, final_lr_ratio: float) -> float:
    """The learning-rate multiplier at optimizer step ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - (1.0 - final_lr_ratio) * progress


def linear(optimizer, total_steps: int, warmup_steps: int = 100, final_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup over ``warmup_steps``, then linear decay to ``final_lr_ratio`` at ``total_steps``.

    Args:
        warmup_steps: Steps of linear warmup from 0 (0: start at the peak).
        final_lr_ratio: The learning rate at the end, as a fraction of the peak.
    """
    if warmup_steps < 0:
        raise UserError(f"scheduler linear: warmup_steps={warmup_steps} must be 0 or more")
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise UserError(f"scheduler linear: final_lr_ratio={final_lr_ratio} must be between 0 and 1")
    fn = partial(linear_multiplier, warmup_steps=warmup_steps, total_steps=total_steps, final_lr_ratio=final_lr_ratio)
    return LambdaLR(optimizer, fn)
