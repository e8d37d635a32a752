"""Correctness of lmforge's fused attention kernel (``lmforge.kernels.attention.flash_attention``).

Every output and every gradient (dq, dk, dv, through ``torch.autograd.grad`` with a random upstream
gradient) is compared with a float64 reference written out below: an explicit softmax over the
allowed keys, GQA by ``repeat_interleave`` of a float64 copy of K/V, and zero output for a query row
that has no key to attend to. The reference always sees the very values the kernel sees (fp16 inputs
are rounded first, then upcast), so the tolerance measures the kernel alone.

Without a GPU the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set here and in
this folder's conftest before the kernel module is imported) in fp32 and fp16, at small sizes to keep
the suite to a few minutes. The ``gpu_*`` tests repeat the main checks at training sizes in fp16 and
bf16 and run only where CUDA is available.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch

if not torch.cuda.is_available():  # must precede the import of the kernel module (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lmforge.kernels  # noqa: E402
import lmforge.kernels.attention as attention_module  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402
from lmforge.kernels.attention import BUILD_ERRORS, flash_attention  # noqa: E402

from lmforge import ops  # noqa: E402
from lmforge.model import GPT, GPTConfig  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16]  # bf16 is GPU-only: the interpreter's bf16 dot is unreliable
requires_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

# (rtol relative to the largest reference magnitude, atol floor). On a GPU an fp32 tl.dot may use
# TF32, hence the looser fp32 bound there; on CPU the interpreter computes fp32 dots in fp32.
# Measured under the interpreter: fp32 errors ~5e-7 and fp16 errors ~7e-4 of the reference scale.
TOL = {
    torch.float32: (5e-3, 1e-4) if ON_GPU else (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 2e-3),
}


# --------------------------------------------------------------------------------------------------
# reference and helpers
# --------------------------------------------------------------------------------------------------


def allowed_keys(N, *, causal, key_padding_mask=None, segment_ids=None, batch=1, device="cpu"):
    """(B, N, N) bool: entry [b, i, j] is True when query i of batch row b may attend to key j."""
    allowed = torch.ones(batch, N, N, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, :]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return allowed


def reference_attention(q, k, v, *, causal=True, scale=None, key_padding_mask=None, segment_ids=None):
    """Float64 attention by the book; rows with no allowed key give 0 (and zero gradients, no NaN)."""
    B, H, N, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    allowed = allowed_keys(
        N, causal=causal, key_padding_mask=key_padding_mask, segment_ids=segment_ids, batch=B, device=q.device
    )[:, None]  # (B, 1, N, N)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, N, 1)
    scores = scores.masked_fill(~has_key, 0.0)  # an empty row would be softmax(-inf, ...) = NaN
    probs = torch.softmax(scores, dim=-1) * has_key
    return probs @ v


def make_inputs(B, H, H_kv, N, D, dtype, *, seed=0, device=DEVICE, q_scale=1.0):
    """q (B, H, N, D), k, v (B, H_kv, N, D) and an upstream gradient, rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g) * q_scale
    k = torch.randn(B, H_kv, N, D, generator=g)
    v = torch.randn(B, H_kv, N, D, generator=g)
    dout = torch.randn(B, H, N, D, generator=g)
    return tuple(t.to(dtype).to(device) for t in (q, k, v, dout))


def run_kernel(q, k, v, dout, **kwargs):
    """Kernel output and (dq, dk, dv) for upstream gradient ``dout``; strides of q, k, v are kept."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), dq, dk, dv


def run_reference(q, k, v, dout, **kwargs):
    kwargs.pop("deterministic", None)  # a kernel option: the reference is what both modes compute
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference_attention(q, k, v, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.double())
    return out.detach(), dq, dk, dv


def assert_close(actual, expected, dtype, what):
    """max |actual - expected| <= atol + rtol * max |expected|, with no NaN/inf in ``actual``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: {(~torch.isfinite(actual)).sum().item()} non-finite values"
    rtol, atol = TOL[dtype]
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    bound = atol + rtol * scale
    assert err <= bound, f"{what} ({dtype}): max abs error {err:.3e} > {bound:.3e} (reference max {scale:.3e})"


