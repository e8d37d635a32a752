"""Cross-entropy rows in Triton: loss and logit gradient in one kernel, in place.

Layout: the Triton kernel, the launcher :func:`ce_rows_`, the custom op ``lmforge::cross_entropy_rows``
(``ce_rows_`` on a copy of the logits, opaque to ``torch.compile``), then :func:`cross_entropy` (an
autograd function over given logits, for models that need the logits). :mod:`lmforge.kernels.linear_cross_entropy`
uses :func:`ce_rows_` on each chunk of logits so the full (tokens, vocab) logits never exist.

Per row with target t (rows whose target is ``ignore_index`` give loss 0 and gradient 0; a target
outside [0, V) is never read through: index 0 is read instead and the row's loss and gradient are
NaN, a last line of defence behind the ``ValueError`` of the host-side check, ``check_targets=True``):
``z = softcap * tanh(x / softcap)`` (or x), ``lse = logsumexp(z)``,
``loss = (1 - eps) * (lse - z_t) + eps * (lse - mean(z)) + z_loss * lse**2`` and
``dloss/dz = softmax(z) * (1 + 2 * z_loss * lse) - eps / V - (1 - eps) * onehot(t)``, times
``1 - (z / softcap)**2`` through the soft cap. The gradient, times a scale read from memory (1/number
of counted rows for a mean), overwrites the logits. Math is fp32 whatever the logits' dtype; row
offsets are 64-bit, so tokens x vocab may exceed 2**31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import custom_op
from .utils import target_scale


@triton.jit
def _soft_capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        e = tl.math.exp2(x * (2.0 * 1.4426950408889634 / softcap))  # exp(2x / cap)
        return softcap * (1.0 - 2.0 / (e + 1.0))  # cap * tanh(x / cap), finite for any x
    else:
        return x


@triton.jit
def _ce_rows_kernel(
    X, stride_x, T, LOSS, SCALE, V, ignore_index, eps, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    target = tl.load(T + row)
    counted = target != ignore_index
    in_range = (target >= 0) & (target < V)
    # the index read: an ignored row's loss and gradient are zeroed below, an out-of-range one's are NaN
    target = tl.where(counted & in_range, target, 0)
    # pass 1: running max and sum of exp (base e), the sum of z (label smoothing) and z at the target
    m = float("-inf")
    s = 0.0
    z_sum = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = _soft_capped(tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(offs < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_sum += tl.sum(tl.where(offs < V, z, 0.0), axis=0)
    z_t = _soft_capped(tl.load(x_row + target).to(tl.float32), softcap, HAS_SOFTCAP)
    lse = m + tl.log(s)
    loss = (1.0 - eps) * (lse - z_t) + eps * (lse - z_sum / V) + z_loss * lse * lse
    tl.store(LOSS + row, tl.where(counted, tl.where(in_range, loss, float("nan")), 0.0))
    # pass 2: the gradient, written over the logits
    scale = tl.where(counted, tl.where(in_range, tl.load(SCALE), float("nan")), 0.0)
    p_factor = 1.0 + 2.0 * z_loss * lse
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32)
        z = _soft_capped(x, softcap, HAS_SOFTCAP)
        g = tl.exp(z - lse) * p_factor - eps / V - tl.where(offs == target, 1.0 - eps, 0.0)
        if HAS_SOFTCAP:
            g = g * (1.0 - (z / softcap) * (z / softcap))
        tl.store(x_row + offs, (g * scale).to(X.dtype.element_ty), mask=offs < V)


@triton.jit
def _scale_kernel(X, FACTOR, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < numel
    x = tl.load(X + offs, mask=keep).to(tl.float32)
    tl.store(X + offs, (x * tl.load(FACTOR)).to(X.dtype.element_ty), mask=keep)


def scale_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x *= factor`` in place for a contiguous tensor, in fp32 (``factor``: a one-element tensor)."""
    if not x.is_contiguous():
        raise ValueError("scale_: the tensor must be contiguous")
    if x.numel():
        block = 4096
        _scale_kernel[(triton.cdiv(x.numel(), block),)](
            x, factor.to(device=x.device, dtype=torch.float32).reshape(1), x.numel(), BLOCK=block, num_warps=8
        )
    return x


def ce_rows_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    loss_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row fp32 losses, gradient) of ``logits`` (n, V): the gradient, ``scale`` * d(loss)/d(logits),
    overwrites ``logits`` and is returned as that same tensor; the losses go to ``loss_out`` (n,) fp32
    when given (a slice of the caller's buffer: no per-chunk reduction)."""
    n, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("ce_rows_: logits must be contiguous along the vocabulary")
    targets = targets.contiguous()
    loss = torch.empty(n, device=logits.device, dtype=torch.float32) if loss_out is None else loss_out
    if n == 0:
        return loss, logits
    block_v = min(triton.next_power_of_2(V), 4096 if logits.is_cuda else 1024)
    _ce_rows_kernel[(n,)](
        logits, logits.stride(0), targets, loss, scale.to(torch.float32).reshape(1), V, ignore_index,
        float(label_smoothing), float(z_loss), float(softcap or 0.0),
        HAS_SOFTCAP=softcap is not None, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )  # fmt: skip
    return loss, logits


@custom_op(
    "cross_entropy_rows",
    "(Tensor logits, Tensor targets, int ignore_index, float label_smoothing, float z_loss, float? softcap) "
    "-> (Tensor, Tensor)",
)
def cross_entropy_rows(logits, targets, ignore_index, label_smoothing, z_loss, softcap):
    """(per-row fp32 losses (n,), unscaled d(loss)/d(logits) in a new contiguous tensor of the logits'
    dtype): :func:`ce_rows_` on a copy, as an op that ``torch.compile`` keeps opaque in its graph."""
    grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype).copy_(logits)
    unit = torch.ones((), device=logits.device, dtype=torch.float32)
    loss_rows, grad = ce_rows_(
        grad, targets, unit, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap,
    )  # fmt: skip
    return loss_rows, grad


@cross_entropy_rows.register_fake
def _(logits, targets, ignore_index, label_smoothing, z_loss, softcap):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32), logits.new_empty(logits.shape)


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, scale, ignore_index, label_smoothing, z_loss, softcap):
        loss_rows, grad = cross_entropy_rows(
            logits.detach(), targets, ignore_index, float(label_smoothing), float(z_loss),
            None if softcap is None else float(softcap),
        )  # fmt: skip
        ctx.save_for_backward(grad, scale)  # unscaled: the mean's 1/count is applied in fp32 in backward
        return (loss_rows.sum() * scale).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad, scale = ctx.saved_tensors
        return (grad.float() * (scale * grad_output.float())).to(grad.dtype), None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    check_targets: bool = True,
) -> torch.Tensor:
    """Cross-entropy of logits (N, V) against targets (N,), differentiable for the logits.

    Mean over non-ignored rows (0, with zero gradients, when every row is ignored) or sum; label
    smoothing as torch's; an optional z-loss ``z_loss * logsumexp**2``; optional soft-capping.
    ``check_targets``: raise ``ValueError`` for a target outside [0, V) other than ``ignore_index``
    (one device sync per call on CUDA); turned off, such a row's loss and gradient are NaN.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} must be (N, V) and targets (N,)")
    scale = target_scale(targets, logits.shape[1], ignore_index, reduction, check_targets)
    return _CrossEntropyFunction.apply(logits, targets, scale, ignore_index, label_smoothing, z_loss, softcap)
