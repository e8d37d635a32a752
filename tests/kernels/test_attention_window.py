"""Sliding-window attention (Mistral): the Triton kernel, ``lmforge.ops.attention`` and ``sdpa``.

With window W, query i attends key j when i - W < j <= i (transformers' ``sliding_window_overlay``
on a causal mask). The kernel applies the window mask on the tiles that cross a window's edge and
never visits key tiles that lie wholly before every window of a query block (forward, dQ) nor, for
a key block, query tiles wholly after its keys' windows (dK/dV, fused and deterministic backward).
Everything is checked against float64 attention with the window in its mask, at odd lengths (47,
100: ragged last tiles) and windows of 1, below the tile, at the tile, and >= N (plain causal); the
skipping is shown by NaN keys or queries in tiles that must never be read.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():  # must precede the import of the kernel module (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lmforge.kernels import attention as attention_module  # noqa: E402
from lmforge.kernels import sdpa  # noqa: E402
from lmforge.kernels.attention import flash_attention, use_tiles  # noqa: E402

from lmforge import ops  # noqa: E402
from tests.kernels.test_attention import (  # noqa: E402
    DEVICE,
    NAMES,
    allowed_keys,
    assert_close,
    make_inputs,
    packed_ids,
    padding_mask,
    run_kernel,
)

TILE_16 = (16, 16, 4, 1)  # the interpreter's tile, forced so that the skipping test knows the tile edges
# (fwd, bwd, dkdv, dq) tiles with BLOCK_M != BLOCK_N, both ways round
UNEQUAL_TILES = {
    "fwd32x16-bwd16x32": dict(fwd=(32, 16, 4, 1), bwd=(16, 32, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1)),
    "fwd16x32-bwd32x16": dict(fwd=(16, 32, 4, 1), bwd=(32, 16, 4, 1), dkdv=(32, 16, 4, 1), dq=(16, 32, 4, 1)),
}


def window_allowed(N, window, *, key_padding_mask=None, segment_ids=None, batch=1, device="cpu"):
    """(B, N, N) bool: causal, inside the window (i - j < window), and the other masks."""
    allowed = allowed_keys(
        N, causal=True, key_padding_mask=key_padding_mask, segment_ids=segment_ids, batch=batch, device=device
    )
    i = torch.arange(N, device=device)
    return allowed & (i[:, None] - i[None, :] < window)


def window_reference(q, k, v, window, *, key_padding_mask=None, segment_ids=None):
    """Float64 sliding-window attention by the book; rows with no allowed key give 0."""
    B, H, N, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, N, D)
    allowed = window_allowed(N, window, key_padding_mask=key_padding_mask, segment_ids=segment_ids, batch=B,
                             device=q.device)[:, None]  # (B, 1, N, N)  # fmt: skip
    scores = ((q @ k.transpose(-1, -2)) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, N, 1)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    return probs @ v


def reference_grads(q, k, v, dout, window, **masks):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = window_reference(*leaves, window, **masks)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.double()))


def check(q, k, v, dout, dtype, window, **kwargs):
    """Kernel (out, dq, dk, dv) with ``window`` against the float64 reference; returns the kernel's."""
    masks = {name: kwargs[name] for name in ("key_padding_mask", "segment_ids") if name in kwargs}
    got = run_kernel(q, k, v, dout, window=window, **kwargs)
    for name, a, b in zip(NAMES, got, reference_grads(q, k, v, dout, window, **masks)):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_close(a, b, dtype, f"{name} window={window}")
    return got


# (N, window, dtype, deterministic): windows of one key, below the 16-row tile, of one tile and
# across ragged ends; each fp32 case with both backwards, fp16 with the fused one
REFERENCE_CASES = [
    (N, window, torch.float32, deterministic)
    for N, window in [(47, 1), (47, 5), (47, 16), (100, 5), (100, 16)]
    for deterministic in (False, True)
] + [(47, 5, torch.float16, False), (100, 16, torch.float16, False)]