NAMES = ("out", "dq", "dk", "dv")


def check_against_reference(q, k, v, dout, dtype, **kwargs):
    """Run kernel and reference, compare all four tensors; returns the kernel's (out, dq, dk, dv)."""
    got = run_kernel(q, k, v, dout, **kwargs)
    want = run_reference(q, k, v, dout, **kwargs)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert_close(a, b, dtype, name)
    return got


def padding_mask(lengths, N, side, device=DEVICE):
    """(B, N) bool, True on the ``lengths[b]`` real tokens, on the right (side='right': tokens first,
    padding after) or on the left (side='left': padding first, as for left-padded prompts)."""
    pos = torch.arange(N)
    lengths = torch.as_tensor(lengths)[:, None]
    mask = pos[None, :] < lengths if side == "right" else pos[None, :] >= N - lengths
    return mask.to(device)


def packed_ids(doc_lengths, ids=None, device=DEVICE):
    """(N,) segment ids for documents of the given lengths packed back to back."""
    ids = range(len(doc_lengths)) if ids is None else ids
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in zip(ids, doc_lengths)]).to(device)


# --------------------------------------------------------------------------------------------------
# CPU (interpreter) suite; on a GPU machine it runs on the GPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("N", [1, 17, 64, 257])
def test_matches_reference(N, causal, dtype):
    B, H = (1, 2) if N > 64 else (2, 2)
    q, k, v, dout = make_inputs(B, H, H, N, 32, dtype, seed=N)
    check_against_reference(q, k, v, dout, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 32, 64, 128, 256])
