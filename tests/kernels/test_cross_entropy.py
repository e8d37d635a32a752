"""Correctness of lmforge's loss kernels against a float64 reference.

* ``lmforge.kernels.linear_cross_entropy.linear_cross_entropy``: the loss of ``hidden @ weight.T``
  walked in chunks of tokens, the full (N, V) logits never held; per-chunk rows by torch ops
  (``use_triton=False``) or by the Triton row kernel (``use_triton=True``).
* ``lmforge.kernels.cross_entropy.cross_entropy``: the same loss over given logits (Triton).
* ``lmforge.ops.linear_cross_entropy``: the model's dispatch point (``torch | auto | triton``).

The reference is written out below: full logits in float64, ``z = softcap * tanh(logits / softcap)``,
``lse = logsumexp(z)``, per counted row ``(1 - eps) * (lse - z_t) + eps * (lse - mean z) +
z_loss * lse**2``, ignored rows 0, mean over the counted rows (0 when there is none) or sum; its
gradients come from float64 autograd. It always sees the very values the kernel sees (fp16 inputs
are rounded first, then upcast), so the tolerances measure the kernels alone.

Without a GPU the Triton paths run under the Triton interpreter (``TRITON_INTERPRET=1``, set here and
in this folder's conftest before the kernel modules are imported), at small sizes: the interpreter
costs about 5 ms per row of logits. The ``gpu_*`` tests (bf16 at GPT-2 sizes, and N * V >= 2**31)
run only where CUDA is available. The chunk-size rule is checked here at both anchor shapes of
ANCHORS.md; out-of-range targets are in ``test_linear_ce_targets.py``, the padded logits buffer in
``test_linear_ce_buffer.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # must precede the import of the kernel modules (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lmforge.kernels.cross_entropy import cross_entropy  # noqa: E402
from lmforge.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lmforge import ops  # noqa: E402
from lmforge.model import GPT, GPTConfig  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16]  # bf16 is GPU-only here (the interpreter has no numpy bf16)
PATHS = [False, True]  # use_triton
requires_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

# (loss rtol, gradient rtol); each bound is relative to the largest magnitude of the reference
# (the loss itself, or the whole gradient tensor), with no absolute floor: an all-zero reference
# asks for exact zeros. fp16 logits are rounded to fp16 by the chunk product (~5e-4 relative).
TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (5e-3, 3e-2),
}


# --------------------------------------------------------------------------------------------------
# reference and helpers
# --------------------------------------------------------------------------------------------------


def reference_from_logits(
    logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None
):
    """The loss by the book, in the dtype of ``logits`` (float64 for the reference)."""
    z = logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    counted = targets != ignore_index
    z_t = z.gather(1, torch.where(counted, targets, 0)[:, None]).squeeze(1)
    eps = label_smoothing
    rows = (1 - eps) * (lse - z_t) + eps * (lse - z.mean(dim=-1)) + z_loss * lse.square()
    total = torch.where(counted, rows, torch.zeros_like(rows)).sum()
    if reduction == "mean":
        total = total / max(int(counted.sum()), 1)
    return total


def reference(hidden, weight, targets, **options):
    """Float64 loss, d_hidden and d_weight of ``hidden @ weight.T``; ``chunk_size``/``use_triton`` ignored."""
    options = {k: v for k, v in options.items() if k not in ("chunk_size", "use_triton")}
    h, w = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss = reference_from_logits(h @ w.t(), targets, **options)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), dh, dw


def reference_logits(logits, targets, **options):
    """Float64 loss and d_logits."""
    z = logits.detach().double().requires_grad_()
    loss = reference_from_logits(z, targets, **options)
    (dz,) = torch.autograd.grad(loss, z)
    return loss.detach(), dz


def run_lce(hidden, weight, targets, grad_output=None, **options):
    """linear_cross_entropy's loss, d_hidden, d_weight (upstream gradient ``grad_output``, default 1)."""
    h, w = (t.detach().requires_grad_() for t in (hidden, weight))
    loss = linear_cross_entropy(h, w, targets, **options)
    assert loss.ndim == 0, f"loss has shape {tuple(loss.shape)}, expected a scalar"
    dh, dw = torch.autograd.grad(loss, (h, w), grad_output)
    return loss.detach(), dh, dw


def run_ce(logits, targets, grad_output=None, **options):
    z = logits.detach().requires_grad_()
    loss = cross_entropy(z, targets, **options)
    assert loss.ndim == 0, f"loss has shape {tuple(loss.shape)}, expected a scalar"
    (dz,) = torch.autograd.grad(loss, z, grad_output)
    return loss.detach(), dz


def make_inputs(N, C, V, dtype, *, seed=0, logit_std=2.0, ignore_frac=0.0, ignore_index=-100, device=DEVICE):
    """hidden (N, C) ~ N(0, 1) and weight (V, C) giving logits of std ~``logit_std``, rounded to
    ``dtype``; targets (N,) uniform over the vocabulary, a fraction set to ``ignore_index``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g)
    weight = torch.randn(V, C, generator=g) * (logit_std / C**0.5)
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_frac:
        targets[torch.rand(N, generator=g) < ignore_frac] = ignore_index
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), targets.to(device)


def make_logits(N, V, dtype, *, seed=0, logit_std=2.0, ignore_frac=0.0, ignore_index=-100, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * logit_std
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_frac:
        targets[torch.rand(N, generator=g) < ignore_frac] = ignore_index
    return logits.to(dtype).to(device), targets.to(device)


def assert_close(actual, expected, rtol, what, atol=0.0):
    """max |actual - expected| <= atol + rtol * max |expected|, with no NaN/inf in ``actual``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: {(~torch.isfinite(actual)).sum().item()} non-finite values"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    bound = atol + rtol * scale
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e} ({rtol:.0e} x reference max {scale:.3e})"


