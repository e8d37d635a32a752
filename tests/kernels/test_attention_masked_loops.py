"""The masked paths' split loops: whole tiles in a plain loop, the rest tile by tile.

With key padding or segment ids, each program runs the tiles that its bounds show whole (inside one
document's run of ids, over contiguous real keys, below the causal diagonal) in a plain loop without
masks, and the tiles before and after that range one by one with masks (see ``_whole_keys`` and
``_whole_queries`` in lmforge.kernels.attention). These cases put the edges of that range inside, at
and across tile edges, for the forward, the fused backward and the deterministic dK/dV + dQ kernels,
with the interpreter's 16x16 tile and with unequal forced tiles; everything against float64.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the import of the kernel module (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from lmforge.kernels.attention import _bounds, use_tiles  # noqa: E402

from tests.kernels.test_attention import DEVICE, check_against_reference, make_inputs, packed_ids  # noqa: E402

N = 80  # five 16-row tiles, two and a half 32-row ones

# Segment ids per batch row: documents starting and ending inside tiles, exactly at tile edges (16,
# 48), across several tiles, one token long, one covering the whole row, and an id that recurs.
SEGMENTS = {
    "inside": [[7, 25, 9, 39], [3, 60, 17]],
    "edges": [[16, 32, 32], [48, 32]],
    "across": [[31, 1, 48], [1, 78, 1]],
    "whole-row": [[80], [40, 40]],
    "recurring": ([[20, 12, 20, 28], [5, 70, 5]], [[4, 6, 4, 8], [1, 2, 1]]),
}


def segments(name):
    spec = SEGMENTS[name]
    lengths, ids = spec if isinstance(spec, tuple) else (spec, [None] * len(spec))
    return torch.stack([packed_ids(n, i) for n, i in zip(lengths, ids)])


def padding(name):
    """(2, N) bool key-padding masks: right and left padding with ends inside and at tile edges, holes
    between real keys, and a row without a real key."""
    pad = torch.ones(2, N, dtype=torch.bool)
    if name == "right":
        pad[0, 53:] = False
        pad[1, 64:] = False
    elif name == "left":
        pad[0, :9] = False
        pad[1, :32] = False
    elif name == "both-ends":
        pad[0, :5] = False
        pad[0, 70:] = False
        pad[1, :16] = False
        pad[1, 47:] = False
    elif name == "holes":
        pad[0, 20:23] = False
        pad[0, 75:] = False
        pad[1, 32:48] = False
    elif name == "no-real-key":
        pad[0, :] = False
        pad[1, 33:] = False
    return pad.to(DEVICE)


# (fwd, bwd, dkdv, dq) tiles; None: the interpreter's 16x16 tile through the autotuner
TILES = {
    "16x16": None,
    "fwd32x16-bwd16x32": dict(fwd=(32, 16, 4, 1), bwd=(16, 32, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1)),
    "fwd16x32-bwd32x16": dict(fwd=(16, 32, 4, 1), bwd=(32, 16, 4, 1), dkdv=(32, 16, 4, 1), dq=(16, 32, 4, 1)),
}


def run(tiles, dtype, *, H=2, H_kv=1, D=32, seed=0, **kwargs):
    q, k, v, dout = make_inputs(2, H, H_kv, N, D, dtype, seed=seed)
    for deterministic in (False, True):
        if TILES[tiles] is None:
            check_against_reference(q, k, v, dout, dtype, deterministic=deterministic, **kwargs)
        else:
            with use_tiles(**TILES[tiles]):
                check_against_reference(q, k, v, dout, dtype, deterministic=deterministic, **kwargs)


# every layout with the unequal tiles; the interpreter's 16x16 tile (test_attention.py's packed cases run
# it too) on the layouts whose edges fall on its tile edges
SEGMENT_CASES = [(docs, "fwd32x16-bwd16x32") for docs in SEGMENTS] + [("edges", "16x16"), ("across", "16x16")]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("docs, tiles", SEGMENT_CASES)
def test_segments(docs, causal, tiles):
    run(tiles, torch.float32, causal=causal, segment_ids=segments(docs), seed=1)


@pytest.mark.parametrize("tiles", ["fwd32x16-bwd16x32"])  # 16x16 tiles: test_attention.py's padding cases
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("pad", ["right", "left", "both-ends", "holes", "no-real-key"])
def test_padding(pad, causal, tiles):
    run(tiles, torch.float32, causal=causal, key_padding_mask=padding(pad), seed=2)


@pytest.mark.parametrize("tiles", ["fwd16x32-bwd32x16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "case", [("inside", "left"), ("edges", "right"), ("whole-row", "holes"), ("across", "both-ends")]
)
def test_segments_and_padding(case, causal, tiles):
    docs, pad = case
    run(tiles, torch.float32, causal=causal, segment_ids=segments(docs), key_padding_mask=padding(pad), seed=3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", [("edges", "right"), ("inside", "holes")])
def test_fp16(case, causal):
    docs, pad = case
    run("fwd32x16-bwd16x32", torch.float16, causal=causal, segment_ids=segments(docs), key_padding_mask=padding(pad))


@pytest.mark.parametrize("masks", ["segments", "padding"])
def test_multi_head_groups_and_head_dim_256(masks):
    """Four query heads on two key/value heads; and head dim 256, where no tile runs unmasked."""
    kwargs = dict(segment_ids=segments("inside")) if masks == "segments" else dict(key_padding_mask=padding("right"))
    run("fwd32x16-bwd16x32", torch.float32, H=4, H_kv=2, causal=True, seed=4, **kwargs)
    run("16x16", torch.float32, H=1, H_kv=1, D=256, causal=True, seed=5, **kwargs)


def test_bounds_runs_and_contiguous_padding():
    seg = torch.tensor([[4, 4, 4, 9, 9, 4], [1, 1, 1, 1, 1, 1]])
    kpm = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0]], dtype=torch.int8)
    b = _bounds(kpm, seg, 2, 6, "cpu")
    assert b.shape == (2, 4 * 6 + 3)
    assert b[:, 14:20].tolist() == [[0, 0, 0, 3, 3, 5], [0] * 6]  # start of each position's run
    assert b[:, 20:26].tolist() == [[2, 2, 2, 4, 4, 5], [5] * 6]  # end of each position's run
    assert b[:, 12:14].tolist() == [[0, 3], [1, 4]]  # first and last real key
    assert b[:, 26].tolist() == [3, -1]  # row 1 has a hole at 2
