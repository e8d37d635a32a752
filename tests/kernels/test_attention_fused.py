"""The fused (five-product) attention backward, the deterministic two-kernel one, and the tile API.

``flash_attention``'s default backward computes dK, dV and dQ in one kernel per key block (dQ summed
with fp32 atomics, then scaled and cast); ``deterministic=True`` (or torch's deterministic algorithms)
runs the two-kernel dK/dV + dQ backward on pinned or first-listed tiles. Both are compared with the
float64 reference of ``test_attention.py`` at odd lengths, head dims that are not powers of two, GQA,
causal or not, with key padding and segment ids, and with unequal tiles forced through ``use_tiles``.
Under the interpreter (no GPU) every tile is small; on a GPU the same tests run compiled.
"""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():  # must precede the import of the kernel module (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lmforge.kernels.attention as attention  # noqa: E402
import pytest  # noqa: E402
from lmforge.kernels.attention import pin_tiles, tile_lists, tuned_tiles, use_tiles  # noqa: E402

from tests.kernels.test_attention import (  # noqa: E402
    NAMES,
    assert_close,
    make_inputs,
    packed_ids,
    padding_mask,
    run_kernel,
    run_reference,
)

INTERPRETED = attention._interpreting()


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, tile or None for the autotuner) of every tile-chosen launch."""
    seen = []
    choose = attention._chosen_tile

    def spy(name, key, block_d, deterministic):
        tile = choose(name, key, block_d, deterministic)
        seen.append((name, tile))
        return tile

    monkeypatch.setattr(attention, "_chosen_tile", spy)
    return seen


@pytest.fixture
def fresh_tiles(monkeypatch):
    """No pinned, forced or recorded tiles, and the environment variable not yet read."""
    monkeypatch.setattr(attention, "_pinned", {})
    monkeypatch.setattr(attention, "_forced", {})
    monkeypatch.setattr(attention, "_tuned", {})
    monkeypatch.setattr(attention, "_env_read", False)
    monkeypatch.delenv(attention.TILES_ENV, raising=False)


def _masks(case, B, N):
    """(key_padding_mask, segment_ids) for a case name, B == 2."""
    kpm = seg = None
    if "padding" in case:
        kpm = torch.stack([padding_mask([N - 9], N, "right")[0], padding_mask([N // 2], N, "left")[0]])
    if "segments" in case:
        cut = N // 3
        seg = torch.stack([packed_ids([cut, 1, N - cut - 1]), packed_ids([N - 5, 5], [7, 3])])
    return kpm, seg


def check(q, k, v, dout, dtype, **kwargs):
    got = run_kernel(q, k, v, dout, **kwargs)
    ref_kwargs = {key: value for key, value in kwargs.items() if key != "deterministic"}
    want = run_reference(q, k, v, dout, **ref_kwargs)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert_close(a, b, dtype, name)
    return got


SHAPES = [  # (H, H_kv, N, D): odd lengths, head dims that are not powers of two, GQA and MQA
    (4, 2, 47, 16),
    (2, 1, 100, 40),
    (2, 2, 47, 64),
]


# every mask on the GQA shape; the other shapes without masks and with both
FUSED_CASES = [(SHAPES[0], masks) for masks in ("none", "padding", "segments", "padding+segments")] + [
    (shape, masks) for shape in SHAPES[1:] for masks in ("none", "padding+segments")
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "shape, masks", FUSED_CASES, ids=lambda c: "H{}-{}_N{}_D{}".format(*c) if isinstance(c, tuple) else c
)
def test_fused_backward_matches_reference(shape, causal, masks, launches):
    H, H_kv, N, D = shape
    dtype = torch.float32
    q, k, v, dout = make_inputs(2, H, H_kv, N, D, dtype, seed=N + D)
    kpm, seg = _masks(masks, 2, N)
    check(q, k, v, dout, dtype, causal=causal, key_padding_mask=kpm, segment_ids=seg, deterministic=False)
    names = [name for name, _ in launches]
    assert names == ["fwd", "bwd"], names  # the fused kernel, not the dK/dV + dQ pair


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fused_backward_fp16(causal):
    dtype = torch.float16
    q, k, v, dout = make_inputs(2, 4, 1, 47, 40, dtype, seed=3)
    kpm, seg = _masks("padding+segments", 2, 47)
    check(q, k, v, dout, dtype, causal=causal, key_padding_mask=kpm, segment_ids=seg, deterministic=False)


def test_fused_backward_fully_masked_rows_and_scales():
    """Rows with no key give zero output and zero gradients; scale < 0 and scale == 0 go through q."""
    dtype, N = torch.float32, 33
    q, k, v, dout = make_inputs(2, 2, 1, N, 16, dtype, seed=21)
    kpm = padding_mask([20, 0], N, "left")
    out, dq, dk, dv = check(q, k, v, dout, dtype, causal=True, key_padding_mask=kpm, deterministic=False)
    for name, t in zip(NAMES, (out, dq, dk, dv)):
        assert (t[1] == 0).all(), f"{name}: non-zero in the fully masked batch row"
    assert (dq[0, :, : N - 20] == 0).all() and (dk[0, :, : N - 20] == 0).all()
    for scale in (-0.5, 0.0):
        check(q, k, v, dout, dtype, causal=False, scale=scale, deterministic=False)


TILE_CASES = {  # unequal tiles, forced per kernel
    "fwd32x16-bwd16x32": dict(fwd=(32, 16, 4, 1), bwd=(16, 32, 4, 1)),
    "fwd16x32-bwd32x16": dict(fwd=(16, 32, 4, 1), bwd=(32, 16, 4, 1)),
    "bwd64x16": dict(bwd=(64, 16, 4, 1)),
}


@pytest.mark.parametrize("masks", ["none", "padding+segments"])
@pytest.mark.parametrize("case", list(TILE_CASES))
def test_forced_tiles_fused(case, masks, launches):
    dtype, H, H_kv, N, D = torch.float32, 4, 2, 47, 16
    q, k, v, dout = make_inputs(2, H, H_kv, N, D, dtype, seed=5)
    kpm, seg = _masks(masks, 2, N)
    tiles = TILE_CASES[case]
    with use_tiles(**tiles):
        check(q, k, v, dout, dtype, causal=True, key_padding_mask=kpm, segment_ids=seg, deterministic=False)
    assert dict(launches) == {name: tiles.get(name) for name in ("fwd", "bwd")}
    launches.clear()
    run_kernel(q, k, v, dout, causal=True, deterministic=False)  # outside the block: back to the autotuner
    assert all(tile is None for _, tile in launches), launches


@pytest.mark.parametrize("masks", ["none", "padding+segments"])
def test_forced_tiles_deterministic(masks, launches):
    dtype, H, H_kv, N, D = torch.float32, 2, 1, 47, 40
    q, k, v, dout = make_inputs(2, H, H_kv, N, D, dtype, seed=6)
    kpm, seg = _masks(masks, 2, N)
    tiles = dict(dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1))
    with use_tiles(**tiles):
        check(q, k, v, dout, dtype, causal=True, key_padding_mask=kpm, segment_ids=seg, deterministic=True)
    first_listed = attention._INTERPRETER_TILE if INTERPRETED else tile_lists(D)["fwd"][0]
    assert dict(launches) == {"fwd": first_listed, **tiles}


def test_use_tiles_nests_and_checks_its_arguments():
    with use_tiles(fwd=(16, 16, 4, 1)):
        with use_tiles(bwd=(32, 16, 4, 1)):
            assert attention._forced == {"fwd": (16, 16, 4, 1), "bwd": (32, 16, 4, 1)}
        assert attention._forced == {"fwd": (16, 16, 4, 1)}
    assert attention._forced == {}
    with pytest.raises(ValueError):
        with use_tiles(nope=(16, 16, 4, 1)):
            pass
    with pytest.raises(ValueError):
        with use_tiles(fwd=(16, 16)):
            pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_deterministic_mode_is_bitwise_and_uses_no_atomics(dtype, launches, fresh_tiles):
    B, H, H_kv, N, D = 2, 4, 1, 70, 32  # MQA: every query head adds into the same dk/dv
    q, k, v, dout = make_inputs(B, H, H_kv, N, D, dtype, seed=4)
    kpm = padding_mask([N, 50], N, "right")
    first = check(q, k, v, dout, dtype, causal=True, key_padding_mask=kpm, deterministic=True)
    second = run_kernel(q, k, v, dout, causal=True, key_padding_mask=kpm, deterministic=True)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    names = {name for name, _ in launches}
    assert names == {"fwd", "dkdv", "dq"}, names  # never the fused kernel and its atomics
    assert all(tile is not None for _, tile in launches), "deterministic mode went through an autotuner"
    assert attention._tuned == {}


def test_deterministic_follows_torch_setting(launches):
    q, k, v, dout = make_inputs(1, 2, 1, 20, 16, torch.float32, seed=8)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        run_kernel(q, k, v, dout, causal=True)
        assert {name for name, _ in launches} == {"fwd", "dkdv", "dq"}
        launches.clear()
        torch.use_deterministic_algorithms(False)
        run_kernel(q, k, v, dout, causal=True)
        assert {name for name, _ in launches} == {"fwd", "bwd"}
    finally:
        torch.use_deterministic_algorithms(was)


def test_fused_and_deterministic_agree():
    dtype = torch.float32
    q, k, v, dout = make_inputs(2, 4, 2, 47, 16, dtype, seed=9)
    kpm, seg = _masks("padding+segments", 2, 47)
    kwargs = dict(causal=True, key_padding_mask=kpm, segment_ids=seg)
    fused = run_kernel(q, k, v, dout, deterministic=False, **kwargs)
    exact = run_kernel(q, k, v, dout, deterministic=True, **kwargs)
    assert torch.equal(fused[0], exact[0])  # same forward tile under the interpreter / pinned on a GPU
    for name, a, b in zip(NAMES[1:], fused[1:], exact[1:]):
        assert_close(a, b, dtype, f"fused vs two-kernel {name}")


def test_tile_lists_api():
    for head_dim, bucket in ((16, 64), (40, 64), (64, 64), (80, 128), (128, 128), (256, 256)):
        lists = tile_lists(head_dim)
        assert set(lists) == {"fwd", "bwd", "dkdv", "dq"}
        assert lists["fwd"] == attention.FWD_TILES[bucket] and lists["bwd"] == attention.BWD_TILES[bucket]
        assert lists["dkdv"] == attention.DKDV_TILES[bucket] and lists["dq"] == attention.DQ_TILES[bucket]
        for tiles in lists.values():
            assert tiles and all(len(t) == 4 and all(isinstance(x, int) for x in t) for t in tiles)
    assert (128, 128, 8, 3) in tile_lists(128)["fwd"]
    assert any(t[:3] == (128, 64, 8) for t in tile_lists(128)["dq"])
    lists = tile_lists(64)
    lists["fwd"].append((1, 1, 1, 1))  # a copy: the module's lists stay as they are
    assert (1, 1, 1, 1) not in tile_lists(64)["fwd"]


def test_tuned_tiles_pin_round_trip(tmp_path, fresh_tiles, launches, monkeypatch):
    dtype = torch.float32
    q, k, v, dout = make_inputs(2, 2, 1, 40, 16, dtype, seed=10)
    kpm = padding_mask([40, 30], 40, "right")
    kwargs = dict(causal=True, key_padding_mask=kpm, deterministic=False)
    first = run_kernel(q, k, v, dout, **kwargs)
    tuned = tuned_tiles()
    assert set(tuned) == {"fwd", "bwd"}, tuned
    key = attention._tune_key(64, 16, dtype, True, kpm, None)
    assert tuned["fwd"] == {key: list(attention._INTERPRETER_TILE if INTERPRETED else tuned["fwd"][key])}
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(tuned))

    pin_tiles(path)
    launches.clear()

    def no_autotuning(*args, **kwargs):
        raise AssertionError("a pinned launch went through the autotuner")

    for kernel in (attention._attn_fwd, attention._attn_bwd):
        monkeypatch.setattr(kernel, "run", no_autotuning)
    second = run_kernel(q, k, v, dout, **kwargs)
    assert [tile for _, tile in launches] == [tuple(tuned["fwd"][key]), tuple(tuned["bwd"][key])]
    for name, a, b in zip(("out", "dk", "dv"), (first[0], *first[2:]), (second[0], *second[2:])):
        assert torch.equal(a, b), f"{name}: pinned tiles gave other numbers"

    pin_tiles(None)  # unpinned: an unpinned key autotunes again
    with pytest.raises(AssertionError, match="autotuner"):
        run_kernel(q, k, v, dout, **kwargs)


def test_pinned_tile_is_used_and_env_is_read_once(tmp_path, fresh_tiles, launches, monkeypatch):
    dtype = torch.float32
    q, k, v, dout = make_inputs(1, 2, 2, 47, 16, dtype, seed=11)
    key = attention._tune_key(64, 16, dtype, True, None, None)
    pinned = {"fwd": {key: [32, 16, 4, 1]}, "bwd": {key: [16, 32, 4, 1]}, "dq": {key: [16, 32, 4, 1]}}
    path = tmp_path / "pinned.json"
    path.write_text(json.dumps(pinned))
    monkeypatch.setenv(attention.TILES_ENV, str(path))
    check(q, k, v, dout, dtype, causal=True, deterministic=False)
    assert launches == [("fwd", (32, 16, 4, 1)), ("bwd", (16, 32, 4, 1))]
    launches.clear()
    # deterministic: pinned dq, and dkdv (not pinned) on the first tile listed for the bucket
    check(q, k, v, dout, dtype, causal=True, deterministic=True)
    first_listed = attention._INTERPRETER_TILE if INTERPRETED else tile_lists(16)["dkdv"][0]
    assert launches == [("fwd", (32, 16, 4, 1)), ("dkdv", first_listed), ("dq", (16, 32, 4, 1))]
    path.write_text("{}")  # read once: a later change of the file is not seen
    launches.clear()
    run_kernel(q, k, v, dout, causal=True, deterministic=False)
    assert launches[0] == ("fwd", (32, 16, 4, 1))


def test_pin_tiles_checks_its_input(tmp_path, fresh_tiles):
    with pytest.raises(ValueError):
        pin_tiles({"nope": {}})
    with pytest.raises(ValueError):
        pin_tiles({"fwd": {"k": [16, 16, 4]}})
    with pytest.raises(ValueError):
        pin_tiles({"fwd": [16, 16, 4, 1]})
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError):
        pin_tiles(str(path))


def test_grid_puts_batch_times_heads_on_axis_0(monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65535: B*H (B*H_kv for dK/dV) goes on axis 0, the block index on
    axis 1. Checked on the launch grids of every kernel at B*H = 70000 (a real launch of that many
    programs would take the interpreter the best part of an hour)."""
    grids = {}

    def record(name, kernel, grid, args, kwargs, key, block_d, deterministic):
        grids[name] = grid({"BLOCK_M": 16, "BLOCK_N": 32})

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids[self.name] = grid

            return launch

    monkeypatch.setattr(attention, "_launch", record)
    monkeypatch.setattr(attention, "_attn_bwd_delta", Recorder("delta"))
    monkeypatch.setattr(attention, "_attn_bwd_dq_cast", Recorder("cast"))
    B, H, H_kv, N, D = 2, 35000, 5000, 100, 16
    q = torch.empty(()).expand(B, H, N, D)  # stride-0 views: the outputs are allocated, never touched
    k = torch.empty(()).expand(B, H_kv, N, D)
    o, lse = attention._forward(q, k, k, True, 0.25, None, None, None)
    attention._backward(o, q, k, k, o, lse, True, 0.25, None, None, None, deterministic=False)
    attention._backward(o, q, k, k, o, lse, True, 0.25, None, None, None, deterministic=True)
    assert grids["fwd"] == (B * H, 7) and grids["dq"] == (B * H, 7)
    assert grids["bwd"] == (B * H_kv, 4) and grids["dkdv"] == (B * H_kv, 4)
    assert grids["delta"] == (B * H, 2) and grids["cast"] == (B * H, 2)
    assert all(g[1] <= 65535 for g in grids.values())