def check_lce(hidden, weight, targets, what, **options):
    """Compare linear_cross_entropy with the reference: loss, d_hidden, d_weight and their dtypes."""
    dtype = hidden.dtype
    loss_rtol, grad_rtol = TOL[dtype]
    loss, dh, dw = run_lce(hidden, weight, targets, **options)
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, targets, **options)
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype, f"{what}: grad dtypes {dh.dtype}, {dw.dtype}"
    assert_close(loss, ref_loss, loss_rtol, f"{what}: loss")
    assert_close(dh, ref_dh, grad_rtol, f"{what}: d_hidden")
    assert_close(dw, ref_dw, grad_rtol, f"{what}: d_weight")


def path_id(use_triton):
    return "triton" if use_triton else "torch"


# --------------------------------------------------------------------------------------------------
# the reference itself
# --------------------------------------------------------------------------------------------------


def test_reference_matches_torch_cross_entropy():
    logits, targets = make_logits(40, 97, torch.float64, seed=1, ignore_frac=0.3, device="cpu")
    for reduction in ("mean", "sum"):
        for eps in (0.0, 0.1):
            want = F.cross_entropy(logits, targets, reduction=reduction, label_smoothing=eps)
            got = reference_from_logits(logits, targets, reduction=reduction, label_smoothing=eps)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # a custom ignore value that is a real token id
    targets = torch.where(targets == -100, 5, targets)
    torch.testing.assert_close(
        reference_from_logits(logits, targets, ignore_index=5), F.cross_entropy(logits, targets, ignore_index=5)
    )


# --------------------------------------------------------------------------------------------------
# linear_cross_entropy: shapes, chunking, options
# --------------------------------------------------------------------------------------------------

# (N, C, V, chunk_size): chunks smaller than N and not dividing it, one-row chunks, the default
SHAPES = [
    (1, 16, 97, None),
    (7, 64, 1000, 3),
    (64, 16, 1000, None),
    (64, 64, 97, 10),
    (300, 16, 97, 16),  # 19 chunks, the last of 12 rows
    (300, 64, 1000, None),
    (300, 16, 1000, 128),  # 3 chunks, the last of 44 rows
]


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_shapes(dtype, use_triton):
    for i, (N, C, V, chunk) in enumerate(SHAPES):
        hidden, weight, targets = make_inputs(N, C, V, dtype, seed=i)
        what = f"N={N} C={C} V={V} chunk_size={chunk} {path_id(use_triton)}"
        check_lce(hidden, weight, targets, what, chunk_size=chunk, use_triton=use_triton)