@pytest.mark.parametrize(
    "N, window, dtype, deterministic", REFERENCE_CASES, ids=lambda x: str(x).removeprefix("torch.")
)
def test_matches_reference(N, window, dtype, deterministic):
    """Two query heads on one key/value head (GQA), on the interpreter's 16x16 tiles."""
    q, k, v, dout = make_inputs(2, 2, 1, N, 16, dtype, seed=N + window)
    check(q, k, v, dout, dtype, window, deterministic=deterministic)


@pytest.mark.parametrize("window", [47, 1000])
def test_window_of_n_or_more_is_plain_causal(window):
    """A window of N or more keeps every causal pair: the reference's numbers, and exactly those of no
    window at all."""
    q, k, v, dout = make_inputs(1, 2, 1, 47, 16, torch.float32, seed=3)
    with_window = check(q, k, v, dout, torch.float32, window, deterministic=True)
    plain = run_kernel(q, k, v, dout, deterministic=True)
    for name, a, b in zip(NAMES, with_window, plain):
        assert torch.equal(a, b), f"{name}: window={window} differs from plain causal attention"


@pytest.mark.parametrize(
    "window, tiles, deterministic",
    [(5, "fwd32x16-bwd16x32", False), (5, "fwd16x32-bwd32x16", True), (40, "fwd32x16-bwd16x32", True),
     (40, "fwd16x32-bwd32x16", False)],
)  # fmt: skip
def test_unequal_tiles(window, tiles, deterministic):
    """Window edges against query and key tiles of different sizes (the interior range's bounds)."""
    q, k, v, dout = make_inputs(1, 2, 1, 100, 16, torch.float32, seed=window)
    with use_tiles(**UNEQUAL_TILES[tiles]):
        check(q, k, v, dout, torch.float32, window, deterministic=deterministic)


def _masks(case, N):
    """(key_padding_mask, segment_ids) for two batch rows of length N."""
    if case == "right-padding":
        return padding_mask([N, N - 30], N, "right"), None
    if case == "left-padding":  # left padding longer than the window: the first rows see no key
        return padding_mask([N - 21, N - 2], N, "left"), None
    if case == "padding-holes":
        pad = torch.ones(2, N, dtype=torch.bool)
        pad[0, 20:26] = False
        pad[1, 40:60] = False
        return pad.to(DEVICE), None
    seg = torch.stack([packed_ids([30, 3, 40, N - 73]), packed_ids([16, N - 16])])
    if case == "segments":
        return None, seg
    return padding_mask([N - 9, N - 40], N, "right"), seg  # segments+padding


MASK_CASES = ["right-padding", "left-padding", "padding-holes", "segments", "segments+padding"]


# (window, tiles, deterministic): a window below the tile on 16x16 tiles, fused; one of two and a half
# tiles on unequal tiles, deterministic
WINDOW_TILES = [(5, None, False), (37, "fwd32x16-bwd16x32", True)]


@pytest.mark.parametrize("window, tiles, deterministic", WINDOW_TILES, ids=["w5-fused", "w37-deterministic"])
@pytest.mark.parametrize("case", MASK_CASES)
def test_with_padding_and_segments(case, window, tiles, deterministic):
    kpm, seg = _masks(case, 100)
    q, k, v, dout = make_inputs(2, 1, 1, 100, 16, torch.float32, seed=7)
    with use_tiles(**(UNEQUAL_TILES[tiles] if tiles else {})):
        check(q, k, v, dout, torch.float32, window, key_padding_mask=kpm, segment_ids=seg,
              deterministic=deterministic)  # fmt: skip


@pytest.mark.parametrize("case", ["segments+padding"])
def test_with_masks_fp16(case):
    kpm, seg = _masks(case, 100)
    q, k, v, dout = make_inputs(2, 2, 1, 100, 16, torch.float16, seed=8)
    check(q, k, v, dout, torch.float16, 9, key_padding_mask=kpm, segment_ids=seg)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over NaN rows
