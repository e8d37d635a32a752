"""The chunks' logits buffer of ``linear_cross_entropy``: one (chunk, padded_vocab(V)) buffer a call.

* Vocabularies that are not a multiple of 64 (50, 131), with several chunks and a shorter tail
  chunk, on both row paths, against the float64 reference; and the padded buffer against the same
  computation with unpadded rows (``LOGITS_ROW_ALIGN = 1``), to fp32 tolerance.
* Layout: every chunk's logits, the tail's included, are a ``[:n, :V]`` view of the one buffer,
  rows ``padded_vocab(V)`` apart; the products write and read it in place: no op of the three
  products copies it (the profiler sees every aten call, nested ones included), and the only
  allocation of a chunk's size is the buffer itself.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the import of the kernel modules (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lmforge.kernels.linear_cross_entropy as lce  # noqa: E402
import pytest  # noqa: E402
from lmforge.kernels.cross_entropy import ce_rows_  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from tests.kernels.test_cross_entropy import (  # noqa: E402
    DTYPES,
    PATHS,
    assert_close,
    check_lce,
    make_inputs,
    path_id,
    run_lce,
)

OPTIONS = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_not_a_multiple_of_64(dtype, use_triton):
    for i, (N, V, chunk) in enumerate(((23, 50, 8), (21, 131, 5), (9, 64, 4), (5, 131, 5))):
        hidden, weight, targets = make_inputs(N, 16, V, dtype, seed=30 + i, ignore_frac=0.2, logit_std=5.0)
        what = f"N={N} V={V} chunk_size={chunk} (padded to {lce.padded_vocab(V)}) {path_id(use_triton)}"
        check_lce(hidden, weight, targets, what, chunk_size=chunk, use_triton=use_triton, **OPTIONS)


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_padded_rows_equal_unpadded_rows(use_triton, monkeypatch):
    hidden, weight, targets = make_inputs(19, 16, 131, torch.float32, seed=40, ignore_frac=0.2)
    options = dict(chunk_size=6, use_triton=use_triton, **OPTIONS)
    padded = run_lce(hidden, weight, targets, **options)
    monkeypatch.setattr(lce, "LOGITS_ROW_ALIGN", 1)
    assert lce.padded_vocab(131) == 131
    unpadded = run_lce(hidden, weight, targets, **options)
    for what, a, b, rtol in zip(("loss", "d_hidden", "d_weight"), padded, unpadded, (1e-6, 1e-5, 1e-5)):
        assert_close(a, b, rtol, f"padded vs unpadded rows {path_id(use_triton)}: {what}")


def _run_chunked(rows, N=21, C=16, V=131, chunk=8, dtype=torch.float32):
    hidden, weight, targets = make_inputs(N, C, V, dtype, seed=41, device="cpu")
    return lce._chunked(hidden, weight, targets, rows, dtype=dtype, chunk=chunk, want_hidden=True, want_weight=True,
                        ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None)  # fmt: skip


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_every_chunk_is_a_view_of_one_buffer(use_triton):
    seen = []
    real = ce_rows_ if use_triton else lce.torch_rows

    def rows(logits, targets, scale, **options):
        seen.append((logits.data_ptr(), logits.untyped_storage().nbytes(), tuple(logits.shape), logits.stride()))
        return real(logits, targets, scale, **options)

    N, V, chunk = 21, 131, 8
    _run_chunked(rows, N=N, V=V, chunk=chunk)
    Vp = lce.padded_vocab(V)
    assert Vp == 192
    assert [s[2] for s in seen] == [(8, V), (8, V), (5, V)], seen
    assert {s[0] for s in seen} == {seen[0][0]}, f"chunks in different memory: {seen}"
    assert {s[1] for s in seen} == {chunk * Vp * 4}, f"not one ({chunk}, {Vp}) fp32 buffer: {seen}"
    assert {s[3] for s in seen} == {(Vp, 1)}, seen
    assert seen[0][0] % 64 == 0  # rows 128 bytes apart from an aligned start: every row aligned in 16-bit


def _products_profile(fn, threshold):
    """(copies and allocations made inside a matrix product, sizes of every allocation of at least
    ``threshold`` bytes) while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    products = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul"}
    allocations = {"aten::empty", "aten::empty_strided", "[memory]"}  # leaves: the memory is reported on them
    copies, sizes = [], []
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and parent.name not in products:
            parent = parent.cpu_parent
        allocated = event.name in allocations and event.cpu_memory_usage > 0
        if parent is not None and (allocated or event.name in ("aten::clone", "aten::contiguous", "aten::copy_")):
            copies.append(f"{event.name} inside {parent.name}")
        if allocated and event.cpu_memory_usage >= threshold:
            sizes.append(event.cpu_memory_usage)
    return copies, sizes


def test_products_work_in_place():
    """The Triton rows (in place): the products neither copy the strided logits nor allocate a chunk
    of their own; the only chunk-sized allocation of the whole call is the buffer."""
    # the probe sees the copy a product makes of an output whose rows are not contiguous
    h, w = torch.randn(8, 4), torch.randn(131, 4)
    strided = torch.empty(8, 2 * 131)[:, ::2]
    copies, _ = _products_profile(lambda: torch.matmul(h, w.t(), out=strided), 8 * 131 * 4)
    assert "aten::clone inside aten::mm" in copies, copies

    N, C, V, chunk = 21, 4, 131, 8  # the two gradients are smaller than a chunk of logits
    copies, sizes = _products_profile(lambda: _run_chunked(ce_rows_, N=N, C=C, V=V, chunk=chunk), chunk * V * 4)
    assert not copies, copies
    assert sizes == [chunk * lce.padded_vocab(V) * 4], f"chunk-sized allocations: {sizes}"