# name -> (make_inputs keywords, linear_cross_entropy / cross_entropy keywords)
OPTIONS = {
    "ignore": (dict(ignore_frac=0.3), dict()),
    "ignore-custom": (dict(ignore_frac=0.3, ignore_index=5), dict(ignore_index=5)),
    "sum": (dict(), dict(reduction="sum")),
    "sum+ignore": (dict(ignore_frac=0.3), dict(reduction="sum")),
    "label-smoothing": (dict(), dict(label_smoothing=0.1)),
    "z-loss": (dict(), dict(z_loss=1e-4)),
    "z-loss-large": (dict(), dict(z_loss=1e-2)),
    "softcap": (dict(logit_std=20.0), dict(softcap=30.0)),
    "all-sum": (
        dict(ignore_frac=0.3, ignore_index=5, logit_std=20.0),
        dict(ignore_index=5, reduction="sum", label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
    ),
    "all-mean": (
        dict(ignore_frac=0.3, logit_std=20.0),
        dict(reduction="mean", label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
    ),
}


def _fp16_inputs(inputs, dtype):
    # fp16 logits of std 20 carry rounding errors of ~0.01 that the sharp softmax turns into ~2%
    # gradient errors: keep the soft cap busy (|logits| up to ~30) with smaller typical logits
    if dtype == torch.float16 and inputs.get("logit_std", 0) > 10:
        return dict(inputs, logit_std=10.0)
    return inputs


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_options(dtype, use_triton):
    for i, (name, (inputs, options)) in enumerate(OPTIONS.items()):
        V = 1000 if name == "all-mean" else 97
        hidden, weight, targets = make_inputs(48, 32, V, dtype, seed=100 + i, **_fp16_inputs(inputs, dtype))
        if "ignore_frac" in inputs:
            assert (targets == options.get("ignore_index", -100)).any()
        what = f"{name} {options} V={V} {path_id(use_triton)}"
        check_lce(hidden, weight, targets, what, chunk_size=13, use_triton=use_triton, **options)


def test_options_matter_at_the_fp32_tolerance():
    """Each option moves the reference loss and gradients by far more than the fp32 tolerances, so the
    option tests above fail for a kernel that ignores it."""
    for name in ("ignore-custom", "label-smoothing", "z-loss", "softcap"):
        inputs, options = OPTIONS[name]
        hidden, weight, targets = make_inputs(48, 32, 97, torch.float32, seed=3, device="cpu", **inputs)
        base = reference(hidden, weight, targets)
        moved = reference(hidden, weight, targets, **options)
        for what, a, b, rtol in zip(("loss", "d_hidden", "d_weight"), moved, base, (1e-5, 1e-4, 1e-4)):
            change = (a - b).abs().max().item() / b.abs().max().item()
            assert change > 5 * rtol, f"{name}: {what} moves by only {change:.1e} of its scale"


# --------------------------------------------------------------------------------------------------
# every target ignored, upstream gradients, fp32 accumulation of the weight gradient
# --------------------------------------------------------------------------------------------------


def _assert_exact_zeros(loss, grads, what):
    assert not torch.isnan(loss).any(), f"{what}: loss is NaN"
    assert loss.item() == 0.0, f"{what}: loss {loss.item()} != 0"
    for name, g in grads.items():
        assert not torch.isnan(g).any(), f"{what}: {name} has NaN"
        assert (g == 0).all(), f"{what}: {name} has {(g != 0).sum().item()} non-zero entries"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_target_ignored(dtype):
    options = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    for N in (8, 0):
        hidden, weight, _ = make_inputs(N, 16, 97, dtype, seed=N)
        for ignore_index in (-100, 5):
            targets = torch.full((N,), ignore_index, dtype=torch.long, device=DEVICE)
            for reduction in ("mean", "sum"):
                for use_triton in PATHS:
                    what = f"N={N} ignore_index={ignore_index} {reduction} {path_id(use_triton)} {dtype}"
                    loss, dh, dw = run_lce(
                        hidden, weight, targets, ignore_index=ignore_index, reduction=reduction,
                        use_triton=use_triton, chunk_size=3, **options,
                    )  # fmt: skip
                    _assert_exact_zeros(loss, dict(d_hidden=dh, d_weight=dw), what)
                logits = hidden @ weight.t()
                loss, dz = run_ce(logits, targets, ignore_index=ignore_index, reduction=reduction, **options)
                _assert_exact_zeros(loss, dict(d_logits=dz), f"cross_entropy {what}")
            for backend in ("torch", "auto", "triton"):
                h, w = (t.detach().requires_grad_() for t in (hidden, weight))
                loss = ops.linear_cross_entropy(h, w, targets, ignore_index=ignore_index, backend=backend)
                dh, dw = torch.autograd.grad(loss, (h, w))
                what = f"ops.linear_cross_entropy(backend={backend!r}) N={N} ignore_index={ignore_index} {dtype}"
                _assert_exact_zeros(loss.detach(), dict(d_hidden=dh, d_weight=dw), what)


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_backward_scales_by_grad_output(use_triton):
    hidden, weight, targets = make_inputs(40, 16, 97, torch.float32, seed=4, ignore_frac=0.2)
    options = dict(chunk_size=16, use_triton=use_triton, label_smoothing=0.1, z_loss=1e-4)
    _, dh, dw = run_lce(hidden, weight, targets, **options)

    h, w = (t.detach().requires_grad_() for t in (hidden, weight))
    (linear_cross_entropy(h, w, targets, **options) * 3.0).backward()
    torch.testing.assert_close(h.grad, 3.0 * dh, rtol=1e-6, atol=0)
    torch.testing.assert_close(w.grad, 3.0 * dw, rtol=1e-6, atol=0)

    # an arbitrary (negative) upstream gradient, against the reference
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, targets, **options)
    _, dh, dw = run_lce(hidden, weight, targets, grad_output=torch.tensor(-0.37, device=DEVICE), **options)
    assert_close(dh, -0.37 * ref_dh, 1e-4, "d_hidden for grad_output=-0.37")
    assert_close(dw, -0.37 * ref_dw, 1e-4, "d_weight for grad_output=-0.37")

    # the loss inside a larger graph: 0.5 * loss + 2 * loss.detach() + loss**2
    h, w = (t.detach().requires_grad_() for t in (hidden, weight))
    loss = linear_cross_entropy(h, w, targets, **options)
    (0.5 * loss + 2.0 * loss.detach() + loss.square()).backward()
    factor = 0.5 + 2.0 * ref_loss.item()
    assert_close(h.grad, factor * ref_dh, 1e-4, "d_hidden through 0.5 * loss + loss**2")
    assert_close(w.grad, factor * ref_dw, 1e-4, "d_weight through 0.5 * loss + loss**2")

    # cross_entropy likewise
    logits, targets = make_logits(30, 97, torch.float32, seed=5, ignore_frac=0.2)
    _, ref_dz = reference_logits(logits, targets, z_loss=1e-4)
    _, dz = run_ce(logits, targets, grad_output=torch.tensor(3.0, device=DEVICE), z_loss=1e-4)
    assert_close(dz, 3.0 * ref_dz, 1e-4, "cross_entropy d_logits for grad_output=3")


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_one_input_requires_grad_and_no_grad(use_triton):
    """A frozen weight, a frozen input, and evaluation under torch.no_grad()."""
    hidden, weight, targets = make_inputs(30, 16, 97, torch.float32, seed=16, ignore_frac=0.2)
    options = dict(chunk_size=7, use_triton=use_triton, label_smoothing=0.1)
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, targets, **options)
    h = hidden.detach().requires_grad_()
    loss = linear_cross_entropy(h, weight, targets, **options)
    (dh,) = torch.autograd.grad(loss, h)
    assert_close(dh, ref_dh, 1e-4, "frozen weight: d_hidden")
    w = weight.detach().requires_grad_()
    loss = linear_cross_entropy(hidden, w, targets, **options)
    (dw,) = torch.autograd.grad(loss, w)
    assert_close(dw, ref_dw, 1e-4, "frozen hidden: d_weight")
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), targets, **options)
    assert not loss.requires_grad
    assert_close(loss, ref_loss, 1e-5, "under torch.no_grad(): loss")


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_weight_grad_accumulates_in_fp32(use_triton):
    """fp16 weight, one-row chunks, 300 chunks: every entry of d_weight is a sum of 300 same-sign terms
    (positive hidden states, every target the same token), so an fp16 running sum would lose ~1e-3 to
    8e-3 of it, while fp32 accumulation leaves only the final rounding to fp16 (<= 2**-11 = 4.9e-4)."""
    N, C, V = 300, 16, 97
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, C, generator=g).abs() + 0.5).half().to(DEVICE)
    weight = (torch.randn(V, C, generator=g) * 0.1).half().to(DEVICE)
    targets = torch.zeros(N, dtype=torch.long, device=DEVICE)
    _, _, dw = run_lce(hidden, weight, targets, reduction="sum", chunk_size=1, use_triton=use_triton)
    _, _, ref_dw = reference(hidden, weight, targets, reduction="sum")
    assert dw.dtype == torch.float16
    assert (ref_dw[0] < 0).all() and (ref_dw[1:] > 0).all()  # the premise: no cancellation
    rel = ((dw.double() - ref_dw) / ref_dw).abs()
    assert rel.max().item() <= 1e-3, (
        f"d_weight: max relative error {rel.max().item():.2e} (median {rel.median().item():.2e}) > 1e-3: "
        "not accumulated in fp32 across chunks?"
    )


