"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T`` without ever holding the logits.

At vocabularies of 50k-256k the logits of a batch are the largest tensor in training (8192 tokens x
128256 in fp32 is 4 GB, and as much again for their gradient). This walks the tokens in chunks:
for each chunk it computes the chunk's logits with one matrix product, turns them in place into
the chunk's loss and logit gradient (the Triton row kernel of :mod:`lmforge.kernels.cross_entropy`
on GPU, or torch ops), and folds that gradient straight into the gradients of the hidden states
(one product) and of the weight (one product per chunk, accumulated across chunks in fp32, or for
bf16 products in bf16 by the matmul itself, so no fp32 copy of the weight's size is ever made).
The backward just scales the stored gradients. A tied embedding weight works like any other weight.

Every chunk's logits go into one buffer allocated once per call, (chunk, ``padded_vocab(V)``):
the product writes its ``[:, :V]`` view in place, so each row starts on a 128-byte boundary
(V = 50257 is odd) for the row kernel and for the two gradient products that read it (cuBLAS
takes the row stride as its leading dimension, no copy). The tail chunk uses the first rows of the
same buffer; traced by ``torch.compile`` (the torch rows) each chunk is a plain product instead.

Targets outside [0, V) other than ``ignore_index`` raise a ``ValueError`` naming the first one
(``check_targets=True``, the default): one reduction over the targets and one read back to the
host per call (a device sync on CUDA), skipped while a CUDA graph is being captured. Traced, it is
the custom op ``lmforge::ce_target_scale`` (which also gives the mean's scale, so no pass drops
it), run eagerly when the graph runs: no graph break. Whether checked or not, both row
implementations clamp the index they read and give such a row a NaN loss and NaN gradients,
never an out-of-bounds read.

This module needs only torch; it imports triton when ``use_triton=True``. The Triton path runs as the
custom op ``lmforge::linear_ce_fwd`` (with a fake implementation and an autograd formula), so
``torch.compile`` keeps it in its graph as one node; the torch path is plain torch and is traced.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from . import custom_op
from .utils import target_scale

log = logging.getLogger(__name__)

# CPU: elements of one chunk of logits, 4M (16 MiB in fp32).
CPU_CHUNK_ELEMENTS = 1 << 22
# CUDA: the fewest tokens per chunk. Each chunk re-reads W in two products and reads and writes the
# (V, C) weight gradient it accumulates into, about 4*V*C*2 bytes of traffic for 6*n*V*C FLOPs:
# 0.75*n FLOP per byte, whatever V and C. Below about 256 tokens a chunk is bound by memory on an
# H100/H200 (~200-300 FLOP/B).
MIN_GPU_CHUNK_TOKENS = 256
# Row stride of the logits buffer, in elements: a multiple of 64 is 128 bytes in bf16/fp16.
LOGITS_ROW_ALIGN = 64
# In-place scaling of a 16-bit gradient on CPU (or CUDA without triton) goes by slices of this many elements.
SCALE_SLICE = 1 << 22


def torch_rows(
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
    """The torch twin of ``ce_rows_``: (per-row fp32 losses, scale * d(loss)/d(logits) in fp32); the
    losses are also written to ``loss_out`` when given.

    Built on the fused ``log_softmax``, with the gradient formed in place in its output, so it
    touches each logit about as often as ``cross_entropy``'s forward and backward do. A row whose
    target is outside [0, V) and not ``ignore_index`` reads index 0 instead and gets NaN.
    """
    V = logits.shape[1]
    x = logits.float()
    if softcap is not None:
        cap_tanh = torch.tanh(x / softcap)
        x = softcap * cap_tanh
    counted = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    safe = torch.where(counted & in_range, targets, 0)  # the index read: never outside the row
    grad = torch.log_softmax(x, dim=-1)  # log p, soon the gradient
    logp_t = grad.gather(1, safe[:, None]).squeeze(1)
    loss = -(1.0 - label_smoothing) * logp_t
    if label_smoothing:
        loss = loss - label_smoothing * grad.mean(dim=-1)
    # (n,): 0 for ignored rows, NaN for a target out of range (its loss and gradient row are NaN)
    factor = torch.where(counted & ~in_range, float("nan"), counted.to(grad.dtype) * scale)
    if z_loss:
        lse = x.gather(1, safe[:, None]).squeeze(1) - logp_t
        loss = loss + z_loss * lse.square()
        grad.exp_().mul_((factor * (1.0 + 2.0 * z_loss * lse))[:, None])
    else:
        grad.exp_().mul_(factor[:, None])
    if label_smoothing:
        grad.sub_((factor * (label_smoothing / V))[:, None])
    grad.scatter_add_(1, safe[:, None], (-(1.0 - label_smoothing) * factor)[:, None])
    if softcap is not None:
        grad.mul_(1.0 - cap_tanh.square())
    loss = torch.where(counted, torch.where(in_range, loss, float("nan")), 0.0)
    if loss_out is not None:
        loss_out.copy_(loss)
    return loss, grad


def padded_vocab(vocab_size: int) -> int:
    """The row stride of the chunk's logits buffer: ``vocab_size`` rounded up to ``LOGITS_ROW_ALIGN``."""
    return -(-vocab_size // LOGITS_ROW_ALIGN) * LOGITS_ROW_ALIGN


def liger_chunk_tokens(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Liger-Kernel's chunk: ``N / ceil(V / C)`` tokens rounded up to a power of two (128 at GPT-2's
    head, 256 at Llama-3's, for 8192 tokens): its logits take about as much memory as the hidden states."""
    per_hidden = -(-vocab_size // hidden_size)  # logits per row over hidden values per row, rounded up
    return 1 << max(0, (-(-num_tokens // per_hidden) - 1).bit_length())


def transient_bytes(num_tokens: int, vocab_size: int, chunk: int, itemsize: int = 2) -> int:
    """Memory one call holds beyond its inputs and the two gradients it returns: the logits buffer
    (``min(chunk, N)`` rows of ``padded_vocab(V)``) and the per-token fp32 losses."""
    return min(chunk, num_tokens) * padded_vocab(vocab_size) * itemsize + num_tokens * 4


def liger_transient_bytes(num_tokens: int, hidden_size: int, vocab_size: int, itemsize: int = 2) -> int:
    """The same for Liger-Kernel: its chunk of logits (``liger_chunk_tokens`` rows of V) and its
    per-token fp32 losses."""
    return liger_chunk_tokens(num_tokens, hidden_size, vocab_size) * vocab_size * itemsize + num_tokens * 4


def default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int, on_cuda: bool) -> int:
    """Tokens per chunk.

    CUDA: the fewest chunks whose :func:`transient_bytes` (bf16) stay within twice Liger-Kernel's
    (:func:`liger_transient_bytes`), but chunks of at least ``MIN_GPU_CHUNK_TOKENS`` tokens, below
    which the products go memory-bound. With k chunks: ``N / k`` tokens when that is a multiple of 64
    (no tail chunk), else ``N / k`` rounded up to a multiple of 128 when that fits, or of 64 (a
    shorter last chunk); one chunk of N when N fits. At GPT-2's head (8192 x 768 x 50257) that is
    32 chunks of 256 tokens, 24.6 MiB (Liger: 128 tokens, 12.3 MiB); at Llama-3's
    (8192 x 4096 x 128256) 16 chunks of 512, 125.3 MiB (Liger: 256, 62.7 MiB).
    CPU: a fixed budget of ``CPU_CHUNK_ELEMENTS`` logits.
    """
    if not on_cuda:
        return max(1, min(num_tokens, CPU_CHUNK_ELEMENTS // vocab_size))
    N = num_tokens
    budget = 2 * liger_transient_bytes(N, hidden_size, vocab_size)
    row_bytes = padded_vocab(vocab_size) * 2
    cap = max(MIN_GPU_CHUNK_TOKENS, (budget - N * 4) // row_bytes)  # the most tokens a chunk may take
    if N <= cap:
        return max(1, N)
    cap = cap // 64 * 64
    chunks = -(-N // cap)
    if N % chunks == 0 and (N // chunks) % 64 == 0:
        return N // chunks
    even = -(-N // chunks)
    wide = -(-even // 128) * 128
    return wide if wide <= cap else -(-even // 64) * 64


def scale_(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``t *= factor`` in place, the product taken in fp32 and rounded once, with no temporary of t's size.

    ``t.mul_(factor)`` on a 16-bit CUDA tensor would first round the fp32 ``factor`` (1/count of a
    mean, times the upstream gradient) to t's dtype: a bias of up to 0.4% in bf16 on every entry.
    """
    if t.dtype == torch.float32:
        return t.mul_(factor)
    if t.is_cuda and importlib.util.find_spec("triton") is not None:
        from .cross_entropy import scale_ as triton_scale_

        return triton_scale_(t, factor)
    flat = t.view(-1)
    for part in flat.split(SCALE_SLICE):
        part.copy_(part.float().mul_(factor))
    return t


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the products: under autocast (bf16-mixed training) the autocast dtype, as F.linear's."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _chunked(hidden, weight, targets, rows, *, dtype, chunk, want_hidden, want_weight, **options):
    """(per-row fp32 losses (N,), unscaled d(loss sum)/d(hidden) in ``dtype`` or None, and
    d/d(weight) or None): chunk by chunk, ``rows`` (``torch_rows`` or the Triton ``ce_rows_``)
    turning each chunk's logits into its losses and logit gradient."""
    N, V = hidden.shape[0], weight.shape[0]
    device = hidden.device.type
    unit = torch.ones((), device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=dtype) if want_hidden else None
    # The weight gradient accumulates across chunks in bf16 when the products run in bf16: each
    # chunk's addmm sums in fp32 inside the matmul and rounds once into the accumulator, and no
    # (V, C) fp32 buffer or temporary is ever allocated (at Llama-3's head that is 2 GiB each).
    # fp16 accumulates in fp32 (its sums over many tokens could overflow), fp32 in fp32.
    acc_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=acc_dtype) if want_weight else None
    losses = torch.empty(N, device=hidden.device, dtype=torch.float32)  # summed once, after the chunks
    # The one logits buffer: rows padded to 128 bytes, the products write and read its [:, :V] view.
    # A traced graph (the torch rows under torch.compile) takes plain products: dynamo does not
    # trace out= into a non-contiguous view, and the compiler plans its own buffers.
    buffer = None
    if N and not torch.compiler.is_compiling():
        buffer = torch.empty(min(chunk, N), padded_vocab(V), device=hidden.device, dtype=dtype)
    with torch.autocast(device, enabled=False):  # dtypes are chosen here, explicitly
        hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
        for start in range(0, N, chunk):
            h = hidden_c[start : start + chunk]
            if buffer is None:
                logits = h @ weight_c.t()
            else:
                logits = torch.matmul(h, weight_c.t(), out=buffer[: h.shape[0], :V])  # (n, V), in place
            _, grad = rows(logits, targets[start : start + chunk], unit, loss_out=losses[start : start + chunk],
                           **options)  # fmt: skip
            del logits  # grad is d(loss)/d(logits), unscaled: the buffer's view for the Triton rows
            grad = grad.to(dtype)
            if grad_hidden is not None:
                torch.matmul(grad, weight_c, out=grad_hidden[start : start + chunk])
            if grad_weight is not None and grad.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad.t(), h)
            elif grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
            del grad
    return losses, grad_hidden, grad_weight


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """The torch-rows path: plain torch, so ``torch.compile`` traces it like any other code."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ignore_index, label_smoothing, z_loss, softcap, chunk):
        losses, grad_hidden, grad_weight = _chunked(
            hidden, weight, targets, torch_rows, dtype=_compute_dtype(hidden), chunk=chunk,
            want_hidden=ctx.needs_input_grad[0], want_weight=ctx.needs_input_grad[1],
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        )  # fmt: skip
        # the 1/count of a mean is applied in the backward, in fp32 with grad_output, so fp16 gradients
        # keep their precision under loss scaling
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        grad_hidden, grad_weight = _scaled(grad_hidden, grad_weight, scale * grad_output.float(), ctx)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _scaled(grad_hidden, grad_weight, factor, ctx):
    """The saved gradients times ``factor``, in the dtypes of hidden and weight. In eager mode both are
    scaled in place (a second backward through the graph would find the saved tensors modified and
    raise, never compute twice): no temporary of their size is made. Traced (torch.compile, or any
    tracer's tensor subclass), out of place, as a graph does not mutate what it saved: one fp32
    multiply and cast each, which the compiler fuses into one pass."""
    grads = [g for g in (grad_hidden, grad_weight) if g is not None]
    if torch.compiler.is_compiling() or any(type(g) is not torch.Tensor for g in grads):
        return tuple(
            None if g is None else (g.float() * factor).to(dtype)
            for g, dtype in ((grad_hidden, ctx.hidden_dtype), (grad_weight, ctx.weight_dtype))
        )
    if grad_hidden is not None:
        grad_hidden = scale_(grad_hidden, factor).to(ctx.hidden_dtype)
    if grad_weight is not None:
        grad_weight = scale_(grad_weight, factor).to(ctx.weight_dtype)
    return grad_hidden, grad_weight


# The Triton-rows path, as a custom op: torch.compile keeps it in the graph as one opaque node.
_LINEAR_CE_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor targets, int ignore_index, float label_smoothing, float z_loss, "
    "float? softcap, int chunk_size, ScalarType dtype, bool grad_hidden, bool grad_weight, bool fallback) "
    "-> (Tensor, Tensor, Tensor)"
)


@custom_op("linear_ce_fwd", _LINEAR_CE_SCHEMA)
def linear_ce_fwd(
    hidden, weight, targets, ignore_index, label_smoothing, z_loss, softcap, chunk_size, dtype, grad_hidden,
    grad_weight, fallback,
):  # fmt: skip
    """(fp32 sum of the per-token losses, d(sum)/d(hidden) in ``dtype``, d(sum)/d(weight) in fp32, or
    bf16 for bf16 products), each gradient an empty (0,) tensor when its flag is False; products in
    ``dtype``; chunk_size 0: the default for these sizes. With ``fallback`` a row kernel that cannot
    be built here (one of ``build_errors()``) gives way to the torch rows, with a warning once per case."""
    from . import build_errors, build_failed, known_failure
    from .cross_entropy import ce_rows_

    case = ("ce_rows", str(hidden.device), dtype)
    chunk = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.is_cuda)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)

    def run(rows):
        losses, dh, dw = _chunked(hidden, weight, targets, rows, dtype=dtype, chunk=chunk, want_hidden=grad_hidden,
                                  want_weight=grad_weight, **options)  # fmt: skip
        # (outputs of an op may not share memory: two distinct empties)
        return losses.sum(), hidden.new_empty(0) if dh is None else dh, hidden.new_empty(0) if dw is None else dw

    if fallback and known_failure(case):
        return run(torch_rows)
    try:
        return run(ce_rows_)
    except build_errors() as error:
        if not fallback:
            raise
        why = build_failed(case, error)
        log.warning(
            "linear_cross_entropy: the Triton row kernel could not be built or launched (%s); using the "
            "torch rows for %s from now on", why, case[1:],
        )  # fmt: skip
    return run(torch_rows)


@linear_ce_fwd.register_fake
def _(hidden, weight, targets, ignore_index, label_smoothing, z_loss, softcap, chunk_size, dtype, grad_hidden,
      grad_weight, fallback):  # fmt: skip
    acc_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    dh = hidden.new_empty(hidden.shape, dtype=dtype) if grad_hidden else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=acc_dtype) if grad_weight else hidden.new_empty(0)
    return hidden.new_empty((), dtype=torch.float32), dh, dw


def _linear_ce_setup(ctx, inputs, output):
    hidden, weight, *_, grad_hidden, grad_weight, _fallback = inputs
    _, dh, dw = output
    ctx.save_for_backward(dh if grad_hidden else None, dw if grad_weight else None)
    ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
    ctx.mark_non_differentiable(dh, dw)


def _linear_ce_backward(ctx, grad_sum, _dh, _dw):
    grad_hidden, grad_weight = _scaled(*ctx.saved_tensors, grad_sum.float(), ctx)
    return grad_hidden, grad_weight, *([None] * 10)


linear_ce_fwd.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    use_triton: bool = False,
    fallback: bool = False,
    check_targets: bool = True,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` (N, V) against ``targets`` (N,), logits never materialised.

    hidden: (N, C); weight: (V, C). Mean over non-ignored tokens (0, with zero gradients, when every
    target is ignored) or sum; torch's label smoothing; optional z-loss (``z_loss * logsumexp**2``)
    and logit soft-capping (``softcap * tanh(logits / softcap)``). ``use_triton`` computes each
    chunk's softmax, loss and gradient with the Triton row kernel (CUDA, or CPU under
    ``TRITON_INTERPRET=1``), inside the custom op ``lmforge::linear_ce_fwd``; otherwise with torch
    ops, which never hold more than one chunk either. ``fallback`` (with ``use_triton``): when the
    row kernel cannot be built here, the torch rows serve instead (a warning once per case) rather
    than the error propagating. Both paths compile with ``torch.compile`` without a graph break.
    ``check_targets``: raise ``ValueError`` for a target outside [0, V) other than ``ignore_index``
    (one device sync per call on CUDA); turned off, such a token's loss is NaN.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be (N, C) and weight {tuple(weight.shape)} (V, C)"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} must be (N,) = ({hidden.shape[0]},)")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"linear_cross_entropy: softcap={softcap} must be positive")
    # a tensor (no host sync for the count), and the check of the targets
    scale = target_scale(targets, weight.shape[0], ignore_index, reduction, check_targets)
    if not use_triton:
        chunk = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.is_cuda)
        return _LinearCrossEntropyFunction.apply(
            hidden, weight, targets, scale, ignore_index, label_smoothing, z_loss, softcap, chunk
        )
    grad = torch.is_grad_enabled()
    loss_sum, _, _ = linear_ce_fwd(
        hidden, weight, targets, ignore_index, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), chunk_size or 0, _compute_dtype(hidden),
        grad and hidden.requires_grad, grad and weight.requires_grad, fallback,
    )  # fmt: skip
    return loss_sum * scale