def test_head_dims(D, dtype):
    q, k, v, dout = make_inputs(1, 2, 2, 33, D, dtype, seed=D)
    check_against_reference(q, k, v, dout, dtype, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_explicit_scale(causal, dtype):
    # scale 0.7 with D=32 gives peaked softmaxes (scores of std ~4): exercises the running max
    q, k, v, dout = make_inputs(2, 2, 2, 40, 32, dtype, seed=7)
    check_against_reference(q, k, v, dout, dtype, causal=causal, scale=0.7)
    # the default really is 1/sqrt(D)
    default = run_kernel(q, k, v, dout, causal=causal)
    explicit = run_kernel(q, k, v, dout, causal=causal, scale=1 / math.sqrt(32))
    for name, a, b in zip(NAMES, default, explicit):
        assert_close(a, b, dtype, f"default vs explicit 1/sqrt(D) scale: {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("scale", [-0.5, 0.0])
def test_non_positive_scale(scale, causal, dtype):
    # the forward scales only each row's max, which needs scale > 0: others go through q (negated or zeroed)
    q, k, v, dout = make_inputs(1, 2, 1, 33, 32, dtype, seed=8)
    check_against_reference(q, k, v, dout, dtype, causal=causal, scale=scale)


@pytest.mark.parametrize("masks", ["none", "padding"])
def test_causal_many_query_blocks(masks):
    # causal kernels run their query blocks last-first (the heaviest first): at N = 50 the interpreter's
    # 16-row tiles make 4 query blocks, the last one ragged, in the forward and in the dq kernel
    dtype, B, H, H_kv, N, D = torch.float32, 2, 2, 1, 50, 16
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, dtype, seed=50)
    mask = padding_mask([N, 37], N, "left") if masks == "padding" else None
    check_against_reference(q, k, v, dout, dtype, causal=True, key_padding_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("H_kv", [2, 1], ids=["gqa", "mqa"])
def test_grouped_query_attention(H_kv, causal, dtype):
    B, H, N, D = 2, 4, 45, 32
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, dtype, seed=H_kv)
    out, dq, dk, dv = check_against_reference(q, k, v, dout, dtype, causal=causal)
    assert dk.shape == (B, H_kv, N, D) and dv.shape == (B, H_kv, N, D)
    # dk/dv of a shared head are the sum over the query heads of its group: run the kernel as plain MHA
    # on K/V repeated per query head and sum each group's gradients
    group = H // H_kv
    k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out_rep, dq_rep, dk_rep, dv_rep = run_kernel(q, k_rep, v_rep, dout, causal=causal)
    assert_close(out, out_rep, dtype, "GQA vs MHA on repeated K/V: out")
    assert_close(dq, dq_rep, dtype, "GQA vs MHA on repeated K/V: dq")
    assert_close(dk, dk_rep.view(B, H_kv, group, N, D).sum(2), dtype, "dk = sum of the group's dk")
    assert_close(dv, dv_rep.view(B, H_kv, group, N, D).sum(2), dtype, "dv = sum of the group's dv")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_key_padding_mask(side, causal, dtype):
    B, H, N, D = 3, 2, 37, 32
    lengths = torch.randint(1, N, (B,), generator=torch.Generator().manual_seed(3)).tolist()
    lengths[0] = N  # one row without padding
    mask = padding_mask(lengths, N, side)
    q, k, v, dout = make_inputs(B, H, H, N, D, dtype, seed=11)
    out, dq, dk, dv = check_against_reference(q, k, v, dout, dtype, causal=causal, key_padding_mask=mask)
    # padding keys take no gradient at all
    pad = ~mask[:, None, :, None].expand_as(dk)
    assert (dk[pad] == 0).all() and (dv[pad] == 0).all(), "padding keys got a non-zero dk/dv"
    if side == "left" and causal:  # queries before the first real token see nothing: exact zeros
        empty = ~allowed_keys(N, causal=True, key_padding_mask=mask, batch=B, device=mask.device).any(-1)
        assert empty.any()
        empty = empty[:, None, :, None].expand_as(out)
        assert (out[empty] == 0).all() and (dq[empty] == 0).all()


DOCS = [5, 11, 1, 20]  # packed in one row of 37 tokens
DOCS_ROW2 = ([20, 17], [2, 5])  # a second row: other lengths, ids that neither start at 0 nor are consecutive


def packed_segment_ids():
    return torch.stack([packed_ids(DOCS), packed_ids(*DOCS_ROW2)])  # (2, 37)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_segment_ids_match_separate_documents(causal, dtype):
    B, H, H_kv, N, D = 2, 2, 1, sum(DOCS), 32
    seg = packed_segment_ids()
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, dtype, seed=5)
    out, dq, dk, dv = check_against_reference(q, k, v, dout, dtype, causal=causal, segment_ids=seg)

    # the same as attending within each document on its own
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    parts, total = [], 0.0
    for b, lengths in enumerate([DOCS, DOCS_ROW2[0]]):
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            o = reference_attention(*(t[b : b + 1, :, sl] for t in leaves), causal=causal)
            parts.append((b, sl, o.detach()))
            total = total + (o * dout[b : b + 1, :, sl].double()).sum()
            start += n
    for b, sl, o in parts:
        assert_close(out[b : b + 1, :, sl], o, dtype, f"out of row {b}, document {sl}")
    ref_grads = torch.autograd.grad(total, leaves)
    for name, a, e in zip(NAMES[1:], (dq, dk, dv), ref_grads):
        assert_close(a, e, dtype, f"{name} vs documents run separately")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("masks", ["segments", "padding", "both"])
def test_visited_range_with_repeated_ids_and_padding_holes(masks, causal):
    """The kernels visit only the key (or query) tiles between the first and the last position of the
    ids present and between a row's first and last real key. That must stay exact when an id recurs
    far from its first run (row 0: id 3 at 0-9 and again at 30-34), when padding has holes in the
    middle as well as at the ends, and when documents span several 16-key tiles (N = 70: 5 tiles)."""
    N = 70
    seg = torch.stack([packed_ids([10, 20, 5, 35], [3, 8, 3, 9]), packed_ids([33, 4, 33], [1, 2, 1])])
    pad = torch.ones(2, N, dtype=torch.bool, device=DEVICE)
    pad[0, :6] = False
    pad[0, 40:44] = False
    pad[1, 60:] = False
    kwargs = dict(causal=causal)
    if masks in ("segments", "both"):
        kwargs["segment_ids"] = seg
    if masks in ("padding", "both"):
        kwargs["key_padding_mask"] = pad
    q, k, v, dout = make_inputs(2, 2, 1, N, 32, torch.float32, seed=11)
    check_against_reference(q, k, v, dout, torch.float32, **kwargs)


