"""The dispatch point for the two hot operations of training: attention and the output loss.

Every model calls :func:`attention` and :func:`linear_cross_entropy`; the ``backend`` argument
(``auto | triton | torch``, set in the model config) picks the implementation. The torch paths
(``scaled_dot_product_attention`` and ``cross_entropy``) run everywhere. ``auto`` uses a Triton
kernel from ``lmforge.kernels`` where it can run (CUDA, fp16/bf16) and logs once why it does not
elsewhere; ``triton`` forces the kernel and fails clearly where it cannot run (on CPU it runs only
under ``TRITON_INTERPRET=1``, for tests).

Under ``auto`` a kernel that cannot be compiled or launched on this GPU (a Triton compilation error,
too little shared memory for every tuned configuration) does not stop training: the error is logged
once as a warning, and that case (device, dtype, head dim, masks) runs on the torch path from then
on. The attention backward falls back the same way, by recomputing through the torch path. Under
``triton`` the error propagates.

Under ``torch.compile`` the whole step is one graph (no graph break): the kernels are the custom ops
``lmforge::flash_attn_fwd`` / ``flash_attn_bwd`` / ``linear_ce_fwd`` (opaque nodes), the torch paths
are traced, and the dispatch is decided once, while tracing, from what the graph is specialised on.
The once-only reasons are logged then, while tracing (never from inside the graph); a kernel that
fails to build at run time is answered inside its op (``auto``: the torch computation, one warning).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge import kernels
from lmforge.errors import UserError
from lmforge.kernels import check_window, sdpa

log = logging.getLogger(__name__)

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: an install does not change mid-run
_told: set[str] = set()


# Under torch.compile the dispatch below is traced by dynamo: every decision depends only on what the
# graph is specialised on (device, dtype, head dim, which masks are given, the backend), so it is taken
# once, while tracing. The two functions that touch lmforge's own state (the once-only log lines and
# the memory of kernels that failed to build) are marked as torch.compiler.assume_constant_result
# does: dynamo runs them for real while tracing and puts their result in the graph as a constant, so
# the graph holds no logging call (a graph break) and no guard on that state, and each reason is still
# logged once: when the graph is traced, or by the first eager call.


def _constant_when_traced(fn):
    """``torch.compiler.assume_constant_result(fn)``, which only sets this attribute, without importing
    torch._dynamo (and with it triton) when lmforge.ops is imported. tests/kernels/test_compile_ops.py
    fails (a graph break on logging) should a torch release stop honouring it."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_when_traced
def _tell_once(message: str) -> bool:
    """Log ``message`` (INFO) the first time it comes; under torch.compile, when the graph is traced."""
    if message not in _told:
        _told.add(message)
        log.info(message)
    return True


@_constant_when_traced
def _known_unbuildable(case: tuple) -> str:
    """Why ``case`` failed to build here before ("" when it did not): it goes to torch from then on.
    The memory is the kernels' own (lmforge.kernels.known_failure), shared with their in-op fallbacks."""
    why = kernels.known_failure(case)
    return f"the Triton kernel failed to build here ({why})" if why else ""


def _build_failed(case: tuple, op: str, err: BaseException) -> str:
    """Remember that ``case`` cannot be built here, warn once, and return the reason for later log lines."""
    why = f"the Triton kernel failed to build here ({kernels.build_failed(case, err)})"
    log.warning(f"{op}: {why}; using the torch path for {case[1:]} from now on")
    return why


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _on_cuda(t: Tensor) -> bool:
    return t.is_cuda


def triton_available() -> bool:
    return _TRITON


def check_backend(op: str, backend: str) -> None:
    """Raise a one-line error when ``backend`` cannot serve ``op`` in this installation."""
    if backend == "triton" and not triton_available():
        raise UserError(f"model config: {op}='triton' needs the triton package (Linux); use {op}: auto or torch")