@pytest.mark.parametrize(
    "masks, deterministic", [("none", False), ("none", True), ("padding", False), ("segments", True)]
)
def test_tiles_outside_the_window_are_never_visited(masks, deterministic):
    """NaN in tiles no program may read: any visit, even masked, would spread it (0 * NaN = NaN).

    N = 64 on 16x16 tiles, window 16. Forward and dQ: the query blocks from 32 on see keys from 17 on,
    so key tile [0, 16) (NaN keys and values) must be skipped there. dK/dV: the key blocks below 32
    are seen by queries up to 46, so query tile [48, 64) (NaN queries and upstream gradients) must be
    skipped there. Padding (every key real) and one segment take the masked-loop path instead.
    """
    N, W = 64, 16
    q, k, v, dout = make_inputs(1, 2, 1, N, 16, torch.float32, seed=11)
    kwargs = {}
    if masks == "padding":
        kwargs["key_padding_mask"] = torch.ones(1, N, dtype=torch.bool, device=DEVICE)
    elif masks == "segments":
        kwargs["segment_ids"] = torch.zeros(1, N, dtype=torch.long, device=DEVICE)
    want = reference_grads(q, k, v, dout, W, **kwargs)
    tiles = dict(fwd=TILE_16, bwd=TILE_16, dkdv=TILE_16, dq=TILE_16)
    nan_keys = k.clone(), v.clone()
    for t in nan_keys:
        t[:, :, :16] = float("nan")
    with use_tiles(**tiles):
        out, dq, _, _ = run_kernel(q, *nan_keys, dout, window=W, deterministic=deterministic, **kwargs)
    assert_close(out[:, :, 32:], want[0][:, :, 32:], torch.float32, "out of queries whose window excludes NaN keys")
    assert_close(dq[:, :, 32:], want[1][:, :, 32:], torch.float32, "dq of queries whose window excludes NaN keys")
    assert out[:, :, 16:32].isnan().any(), "the NaN keys should reach the queries that see them (test premise)"

    nan_q, nan_dout = q.clone(), dout.clone()
    nan_q[:, :, 48:] = float("nan")
    nan_dout[:, :, 48:] = float("nan")
    with use_tiles(**tiles):
        _, _, dk, dv = run_kernel(nan_q, k, v, nan_dout, window=W, deterministic=deterministic, **kwargs)
    assert_close(dk[:, :, :32], want[2][:, :, :32], torch.float32, "dk of keys no NaN query sees")
    assert_close(dv[:, :, :32], want[3][:, :, :32], torch.float32, "dv of keys no NaN query sees")
    assert dv[:, :, 32:48].isnan().any(), "the NaN queries should reach the keys they see (test premise)"


def test_window_smaller_than_the_tile_is_exact_and_local():
    """Window 3 on 16x16 tiles: exact results, and each output depends on its 3 most recent keys only."""
    N, W = 47, 3
    q, k, v, dout = make_inputs(1, 1, 1, N, 16, torch.float32, seed=12)
    out = check(q, k, v, dout, torch.float32, W)[0]
    far_k, far_v = k.clone(), v.clone()
    far_k[:, :, :30] = torch.randn_like(far_k[:, :, :30]) * 100
    far_v[:, :, :30] = torch.randn_like(far_v[:, :, :30]) * 100
    perturbed = flash_attention(q, far_k, far_v, window=W)
    assert torch.equal(perturbed[:, :, 32:], out[:, :, 32:]), "outputs read keys outside their window"
    assert not torch.equal(perturbed[:, :, :32], out[:, :, :32]), "the perturbed keys are inside some window"


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_ops_attention(backend):
    B, H, H_kv, N, D, W = 2, 4, 2, 29, 16, 6
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, torch.float32, seed=13)
    kpm = padding_mask([N, 20], N, "left")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ops.attention(*leaves, backend=backend, key_padding_mask=kpm, window=W)
    got = (out.detach(), *torch.autograd.grad(out, leaves, dout))
    for name, a, b in zip(NAMES, got, reference_grads(q, k, v, dout, W, key_padding_mask=kpm)):
        assert_close(a, b, torch.float32, f"ops.attention(backend={backend!r}, window={W}) {name}")