def test_segment_extent_and_bounds():
    from lmforge.kernels.attention import _bounds, _segment_extent

    seg = torch.tensor([[5, 5, 1, 1, 1, 5, 7, 7], [0, 0, 0, 0, 2, 2, 0, 3]])
    first, last = _segment_extent(seg)
    assert first.tolist() == [[0, 0, 2, 2, 2, 0, 6, 6], [0, 0, 0, 0, 4, 4, 0, 7]]
    assert last.tolist() == [[5, 5, 4, 4, 4, 5, 7, 7], [6, 6, 6, 6, 5, 5, 6, 7]]
    kpm = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 0], [0] * 8], dtype=torch.int8)
    bounds = _bounds(kpm, seg, 2, 8, "cpu")
    assert bounds[:, 16:18].tolist() == [[1, 4], [8, -1]]  # first and last real key; none in row 1
    # the runs of equal ids holding each position, and the last real key where the real keys are contiguous
    assert bounds[:, 18:26].tolist() == [[0, 0, 2, 2, 2, 5, 6, 6], [0, 0, 0, 0, 4, 4, 6, 7]]
    assert bounds[:, 26:34].tolist() == [[1, 1, 4, 4, 4, 5, 7, 7], [3, 3, 3, 3, 5, 5, 6, 7]]
    assert bounds[:, 34].tolist() == [-1, -1]  # row 0 has a hole at 3; row 1 has no real key


def test_segment_ids_isolate_documents():
    dtype, H, N, D = torch.float32, 2, sum(DOCS), 32
    seg = packed_ids(DOCS)[None]
    q, k, v, dout = make_inputs(1, H, H, N, D, dtype, seed=6)
    starts = [sum(DOCS[:i]) for i in range(len(DOCS))]
    doc2 = slice(starts[1], starts[1] + DOCS[1])
    others = torch.ones(N, dtype=torch.bool, device=DEVICE)
    others[doc2] = False

    # perturbing document 2 leaves every other document's output bit-for-bit unchanged
    # (document 1 is before it, documents 3 and 4 after it: causality alone would not isolate those)
    base = flash_attention(q, k, v, causal=True, segment_ids=seg)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, doc2] += torch.randn(t[:, :, doc2].shape, generator=torch.Generator().manual_seed(1)).to(t)
    moved = flash_attention(q2, k2, v2, causal=True, segment_ids=seg)
    assert torch.equal(base[:, :, others], moved[:, :, others]), "another document's tokens changed the output"
    assert not torch.allclose(base[:, :, doc2], moved[:, :, doc2])

    # a loss on document 2 alone has exactly zero gradient on every other document's q, k, v
    dout2 = torch.zeros_like(dout)
    dout2[:, :, doc2] = dout[:, :, doc2]
    _, dq, dk, dv = run_kernel(q, k, v, dout2, causal=True, segment_ids=seg)
    for name, g in zip(NAMES[1:], (dq, dk, dv)):
        assert (g[:, :, others] == 0).all(), f"{name}: gradient leaked out of document 2"
        assert g[:, :, doc2].abs().max() > 0


