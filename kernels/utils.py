"""What the loss kernels share: the loss's scale (1/count for a mean) and the check of the targets.

torch only. :mod:`lmforge.kernels.cross_entropy` (loss rows over given logits) and
:mod:`lmforge.kernels.linear_cross_entropy` (the fused head and loss, which uses the former's rows)
both scale their gradients by :func:`target_scale`, which checks the targets first.
"""

from __future__ import annotations

import torch

from . import custom_op


def mean_scale(targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """1 / (number of counted targets) for a mean (1 when there are none), 1 for a sum."""
    if reduction == "sum":
        return torch.ones((), device=targets.device, dtype=torch.float32)
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
    return 1.0 / (targets != ignore_index).sum().clamp(min=1).to(torch.float32)


def check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise ``ValueError`` when a target is outside [0, vocab_size) and not ``ignore_index``.

    One reduction (the least and greatest target, ignored ones read as 0) and one read back to the
    host: a device sync on CUDA. Nothing while a CUDA graph is being captured (it cannot sync).
    """
    if targets.numel() == 0 or (targets.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = torch.stack(torch.aminmax(torch.where(targets == ignore_index, 0, targets))).tolist()
    if 0 <= lo and hi < vocab_size:
        return
    flat = targets.reshape(-1)
    bad = ((flat != ignore_index) & ((flat < 0) | (flat >= vocab_size))).nonzero()
    position = int(bad[0])
    more = f" ({len(bad)} targets out of range)" if len(bad) > 1 else ""
    raise ValueError(
        f"targets must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
        f"got {int(flat[position])} at position {position}{more}"
    )


@custom_op("ce_target_scale", "(Tensor targets, int vocab_size, int ignore_index, str reduction) -> Tensor")
def ce_target_scale(targets, vocab_size, ignore_index, reduction):
    """:func:`mean_scale` after :func:`check_target_range`, as an op for traced code: it runs eagerly
    inside a compiled graph, so the check reads the targets back without a graph break (and no pass
    drops it, as its result scales the loss)."""
    check_target_range(targets, vocab_size, ignore_index)
    return mean_scale(targets, ignore_index, reduction)


@ce_target_scale.register_fake
def _(targets, vocab_size, ignore_index, reduction):
    return targets.new_empty((), dtype=torch.float32)


def target_scale(
    targets: torch.Tensor, vocab_size: int, ignore_index: int, reduction: str, check: bool = True
) -> torch.Tensor:
    """The loss's scale (:func:`mean_scale`), the targets checked first (:func:`check_target_range`) with ``check``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
    if not check:
        return mean_scale(targets, ignore_index, reduction)
    if torch.compiler.is_compiling() or type(targets) is not torch.Tensor:
        # traced (torch.compile, or any tracer's tensor subclass): the op, which reads the targets
        # eagerly when the graph runs
        return ce_target_scale(targets, vocab_size, ignore_index, reduction)
    # eager: the same without the op's dispatch, which would import torch._dynamo (and triton) on
    # the first call of the torch path
    check_target_range(targets, vocab_size, ignore_index)
    return mean_scale(targets, ignore_index, reduction)