@pytest.mark.parametrize("masks", ["none", "padding+segments"])
@pytest.mark.parametrize("window", [1, 4, 29, 50])
def test_sdpa_matches_an_explicit_mask(window, masks):
    B, H, N, D = 2, 2, 29, 8
    q, k, v, _ = make_inputs(B, H, H, N, D, torch.float64, seed=14, device="cpu")
    kpm = seg = None
    if masks != "none":
        kpm = padding_mask([N, 22], N, "right", device="cpu")
        seg = torch.stack([packed_ids([10, 19], device="cpu"), packed_ids([5, 24], device="cpu")])
    allowed = window_allowed(N, window, key_padding_mask=kpm, segment_ids=seg, batch=B)[:, None]  # (B, 1, N, N)
    got = sdpa(q, k, v, window=window, key_padding_mask=kpm, segment_ids=seg)
    if masks == "none":  # every row has a key: torch's own attention with the mask
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
    torch.testing.assert_close(got, window_reference(q, k, v, window, key_padding_mask=kpm, segment_ids=seg))


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "4"])
def test_invalid_windows_raise(window):
    q = torch.zeros(1, 1, 8, 16, device=DEVICE)
    for call in (sdpa, flash_attention, ops.attention):
        with pytest.raises(ValueError, match="window"):
            call(q, q, q, window=window)


def test_window_needs_causal():
    q = torch.zeros(1, 1, 8, 16, device=DEVICE)
    for call in (sdpa, flash_attention, ops.attention):
        with pytest.raises(ValueError, match="causal"):
            call(q, q, q, causal=False, window=4)


def test_keys_name_the_window():
    """The autotune key and the failure-memory case tell a windowed launch from a plain one; a plain
    launch's autotune key reads as before (pinned tile files stay valid)."""
    plain = attention_module._tune_key(64, 16, torch.float16, True, None, None)
    assert plain == "N_TUNE=64,BLOCK_D=16,CAUSAL=1,HAS_KPM=0,HAS_SEG=0,dtype=float16"
    assert "HAS_WINDOW=1" in attention_module._tune_key(64, 16, torch.float16, True, None, None, 8)
    q = torch.zeros(1, 1, 8, 16)
    assert attention_module._backward_key(q, True, None, None, 8) != attention_module._backward_key(
        q, True, None, None, None
    )


def test_window_backward_fallback_and_ops_pass_opcheck(monkeypatch):
    """The ops' schema and fake implementations with ``window``, and the torch backward a failed build
    falls back to (its written-out gradients take the window too)."""
    B, H, H_kv, N, D, W = 1, 2, 1, 16, 16, 5
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, torch.float32, seed=15)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    args = (*leaves, None, None, None, True, 0.25, False, False, W)
    torch.library.opcheck(attention_module.flash_attn_fwd, args)
    out, lse = attention_module.flash_attn_fwd(q, k, v, None, None, None, True, 0.25, False, False, W)
    bwd_args = (dout, q, k, v, out, lse, None, None, None, True, 0.25, False, False, W)
    torch.library.opcheck(attention_module.flash_attn_bwd, bwd_args)
    torch_grads = attention_module._torch_backward(dout, q, k, v, True, 1 / math.sqrt(D), None, None, W)
    for name, a, b in zip(NAMES[1:], torch_grads, reference_grads(q, k, v, dout, W)[1:]):
        assert_close(a, b, torch.float32, f"torch fallback {name}")