def test_segment_id_dtypes_and_large_ids():
    """int32 and int64 ids mean the same documents; int64 ids beyond the int32 range stay distinct
    (0 and 2**32 are two documents): the kernel must either honour them or refuse with ValueError,
    never silently truncate them into one document."""
    dtype, N = torch.float32, 20
    q, k, v, dout = make_inputs(1, 2, 2, N, 16, dtype, seed=14)
    seg = packed_ids([8, 12])[None]
    check_against_reference(q, k, v, dout, dtype, causal=True, segment_ids=seg.to(torch.int32))
    big = seg * 2**32  # ids 0 and 4294967296
    try:
        got = run_kernel(q, k, v, dout, causal=True, segment_ids=big)
    except ValueError:
        return
    want = run_reference(q, k, v, dout, causal=True, segment_ids=big)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, dtype, f"segment ids 0 and 2**32: {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fully_masked_rows(causal, dtype):
    B, H, N, D = 2, 2, 40, 32
    mask = padding_mask([27, 0], N, "left")  # row 0: 13 padding tokens first; row 1: nothing at all
    assert not mask[1].any()
    q, k, v, dout = make_inputs(B, H, H, N, D, dtype, seed=9)
    out, dq, dk, dv = check_against_reference(q, k, v, dout, dtype, causal=causal, key_padding_mask=mask)
    for name, t in zip(NAMES, (out, dq, dk, dv)):
        assert not torch.isnan(t).any(), f"{name} has NaN"
    # row 1 has no key: output and every gradient exactly 0
    for name, t in zip(NAMES, (out, dq, dk, dv)):
        assert (t[1] == 0).all(), f"{name}: non-zero in the fully masked batch row"
    # row 0: the 13 padding keys take no gradient; with causal the 13 first queries see nothing
    assert (dk[0, :, :13] == 0).all() and (dv[0, :, :13] == 0).all()
    if causal:
        assert (out[0, :, :13] == 0).all() and (dq[0, :, :13] == 0).all()
        assert out[0, :, 13:].abs().amin(-1).gt(0).all()
    else:
        assert out[0].abs().amin(-1).gt(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    # the model's layout: (B, N, H, D) projections viewed as (B, H, N, D) by transpose(1, 2); the
    # upstream gradient of such a model is a transposed view as well
    B, H, H_kv, N, D = 2, 4, 2, 50, 32
    g = torch.Generator().manual_seed(12)
    q, k, v, dout = (
        torch.randn(B, N, h, D, generator=g).to(dtype).to(DEVICE).transpose(1, 2) for h in (H, H_kv, H_kv, H)
    )
    assert not any(t.is_contiguous() for t in (q, k, v, dout))
    mask = padding_mask([N, 31], N, "right")
    check_against_reference(q, k, v, dout, dtype, causal=True, key_padding_mask=mask)


def test_expanded_upstream_gradient():
    # out.sum().backward() hands the backward a stride-0 (expanded) gradient
    dtype, B, H, H_kv, N, D = torch.float32, 1, 2, 1, 21, 16
    q, k, v, _ = make_inputs(B, H, H_kv, N, D, dtype, seed=15)
    dout = torch.ones((), dtype=dtype, device=DEVICE).expand(B, H, N, D)
    check_against_reference(q, k, v, dout, dtype, causal=True)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype, deterministic):
    B, H, H_kv, N, D = 2, 4, 1, 70, 32  # MQA: every query head adds into the same dk/dv
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, dtype, seed=4)
    mask = padding_mask([N, 50], N, "right")
    kwargs = dict(causal=True, key_padding_mask=mask, deterministic=deterministic)
    first = run_kernel(q, k, v, dout, **kwargs)
    second = run_kernel(q, k, v, dout, **kwargs)
    # the fused backward sums dq with atomics (any order on a GPU); dk and dv have one owner each
    names = NAMES if deterministic or not ON_GPU else ("out", "dk", "dv")
    for name, a, b in zip(NAMES, first, second):
        if name in names:
            assert torch.equal(a, b), f"{name} differs between two identical runs"


