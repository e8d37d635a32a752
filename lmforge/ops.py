"""The dispatch point for the two hot operations of training: attention and the output loss.

Every model calls :func:`attention` and :func:`linear_cross_entropy`; the ``backend`` argument
(``auto | triton | torch``, set in the model config) picks the implementation. The torch paths
(``scaled_dot_product_attention`` and ``cross_entropy``) run everywhere. Triton kernels from
``lmforge.kernels`` register here as they land; until a kernel exists for an op, ``auto``
resolves to torch and ``triton`` is refused when the config is validated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Ops for which lmforge.kernels provides a Triton implementation. Empty until the kernel issues land.
TRITON_OPS: frozenset[str] = frozenset()


def check_backend(op: str, backend: str) -> None:
    """Raise a one-line error when ``backend`` cannot serve ``op`` in this version of lmforge."""
    if backend == "triton" and op not in TRITON_OPS:
        raise ValueError(
            f"model config: {op}='triton' is not available: this lmforge has no Triton kernel for {op} yet; "
            f"use {op}: auto or {op}: torch"
        )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention. q: (B, nh, T, hs); k, v: (B, nkv, T, hs) with nkv dividing nh."""
    check_backend("attention", backend)
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale, enable_gqa=k.size(1) != q.size(1)
    )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` over non-ignored tokens.

    hidden: (N, C); weight: (V, C); targets: (N,). Returns 0 (with zero gradients) when every target
    is ignored, where plain ``cross_entropy`` would return NaN.
    """
    check_backend("loss", backend)
    logits = hidden @ weight.t()  # (N, V)
    loss_sum = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum()
    return loss_sum / count.clamp(min=1).to(loss_sum.dtype)


def cuda_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