def test_fp16_loss_scaling_keeps_small_gradients():
    """fp16 training multiplies the loss by a large scale (GradScaler) so that small logit gradients
    survive fp16. The fused path must be as accurate under loss scaling as the plain torch path it
    replaces: with N=2048 tokens and V=4099, softmax(z) / N is ~1e-7, below fp16's normal range,
    unless the gradient is kept unscaled (or scaled by grad_output) before it is rounded to fp16."""
    N, C, V, loss_scale = 2048, 32, 4099, 1024.0
    hidden, weight, _ = make_inputs(N, C, V, torch.float16, seed=6)
    g = torch.Generator().manual_seed(6)
    targets = torch.randint(0, V // 2, (N,), generator=g).to(DEVICE)  # tokens V//2.. are never targets
    _, ref_dh, ref_dw = reference(hidden, weight, targets)
    rare = slice(V // 2, V)

    def errors(dh, dw):
        dh, dw = dh.double() / loss_scale, dw.double() / loss_scale
        dh_err = ((dh - ref_dh).abs().max() / ref_dh.abs().max()).item()
        # each never-targeted token's weight row, relative to that row's own scale
        rows = (dw[rare] - ref_dw[rare]).abs().amax(1) / ref_dw[rare].abs().amax(1)
        return dh_err, rows.max().item()

    h, w = (t.detach().requires_grad_() for t in (hidden, weight))
    (ops.linear_cross_entropy(h, w, targets, backend="torch") * loss_scale).backward()
    torch_dh, torch_rows = errors(h.grad, w.grad)
    h, w = (t.detach().requires_grad_() for t in (hidden, weight))
    (linear_cross_entropy(h, w, targets, chunk_size=512) * loss_scale).backward()
    fused_dh, fused_rows = errors(h.grad, w.grad)
    # measured: torch path 7e-4 (d_hidden) and 2e-3 (rare rows)
    assert fused_dh <= max(2 * torch_dh, 2e-3), f"d_hidden error {fused_dh:.2e} vs torch path {torch_dh:.2e}"
    assert fused_rows <= max(2 * torch_rows, 1e-2), (
        f"d_weight rows of never-targeted tokens: error {fused_rows:.2e} of the row vs torch path {torch_rows:.2e}"
    )


# --------------------------------------------------------------------------------------------------
# memory: the (N, V) logits never exist
# --------------------------------------------------------------------------------------------------


def _saved_numels(fn):
    """Run ``fn`` (forward and backward) and return the element counts of every tensor saved for backward."""
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return numels


class _LargestOutput(TorchDispatchMode):
    """Records the largest element count of any tensor an aten op returns; with ``new_only``, only of
    tensors in new memory (not views of, or in-place results on, the op's inputs)."""

    def __init__(self, new_only=False):
        super().__init__()
        self.largest = 0
        self.where = None
        self.new_only = new_only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        known = {a.untyped_storage().data_ptr() for a in inputs} if self.new_only else set()
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                if t.untyped_storage().data_ptr() not in known:
                    self.largest, self.where = t.numel(), f"{func} -> {tuple(t.shape)}"
        return out


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_no_logits_saved_for_backward(use_triton):
    N, C, V = 128, 16, 1000
    hidden, weight, targets = make_inputs(N, C, V, torch.float32, seed=7)

    def run(fn):
        def go():
            h, w = (t.detach().requires_grad_() for t in (hidden, weight))
            fn(h, w).backward()

        return _saved_numels(go)

    # the probe sees the logits that plain cross-entropy saves...
    assert max(run(lambda h, w: ops.linear_cross_entropy(h, w, targets, backend="torch"))) >= N * V
    # ...and none in the chunked path
    saved = run(lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=32, use_triton=use_triton))
    assert saved and max(saved) < N * V, f"a tensor of {max(saved)} elements (N * V = {N * V}) saved for backward"
    assert max(saved) <= max(N * C, V * C), f"saved tensors {sorted(saved)}: more than the two gradients"


def test_default_chunk_never_builds_the_logits():
    """With the default chunk size, no op of the forward or the backward returns a tensor as large as
    the (N, V) logits (N * V = 16M fp32 elements, above the memory budget of one chunk)."""
    N, C, V = 4096, 16, 4096
    # on CPU also on a GPU machine: there the memory budget of a chunk may well exceed these logits
    hidden, weight, targets = make_inputs(N, C, V, torch.float32, seed=8, logit_std=1.0, device="cpu")
    h, w = (t.detach().requires_grad_() for t in (hidden, weight))
    with _LargestOutput() as probe:
        linear_cross_entropy(h, w, targets).backward()
    assert probe.largest < N * V, f"{probe.where}: the full logits were built"
    assert probe.largest <= N * V // 2, f"{probe.where}: a chunk of more than half the logits"
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


# The memory bars of ANCHORS.md at the two anchor shapes (bf16): twice Liger-Kernel's transient memory,
# its chunk of logits (128 and 256 tokens) and its per-token fp32 losses. ANCHORS.md writes them as
# 24 and 126 MiB, twice Liger's rounded 12 and 63 MiB; exactly they are 24.60 and 125.31 MiB. At
# GPT-2's head a 256-token chunk of bf16 logits alone is 24.54 MiB, so the exact figure is the bar.
ANCHOR_SHAPES = {"gpt2": (8192, 768, 50257), "llama3": (8192, 4096, 128256)}


def test_cuda_chunk_policy_at_the_anchors():
    """256-token chunks at GPT-2's head and 512 at Llama-3's, both dividing the 8192 tokens (no tail
    chunk); the transient memory (logits buffer with padded rows + per-token losses) within the bars."""
    from lmforge.kernels import linear_cross_entropy as lce

    expected = {"gpt2": (256, 24.59), "llama3": (512, 125.28)}  # tokens, MiB
    for name, (N, C, V) in ANCHOR_SHAPES.items():
        chunk = lce.default_chunk_size(N, C, V, on_cuda=True)
        transient = lce.transient_bytes(N, V, chunk)
        assert transient == chunk * -(-V // 64) * 64 * 2 + N * 4  # the buffer's rows padded to 64 logits
        bar = 2 * lce.liger_transient_bytes(N, C, V)
        assert bar == 2 * (lce.liger_chunk_tokens(N, C, V) * V * 2 + N * 4)
        assert (chunk, round(transient / 2**20, 2)) == expected[name], (name, chunk, transient / 2**20)
        assert N % chunk == 0, (name, chunk)
        assert transient <= bar, f"{name}: {transient / 2**20:.2f} MiB > {bar / 2**20:.2f} MiB"
    assert lce.liger_chunk_tokens(*ANCHOR_SHAPES["gpt2"]) == 128
    assert lce.liger_chunk_tokens(*ANCHOR_SHAPES["llama3"]) == 256
    assert lce.transient_bytes(8192, 128256, 512) <= 126 * 2**20  # ANCHORS.md's figure, as written


def test_cuda_chunk_policy_at_other_sizes():
    """Within the memory bar unless the 256-token floor decides; the fewest chunks the bar allows; a
    multiple of 64 tokens (or the whole batch); equal chunks whenever N / chunks is a multiple of 64."""
    from lmforge.kernels import linear_cross_entropy as lce

    # odd token counts: a shorter last chunk
    assert lce.default_chunk_size(8191, 768, 50257, on_cuda=True) == 256  # 31 x 256 + 255
    assert lce.default_chunk_size(1000, 768, 50257, on_cuda=True) == 256  # 3 x 256 + 232 (the floor)
    assert lce.default_chunk_size(8384, 768, 50257, on_cuda=True) == 256  # 8384 = 64 * 131: 32 x 256 + 192
    assert lce.default_chunk_size(24576, 768, 50257, on_cuda=True) == 1024  # 24 x 1024
    assert lce.default_chunk_size(16384, 4096, 128256, on_cuda=True) == 1024
    assert lce.default_chunk_size(100, 768, 50257, on_cuda=True) == 100  # one chunk
    for N in (1, 7, 100, 255, 256, 257, 1000, 2048, 8191, 8192, 8193, 8384, 12288, 16384, 65536):
        for C, V in ((768, 50257), (4096, 128256), (2048, 256000), (2048, 32000), (64, 1000), (4096, 512)):
            chunk = lce.default_chunk_size(N, C, V, on_cuda=True)
            what = (N, C, V, chunk)
            assert 1 <= chunk <= N, what
            assert chunk >= min(N, lce.MIN_GPU_CHUNK_TOKENS), what
            assert chunk == N or chunk % 64 == 0, what
            bar = 2 * lce.liger_transient_bytes(N, C, V)
            within = lce.transient_bytes(N, V, chunk) <= bar
            assert within or chunk == min(N, lce.MIN_GPU_CHUNK_TOKENS), what
            if chunk < N:
                # the fewest chunks: one more row of 64 tokens would not fit the bar (or the floor's size)
                cap = max(lce.MIN_GPU_CHUNK_TOKENS, (bar - N * 4) // (lce.padded_vocab(V) * 2)) // 64 * 64
                chunks = -(-N // chunk)
                assert chunks == -(-N // cap), (*what, cap)
                if N % chunks == 0 and (N // chunks) % 64 == 0:
                    assert N % chunk == 0, what
    assert lce.default_chunk_size(4096, 16, 4096, on_cuda=False) == lce.CPU_CHUNK_ELEMENTS // 4096


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_inplace_scaling_rounds_once(dtype, monkeypatch):
    """The backward scales 16-bit gradients in place by an fp32 factor (1/count of a mean times the
    upstream gradient): the product is taken in fp32 and rounded once, by slices, with no copy of the
    whole tensor (a fp32 copy of d_hidden at Llama-3's head would be 128 MiB)."""
    from lmforge.kernels import linear_cross_entropy as lce

    monkeypatch.setattr(lce, "SCALE_SLICE", 1000)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(97, 53, generator=g).to(dtype)
    factor = torch.tensor(1.0 / 3.0)
    expected = (x.float() * factor).to(dtype)
    got = x.clone()
    with _LargestOutput(new_only=True) as probe:
        lce.scale_(got, factor)
    assert torch.equal(got, expected)
    assert probe.largest <= 1000, f"{probe.where}: a temporary larger than one slice"
    if dtype == torch.float16:  # the Triton kernel; under the interpreter fp16 rounds like the GPU (bf16 does not)
        from lmforge.kernels.cross_entropy import scale_ as triton_scale_

        assert torch.equal(triton_scale_(x.clone().to(DEVICE), factor.to(DEVICE)).cpu(), expected)


def test_backward_makes_no_gradient_sized_temporary(monkeypatch):
    """bf16 products (the dtype of training): no op of the backward returns a tensor as large as either
    gradient, i.e. the gradients computed in the forward are scaled in place, not copied."""
    from lmforge.kernels import linear_cross_entropy as lce

    monkeypatch.setattr(lce, "SCALE_SLICE", 256)
    N, C, V = 64, 32, 300
    hidden, weight, targets = make_inputs(N, C, V, torch.float32, seed=22, ignore_frac=0.2, device="cpu")
    h, w = (t.detach().to(torch.bfloat16).requires_grad_() for t in (hidden, weight))
    loss = linear_cross_entropy(h, w, targets, chunk_size=16)
    with _LargestOutput(new_only=True) as probe:
        loss.backward()
    assert probe.largest < min(N * C, V * C), f"{probe.where}: a gradient-sized temporary in the backward"
    _, ref_dh, ref_dw = reference(h.detach(), w.detach(), targets)
    assert_close(h.grad, ref_dh, TOL[torch.bfloat16][1], "bf16 d_hidden after in-place scaling")
    assert_close(w.grad, ref_dw, TOL[torch.bfloat16][1], "bf16 d_weight after in-place scaling")


def test_torch_path_does_not_import_triton():
    """linear_cross_entropy(use_triton=False), and ops' auto backend on CPU, never import triton."""
    code = (
        "import sys, torch\n"
        "from lmforge.kernels.linear_cross_entropy import linear_cross_entropy\n"
        "from lmforge import ops\n"
        "h = torch.randn(10, 8, requires_grad=True); w = torch.randn(33, 8, requires_grad=True)\n"
        "t = torch.randint(0, 33, (10,))\n"
        "linear_cross_entropy(h, w, t, chunk_size=4).backward()\n"
        "ops.linear_cross_entropy(h, w, t, backend='auto').backward()\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# cross_entropy over given logits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_logits(dtype):
    loss_rtol, grad_rtol = TOL[dtype]
    cases = [
        (40, 97, "ignore"),
        (40, 97, "all-sum"),
        (24, 1000, "label-smoothing"),
        (24, 1000, "z-loss-large"),
        (24, 1000, "all-mean"),
        (9, 4099, "softcap"),
        (9, 4099, "all-sum"),
        (5, 4099, "sum"),
    ]
    for i, (N, V, name) in enumerate(cases):
        inputs, options = OPTIONS[name]
        logits, targets = make_logits(N, V, dtype, seed=200 + i, **_fp16_inputs(inputs, dtype))
        what = f"cross_entropy N={N} V={V} {name} {options} {dtype}"
        loss, dz = run_ce(logits, targets, **options)
        ref_loss, ref_dz = reference_logits(logits, targets, **options)
        assert dz.dtype == dtype, f"{what}: d_logits dtype {dz.dtype}"
        assert_close(loss, ref_loss, loss_rtol, f"{what}: loss")
        assert_close(dz, ref_dz, grad_rtol, f"{what}: d_logits")
    # torch's cross_entropy agrees where it has the same options
    logits, targets = make_logits(16, 97, dtype, seed=9, ignore_frac=0.25)
    loss, _ = run_ce(logits, targets, label_smoothing=0.1)
    want = F.cross_entropy(logits.float(), targets, label_smoothing=0.1)
    assert_close(loss, want, loss_rtol, "cross_entropy vs torch.nn.functional.cross_entropy")


def test_non_contiguous_inputs():
    """Transposed views for hidden, weight and logits, and strided targets, as any torch function takes them."""
    N, C, V = 37, 16, 97
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(C, N, generator=g).to(DEVICE).t()  # (N, C), column-major
    weight = (torch.randn(C, V, generator=g) / 2).to(DEVICE).t()  # (V, C), column-major
    targets = torch.randint(0, V, (2 * N,), generator=g).to(DEVICE)[::2]  # stride 2
    targets[::5] = -100
    assert not (hidden.is_contiguous() or weight.is_contiguous() or targets.is_contiguous())
    for use_triton in PATHS:
        check_lce(hidden, weight, targets, f"non-contiguous {path_id(use_triton)}", chunk_size=8, use_triton=use_triton)
    logits = (torch.randn(V, N, generator=g) * 2).to(DEVICE).t()
    loss, dz = run_ce(logits, targets)
    ref_loss, ref_dz = reference_logits(logits, targets)
    assert_close(loss, ref_loss, 1e-5, "cross_entropy non-contiguous: loss")
    assert_close(dz, ref_dz, 1e-4, "cross_entropy non-contiguous: d_logits")


# --------------------------------------------------------------------------------------------------
# the dispatch point and the model
# --------------------------------------------------------------------------------------------------


def test_ops_backends_match_reference():
    hidden, weight, targets = make_inputs(50, 32, 97, torch.float32, seed=11, ignore_frac=0.2, ignore_index=7)
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, targets, ignore_index=7)
    for backend in ("torch", "auto", "triton"):
        h, w = (t.detach().requires_grad_() for t in (hidden, weight))
        loss = ops.linear_cross_entropy(h, w, targets, ignore_index=7, backend=backend)
        dh, dw = torch.autograd.grad(loss, (h, w))
        assert_close(loss.detach(), ref_loss, 1e-5, f"ops backend={backend}: loss")
        assert_close(dh, ref_dh, 1e-4, f"ops backend={backend}: d_hidden")
        assert_close(dw, ref_dw, 1e-4, f"ops backend={backend}: d_weight")


def _gpt_pair(loss, **overrides):
    kwargs = dict(vocab_size=101, block_size=16, n_layer=1, n_head=2, n_embd=32, attention="torch")
    kwargs.update(overrides)
    torch.manual_seed(0)
    ref = GPT(GPTConfig(**kwargs, loss="torch")).to(DEVICE)
    model = GPT(GPTConfig(**kwargs, loss=loss)).to(DEVICE)
    model.load_state_dict(ref.state_dict())
    return ref, model


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_tied_embedding_gets_both_gradients(backend):
    """GPT with tie_embeddings: the shared weight is the lm head of the loss and the token embedding;
    model.loss with the chunked loss gives the loss and every parameter gradient of loss='torch'."""
    ref, model = _gpt_pair(backend, tie_embeddings=True)
    assert model.lm_head.weight is model.wte.weight
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (3, 16), generator=g).to(DEVICE)  # tokens 50.. appear only as targets or not at all
    targets = torch.randint(0, 101, (3, 16), generator=g)
    targets[:, :3] = -100
    targets = targets.to(DEVICE)
    losses = []
    for m in (ref, model):
        loss = m.loss(idx, targets)
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[1], losses[0], 1e-5, f"loss={backend} vs torch: loss")
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    # floor: some gradients are rounding noise (the key bias cannot change a softmax: ~1e-11)
    floor = 1e-6 * max(g.abs().max().item() for g in ref_grads.values())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert_close(p.grad, ref_grads[name], 1e-4, f"loss={backend} vs torch: grad of {name}", atol=floor)
    # the embedding rows of tokens that are never inputs are reached through the lm head alone
    grad = model.wte.weight.grad
    assert grad[50:].abs().amax(1).gt(0).all() and grad[:50].abs().amax(1).gt(0).all()


def test_training_curves_match_torch_loss():
    """20 AdamW steps (lr 1e-2) on one fixed batch from the same init: loss='auto' follows loss='torch'."""
    kwargs = dict(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 320, (4, 32), generator=g).to(DEVICE)
    targets = torch.randint(0, 320, (4, 32), generator=g).to(DEVICE)
    torch.manual_seed(0)
    init = GPT(GPTConfig(**kwargs)).state_dict()
    curves = {}
    for loss_backend in ("torch", "auto"):
        model = GPT(GPTConfig(**kwargs, attention="torch", loss=loss_backend)).to(DEVICE)
        model.load_state_dict(init)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        curve = []
        for _ in range(20):
            opt.zero_grad(set_to_none=True)
            loss = model.loss(idx, targets)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[loss_backend] = curve
    assert curves["torch"][-1] < curves["torch"][0] - 1.0, f"did not train: {curves['torch']}"
    for step, (a, b) in enumerate(zip(curves["auto"], curves["torch"])):
        assert abs(a - b) <= 1e-4, f"step {step}: loss auto {a:.6f} vs torch {b:.6f}\n{curves}"


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_autocast_bf16(use_triton):
    """Under bf16 autocast (Lightning's bf16-mixed, the default precision on GPUs) with fp32 hidden
    states and weight, the fused loss runs and matches the torch path under the same autocast."""
    hidden, weight, targets = make_inputs(64, 32, 97, torch.float32, seed=12, ignore_frac=0.1)
    results = {}
    for name in ("torch", "fused"):
        h, w = (t.detach().requires_grad_() for t in (hidden, weight))
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            if name == "torch":
                loss = ops.linear_cross_entropy(h, w, targets, backend="torch")
            else:
                loss = linear_cross_entropy(h, w, targets, chunk_size=16, use_triton=use_triton)
        dh, dw = torch.autograd.grad(loss, (h, w))
        assert dh.dtype == torch.float32 and dw.dtype == torch.float32
        results[name] = (loss.detach().float(), dh, dw)
    loss_rtol, grad_rtol = TOL[torch.bfloat16]
    rtols = (loss_rtol, grad_rtol, grad_rtol)
    for what, a, b, rtol in zip(("loss", "d_hidden", "d_weight"), results["fused"], results["torch"], rtols):
        assert_close(a, b, rtol, f"autocast bf16 {path_id(use_triton)}: {what}")


# --------------------------------------------------------------------------------------------------
# GPU suite: realistic sizes in bf16, and more than 2**31 logits
# --------------------------------------------------------------------------------------------------


def _fp32_reference_chunked(hidden, weight, targets, *, rows_chunk=2048, **options):
    """fp32 loss, d_hidden and d_weight of ``hidden @ weight.T`` computed chunk by chunk (never the full
    logits), from the (bf16) inputs upcast to fp32."""
    N = hidden.shape[0]
    w = weight.float()
    counted = int((targets != options.get("ignore_index", -100)).sum())
    denom = max(counted, 1) if options.get("reduction", "mean") == "mean" else 1
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    dh = torch.empty(N, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    dw = torch.zeros_like(w)
    for s in range(0, N, rows_chunk):
        h = hidden[s : s + rows_chunk].float()
        z = (h @ w.t()).requires_grad_()
        part = reference_from_logits(z, targets[s : s + rows_chunk], **dict(options, reduction="sum"))
        (dz,) = torch.autograd.grad(part, z)
        total += part.double()
        dz /= denom
        dh[s : s + rows_chunk] = dz @ w
        dw += dz.t() @ h
        del z, dz
    return (total / denom).float(), dh, dw


@requires_cuda
@pytest.mark.parametrize("options", ["ignore", "all-mean"])
def test_gpu_bf16_gpt2_sizes(options):
    N, C, V = 4096, 768, 50257
    inputs, opts = OPTIONS[options]
    hidden, weight, targets = make_inputs(N, C, V, torch.bfloat16, seed=13, **dict(inputs, logit_std=3.0))
    ref_loss, ref_dh, ref_dw = _fp32_reference_chunked(hidden, weight, targets, **opts)
    loss_rtol, grad_rtol = TOL[torch.bfloat16]
    for use_triton in PATHS:
        loss, dh, dw = run_lce(hidden, weight, targets, use_triton=use_triton, **opts)
        what = f"bf16 N={N} C={C} V={V} {options} {path_id(use_triton)}"
        assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
        assert_close(loss.float(), ref_loss, loss_rtol, f"{what}: loss")
        assert_close(dh, ref_dh, grad_rtol, f"{what}: d_hidden")
        assert_close(dw, ref_dw, grad_rtol, f"{what}: d_weight")
        del dh, dw
    # cross_entropy over the bf16 logits of the same inputs
    logits = hidden @ weight.t()
    loss, dz = run_ce(logits, targets, **opts)
    ref_loss, ref_dz = reference_logits(logits.float(), targets, **opts)  # float64 of the bf16 logits
    assert_close(loss.float(), ref_loss, loss_rtol, f"cross_entropy bf16 {options}: loss")
    assert_close(dz, ref_dz, grad_rtol, f"cross_entropy bf16 {options}: d_logits")


@requires_cuda
def test_gpu_bf16_ops_and_model_under_autocast():
    ref, model = _gpt_pair("auto", vocab_size=50257, block_size=256, n_layer=2, n_head=4, n_embd=256)
    g = torch.Generator().manual_seed(14)
    idx = torch.randint(0, 50257, (8, 256), generator=g).to(DEVICE)
    targets = torch.randint(0, 50257, (8, 256), generator=g).to(DEVICE)
    losses = []
    for m in (ref, model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m.loss(idx, targets)
        loss.backward()
        losses.append(loss.detach().float())
    assert_close(losses[1], losses[0], 5e-3, "model.loss auto vs torch under bf16 autocast")
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    floor = 1e-4 * max(g.abs().max().item() for g in ref_grads.values())
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_grads[name], 5e-2, f"grad of {name} under bf16 autocast", atol=floor)


@requires_cuda
def test_gpu_more_than_2_31_logits():
    """N * V = 45000 * 50257 > 2**31: row offsets must be 64-bit. Row 42730 straddles element 2**31."""
    N, C, V = 45000, 64, 50257
    assert N * V >= 2**31 and 42730 * V < 2**31 < 42731 * V
    hidden, weight, targets = make_inputs(N, C, V, torch.bfloat16, seed=15, ignore_frac=0.05, logit_std=3.0)
    ref_loss, ref_dh, ref_dw = _fp32_reference_chunked(hidden, weight, targets)
    loss_rtol, grad_rtol = TOL[torch.bfloat16]
    loss, dh, dw = run_lce(hidden, weight, targets, use_triton=True)
    assert_close(loss.float(), ref_loss, loss_rtol, "linear_cross_entropy N*V > 2**31: loss")
    assert_close(dh, ref_dh, grad_rtol, "linear_cross_entropy N*V > 2**31: d_hidden")
    assert_close(dw, ref_dw, grad_rtol, "linear_cross_entropy N*V > 2**31: d_weight")
    tail = slice(N - 4000, N)
    assert_close(dh[tail], ref_dh[tail], grad_rtol, "linear_cross_entropy N*V > 2**31: last rows of d_hidden")
    del dh, dw

    # cross_entropy over the full (N, V) bf16 logits (4.5 GB, and as much for the gradient)
    logits = hidden @ weight.t()
    loss, dz = run_ce(logits, targets)
    assert_close(loss.float(), ref_loss, loss_rtol, "cross_entropy N*V > 2**31: loss")
    counted = max(int((targets != -100).sum()), 1)
    for row in (0, 1, 42730, 42731, N - 2, N - 1):
        z = logits[row : row + 1].double().requires_grad_()
        part = reference_from_logits(z, targets[row : row + 1], reduction="sum") / counted
        (ref_row,) = torch.autograd.grad(part, z)
        assert_close(dz[row : row + 1], ref_row, grad_rtol, f"cross_entropy N*V > 2**31: d_logits row {row}")


@requires_cuda
def test_gpu_transient_memory_at_gpt2_head():
    """The memory bar of ANCHORS.md, on the card: at GPT-2's head (8192 x 768 x 50257, bf16) the step
    needs beyond its own gradients what ``transient_bytes`` computes, within twice Liger-Kernel's
    (its chunk of 128 x 50257 bf16 logits and its per-token losses), and the bf16 in-place scaling
    rounds once."""
    N, C, V = 8192, 768, 50257
    hidden, weight, targets = make_inputs(N, C, V, torch.bfloat16, seed=23)
    h, w = (t.detach().requires_grad_() for t in (hidden, weight))
    linear_cross_entropy(h, w, targets, use_triton=True).backward()  # warm-up: compiles, cuBLAS workspace
    h.grad = w.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(h, w, targets, use_triton=True).backward()
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    kept = torch.cuda.memory_allocated() - before
    assert kept <= (N + V) * C * 2 + (1 << 20), f"the step keeps {kept / 2**20:.1f} MiB beyond its gradients"
    # the logits buffer (256 x 50304 bf16) and the per-token losses, with 64 KiB for the small tensors
    from lmforge.kernels import linear_cross_entropy as lce

    computed = lce.transient_bytes(N, V, lce.default_chunk_size(N, C, V, on_cuda=True))
    assert transient <= computed + (64 << 10), f"transient {transient / 2**20:.2f} MiB > {computed / 2**20:.2f} MiB"
    bar = 2 * lce.liger_transient_bytes(N, C, V)
    assert transient <= bar, f"transient {transient / 2**20:.2f} MiB > twice Liger's {bar / 2**20:.2f} MiB"

    from lmforge.kernels.cross_entropy import scale_ as triton_scale_

    x = torch.randn(1000, 77, device="cuda").to(torch.bfloat16)
    factor = torch.tensor(1.0 / 3.0, device="cuda")
    assert torch.equal(triton_scale_(x.clone(), factor), (x.float() * factor).to(torch.bfloat16))