def _bad_inputs():
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(dtype).to(DEVICE)

    ok = dict(q=t(2, 4, 16, 32), k=t(2, 2, 16, 32), v=t(2, 2, 16, 32))
    mask = torch.ones(2, 16, dtype=torch.bool, device=DEVICE)
    seg = torch.zeros(2, 16, dtype=torch.long, device=DEVICE)
    return {
        "q-3d": dict(ok, q=t(4, 16, 32)),
        "k-3d": dict(ok, k=t(2, 16, 32)),
        "head-dim-mismatch": dict(ok, k=t(2, 2, 16, 16), v=t(2, 2, 16, 16)),
        "seq-len-mismatch": dict(ok, k=t(2, 2, 15, 32), v=t(2, 2, 15, 32)),
        "batch-mismatch": dict(ok, k=t(1, 2, 16, 32), v=t(1, 2, 16, 32)),
        "k-v-mismatch": dict(ok, v=t(2, 1, 16, 32)),
        "heads-not-divisible": dict(ok, q=t(2, 3, 16, 32)),
        "more-kv-heads": dict(ok, k=t(2, 8, 16, 32), v=t(2, 8, 16, 32)),
        "mask-too-long": dict(ok, key_padding_mask=torch.ones(2, 17, dtype=torch.bool, device=DEVICE)),
        "mask-batch": dict(ok, key_padding_mask=torch.ones(3, 16, dtype=torch.bool, device=DEVICE)),
        "mask-3d": dict(ok, key_padding_mask=mask[:, None]),
        "segments-too-short": dict(ok, segment_ids=seg[:, :15]),
        "segments-batch": dict(ok, segment_ids=seg[:1]),
        "head-dim-too-large": dict(q=t(1, 1, 4, 512), k=t(1, 1, 4, 512), v=t(1, 1, 4, 512)),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_invalid_inputs_raise_value_error(case):
    kwargs = _bad_inputs()[case]
    with pytest.raises(ValueError):
        flash_attention(**kwargs)


def test_build_errors_are_triton_types():
    names = {e.__name__ for e in BUILD_ERRORS}
    assert {"CompilationError", "OutOfResources", "PTXASError", "AutotunerError"} <= names
    assert triton.runtime.errors.OutOfResources in BUILD_ERRORS


@pytest.fixture
def broken_backward(monkeypatch):
    """The Triton backward fails as on a GPU whose shared memory is too small; returns its call count."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise triton.runtime.errors.OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(attention_module, "_backward", fail)
    monkeypatch.setattr(attention_module, "_fallback_warned", False)
    monkeypatch.setattr(lmforge.kernels, "_failures", {})
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_fallback(broken_backward, caplog, dtype):
    B, H, H_kv, N, D = 2, 2, 1, 20, 16
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, dtype, seed=16)
    mask = padding_mask([N, 13], N, "left")
    kwargs = dict(causal=True, key_padding_mask=mask)
    fallback = functools.partial(reference_attention, **kwargs)  # float64 attention: the grads come back in dtype
    want = run_reference(q, k, v, dout, **kwargs)
    with caplog.at_level(logging.WARNING, logger=attention_module.__name__):
        for _ in range(2):
            got = run_kernel(q, k, v, dout, backward_fallback=fallback, **kwargs)
            for name, a, b in zip(NAMES, got, want):
                assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
                assert_close(a, b, dtype, f"{name} with the backward fallback")
    warnings = [r for r in caplog.records if r.name == attention_module.__name__ and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "OutOfResources" in message and "shared memory" in message and "\n" not in message
    assert len(broken_backward) == 1, "a backward that failed to build was tried again"


def test_backward_without_fallback_raises(broken_backward, monkeypatch):
    q, k, v, dout = make_inputs(1, 2, 2, 20, 16, torch.float32, seed=17)
    with pytest.raises(triton.runtime.errors.OutOfResources):
        run_kernel(q, k, v, dout, causal=True)

    # any other error is a bug, not "could not be built": it propagates even with a fallback
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(attention_module, "_backward", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        run_kernel(q, k, v, dout, causal=True, backward_fallback=functools.partial(reference_attention, causal=True))


OPS_CASES = ["left-padding", "segments", "segments+padding", "full-padding"]


def _ops_case(case, B, N):
    """(causal, key_padding_mask, segment_ids) for ``test_ops_attention``; B == 2, N == 29."""
    if case == "left-padding":  # causal + left padding: empty first rows; row 1 entirely padding
        return True, padding_mask([20, 0], N, "left"), None
    if case == "segments":
        return True, None, torch.stack([packed_ids([7, 1, 21]), packed_ids([10, 19], [4, 8])])
    if case == "segments+padding":  # row 0: three documents then 5 padding tokens; row 1: padding first
        seg = torch.stack([packed_ids([7, 10, 7, 5], [0, 1, 2, 3]), packed_ids([6, 9, 14], [0, 1, 2])])
        return True, torch.stack([padding_mask([24], N, "right")[0], padding_mask([23], N, "left")[0]]), seg
    if case == "full-padding":  # non-causal, right padding; row 1 entirely padding
        return False, padding_mask([17, 0], N, "right"), None
    raise AssertionError(case)


@pytest.mark.parametrize("case", OPS_CASES)
@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_ops_attention(backend, case):
    dtype, B, H, H_kv, N, D = torch.float32, 2, 4, 2, 29, 16
    causal, mask, seg = _ops_case(case, B, N)
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, dtype, seed=13)
    kwargs = dict(causal=causal, key_padding_mask=mask, segment_ids=seg)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ops.attention(*leaves, backend=backend, **kwargs)
    got = (out.detach(), *torch.autograd.grad(out, leaves, dout))
    want = run_reference(q, k, v, dout, **kwargs)
    for name, a, b in zip(NAMES, got, want):
        assert not torch.isnan(a).any(), f"{name} has NaN (backend={backend})"
        assert_close(a, b, dtype, f"ops.attention(backend={backend!r}) {name}")
    if mask is not None and not mask[1].any():
        assert (got[0][1] == 0).all(), "a batch row with no real token must give exact zeros"


def test_training_step_matches_torch_backend():
    kwargs = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos_encoding="rope")
    torch.manual_seed(0)
    ref = GPT(GPTConfig(**kwargs, attention="torch")).to(DEVICE)
    model = GPT(GPTConfig(**kwargs, attention="triton")).to(DEVICE)
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (2, 32), generator=g).to(DEVICE)
    targets = torch.randint(0, 64, (2, 32), generator=g).to(DEVICE)

    losses = []
    for m in (ref, model):
        loss = m.loss(idx, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, ref_grads[name].grad, torch.float32, f"grad of {name}")


# --------------------------------------------------------------------------------------------------
# GPU suite: training sizes, fp16 and bf16, compiled kernels (no interpreter)
# --------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16]


def _gpu_masks(N, seed):
    """Right padding in row 0, left padding in row 1, and random packed documents in both rows."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.stack([padding_mask([N - N // 5], N, "right")[0], padding_mask([N // 2], N, "left")[0]])
    rows = []
    for _ in range(2):
        cuts = torch.randperm(N - 1, generator=g)[:6].add(1).sort().values.tolist()
        bounds = [0, *cuts, N]
        rows.append(packed_ids([b - a for a, b in zip(bounds, bounds[1:])]))
    return mask, torch.stack(rows)


@requires_cuda
@pytest.mark.parametrize("masks", ["none", "padding+segments"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [1024, 2047])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_matches_reference(dtype, N, D, causal, masks):
    B, H, H_kv = 2, 8, 2
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, dtype, seed=N + D)
    kwargs = dict(causal=causal)
    if masks != "none":
        kwargs["key_padding_mask"], kwargs["segment_ids"] = _gpu_masks(N, seed=D)
    check_against_reference(q, k, v, dout, dtype, **kwargs)


@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_fully_masked_rows_and_determinism(dtype):
    B, H, H_kv, N, D = 2, 8, 2, 1024, 64
    mask = padding_mask([700, 0], N, "left")
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, dtype, seed=2)
    kwargs = dict(causal=True, key_padding_mask=mask, deterministic=True)
    first = check_against_reference(q, k, v, dout, dtype, **kwargs)
    out, dq, dk, dv = first
    for name, t in zip(NAMES, first):
        assert not torch.isnan(t).any(), f"{name} has NaN"
        assert (t[1] == 0).all(), f"{name}: non-zero in the fully masked batch row"
    assert (out[0, :, : N - 700] == 0).all() and (dk[0, :, : N - 700] == 0).all() and (dv[0, :, : N - 700] == 0).all()
    second = run_kernel(q, k, v, dout, **kwargs)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_non_contiguous_and_ops_dispatch(dtype):
    B, H, H_kv, N, D = 2, 8, 2, 1024, 128
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (
        torch.randn(B, N, h, D, generator=g).to(dtype).to(DEVICE).transpose(1, 2) for h in (H, H_kv, H_kv, H)
    )
    mask, seg = _gpu_masks(N, seed=3)
    check_against_reference(q, k, v, dout, dtype, causal=True, key_padding_mask=mask, segment_ids=seg)
    want = run_reference(q, k, v, dout, causal=True, key_padding_mask=mask, segment_ids=seg)
    for backend in ("auto", "triton", "torch"):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = ops.attention(*leaves, causal=True, key_padding_mask=mask, segment_ids=seg, backend=backend)
        got = (out.detach(), *torch.autograd.grad(out, leaves, dout))
        for name, a, b in zip(NAMES, got, want):
            assert_close(a, b, dtype, f"ops.attention(backend={backend!r}) {name}")


