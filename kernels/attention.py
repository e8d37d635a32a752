"""Fused attention (FlashAttention-2 style) in Triton: forward, backward, autograd, module.

Layout of this file: the Triton kernels, then the plain-Python launchers, then the custom ops
(``lmforge::flash_attn_fwd``, ``lmforge::flash_attn_bwd``: opaque nodes for ``torch.compile``) and
their autograd formula, then the thin public API (:func:`flash_attention`, :class:`FlashAttention`).

What it computes, for q (B, H, N, D) and k, v (B, H_kv, N, D), H_kv dividing H:
``softmax(q k^T * scale + mask) v``, where the mask combines, as requested, causality (key index
<= query index), Mistral's sliding window (with causality: query i sees keys i - W < j <= i), a
key-padding mask (B, N: True = a real token) and segment ids (B, N: a query sees only keys of its
own packed document). Grouped-query and multi-query attention read each key/value
head once for its whole group of query heads: K and V are never repeated in memory.

The forward pass tiles queries into BLOCK_M rows and streams BLOCK_N keys at a time with an online
softmax in base 2 (exp2, with log2(e) folded into the scale), accumulating in fp32; it keeps the
row-wise logsumexp (base 2) for the backward. Only each row's max is scaled, so the scale and the
max subtraction fuse into one FMA per score. With a causal mask the query blocks run last-first
(forward and dQ), so the programs with the most keys to visit start first. A row with no key to
attend to outputs zeros (its logsumexp is stored as +inf, so the backward sees probabilities of
exactly 0, never NaN).

The backward starts with delta = rowsum(dO * O). By default it is then FlashAttention-2's fused
five-product scheme: one program per key block and key/value head loops over every query head of
its group and every query block, computing S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q
and this block's share of dQ, dS K, which it adds into an fp32 (B, H, N, D) buffer with
``tl.atomic_add`` (the delta kernel zeroes that buffer; the autotuner resets it between trials); a
small kernel then scales dQ and casts it to q's dtype and layout. Working on the transposes makes
the held key block the row dimension of the products (wgmma's tiles are 64 rows per warpgroup), so
P^T and dS^T feed dV and dK directly. With ``deterministic=True`` (or, by default, when
``torch.are_deterministic_algorithms_enabled()``), the backward is the two-kernel scheme instead: the
same dK/dV kernel without the dQ products, then a dQ kernel per query block; no atomics, and every
kernel runs the tile pinned for its autotune key or else the first listed for its head dim, so two
processes (two DDP ranks) give bitwise-identical gradients.

With key padding or segment ids, each program first narrows the tiles it visits to those between
the first and last position of the segment ids present and between the row's first and last real
key (per-row bounds computed once per batch, see _bounds). It then splits that range: the tiles the
bounds show whole (every pair kept, so no mask to build) run in a plain loop with no per-tile loads
of the masks and no branches, which Triton software-pipelines like the unmasked path (the K/V or
Q/dO loads become asynchronous copies, LDGSTS on sm_90, issued ``num_stages - 1`` tiles ahead); the
tiles before and after it run one by one, skipping those the masks empty and running any whole one
without a mask, with synchronous loads. For the forward and dQ (a query block, key tiles; see
_whole_keys) the whole range is the key tiles inside the row, below the causal diagonal, between
the first and last real key when the real keys are contiguous, and, when the query block lies in
one document, inside the run of its id around the block; for dK/dV (a key block, query tiles; see
_whole_queries) it needs every key of the block real and in one document, and is the query tiles
inside the row, past the diagonal and inside that document's run. A query block straddling
documents, or padding with holes, leaves the range empty: the whole row then goes tile by tile, as
does everything at head dims above 128 (an unmasked copy of the tile body spills there). Packed
documents cost about the sum of their squares, not the square of their sum.

A sliding window W (HAS_WINDOW, with the window as a runtime int; see _window_keys and
_window_queries) cuts the same ranges: a query block [start_m, +BLOCK_M) never visits the key tiles
below the one holding start_m - W + 1, and a key block [start_n, +BLOCK_N) never visits the query
tiles past start_n + BLOCK_N - 1 + W - 1 (fused and deterministic dK/dV alike), so a long row costs
about N * W, not N^2 / 2. Inside the range a key tile is whole only if the block's last query still
sees its first key (start_n >= start_m + BLOCK_M - W; for dK/dV, start_m + BLOCK_M <= start_n + W);
the tiles across that far edge of the window run masked: without other masks, first (forward, dQ)
or last (dK/dV) of the existing unmasked/masked loops; with them, as edge tiles of the split loop.

Launch grids put batch x head (batch x key/value head for dK/dV) on axis 0, which CUDA does not
cap at 65535, and the query or key block on axis 1. Offsets are 64-bit where they can pass int32:
each program advances its base pointers by ``start.to(int64) * stride`` for the batch, the head and
the first row of each tile (and the logsumexp/delta rows), while in-tile offsets stay int32 and
cheap, unless a stride is so large that one tile's span could overflow (WIDE, chosen per launch).

Tile shapes, (BLOCK_M, BLOCK_N, num_warps, num_stages), are listed per head-dim bucket (FWD_TILES,
BWD_TILES for the fused backward, DKDV_TILES, DQ_TILES; :func:`tile_lists`) and autotuned per
power-of-two bucket of the length; `benchmarks/kernel_report.py` shows what each compiles to for
sm_90 without a GPU. :func:`use_tiles` forces tiles inside a ``with`` block (a GPU gate runs every
listed tile that way), :func:`tuned_tiles` reports what the autotuners picked and :func:`pin_tiles`
(or ``LMFORGE_ATTN_TILES=path``, read at the first launch) pins such picks, on every rank alike.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import build_errors, build_failed, check_window, custom_op, known_failure, sdpa

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

log = logging.getLogger(__name__)

# "This kernel could not be built or launched on this GPU": the errors that the backward's fallback
# (flash_attention(..., backward_fallback=...)) answers; any other error propagates.
BUILD_ERRORS: tuple[type[BaseException], ...] = build_errors()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Tile shapes, (BLOCK_M, BLOCK_N, num_warps, num_stages), per head-dim bucket (the padded head dim:
# 64 and below, 128, 256). Every entry compiles for sm_90 (H100/H200) without register spills and
# within shared memory, as `python benchmarks/kernel_report.py` shows; the autotuner times them on the
# card. Wider tiles spill at larger head dims: the forward holds a (BLOCK_M, D) fp32 accumulator, the
# dK/dV kernels two (BLOCK_N, D) ones, the dQ kernel one (BLOCK_M, D). The first tile of a bucket is
# what deterministic mode runs when nothing is pinned (see pin_tiles).
FWD_TILES = {
    64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4)],
    256: [(64, 64, 8, 2), (64, 32, 4, 2)],
}
# The fused (five-product) backward: a program holds a key block (BLOCK_N rows), streams query tiles
# of BLOCK_M and adds its dQ partials into an fp32 buffer with atomics.
BWD_TILES = {
    64: [(32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (64, 128, 8, 1), (32, 64, 8, 2), (32, 64, 4, 2)],
    128: [
        (16, 128, 8, 2),
        (16, 128, 8, 3),
        (32, 64, 8, 2),
        (32, 64, 8, 3),
        (32, 128, 8, 1),
        (16, 64, 8, 2),
        (32, 32, 8, 2),  # the one clean with key padding (the others spill a little there)
    ],
    256: [(32, 32, 8, 2), (16, 32, 8, 2)],
}
# dK/dV of the deterministic two-kernel backward: as BWD_TILES, without the dQ partials.
DKDV_TILES = {
    64: [(64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 2)],
    128: [(32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (32, 64, 8, 3), (16, 64, 8, 2)],
    256: [(32, 32, 8, 2)],
}
# dQ: the mirror; a program holds a query block (BLOCK_M rows) and streams key tiles of BLOCK_N.
DQ_TILES = {
    64: [(128, 32, 4, 2), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    256: [(128, 32, 8, 2), (64, 32, 8, 3), (64, 32, 4, 3)],
}
_TILES = {"fwd": FWD_TILES, "bwd": BWD_TILES, "dkdv": DKDV_TILES, "dq": DQ_TILES}
_INTERPRETER_TILE = (16, 16, 4, 1)  # the one config the autotuners hold under TRITON_INTERPRET=1


def _head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def tile_lists(head_dim: int) -> dict[str, list[tuple[int, int, int, int]]]:
    """The tiles listed for ``head_dim``'s bucket, per kernel: "fwd" (forward), "bwd" (the fused
    backward), "dkdv" and "dq" (the deterministic two-kernel backward); each a list of
    (BLOCK_M, BLOCK_N, num_warps, num_stages). The same lists with or without a GPU."""
    bucket = _head_dim_bucket(_block_d(head_dim))
    return {name: list(tiles[bucket]) for name, tiles in _TILES.items()}


def _configs(tiles: dict[int, list[tuple[int, int, int, int]]]) -> list[triton.Config]:
    """Every tile shape of ``tiles`` as an autotune config (one 16x16 config under the interpreter)."""
    if _interpreting():
        bm, bn, w, st = _INTERPRETER_TILE
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)]
    shapes = dict.fromkeys(shape for bucket in tiles.values() for shape in bucket)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in shapes]


def _for_head_dim(tiles: dict[int, list[tuple[int, int, int, int]]]):
    """The autotuner's pruning: keep the configs listed for the launch's head dim."""

    def prune(configs, named_args, **kwargs):
        if _interpreting():
            return configs
        block_d = named_args["BLOCK_D"] if "BLOCK_D" in named_args else kwargs.get("BLOCK_D", 64)
        wanted = set(tiles[_head_dim_bucket(block_d)])
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        return kept or configs[-1:]

    return prune


# Tile choice outside the autotuners: forced tiles (use_tiles, a context), pinned tiles (pin_tiles or
# LMFORGE_ATTN_TILES) and what the autotuners picked (tuned_tiles). Keys are _tune_key strings.
_forced: dict[str, tuple[int, int, int, int]] = {}
_pinned: dict[str, dict[str, tuple[int, int, int, int]]] = {}
_tuned: dict[str, dict[str, list[int]]] = {}
_env_read = False  # LMFORGE_ATTN_TILES is read once, at the first launch, unless pin_tiles came first
TILES_ENV = "LMFORGE_ATTN_TILES"


def _tile(value, what: str) -> tuple[int, int, int, int]:
    try:
        tile = tuple(int(x) for x in value)
    except (TypeError, ValueError):
        tile = ()
    if len(tile) != 4 or any(x <= 0 for x in tile) or any(isinstance(x, bool) for x in value):
        raise ValueError(f"{what}: expected (BLOCK_M, BLOCK_N, num_warps, num_stages), got {value!r}")
    return tile  # type: ignore[return-value]


def _kernel_name(name: str, what: str) -> str:
    if name not in _TILES:
        raise ValueError(f"{what}: unknown kernel {name!r}; expected one of {', '.join(_TILES)}")
    return name


@contextlib.contextmanager
def use_tiles(**tiles: tuple[int, int, int, int]):
    """Every launch of the named kernels ("fwd", "bwd", "dkdv", "dq") inside the ``with`` block uses the
    given (BLOCK_M, BLOCK_N, num_warps, num_stages), bypassing the autotuner and any pinned tile; the
    kernels not named stay as they are. Works under the interpreter too (tiles of at least 16)."""
    global _forced
    chosen = {_kernel_name(name, "use_tiles"): _tile(tile, f"use_tiles({name}=...)") for name, tile in tiles.items()}
    before = _forced
    _forced = {**before, **chosen}
    try:
        yield
    finally:
        _forced = before


def tuned_tiles() -> dict[str, dict[str, list[int]]]:
    """What the autotuners chose so far in this process, per kernel and autotune key (a string, see
    _tune_key): ``{"fwd": {"N_TUNE=1024,BLOCK_D=64,...": [bm, bn, warps, stages]}, ...}``. JSON-ready;
    :func:`pin_tiles` takes it back (on another rank, in another run)."""
    return {name: {key: list(tile) for key, tile in choices.items()} for name, choices in _tuned.items() if choices}


def pin_tiles(choices: dict | str | os.PathLike | None) -> None:
    """Pin tiles: launches whose kernel and key appear in ``choices`` (a :func:`tuned_tiles` dict or the
    path of a JSON file of one) skip the autotuner and run that tile. ``None`` unpins everything. Keys
    not pinned autotune as usual, except in deterministic mode, which runs the first tile listed for
    the bucket. Without a call, ``LMFORGE_ATTN_TILES=path`` is read once, at the first launch."""
    global _pinned, _env_read
    _env_read = True
    if choices is None:
        _pinned = {}
        return
    if not isinstance(choices, dict):
        with open(os.fspath(choices)) as f:
            choices = json.load(f)
    if not isinstance(choices, dict):
        raise ValueError(f"pin_tiles: expected a dict of kernels, got {type(choices).__name__}")
    pinned: dict[str, dict[str, tuple[int, int, int, int]]] = {}
    for name, per_key in choices.items():
        _kernel_name(name, "pin_tiles")
        if not isinstance(per_key, dict):
            raise ValueError(f"pin_tiles: {name}: expected a dict of autotune keys, got {type(per_key).__name__}")
        pinned[name] = {str(key): _tile(tile, f"pin_tiles: {name}[{key!r}]") for key, tile in per_key.items()}
    _pinned = pinned


def _read_env_once() -> None:
    global _env_read
    if _env_read:
        return
    _env_read = True
    path = os.environ.get(TILES_ENV)
    if path:
        pin_tiles(path)
        log.info("flash_attention: tiles pinned from %s=%s", TILES_ENV, path)


def _tune_key(n_tune: int, block_d: int, dtype: torch.dtype, causal: bool, kpm, seg, window=None) -> str:
    """The autotune key of a launch as a string (kpm, seg: the mask tensors or None; window: the
    sliding window or None, named only when there is one, so keys without one read as before)."""
    flags = f"CAUSAL={int(causal)},HAS_KPM={int(kpm is not None)},HAS_SEG={int(seg is not None)}"
    if window is not None:
        flags += ",HAS_WINDOW=1"
    return f"N_TUNE={n_tune},BLOCK_D={block_d},{flags},dtype={str(dtype).removeprefix('torch.')}"


def _chosen_tile(name: str, key: str, block_d: int, deterministic: bool) -> tuple[int, int, int, int] | None:
    """The tile a launch of kernel ``name`` with autotune ``key`` must run: forced (use_tiles), else
    pinned (pin_tiles), else in deterministic mode the first listed for the bucket; None: autotune."""
    tile = _forced.get(name)
    if tile is None:
        _read_env_once()
        tile = _pinned.get(name, {}).get(key)
        if tile is None and deterministic:
            tile = _INTERPRETER_TILE if _interpreting() else _TILES[name][_head_dim_bucket(block_d)][0]
    return tile


def _launch(name: str, kernel, grid, args: tuple, kwargs: dict, key: str, block_d: int, deterministic: bool):
    """Launch autotuned ``kernel`` (listed as ``name``) on the tile _chosen_tile gives, bypassing the
    autotuner, or else through the autotuner, recording its pick for tuned_tiles."""
    tile = _chosen_tile(name, key, block_d, deterministic)
    if tile is None:
        kernel[grid](*args, **kwargs)
        config = kernel.best_config
        choice = [config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages]
        _tuned.setdefault(name, {})[key] = choice
        return
    bm, bn, warps, stages = tile
    kernel.fn[grid](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _block_mask(
    offs_m, offs_n, N, seg_q, kpm_ptr, seg_ptr, mask_base, window,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr,
    KEYS_FIRST: tl.constexpr = False,
):  # fmt: skip
    """May query offs_m attend to key offs_n? (BLOCK_M, BLOCK_N) booleans, or with KEYS_FIRST the
    transpose, (BLOCK_N, BLOCK_M), for the dK/dV kernel, which works on S^T."""
    if KEYS_FIRST:
        qi = offs_m[None, :]
        ki = offs_n[:, None]
    else:
        qi = offs_m[:, None]
        ki = offs_n[None, :]
    valid = (qi < N) & (ki < N)
    if CAUSAL:
        valid = valid & (qi >= ki)
    if HAS_WINDOW:  # the sliding window (with CAUSAL): the `window` most recent keys, the query's own included
        valid = valid & (qi - ki < window)
    if HAS_KPM:
        keep = tl.load(kpm_ptr + mask_base + offs_n, mask=offs_n < N, other=0)
        if KEYS_FIRST:
            valid = valid & (keep[:, None] != 0)
        else:
            valid = valid & (keep[None, :] != 0)
    if HAS_SEG:
        seg_k = tl.load(seg_ptr + mask_base + offs_n, mask=offs_n < N, other=-1)
        if KEYS_FIRST:
            valid = valid & (seg_k[:, None] == seg_q[None, :])
        else:
            valid = valid & (seg_q[:, None] == seg_k[None, :])
    return valid


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE: full-precision fp32 products (tests in fp32), else tensor cores."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_state(
    start_m, start_n, N, seg_lo, seg_hi, kpm_ptr, seg_ptr, mask_base, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    """(empty, whole) for the tile of queries [start_m, +BLOCK_M) and keys [start_n, +BLOCK_N), whose
    queries have segment ids in [seg_lo, seg_hi]: empty when the masks remove every pair (skip it),
    whole when they keep every pair of a real key (run it without building a mask). The callers'
    key range already starts inside the sliding window, so the window only narrows ``whole``."""
    empty = start_n >= N
    whole = start_n + BLOCK_N <= N
    if CAUSAL:
        empty = empty | (start_n > start_m + BLOCK_M - 1)
        whole = whole & (start_n + BLOCK_N - 1 <= start_m)
    if HAS_WINDOW:  # the block's last query still sees the tile's first key
        whole = whole & (start_n >= start_m + BLOCK_M - window)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if HAS_KPM:
        keep = tl.load(kpm_ptr + mask_base + offs_n, mask=offs_n < N, other=0).to(tl.int32)
        empty = empty | (tl.max(keep, axis=0) == 0)
        whole = whole & (tl.min(keep, axis=0) != 0)
    if HAS_SEG:
        seg_k, lo, hi = _segment_range(offs_n, N, seg_ptr, mask_base, HAS_SEG)
        empty = empty | (hi < seg_lo) | (lo > seg_hi)
        whole = whole & (lo == hi) & (seg_lo == seg_hi) & (lo == seg_lo)
    return empty, whole


@triton.jit
def _segment_range(offs, N, seg_ptr, mask_base, HAS_SEG: tl.constexpr):
    """The segment ids of positions offs, and their min and max (0s without segments)."""
    if HAS_SEG:
        seg = tl.load(seg_ptr + mask_base + offs, mask=offs < N, other=-1)
        lo = tl.min(tl.where(offs < N, seg, 4611686018427387904), axis=0)
        hi = tl.max(tl.where(offs < N, seg, -4611686018427387904), axis=0)
    else:
        seg = tl.zeros_like(offs)
        lo = 0
        hi = 0
    return seg, lo, hi


@triton.jit
def _bounds_row(BOUNDS, b, N):
    """Row b of the (B, 4N + 3) bounds (see _bounds)."""
    return BOUNDS + b.to(tl.int64) * (4 * N + 3)


@triton.jit
def _key_range(
    offs_m, N, lo, hi, BOUNDS, b, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    """The keys [lo, hi) the masks may let queries offs_m see, within the given [lo, hi) and with lo
    rounded down to a key tile: from their segment ids' first and last positions in the row and the
    row's first and last real key (see _bounds). Tiles outside are never visited."""
    row = _bounds_row(BOUNDS, b, N)
    if HAS_SEG:
        first = tl.load(row + offs_m, mask=offs_m < N, other=N)
        last = tl.load(row + N + offs_m, mask=offs_m < N, other=-1)
        lo = tl.maximum(lo, tl.min(first, axis=0))
        hi = tl.minimum(hi, tl.max(last, axis=0) + 1)
    if HAS_KPM:
        lo = tl.maximum(lo, tl.load(row + 2 * N))
        hi = tl.minimum(hi, tl.load(row + 2 * N + 1) + 1)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_range(offs_n, N, lo, BOUNDS, b, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr):
    """The queries [lo, hi) whose segment ids occur among keys offs_n (all of them without segments),
    lo rounded down to a query tile."""
    hi = N
    if HAS_SEG:
        row = _bounds_row(BOUNDS, b, N)
        first = tl.load(row + offs_n, mask=offs_n < N, other=N)
        last = tl.load(row + N + offs_n, mask=offs_n < N, other=-1)
        lo = tl.maximum(lo, tl.min(first, axis=0))
        hi = tl.max(last, axis=0) + 1
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.jit
def _window_keys(start_m, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Under the sliding window, for the queries [start_m, +BLOCK_M): (lo, first_whole), the first
    key tile any of them sees (rounded down to BLOCK_N: older tiles are never visited) and the first
    key that all of them see (from there up to the causal diagonal no window mask is needed)."""
    lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
    return lo, tl.maximum(start_m + BLOCK_M - window, 0)


@triton.jit
def _window_queries(start_n, window, BLOCK_N: tl.constexpr):
    """Under the sliding window, for the keys [start_n, +BLOCK_N): (hi, end_whole), the end of the
    queries any of them is seen by (later query tiles are never visited) and the end of the queries
    that see all of them (query tiles ending there or before need no window mask)."""
    return start_n + BLOCK_N - 1 + window, start_n + window


@triton.jit
def _whole_range(lo, first, end, ok, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """[lo_full, hi_full): the tiles of BLOCK, on the grid of lo (a multiple of BLOCK), that lie inside
    the positions [first, end), whose pairs with the program's block the masks keep whole; ok: the
    masks allow such a range at all (its facts hold). Empty, at lo, when there is none or without
    SPLIT (the kernel runs no separate loop of whole tiles for this tile shape)."""
    lo_full = lo
    hi_full = lo
    if SPLIT:
        lo_full = tl.maximum(lo, ((first + BLOCK - 1) // BLOCK) * BLOCK)
        hi_full = (end // BLOCK) * BLOCK
        ok = ok & (lo_full < hi_full)
        lo_full = tl.where(ok, lo_full, lo)
        hi_full = tl.where(ok, hi_full, lo)
    return lo_full, hi_full


@triton.jit
def _whole_keys(
    start_m, N, lo_n, seg_lo, seg_hi, BOUNDS, b, window,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """The key tiles [lo_full, hi_full) that the queries [start_m, +BLOCK_M) see whole (forward, dQ):
    inside the row, below the causal diagonal, inside every query's sliding window, real keys only
    (the row's real keys contiguous) and, with segment ids, inside the run of the block's one
    document (when the block lies in one)."""
    row = _bounds_row(BOUNDS, b, N)
    first = 0
    end = N
    ok = start_m < N  # always: a tensor to combine with
    if CAUSAL:
        end = tl.minimum(end, start_m + 1)
    if HAS_WINDOW:
        _, first = _window_keys(start_m, window, BLOCK_M, BLOCK_N)
    if HAS_KPM:
        first = tl.maximum(first, tl.load(row + 2 * N))
        end = tl.minimum(end, tl.load(row + 4 * N + 2) + 1)  # -1 when the real keys have holes
    if HAS_SEG:
        ok = ok & (seg_lo == seg_hi)
        first = tl.maximum(first, tl.load(row + 2 * N + 2 + start_m))
        end = tl.minimum(end, tl.load(row + 3 * N + 2 + start_m) + 1)
    return _whole_range(lo_n, first, end, ok, BLOCK_N, SPLIT)


@triton.jit
def _whole_queries(
    start_n, N, lo_m, keys_whole, seg_lo, seg_hi, BOUNDS, b, window,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The query tiles [lo_full, hi_full) that see the keys [start_n, +BLOCK_N) whole (dK/dV): every
    key real and inside the row (keys_whole), the queries inside the row, at or after the block's
    last key (causal), still seeing its first key (sliding window) and, with segment ids, inside the
    run of the key block's one document."""
    first = 0
    end = N
    ok = keys_whole
    if CAUSAL:
        first = start_n + BLOCK_N - 1
    if HAS_WINDOW:
        _, window_end = _window_queries(start_n, window, BLOCK_N)
        end = tl.minimum(end, window_end)
    if HAS_SEG:
        row = _bounds_row(BOUNDS, b, N)
        ok = ok & (seg_lo == seg_hi)
        first = tl.maximum(first, tl.load(row + 2 * N + 2 + start_n))
        end = tl.minimum(end, tl.load(row + 3 * N + 2 + start_n) + 1)
    return _whole_range(lo_m, first, end, ok, BLOCK_M, BLOCK_D <= 128)


@triton.jit
def _query_block_start(N, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """The first query row of this program's block (grid axis 1; axis 0 is batch x head). With CAUSAL
    the blocks go in reverse order: the last block, which visits the most keys, gets index 0, so the
    heaviest programs launch first and the short ones fill the tail of the grid."""
    pid = tl.program_id(1)
    if CAUSAL:
        pid = (N - 1) // BLOCK_M - pid  # the last block's index is cdiv(N, BLOCK_M) - 1
    return pid * BLOCK_M


@triton.jit
def _at(base, start, stride):
    """``base`` advanced by ``start * stride`` elements, computed in 64 bits: the per-program and
    per-tile offsets (batch, head, first row of a tile) that overflow int32 on large tensors."""
    return base + tl.cast(start, tl.int64) * stride


@triton.jit
def _lanes(BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """0 .. BLOCK-1, the in-tile offsets multiplied by a stride: int32 (cheap, enough while every
    stride is below 2**31 / 256), int64 with WIDE (strides for which even a tile's span overflows)."""
    lanes = tl.arange(0, BLOCK)
    if WIDE:
        lanes = lanes.to(tl.int64)
    return lanes


@triton.jit
def _fwd_tile(
    q, m_i, l_i, acc, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n, offs_m, offs_d, N, D, qk_scale,
    seg_q, KPM, SEG, mask_base, window,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr = True,
):  # fmt: skip
    """One step of the online softmax: fold keys [start_n, start_n + BLOCK_N) into (m_i, l_i, acc).

    MASKED=False is for tiles the caller knows every mask keeps whole (below the causal diagonal,
    inside the sequence, no padding or segments): no mask is built or applied there."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    k = tl.load(_at(k_base, start_n, skn) + lanes_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(_at(v_base, start_n, svn) + lanes_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), IEEE)
    # s stays in raw units: with qk_scale > 0, max(s) * qk_scale == max(s * qk_scale), so only the row
    # max is scaled and exp2(s * qk_scale - m) contracts into one FMA per element (no separate s * scale pass)
    if MASKED:
        valid = _block_mask(offs_m, offs_n, N, seg_q, KPM, SEG, mask_base, window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # base-2 scaled units, as m_i
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet stay at zero
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])  # masked entries: -inf * qk_scale - m = -inf: p = 0
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc += _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


_TUNE_KEY = ["N_TUNE", "BLOCK_D", "CAUSAL", "HAS_KPM", "HAS_SEG", "HAS_WINDOW"]


@triton.autotune(configs=_configs(FWD_TILES), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _for_head_dim(FWD_TILES)})  # fmt: skip
@triton.jit
def _attn_fwd(
    Q, K, V, Out, LSE, KPM, SEG, BOUNDS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, GROUP, N, N_TUNE, D, qk_scale, window,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    start_m = _query_block_start(N, BLOCK_M, CAUSAL)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lanes_m = _lanes(BLOCK_M, WIDE)
    lanes_n = _lanes(BLOCK_N, WIDE)
    offs_d = _lanes(BLOCK_D, WIDE)
    mask_base = b.to(tl.int64) * N
    q_mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    q_rows = _at(_at(_at(Q, b, sqb), h, sqh), start_m, sqn)
    q = tl.load(q_rows + lanes_m[:, None] * sqn + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    k_base = _at(_at(K, b, skb), kvh, skh)
    v_base = _at(_at(V, b, svb), kvh, svh)
    seg_q, seg_lo, seg_hi = _segment_range(offs_m, N, SEG, mask_base, HAS_SEG)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo_n = 0
    hi_n = N
    if CAUSAL:
        hi_n = tl.minimum(N, start_m + BLOCK_M)
    if HAS_WINDOW:  # key tiles older than the first query's window are never visited
        lo_n, first_whole = _window_keys(start_m, window, BLOCK_M, BLOCK_N)
    if HAS_KPM or HAS_SEG:  # only these masks can empty a whole tile: branch only then
        lo_n, hi_n = _key_range(offs_m, N, lo_n, hi_n, BOUNDS, b, HAS_KPM, HAS_SEG, BLOCK_N)
        # the tiles known whole from the bounds: a plain loop without masks or branches (it pipelines)
        # (not at head dims above 128, where an unmasked copy of the tile body spills, nor for the
        # 128x128 tile at head dim 128, which has no registers left for it: those run tile by tile)
        SPLIT: tl.constexpr = BLOCK_D <= 128 and BLOCK_M * BLOCK_N * BLOCK_D <= 128 * 64 * 128
        lo_full, hi_full = _whole_keys(start_m, N, lo_n, seg_lo, seg_hi, BOUNDS, b, window, CAUSAL, HAS_KPM,
                                       HAS_SEG, HAS_WINDOW, BLOCK_M, BLOCK_N, SPLIT)  # fmt: skip
        if SPLIT:
            for start_n in range(lo_full, hi_full, BLOCK_N):
                m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n,
                                          offs_m, offs_d, N, D, qk_scale, seg_q, KPM, SEG, mask_base, window,
                                          CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW, IEEE, BLOCK_N, False)  # fmt: skip
        # the others, [lo_n, lo_full) then [hi_full, hi_n), tile by tile
        for edge_n in range(lo_n, lo_full + (hi_n - hi_full), BLOCK_N):
            start_n = tl.where(edge_n < lo_full, edge_n, edge_n + (hi_full - lo_full))
            empty, whole = _tile_state(start_m, start_n, N, seg_lo, seg_hi, KPM, SEG, mask_base, window,
                                       BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW)  # fmt: skip
            whole = whole & (BLOCK_D <= 128)  # a second, unmasked copy of the tile spills at head dim 256
            if whole:  # inside one document, every key real, below the diagonal: no mask to build
                m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n,
                                          offs_m, offs_d, N, D, qk_scale, seg_q, KPM, SEG, mask_base, window,
                                          CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW, IEEE, BLOCK_N, False)  # fmt: skip
            elif not empty:
                m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n,
                                          offs_m, offs_d, N, D, qk_scale, seg_q, KPM, SEG, mask_base,
                                          window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW, IEEE, BLOCK_N)  # fmt: skip
    else:  # whole tiles first, without masks; then the diagonal (causal) or the ragged end
        lo_mask = (N // BLOCK_N) * BLOCK_N
        if CAUSAL:
            lo_mask = (start_m // BLOCK_N) * BLOCK_N
        lo_whole = lo_n
        if HAS_WINDOW:  # before them, masked, the tiles across the far edge of some query's window
            lo_whole = tl.minimum(((first_whole + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo_mask)
            for start_n in range(lo_n, lo_whole, BLOCK_N):
                m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n,
                                          offs_m, offs_d, N, D, qk_scale, seg_q, KPM, SEG, mask_base,
                                          window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW, IEEE, BLOCK_N)  # fmt: skip
        for start_n in range(lo_whole, lo_mask, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n,
                                      offs_m, offs_d, N, D, qk_scale, seg_q, KPM, SEG, mask_base,
                                      window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW, IEEE, BLOCK_N, False)  # fmt: skip
        for start_n in range(lo_mask, hi_n, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n,
                                      offs_m, offs_d, N, D, qk_scale, seg_q, KPM, SEG, mask_base,
                                      window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW, IEEE, BLOCK_N, True)  # fmt: skip
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_rows = _at(_at(_at(Out, b, sob), h, soh), start_m, son)
    tl.store(o_rows + lanes_m[:, None] * son + offs_d[None, :] * sod, out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(_at(LSE, bh, N) + offs_m, lse, mask=offs_m < N)


@triton.jit
def _dq_tile(
    q, do, lse, delta, dq, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n, offs_m, offs_d, N, D, qk_scale,
    seg_q, KPM, SEG, mask_base, window,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr = True,
):  # fmt: skip
    """dQ += dS K for the keys [start_n, start_n + BLOCK_N) (MASKED as in _fwd_tile)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    k = tl.load(_at(k_base, start_n, skn) + lanes_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(_at(v_base, start_n, svn) + lanes_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), IEEE)
    dp = _dot(do, tl.trans(v), IEEE)
    p = tl.math.exp2(s * qk_scale - lse[:, None])  # rows past the end have lse = inf: p = 0
    if MASKED:
        valid = _block_mask(offs_m, offs_n, N, seg_q, KPM, SEG, mask_base, window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW)
        p = tl.where(valid, p, 0.0)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, IEEE)
    return dq


@triton.jit
def _kv_tile(
    k, v, dk, dv, q_base, do_base, dqa_base, lse_base, delta_base, sqn, sqd, sdn, sdd, start_m, lanes_m, offs_n,
    offs_d, N, D, qk_scale, KPM, SEG, mask_base, window,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr = True,
):  # fmt: skip
    """dV += P^T dO and dK += dS^T Q for the queries [start_m, start_m + BLOCK_M) of one head; with
    DQ_ATOMIC also the fifth product, this key block's share of dQ, dS K, added into the fp32 buffer
    at dqa_base (rows of D) with atomics.

    Works on the transposes, S^T = K Q^T and dP^T = V dO^T (BLOCK_N, BLOCK_M), so that every product
    but dQ's has the held key block as its rows: the tensor-core tiles are as tall as BLOCK_N (wgmma
    wants 64 rows per warpgroup) and P^T, dS^T feed dV, dK without a transpose through shared memory.
    MASKED=False: every query of the tile is inside the sequence and at or after every key of the
    block (keys past the end may get garbage there, but their rows are never stored)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_m = offs_m < N
    q_t = tl.load(_at(q_base, start_m, sqn) + lanes_m[None, :] * sqn + offs_d[:, None] * sqd,
                  mask=in_m[None, :] & (offs_d[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_M)  # fmt: skip
    do = tl.load(_at(do_base, start_m, sdn) + lanes_m[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)  # fmt: skip
    lse = tl.load(lse_base + offs_m, mask=in_m, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=in_m, other=0.0)
    p_t = tl.math.exp2(_dot(k, q_t, IEEE) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
    if MASKED:
        seg_q, _, _ = _segment_range(offs_m, N, SEG, mask_base, HAS_SEG)
        valid = _block_mask(
            offs_m, offs_n, N, seg_q, KPM, SEG, mask_base, window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW, True
        )
        p_t = tl.where(valid, p_t, 0.0)
    dv += _dot(p_t.to(do.dtype), do, IEEE)
    ds_t = (p_t * (_dot(v, tl.trans(do), IEEE) - delta[None, :])).to(q_t.dtype)
    dk += _dot(ds_t, tl.trans(q_t), IEEE)
    if DQ_ATOMIC:  # keys past the end have k = 0 (masked load): they add nothing
        dq = _dot(tl.trans(ds_t), k, IEEE)  # (BLOCK_M, BLOCK_D), unscaled (the cast kernel scales)
        tl.atomic_add(_at(dqa_base, start_m, D) + lanes_m[:, None] * D + offs_d[None, :], dq,
                      mask=in_m[:, None] & (offs_d[None, :] < D), sem="relaxed")  # fmt: skip
    return dk, dv


@triton.jit
def _attn_bwd_delta(
    Out, DO, DELTA, DQA, sob, soh, son, sod, sdb, sdh, sdn, sdd, H, N, D,
    ZERO_DQA: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta[b, h, m] = sum_d dO * O: the row term of the softmax backward. ZERO_DQA: also clear the
    rows of the fused backward's fp32 dQ buffer (B, H, N, D), so it needs no separate memset."""
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lanes_m = _lanes(BLOCK_M, WIDE)
    offs_d = _lanes(BLOCK_D, WIDE)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    o_rows = _at(_at(_at(Out, b, sob), h, soh), start_m, son)
    do_rows = _at(_at(_at(DO, b, sdb), h, sdh), start_m, sdn)
    o = tl.load(o_rows + lanes_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_rows + lanes_m[:, None] * sdn + offs_d[None, :] * sdd, mask=mask, other=0.0).to(tl.float32)
    tl.store(_at(DELTA, bh, N) + offs_m, tl.sum(o * do, axis=1), mask=offs_m < N)
    if ZERO_DQA:
        dqa_rows = _at(DQA + tl.cast(bh, tl.int64) * N * D, start_m, D)
        tl.store(dqa_rows + lanes_m[:, None] * D + offs_d[None, :], tl.zeros([BLOCK_M, BLOCK_D], tl.float32), mask=mask)


@triton.jit
def _attn_bwd_dq_cast(
    DQA, DQ, sqgb, sqgh, sqgn, sqgd, H, N, D, sm_scale,
    WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dq = sm_scale * the fused backward's fp32 dQ sums, in dq's dtype and layout."""
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lanes_m = _lanes(BLOCK_M, WIDE)
    offs_d = _lanes(BLOCK_D, WIDE)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    dq = tl.load(
        _at(DQA + tl.cast(bh, tl.int64) * N * D, start_m, D) + lanes_m[:, None] * D + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    dq_rows = _at(_at(_at(DQ, b, sqgb), h, sqgh), start_m, sqgn)
    tl.store(dq_rows + lanes_m[:, None] * sqgn + offs_d[None, :] * sqgd, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=mask)  # fmt: skip


@triton.jit
def _bwd_kv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQA, KPM, SEG, BOUNDS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    skgb, skgh, skgn, skgd, svgb, svgh, svgn, svgd,
    H, HKV, GROUP, N, N_TUNE, D, qk_scale, sm_scale, window,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    WIDE: tl.constexpr, DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block of one key/value head, summed over the query heads of its group; with
    DQ_ATOMIC (the fused backward) also every query head's dQ share, added into DQA. Grid axis 0 is
    batch x key/value head, axis 1 the key block (block 0, the heaviest under a causal mask, first)."""
    bkv = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    b = bkv // HKV
    kvh = bkv % HKV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    lanes_m = _lanes(BLOCK_M, WIDE)
    lanes_n = _lanes(BLOCK_N, WIDE)
    offs_d = _lanes(BLOCK_D, WIDE)
    mask_base = b.to(tl.int64) * N
    kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    k_rows = _at(_at(_at(K, b, skb), kvh, skh), start_n, skn)
    v_rows = _at(_at(_at(V, b, svb), kvh, svh), start_n, svn)
    k = tl.load(k_rows + lanes_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(v_rows + lanes_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    _, seg_lo, seg_hi = _segment_range(offs_n, N, SEG, mask_base, HAS_SEG)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo_m = 0
    if CAUSAL:
        lo_m = (start_n // BLOCK_M) * BLOCK_M
    hi_m = N
    if HAS_SEG:  # only the queries of documents that have keys in this block
        lo_m, hi_m = _query_range(offs_n, N, lo_m, BOUNDS, b, HAS_SEG, BLOCK_M)
    if HAS_WINDOW:  # query tiles past the window of the block's last key are never visited
        hi_window, end_whole = _window_queries(start_n, window, BLOCK_N)
        hi_m = tl.minimum(hi_m, hi_window)
    keys_whole = start_n + BLOCK_N <= N  # every key of the block real (no padding, inside the row)
    if HAS_KPM:  # a key block that is all padding gets zero gradients without visiting any query
        keep = tl.load(KPM + mask_base + offs_n, mask=offs_n < N, other=0).to(tl.int32)
        hi_m = tl.where(tl.max(keep, axis=0) == 0, 0, hi_m)
        keys_whole = keys_whole & (tl.min(keep, axis=0) != 0)
    if HAS_SEG or HAS_KPM:
        lo_full, hi_full = _whole_queries(start_n, N, lo_m, keys_whole, seg_lo, seg_hi, BOUNDS, b, window, CAUSAL,
                                          HAS_SEG, HAS_WINDOW, BLOCK_M, BLOCK_N, BLOCK_D)  # fmt: skip
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        bh = b * H + h
        q_base = _at(_at(Q, b, sqb), h, sqh)
        do_base = _at(_at(DO, b, sdb), h, sdh)
        dqa_base = DQA + tl.cast(bh, tl.int64) * N * D
        lse_base = _at(LSE, bh, N)
        delta_base = _at(DELTA, bh, N)
        if HAS_SEG or HAS_KPM:
            # the query tiles known whole from the bounds: a plain loop without masks or branches
            if BLOCK_D <= 128:  # see _attn_fwd
                for start_m in range(lo_full, hi_full, BLOCK_M):
                    dk, dv = _kv_tile(k, v, dk, dv, q_base, do_base, dqa_base, lse_base, delta_base, sqn, sqd, sdn,
                                      sdd, start_m, lanes_m, offs_n, offs_d, N, D, qk_scale, KPM, SEG, mask_base,
                                      window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW,
                                      IEEE, DQ_ATOMIC, BLOCK_M, False)  # fmt: skip
            # the others, [lo_m, lo_full) then [hi_full, hi_m), tile by tile
            for edge_m in range(lo_m, lo_full + (hi_m - hi_full), BLOCK_M):
                start_m = tl.where(edge_m < lo_full, edge_m, edge_m + (hi_full - lo_full))
                # skip query tiles of other documents (the causal range is already cut by lo_m); run the
                # tiles inside one document, past the diagonal, over real keys without a mask
                visit = start_m < N
                whole = keys_whole & (start_m + BLOCK_M <= N) & (BLOCK_D <= 128)  # see _attn_fwd
                if CAUSAL:
                    whole = whole & (start_m >= start_n + BLOCK_N - 1)
                if HAS_WINDOW:  # the tile's last query still sees the block's first key
                    whole = whole & (start_m + BLOCK_M <= end_whole)
                if HAS_SEG:
                    seg_q_tile, q_lo, q_hi = _segment_range(start_m + tl.arange(0, BLOCK_M), N, SEG, mask_base,
                                                            HAS_SEG)  # fmt: skip
                    visit = visit & (q_hi >= seg_lo) & (q_lo <= seg_hi)
                    whole = whole & (q_lo == q_hi) & (seg_lo == seg_hi) & (q_lo == seg_lo)
                if whole:
                    dk, dv = _kv_tile(k, v, dk, dv, q_base, do_base, dqa_base, lse_base, delta_base, sqn, sqd, sdn,
                                      sdd, start_m, lanes_m, offs_n, offs_d, N, D, qk_scale, KPM, SEG, mask_base,
                                      window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW,
                                      IEEE, DQ_ATOMIC, BLOCK_M, False)  # fmt: skip
                elif visit:
                    dk, dv = _kv_tile(k, v, dk, dv, q_base, do_base, dqa_base, lse_base, delta_base, sqn, sqd, sdn,
                                      sdd, start_m, lanes_m, offs_n, offs_d, N, D, qk_scale, KPM, SEG, mask_base,
                                      window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW,
                                      IEEE, DQ_ATOMIC, BLOCK_M)  # fmt: skip
        else:
            # Query tiles that straddle the diagonal are masked, then whole tiles run unmasked, then
            # the ragged end of the sequence (or the tiles across the far edge of the keys' sliding
            # window, up to hi_m) is masked again.
            mid_lo = lo_m
            if CAUSAL:
                mid_lo = lo_m + ((start_n + BLOCK_N - 1 - lo_m + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
            mid_hi = tl.maximum(mid_lo, (N // BLOCK_M) * BLOCK_M)
            if HAS_WINDOW:
                mid_hi = tl.maximum(mid_lo, (tl.minimum(N, end_whole) // BLOCK_M) * BLOCK_M)
            for start_m in range(lo_m, tl.minimum(mid_lo, hi_m), BLOCK_M):
                dk, dv = _kv_tile(k, v, dk, dv, q_base, do_base, dqa_base, lse_base, delta_base, sqn, sqd, sdn, sdd,
                                  start_m, lanes_m, offs_n, offs_d, N, D, qk_scale, KPM, SEG, mask_base, window,
                                  CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW, IEEE, DQ_ATOMIC, BLOCK_M, True)  # fmt: skip
            for start_m in range(mid_lo, mid_hi, BLOCK_M):
                dk, dv = _kv_tile(k, v, dk, dv, q_base, do_base, dqa_base, lse_base, delta_base, sqn, sqd, sdn, sdd,
                                  start_m, lanes_m, offs_n, offs_d, N, D, qk_scale, KPM, SEG, mask_base, window,
                                  CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW, IEEE, DQ_ATOMIC, BLOCK_M, False)  # fmt: skip
            for start_m in range(mid_hi, hi_m, BLOCK_M):
                dk, dv = _kv_tile(k, v, dk, dv, q_base, do_base, dqa_base, lse_base, delta_base, sqn, sqd, sdn, sdd,
                                  start_m, lanes_m, offs_n, offs_d, N, D, qk_scale, KPM, SEG, mask_base, window,
                                  CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW, IEEE, DQ_ATOMIC, BLOCK_M, True)  # fmt: skip
    dk = dk * sm_scale
    dk_rows = _at(_at(_at(DK, b, skgb), kvh, skgh), start_n, skgn)
    dv_rows = _at(_at(_at(DV, b, svgb), kvh, svgh), start_n, svgn)
    tl.store(dk_rows + lanes_n[:, None] * skgn + offs_d[None, :] * skgd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_rows + lanes_n[:, None] * svgn + offs_d[None, :] * svgd, dv.to(DV.dtype.element_ty), mask=kv_mask)


# The same kernel under two autotuners: the deterministic dK/dV kernel (DQ_ATOMIC=False) and the fused
# five-product backward (DQ_ATOMIC=True), whose trials each add into DQA: it is zeroed before each one.
_attn_bwd_dkdv = triton.autotune(
    configs=_configs(DKDV_TILES), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _for_head_dim(DKDV_TILES)}
)(_bwd_kv)
_attn_bwd = triton.autotune(
    configs=_configs(BWD_TILES),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _for_head_dim(BWD_TILES)},
    reset_to_zero=["DQA"],
)(_bwd_kv)


@triton.autotune(configs=_configs(DQ_TILES), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _for_head_dim(DQ_TILES)})  # fmt: skip
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, KPM, SEG, BOUNDS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    sqgb, sqgh, sqgn, sqgd,
    H, GROUP, N, N_TUNE, D, qk_scale, sm_scale, window,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dQ of one query block of one query head (the deterministic backward)."""
    bh = tl.program_id(0)
    start_m = _query_block_start(N, BLOCK_M, CAUSAL)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lanes_m = _lanes(BLOCK_M, WIDE)
    lanes_n = _lanes(BLOCK_N, WIDE)
    offs_d = _lanes(BLOCK_D, WIDE)
    mask_base = b.to(tl.int64) * N
    q_mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    q_rows = _at(_at(_at(Q, b, sqb), h, sqh), start_m, sqn)
    do_rows = _at(_at(_at(DO, b, sdb), h, sdh), start_m, sdn)
    q = tl.load(q_rows + lanes_m[:, None] * sqn + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(do_rows + lanes_m[:, None] * sdn + offs_d[None, :] * sdd, mask=q_mask, other=0.0)
    lse = tl.load(_at(LSE, bh, N) + offs_m, mask=offs_m < N, other=float("inf"))
    delta = tl.load(_at(DELTA, bh, N) + offs_m, mask=offs_m < N, other=0.0)
    seg_q, seg_lo, seg_hi = _segment_range(offs_m, N, SEG, mask_base, HAS_SEG)
    k_base = _at(_at(K, b, skb), kvh, skh)
    v_base = _at(_at(V, b, svb), kvh, svh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo_n = 0
    hi_n = N
    if CAUSAL:
        hi_n = tl.minimum(N, start_m + BLOCK_M)
    if HAS_WINDOW:  # as in the forward: key tiles older than the first query's window are never visited
        lo_n, first_whole = _window_keys(start_m, window, BLOCK_M, BLOCK_N)
    if HAS_KPM or HAS_SEG:
        lo_n, hi_n = _key_range(offs_m, N, lo_n, hi_n, BOUNDS, b, HAS_KPM, HAS_SEG, BLOCK_N)
        # as in the forward: the tiles known whole in a plain loop, then the others tile by tile
        lo_full, hi_full = _whole_keys(start_m, N, lo_n, seg_lo, seg_hi, BOUNDS, b, window, CAUSAL, HAS_KPM,
                                       HAS_SEG, HAS_WINDOW, BLOCK_M, BLOCK_N, BLOCK_D <= 128)  # fmt: skip
        if BLOCK_D <= 128:
            for start_n in range(lo_full, hi_full, BLOCK_N):
                dq = _dq_tile(q, do, lse, delta, dq, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n, offs_m,
                              offs_d, N, D, qk_scale, seg_q, KPM, SEG, mask_base, window, CAUSAL, HAS_KPM, HAS_SEG,
                              HAS_WINDOW, IEEE, BLOCK_N, False)  # fmt: skip
        for edge_n in range(lo_n, lo_full + (hi_n - hi_full), BLOCK_N):
            start_n = tl.where(edge_n < lo_full, edge_n, edge_n + (hi_full - lo_full))
            empty, whole = _tile_state(start_m, start_n, N, seg_lo, seg_hi, KPM, SEG, mask_base, window,
                                       BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW)  # fmt: skip
            if not empty:  # a whole tile here (between holes of the padding) is masked too: unlike the
                # forward's, a third, unmasked copy of the tile body spills the dQ kernel's tiles
                dq = _dq_tile(q, do, lse, delta, dq, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n, offs_m,
                              offs_d, N, D, qk_scale, seg_q, KPM, SEG, mask_base, window, CAUSAL, HAS_KPM, HAS_SEG,
                              HAS_WINDOW, IEEE, BLOCK_N)  # fmt: skip
    else:  # as in the forward: whole tiles unmasked, then the diagonal or the ragged end
        lo_mask = (N // BLOCK_N) * BLOCK_N
        if CAUSAL:
            lo_mask = (start_m // BLOCK_N) * BLOCK_N
        lo_whole = lo_n
        if HAS_WINDOW:  # before them, masked, the tiles across the far edge of some query's window
            lo_whole = tl.minimum(((first_whole + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo_mask)
            for start_n in range(lo_n, lo_whole, BLOCK_N):
                dq = _dq_tile(q, do, lse, delta, dq, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n, offs_m,
                              offs_d, N, D, qk_scale, seg_q, KPM, SEG, mask_base, window, CAUSAL, HAS_KPM, HAS_SEG,
                              HAS_WINDOW, IEEE, BLOCK_N)  # fmt: skip
        for start_n in range(lo_whole, lo_mask, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, dq, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n, offs_m, offs_d,
                          N, D, qk_scale, seg_q, KPM, SEG, mask_base, window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW,
                          IEEE, BLOCK_N, False)  # fmt: skip
        for start_n in range(lo_mask, hi_n, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, dq, k_base, v_base, skn, skd, svn, svd, start_n, lanes_n, offs_m, offs_d,
                          N, D, qk_scale, seg_q, KPM, SEG, mask_base, window, CAUSAL, HAS_KPM, HAS_SEG, HAS_WINDOW,
                          IEEE, BLOCK_N, True)  # fmt: skip
    dq = dq * sm_scale
    dq_rows = _at(_at(_at(DQ, b, sqgb), h, sqgh), start_m, sqgn)
    tl.store(dq_rows + lanes_m[:, None] * sqgn + offs_d[None, :] * sqgd, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _segment_extent(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of (B, N) segment ids: the first and the last position of its id in its row."""
    B, N = seg.shape
    ids, order = seg.sort(dim=1, stable=True)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group = starts.cumsum(1) - 1  # (B, N): which distinct id, in sorted order
    first = torch.full_like(order, N).scatter_reduce(1, group, order, "amin")  # per distinct id
    last = torch.full_like(order, -1).scatter_reduce(1, group, order, "amax")
    # back from sorted order to positions (order is a permutation, so every position is written)
    at_position = [torch.empty_like(order).scatter_(1, order, per_id.gather(1, group)) for per_id in (first, last)]
    return at_position[0], at_position[1]


def _bounds(kpm: torch.Tensor | None, seg: torch.Tensor | None, B: int, N: int, device) -> torch.Tensor | None:
    """int32 (B, 4N + 3), per row: columns [0, N) and [N, 2N), per position the first and the last
    position of its segment id in the row; 2N and 2N + 1, the row's first and last real key (N and -1
    when there is none); [2N + 2, 3N + 2) and [3N + 2, 4N + 2), per position the first and the last
    position of the run of equal segment ids that holds it (a document, unless its id recurs); 4N + 2,
    the last real key again when the real keys are contiguous (no padding between them), else -1.
    The kernels visit only the tiles between the first pair and the real keys, so packed documents
    and padding cost what they hold, not the square of the row, and run the tiles that the runs and
    contiguous real keys make whole in plain loops without masks (see _whole_keys, _whole_queries)."""
    if kpm is None and seg is None:
        return None
    bounds = torch.zeros((B, 4 * N + 3), dtype=torch.int32, device=device)
    pos = torch.arange(N, device=device)
    if seg is not None:
        first, last = _segment_extent(seg)
        bounds[:, :N], bounds[:, N : 2 * N] = first, last
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        ends = torch.ones_like(seg, dtype=torch.bool)
        ends[:, :-1] = starts[:, 1:]
        bounds[:, 2 * N + 2 : 3 * N + 2] = torch.where(starts, pos, 0).cummax(1).values
        bounds[:, 3 * N + 2 : 4 * N + 2] = torch.where(ends, pos, N).flip(1).cummin(1).values.flip(1)
    if kpm is not None:
        real = kpm != 0
        first_real = torch.where(real, pos, N).amin(1)
        last_real = torch.where(real, pos, -1).amax(1)
        bounds[:, 2 * N], bounds[:, 2 * N + 1] = first_real, last_real
        contiguous = real.sum(1) == last_real - first_real + 1  # no padding between the real keys
        bounds[:, 4 * N + 2] = torch.where(contiguous, last_real, -1)
    return bounds


# The masks of the last call and what was derived from them. Every layer of a model passes the same
# mask tensors, so the conversions and the bounds (a sort per row) are made once per batch, not once
# per layer; the tensors' version counters catch an in-place change.
_last_masks: tuple | None = None


def _masks(q: torch.Tensor, key_padding_mask, segment_ids):
    """(kpm int8, segment ids int64, bounds) on q's device, each None when not given; checked shapes."""
    global _last_masks
    if torch.compiler.is_compiling():  # traced: no cache (a graph cannot test identity or versions)
        return _derive_masks(q, key_padding_mask, segment_ids)
    B, N = q.shape[0], q.shape[2]
    sources = (key_padding_mask, segment_ids)
    try:
        versions = tuple(None if t is None else t._version for t in sources)
    except RuntimeError:  # inference-mode tensors keep no version counter: nothing is cached for them
        versions = None
    if _last_masks is not None and versions is not None:
        last_sources, last_versions, last_where, derived = _last_masks
        same = all(a is b for a, b in zip(sources, last_sources))
        if same and versions == last_versions and last_where == (q.device, B, N):
            return derived
    derived = _derive_masks(q, key_padding_mask, segment_ids)
    if versions is not None and (key_padding_mask is not None or segment_ids is not None):
        _last_masks = (sources, versions, (q.device, B, N), derived)
    return derived


def _derive_masks(q: torch.Tensor, key_padding_mask, segment_ids):
    B, N = q.shape[0], q.shape[2]
    kpm = seg = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, N):
            raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (B, N) = {(B, N)}")
        kpm = key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
    if segment_ids is not None:
        if segment_ids.shape != (B, N):
            raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected (B, N) = {(B, N)}")
        seg = segment_ids.to(device=q.device, dtype=torch.int64).contiguous()  # any integer ids, compared exactly
    return kpm, seg, _bounds(kpm, seg, B, N, q.device)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("flash_attention expects q, k, v of shape (B, H, N, D)")
    B, H, N, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != N or k.shape[3] != D:
        raise ValueError(
            f"flash_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree "
            "on batch, length and head dim (self-attention)"
        )
    if H % k.shape[1]:
        raise ValueError(f"flash_attention: {H} query heads are not a multiple of {k.shape[1]} key/value heads")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {D} is above the supported {MAX_HEAD_DIM}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention: dtype {q.dtype} is not supported (float16, bfloat16, float32)")


def _tuning_length(N: int) -> int:
    """The autotuning key for length N: its power-of-two bucket (at least 64). Fine-tuning batches are
    padded to their longest example, so N changes from batch to batch; keyed on N itself, the autotuner
    would time every tile shape again for each new length. N_TUNE is not used inside the kernels."""
    return max(64, triton.next_power_of_2(N))


def _dummy(q: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, device=q.device, dtype=torch.int32)


def _wide(*tensors: torch.Tensor) -> bool:
    """WIDE for the kernels: some stride of a row or of the head dim is so large that even offsets
    inside one tile (up to 256 rows or columns) could pass int32; per-program and per-tile offsets are
    64-bit anyway (see _at)."""
    return any(abs(s) * 256 >= 2**31 for t in tensors for s in t.stride()[2:])


def _window_arg(window: int | None, N: int) -> int:
    """The kernels' runtime ``window``: 0 without one (HAS_WINDOW off), else at most N (a window of N
    or more is plain causal attention; the cap keeps the kernels' bounds far from int32's limit)."""
    return 0 if window is None else min(window, N)


def _forward(q, k, v, causal, scale, kpm, seg, bounds, deterministic=False, window=None):
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    block_d = _block_d(D)
    # The forward scales each row's max, not every score (see _fwd_tile), which needs scale > 0. Any
    # other scale goes through q: q * scale == (-q) * |scale|, and a zero scale is a zero q at scale 1.
    # The logsumexp is the same either way, so the backward takes the true q and scale.
    q_in, fwd_scale = q, scale
    if scale < 0:
        q_in, fwd_scale = -q, -scale
    elif scale == 0:
        q_in, fwd_scale = torch.zeros_like(q), 1.0
    n_tune = _tuning_length(N)
    grid = lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_M"]))  # noqa: E731
    args = (
        q_in, k, v, o, lse, *(t if t is not None else _dummy(q) for t in (kpm, seg, bounds)),
        *q_in.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, H // k.shape[1], N, n_tune, D, fwd_scale * LOG2E, _window_arg(window, N),
    )  # fmt: skip
    flags = dict(CAUSAL=causal, HAS_KPM=kpm is not None, HAS_SEG=seg is not None, HAS_WINDOW=window is not None,
                 IEEE=q.dtype == torch.float32, WIDE=_wide(q_in, k, v, o), BLOCK_D=block_d)  # fmt: skip
    key = _tune_key(n_tune, block_d, q.dtype, causal, kpm, seg, window)
    _launch("fwd", _attn_fwd, grid, args, flags, key, block_d, deterministic)
    return o, lse


def _backward(do, q, k, v, o, lse, causal, scale, kpm, seg, bounds, deterministic=False, window=None):
    """dq, dk, dv. Deterministic: the two-kernel backward (dK/dV, then dQ; no atomics) on pinned or
    first-listed tiles. Otherwise the fused backward: one kernel per key block computes all five
    products and adds dQ into an fp32 buffer with atomics; a small kernel scales and casts it."""
    B, H, N, D = q.shape
    HKV = k.shape[1]
    block_d = _block_d(D)
    n_tune = _tuning_length(N)
    fused = not deterministic
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    wide = _wide(q, k, v, do, o, dq, dk, dv)
    # the fused backward's dQ sums, zeroed by the delta kernel (no separate memset)
    dqa = torch.empty((B, H, N, D), device=q.device, dtype=torch.float32) if fused else _dummy(q)
    _attn_bwd_delta[(B * H, triton.cdiv(N, 64))](
        o, do, delta, dqa, *o.stride(), *do.stride(), H, N, D, ZERO_DQA=fused, WIDE=wide, BLOCK_M=64, BLOCK_D=block_d
    )
    masks = [t if t is not None else _dummy(q) for t in (kpm, seg, bounds)]
    flags = dict(CAUSAL=causal, HAS_KPM=kpm is not None, HAS_SEG=seg is not None, HAS_WINDOW=window is not None,
                 IEEE=q.dtype == torch.float32, WIDE=wide, BLOCK_D=block_d)  # fmt: skip
    key = _tune_key(n_tune, block_d, q.dtype, causal, kpm, seg, window)
    win = _window_arg(window, N)
    kv_args = (
        q, k, v, do, lse, delta, dk, dv, dqa, *masks,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, HKV, H // HKV, N, n_tune, D, scale * LOG2E, scale, win,
    )  # fmt: skip
    kv_grid = lambda meta: (B * HKV, triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    if fused:
        _launch("bwd", _attn_bwd, kv_grid, kv_args, dict(flags, DQ_ATOMIC=True), key, block_d, False)
        _attn_bwd_dq_cast[(B * H, triton.cdiv(N, 64))](
            dqa, dq, *dq.stride(), H, N, D, scale, WIDE=wide, BLOCK_M=64, BLOCK_D=block_d
        )
        return dq, dk, dv
    _launch("dkdv", _attn_bwd_dkdv, kv_grid, kv_args, dict(flags, DQ_ATOMIC=False), key, block_d, True)
    dq_args = (
        q, k, v, do, lse, delta, dq, *masks,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, H // HKV, N, n_tune, D, scale * LOG2E, scale, win,
    )  # fmt: skip
    dq_grid = lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_M"]))  # noqa: E731
    _launch("dq", _attn_bwd_dq, dq_grid, dq_args, flags, key, block_d, True)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom ops, autograd and the public API
# ----------------------------------------------------------------------------------------------
#
# The launchers run behind two custom ops, so torch.compile keeps them in its graph as opaque nodes
# (their fake implementations give the output shapes): lmforge::flash_attn_fwd -> (out, lse) and
# lmforge::flash_attn_bwd -> (dq, dk, dv); flash_attn_fwd's registered autograd formula calls
# flash_attn_bwd. With fallback=True an op whose kernel cannot be built or launched here (one of
# BUILD_ERRORS) computes through torch instead (the forward with lmforge.kernels.sdpa, the backward
# with its gradients written out), warns once and goes to torch directly from then on: this is how
# ``attention: auto`` survives such a GPU inside a compiled graph, where no Python around the op sees
# the error. (An op's implementation runs below autograd: it cannot recompute under autograd.)


_fallback_warned = False  # the backward fallback's warning is logged once per process


def _backward_key(q, causal, kpm, seg, window) -> tuple:
    """What a compiled attention kernel is specialised on: a case of the failure memory (kernels.known_failure)."""
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    return (str(q.device), q.dtype, block_d, causal, kpm is None, seg is None, window is None)


def _fallback_backward(fallback, do, q, k, v):
    """dq, dk, dv of ``fallback(q, k, v)`` for the upstream gradient ``do``, by recomputing its output."""
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
        out = fallback(*leaves)
        grads = torch.autograd.grad(out, leaves, do.to(out.dtype), allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))


def _torch_attention(causal, scale, kpm, seg, window) -> Callable:
    return functools.partial(sdpa, causal=causal, scale=scale, key_padding_mask=kpm, segment_ids=seg, window=window)


def _torch_backward(do, q, k, v, causal, scale, kpm, seg, window):
    """dq, dk, dv of :func:`lmforge.kernels.sdpa` for the upstream gradient ``do``: the softmax's
    backward written out in fp32 (an op's implementation runs below autograd, so none is recorded)."""
    B, H, N, D = q.shape
    H_kv = k.shape[1]
    group = H // H_kv
    qf, dof = q.float(), do.float()
    kf, vf = (t.float().repeat_interleave(group, dim=1) for t in (k, v))  # (B, H, N, D)
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool, device=q.device)
    if causal:
        band = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()  # (N, N)
        allowed = allowed & (band if window is None else band.triu(1 - window))  # as sdpa's window
    if kpm is not None:
        allowed = allowed & kpm.bool()[:, None, None, :]
    if seg is not None:
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    has_key = allowed.any(dim=-1, keepdim=True)  # rows with no key: output 0, gradients 0
    s = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(s, dim=-1) * has_key  # (B, H, N, N)
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = ((ds.transpose(-1, -2) @ qf) * scale).view(B, H_kv, group, N, D).sum(dim=2)
    dv = (p.transpose(-1, -2) @ dof).view(B, H_kv, group, N, D).sum(dim=2)
    return dq, dk, dv


def _like(ref: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in a new tensor with ``ref``'s layout: what the fake implementations promise."""
    return torch.empty_like(ref).copy_(value)


def _warn_fallback(error: BaseException) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    lines = str(error).strip().splitlines()
    log.warning(
        "flash_attention: the Triton backward could not be built or launched (%s: %s); computing the "
        "gradients with the fallback attention instead",
        type(error).__name__,
        lines[0] if lines else "",
    )


_OPT = (
    "Tensor? kpm, Tensor? seg, Tensor? bounds, bool causal, float scale, bool fallback, bool deterministic=False, "
    "int? window=None"
)


@custom_op("flash_attn_fwd", f"(Tensor q, Tensor k, Tensor v, {_OPT}) -> (Tensor, Tensor)")
def flash_attn_fwd(q, k, v, kpm, seg, bounds, causal, scale, fallback, deterministic=False, window=None):
    """(out like q, fp32 logsumexp (B, H, N) in base 2). kpm, seg, bounds: as made by ``_masks``;
    deterministic: pinned or first-listed tiles, never the autotuner's run-dependent pick; window:
    the sliding window (checked by flash_attention) or None."""
    key = _backward_key(q, causal, kpm, seg, window)
    if not (fallback and known_failure(("flash_attn_fwd", *key))):
        try:
            return _forward(q, k, v, causal, scale, kpm, seg, bounds, deterministic, window)
        except BUILD_ERRORS as error:
            if not fallback:
                raise
            why = build_failed(("flash_attn_fwd", *key), error)
            log.warning(
                "flash_attention: the Triton forward could not be built or launched (%s); computing %s "
                "with torch attention from now on", why, key[1:],
            )  # fmt: skip
    with torch.no_grad():
        out = _like(q, _torch_attention(causal, scale, kpm, seg, window)(q, k, v))
    # no logsumexp: the backward of a case whose forward fell back recomputes through torch as well
    return out, torch.full(q.shape[:3], float("nan"), device=q.device, dtype=torch.float32)


@flash_attn_fwd.register_fake
def _(q, k, v, kpm, seg, bounds, causal, scale, fallback, deterministic=False, window=None):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@custom_op("flash_attn_bwd", f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_OPT}) -> "
           "(Tensor, Tensor, Tensor)")  # fmt: skip
def flash_attn_bwd(dout, q, k, v, out, lse, kpm, seg, bounds, causal, scale, fallback, deterministic=False,
                   window=None):  # fmt: skip
    """(dq, dk, dv), each like its input, for the upstream gradient ``dout`` of ``out``; deterministic:
    the two-kernel backward without atomics, on pinned or first-listed tiles."""
    key = _backward_key(q, causal, kpm, seg, window)
    if not (fallback and (known_failure(("flash_attn_bwd", *key)) or known_failure(("flash_attn_fwd", *key)))):
        try:
            return _backward(dout, q, k, v, out, lse, causal, scale, kpm, seg, bounds, deterministic, window)
        except BUILD_ERRORS as error:
            if not fallback:
                raise
            _warn_fallback(error)
            build_failed(("flash_attn_bwd", *key), error)
    grads = _torch_backward(dout, q, k, v, causal, scale, kpm, seg, window)
    return tuple(_like(t, g) for t, g in zip((q, k, v), grads))


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, kpm, seg, bounds, causal, scale, fallback, deterministic=False, window=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, seg, bounds, causal, scale, fallback, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, seg, bounds)
    ctx.causal, ctx.scale, ctx.fallback = causal, scale, fallback
    ctx.deterministic = bool(rest[0]) if rest else False
    ctx.window = rest[1] if len(rest) > 1 else None
    ctx.mark_non_differentiable(lse)


def _backward_formula(ctx, dout, dlse):
    q, k, v, out, lse, kpm, seg, bounds = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(
        dout, q, k, v, out, lse, kpm, seg, bounds, ctx.causal, ctx.scale, ctx.fallback, ctx.deterministic, ctx.window
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_backward_formula, setup_context=_setup_context)


class _CallableFallbackFunction(torch.autograd.Function):
    """flash_attention with a ``backward_fallback`` callable: the callable's gradients when the Triton
    backward cannot be built (a Python callable cannot enter a custom op, so this runs in eager)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kpm, seg, bounds, backward_fallback, deterministic, window):
        o, lse = flash_attn_fwd(q, k, v, kpm, seg, bounds, causal, scale, False, deterministic, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.kpm, ctx.seg, ctx.bounds = causal, scale, kpm, seg, bounds
        ctx.deterministic, ctx.window = deterministic, window
        ctx.backward_fallback = backward_fallback
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        fallback = ctx.backward_fallback
        case = ("flash_attn_bwd", *_backward_key(q, ctx.causal, ctx.kpm, ctx.seg, ctx.window))
        if known_failure(case):  # it failed before: do not rebuild it every step
            dq, dk, dv = _fallback_backward(fallback, do, q, k, v)
        else:
            try:
                dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, ctx.kpm, ctx.seg, ctx.bounds, ctx.causal, ctx.scale,
                                            False, ctx.deterministic, ctx.window)  # fmt: skip
            except BUILD_ERRORS as error:
                _warn_fallback(error)
                build_failed(case, error)
                dq, dk, dv = _fallback_backward(fallback, do, q, k, v)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    backward_fallback: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | bool | None = None,
    deterministic: bool | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Fused attention. q: (B, H, N, D); k, v: (B, H_kv, N, D) with H_kv dividing H.

    key_padding_mask: (B, N) bool, True for real tokens. segment_ids: (B, N) ints; a query attends
    only to keys with its id (packed documents). window: Mistral's sliding window, a positive int
    (None: unlimited) that needs causal=True (else ValueError): query i attends only to keys j with
    i - window < j <= i, and key tiles outside every query's window are never visited. Rows that
    can attend to nothing give zeros.
    Runs on CUDA (fp16, bf16; fp32 computes its products in full precision, slowly) and on CPU
    under ``TRITON_INTERPRET=1`` for testing. Works under ``torch.compile`` (custom ops
    ``lmforge::flash_attn_fwd`` / ``lmforge::flash_attn_bwd``; no graph break).

    backward_fallback: what to do when a Triton kernel raises one of :data:`BUILD_ERRORS` (it cannot
    be built or launched on this GPU); without it, the error propagates.

    - ``True``: the forward computes with :func:`lmforge.kernels.sdpa` instead (the same attention
      in plain torch) and the backward with its gradients written out in torch (fp32), inside the
      ops, so this works in a compiled graph too; a warning is logged once (per case for the
      forward) and later calls of that case go to torch directly.
    - ``f(q, k, v) -> out``, the same attention (masks, scale and all, bound by the caller, e.g. with
      functools.partial) in plain PyTorch: the backward's gradients are those of ``f``'s output
      recomputed under autograd; a warning is logged once per process, and later backwards of the
      same kind (device, dtype, head dim, causal, masks) go to ``f`` directly. Eager mode only: a
      compiled graph cannot hand a Python callable to the op (use ``True`` there).

    deterministic: ``None`` follows ``torch.are_deterministic_algorithms_enabled()`` at call time.
    True: the two-kernel backward (dK/dV, then dQ; no atomics) and, for every kernel, the tile pinned
    for the launch's autotune key (:func:`pin_tiles`) or else the first listed for its head dim, so
    that two processes (two DDP ranks) give bitwise-identical gradients. False: the fused
    five-product backward, whose dQ is summed with fp32 atomics (not bitwise reproducible).
    """
    _check(q, k, v)
    check_window(window, causal)
    kpm, seg, bounds = _masks(q, key_padding_mask, segment_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    deterministic = bool(deterministic)
    if callable(backward_fallback):
        return _CallableFallbackFunction.apply(
            q, k, v, causal, scale, kpm, seg, bounds, backward_fallback, deterministic, window
        )
    out, _ = flash_attn_fwd(
        q, k, v, kpm, seg, bounds, causal, scale, backward_fallback is True, deterministic=deterministic, window=window
    )
    return out


class FlashAttention(torch.nn.Module):
    """:func:`flash_attention` as a module, for models built from modules."""

    def __init__(self, causal: bool = True, scale: float | None = None, window: int | None = None) -> None:
        super().__init__()
        check_window(window, causal)
        self.causal, self.scale, self.window = causal, scale, window

    def forward(self, q, k, v, key_padding_mask=None, segment_ids=None):
        return flash_attention(q, k, v, causal=self.causal, scale=self.scale, key_padding_mask=key_padding_mask,
                               segment_ids=segment_ids, window=self.window)  # fmt: skip