def _attention_kernel_refusal(q: Tensor, dropout_p: float) -> str | None:
    """Why the Triton kernel cannot run these inputs, or None when it can."""
    if not (q.is_cuda or _interpreting()):
        return f"inputs are on {q.device.type}, not CUDA"
    if not triton_available():
        return "triton is not installed"
    if dropout_p > 0:
        return "attention dropout > 0"
    if q.size(-1) > 256:
        return f"head dim {q.size(-1)} > 256"
    return None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    key_padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
    window: int | None = None,
) -> Tensor:
    """Attention. q: (B, nh, T, hs); k, v: (B, nkv, T, hs) with nkv dividing nh.

    key_padding_mask (B, T, True = real token) and segment_ids (B, T, packed documents) restrict
    which keys a query sees; rows that can see nothing give zeros. ``window`` (Mistral's sliding
    window, None = unlimited) lets query i see only keys j with i - window < j <= i; it must be a
    positive int and needs causal=True (a window with causal=False raises ValueError). ``auto`` runs
    lmforge's Triton kernel on CUDA for fp16/bf16 and scaled_dot_product_attention otherwise
    (saying why, once).
    """
    check_backend("attention", backend)
    check_window(window, causal)
    if backend != "torch":
        refusal = _attention_kernel_refusal(q, dropout_p)
        if refusal is None and backend == "auto" and q.dtype not in KERNEL_DTYPES:
            refusal = f"dtype {q.dtype} (the kernel serves float16 and bfloat16)"
        case = ("attention", str(q.device), q.dtype, q.size(-1), causal, key_padding_mask is not None,
                segment_ids is not None, window is not None)  # fmt: skip
        if refusal is None and backend == "auto":
            refusal = _known_unbuildable(case) or None
        if refusal is None:
            from lmforge.kernels.attention import flash_attention

            kwargs = dict(causal=causal, scale=scale, key_padding_mask=key_padding_mask, segment_ids=segment_ids,
                          window=window)  # fmt: skip
            if torch.compiler.is_compiling():
                # in a compiled graph only the op sees a build error: under auto the op itself computes
                # through torch then, forward or backward
                return flash_attention(q, k, v, backward_fallback=backend == "auto", **kwargs)
            from lmforge.kernels import build_errors

            fallback = None
            if backend == "auto":  # a backward that fails to build recomputes through the torch path instead
                fallback = functools.partial(_sdpa, causal=causal, dropout_p=0.0, scale=scale,
                                             key_padding_mask=key_padding_mask, segment_ids=segment_ids,
                                             window=window)  # fmt: skip
            try:
                return flash_attention(q, k, v, backward_fallback=fallback, **kwargs)
            except build_errors() as err:
                if backend == "triton":
                    raise
                refusal = _build_failed(case, "attention", err)
        if backend == "triton":
            raise UserError(f"attention='triton' cannot run here: {refusal}; use attention: auto or torch")
        _tell_once(f"attention: using torch scaled_dot_product_attention because {refusal}")
    return _sdpa(q, k, v, causal, dropout_p, scale, key_padding_mask, segment_ids, window)


def _sdpa(q, k, v, causal, dropout_p, scale, key_padding_mask, segment_ids, window=None) -> Tensor:
    return sdpa(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, segment_ids=segment_ids,
                dropout_p=dropout_p, window=window)  # fmt: skip


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
    check_targets: bool = True,
) -> Tensor:
    """Mean (or, with reduction="sum", summed) cross-entropy of ``hidden @ weight.T`` against
    ``targets`` over non-ignored tokens.

    ``check_targets``: a target outside [0, V) other than ``ignore_index`` raises ``ValueError``
    naming it; on CUDA that reads the targets back once (a device sync), so the training tasks, which
    check each batch on the host before it moves to the GPU, turn it off.

    hidden: (N, C); weight: (V, C); targets: (N,). Returns 0 (with zero gradients) when every target
    is ignored. ``auto`` walks the tokens in chunks and never holds the (N, V) logits: with the
    Triton row kernel on CUDA, with torch ops elsewhere; ``torch`` is plain ``cross_entropy`` on the
    full logits, for comparison; ``triton`` forces the kernel.
    """
    check_backend("loss", backend)
    if backend == "torch":
        from lmforge.kernels.utils import target_scale

        # 1/count for a mean (1 for a sum), the targets checked first (also inside a compiled graph)
        scale = target_scale(targets, weight.shape[0], ignore_index, reduction, check_targets)
        logits = hidden @ weight.t()  # (N, V)
        loss_sum = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
        return loss_sum * scale.to(loss_sum.dtype)
    from lmforge.kernels.linear_cross_entropy import linear_cross_entropy as chunked

    use_triton = backend == "triton" or (_on_cuda(hidden) and triton_available())
    if use_triton and not (_on_cuda(hidden) or _interpreting()):
        raise UserError(f"loss='triton' cannot run here: inputs are on {hidden.device.type}, not CUDA; use loss: auto")
    if backend == "auto" and not use_triton:
        _tell_once(f"loss: chunked torch cross-entropy because inputs are on {hidden.device.type}, not CUDA")
    case = ("loss", str(hidden.device), hidden.dtype)
    if use_triton and backend == "auto":
        why = _known_unbuildable(case)
        if why:
            use_triton = False
            _tell_once(f"loss: chunked torch cross-entropy because {why}")
    options = dict(ignore_index=ignore_index, reduction=reduction, check_targets=check_targets)
    if use_triton and backend == "auto":
        if torch.compiler.is_compiling():
            # in a compiled graph only the op sees a build error: under auto it takes the torch rows then
            return chunked(hidden, weight, targets, use_triton=True, fallback=True, **options)
        from lmforge.kernels import build_errors

        try:
            return chunked(hidden, weight, targets, use_triton=True, **options)
        except build_errors() as err:
            _build_failed(case, "loss", err)
            use_triton = False
    return chunked(hidden, weight, targets, use_triton=use_triton, **options)


def cuda_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
