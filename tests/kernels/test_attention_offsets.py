"""Attention on tensors whose element offsets pass int32: the kernels' 64-bit pointer arithmetic.

In the model's (B, N, H, D) layout viewed as (B, H, N, D), the row stride is H*D, so ``row * stride``
passes 2**31 once N*H*D does. The kernels advance 64-bit base pointers by ``start * stride`` (batch,
head, first row of a tile) and keep in-tile offsets in int32, unless some stride is so large that a
tile's own span passes int32 (then WIDE makes them 64-bit too).

The tensors here are real: views of a sparse file mapped with ``torch.from_file(shared=True)``, many
GiB large, of which only the touched pages (the few heads used, per row) take memory or disk. The
views keep the huge strides; the reference runs on small contiguous copies.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the import of the kernel module (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lmforge.kernels.attention as attention  # noqa: E402
import pytest  # noqa: E402
from lmforge.kernels.attention import use_tiles  # noqa: E402

from tests.kernels.test_attention import NAMES, assert_close, run_kernel, run_reference  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU views of a mapped file (interpreter)")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def mapped(tmp_path):
    """mapped(N, heads, D, dtype): a (1, N, heads, D) tensor on a sparse file (nothing written yet)."""
    made = []

    def make(N, heads, D, dtype):
        path = tmp_path / f"storage-{len(made)}.bin"
        numel = N * heads * D
        with open(path, "wb") as f:
            f.truncate(numel * torch.empty((), dtype=dtype).element_size())  # a hole: no disk, no memory
        made.append(path)
        return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(1, N, heads, D)

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def _qkv_views(storage, H, H_kv, seed):
    """q, k, v, dout: (1, h, N, D) views of disjoint heads of a (1, N, heads, D) storage, filled with
    random values (only their rows are written), and contiguous copies for the reference."""
    _, N, _, D = storage.shape
    g = torch.Generator().manual_seed(seed)
    views, start = [], 0
    for h in (H, H_kv, H_kv, H):
        view = storage[:, :, start : start + h].transpose(1, 2)  # (1, h, N, D), row stride heads * D
        view.copy_(torch.randn(1, h, N, D, generator=g).to(storage.dtype))
        views.append(view)
        start += h
    return views, [v.clone() for v in views]


def _check(views, copies, dtype, deterministic, **kwargs):
    got = run_kernel(*views, deterministic=deterministic, **kwargs)
    want = run_reference(*copies, **kwargs)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, dtype, f"{name} (deterministic={deterministic})")


def test_row_offsets_past_int32_in_the_model_layout(mapped):
    """(B, N, H, D) with N*H*D > 2**31 (H*D = 2**22, N = 520): rows 512 and later sit past 2**31
    elements; in-tile offsets stay int32 (no WIDE)."""
    dtype, N, D = torch.float16, 520, 16
    heads = 2**22 // D
    before = _resident_bytes()
    storage = mapped(N, heads, D, dtype)  # 4.4 GB of file, a few hundred MB of it touched
    views, copies = _qkv_views(storage, 2, 1, seed=1)
    assert (N - 1) * views[0].stride(2) >= 2**31 and not attention._wide(*views)
    # 64-row tiles keep the interpreter's run short (the offsets are the point); full and causal
    with use_tiles(fwd=(64, 64, 4, 1), bwd=(64, 64, 4, 1), dkdv=(64, 64, 4, 1), dq=(64, 64, 4, 1)):
        _check(views, copies, dtype, False, causal=False)
        _check(views, copies, dtype, True, causal=True)
    grown = _resident_bytes() - before
    assert grown < 3 * 2**30, f"{grown / 2**30:.1f} GiB resident: the storage was copied"


def test_tile_span_past_int32_uses_wide_offsets(mapped):
    """A row stride of 2**28 elements: even the 16 rows of one tile span more than 2**31 elements, so
    the launch sets WIDE (64-bit in-tile offsets) on top of the 64-bit base pointers."""
    dtype, N, D = torch.float16, 24, 16
    heads = 2**28 // D
    before = _resident_bytes()
    storage = mapped(N, heads, D, dtype)  # 12.9 GB of file, 24 rows touched
    views, copies = _qkv_views(storage, 2, 1, seed=2)
    assert 15 * views[0].stride(2) >= 2**31 and attention._wide(*views)
    for deterministic in (False, True):
        _check(views, copies, dtype, deterministic, causal=True)
    grown = _resident_bytes() - before
    assert grown < 2**30, f"{grown / 2**30:.1f} GiB resident: the storage was copied"