@requires_cuda
@pytest.mark.parametrize("masks", ["none", "padding+segments"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_every_listed_tile(D, masks):
    """Every tile listed for the head dim, forced through use_tiles (the autotuner only runs its pick)."""
    dtype, B, H, H_kv, N = torch.bfloat16, 2, 4, 2, 1000
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, dtype, seed=D)
    kwargs = dict(causal=True)
    if masks != "none":
        kwargs["key_padding_mask"], kwargs["segment_ids"] = _gpu_masks(N, seed=D)
    want = run_reference(q, k, v, dout, **kwargs)
    for kernel, tiles in attention_module.tile_lists(D).items():
        deterministic = kernel in ("dkdv", "dq")
        for tile in tiles:
            with attention_module.use_tiles(**{kernel: tile}):
                got = run_kernel(q, k, v, dout, deterministic=deterministic, **kwargs)
            for name, a, b in zip(NAMES, got, want):
                assert_close(a, b, dtype, f"{kernel} tile {tile}: {name}")


def test_autotuning_is_keyed_on_length_buckets():
    """Fine-tuning batches are padded to their longest example, so the length changes from batch to
    batch: the tuned tiles are keyed on its power-of-two bucket, not on the length itself, or every
    new length would time every tile shape again."""
    import lmforge.kernels.attention as attention

    for kernel in (attention._attn_fwd, attention._attn_bwd, attention._attn_bwd_dkdv, attention._attn_bwd_dq):
        assert "N_TUNE" in kernel.keys and "N" not in kernel.keys, kernel.keys
    assert attention._tuning_length(700) == attention._tuning_length(1000) == 1024
    assert attention._tuning_length(1) == attention._tuning_length(64) == 64
    assert attention._tuning_length(1025) == 2048


def test_masks_are_derived_once_per_batch():
    """Every layer passes the same mask tensors: their conversions and bounds are reused, and made
    again when a tensor is new or changed in place (or has no version counter, in inference mode)."""
    import lmforge.kernels.attention as attention

    q = torch.zeros(2, 1, 8, 16, device=DEVICE)
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]] * 2, device=DEVICE)
    first = attention._masks(q, None, seg)
    assert attention._masks(q, None, seg) is first
    seg[1, 0] = 5  # in place: the bounds must follow
    changed = attention._masks(q, None, seg)
    assert changed is not first and changed[2][1, 0].item() == 0 and changed[2][1, 1].item() == 1
    assert attention._masks(q, None, seg.clone()) is not changed
    with torch.inference_mode():
        frozen = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2, device=DEVICE)
    derived = attention._masks(q, None, frozen)
    assert derived[2][0, 3].item() == 3 and attention._masks(q, None, frozen) is not derived
