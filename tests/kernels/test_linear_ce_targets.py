"""Targets outside [0, V): a clear error by default, NaN and no out-of-bounds read without the check.

* ``check_targets=True`` (the default) on ``linear_cross_entropy`` (torch rows and Triton rows),
  ``cross_entropy`` and ``lmforge.ops.linear_cross_entropy``: a negative target other than
  ``ignore_index``, one equal to V and one far above it raise ``ValueError`` naming the first bad
  value, its position and the valid range, eager and compiled (``fullgraph=True``, one graph).
* ``check_targets=False``: such a row's loss and gradient are NaN, every other row's equal the float64
  reference, and the Triton row kernel reads and writes only inside its arguments: under the
  interpreter every masked load and store is checked against the storages the kernel was given
  (an unclamped target of 10**12 would otherwise read far outside them, or crash the process).
"""

from __future__ import annotations

import contextlib
import os
import re

import numpy as np
import torch

if not torch.cuda.is_available():  # must precede the import of the kernel modules (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lmforge.kernels.utils as lce  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from lmforge.kernels.cross_entropy import ce_rows_, cross_entropy  # noqa: E402
from lmforge.kernels.linear_cross_entropy import linear_cross_entropy, torch_rows  # noqa: E402

from lmforge import ops  # noqa: E402
from tests.kernels.test_cross_entropy import (  # noqa: E402
    DEVICE,
    PATHS,
    assert_close,
    make_inputs,
    make_logits,
    path_id,
    reference_logits,
    requires_cuda,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
V = 50  # not a multiple of 64
BAD = [-1, -7, V, V + 3, 10**12]  # 10**12 * 4 bytes past the row: far outside any allocation


def _with_bad(targets, position, value):
    targets = targets.clone()
    targets[position] = value
    return targets


def _message(value, position, ignore_index=-100):
    return re.escape(f"targets must be in [0, {V}) or ignore_index={ignore_index}; got {value} at position {position}")


# --------------------------------------------------------------------------------------------------
# the check: a ValueError that names the value, its position and the range
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_out_of_range_target_raises(use_triton):
    hidden, weight, targets = make_inputs(16, 8, V, torch.float32, seed=1, ignore_frac=0.2)
    targets[12] = 3  # the bad value goes here; a -100 elsewhere is fine
    for value in BAD:
        bad = _with_bad(targets, 12, value)
        with pytest.raises(ValueError, match=_message(value, 12)):
            linear_cross_entropy(hidden, weight, bad, chunk_size=5, use_triton=use_triton)
    # the first of several bad targets, and how many there are
    bad = _with_bad(_with_bad(targets, 14, V), 5, -2)
    with pytest.raises(ValueError, match=_message(-2, 5) + r" \(2 targets out of range\)"):
        linear_cross_entropy(hidden, weight, bad, chunk_size=5, use_triton=use_triton)
    # with a custom ignore_index, -100 is out of range like any other negative value
    with pytest.raises(ValueError, match=_message(-100, 0, ignore_index=5)):
        linear_cross_entropy(hidden, weight, _with_bad(targets, 0, -100), ignore_index=5, use_triton=use_triton)
    # every valid target (0 and V - 1 included) passes, with or without ignored ones
    fine = _with_bad(_with_bad(targets, 0, 0), 1, V - 1)
    assert torch.isfinite(linear_cross_entropy(hidden, weight, fine, chunk_size=5, use_triton=use_triton))


def test_cross_entropy_and_ops_raise():
    logits, targets = make_logits(10, V, torch.float32, seed=2)
    for value in BAD:
        with pytest.raises(ValueError, match=_message(value, 7)):
            cross_entropy(logits, _with_bad(targets, 7, value))
    hidden, weight, targets = make_inputs(10, 8, V, torch.float32, seed=3)
    for backend in ("auto", "triton"):
        with pytest.raises(ValueError, match=_message(V, 9)):
            ops.linear_cross_entropy(hidden, weight, _with_bad(targets, 9, V), backend=backend)


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_check_under_torch_compile(use_triton):
    """Compiled with ``fullgraph=True`` (one graph), the check still runs on every call: good targets
    give the eager loss, a bad one raises the same ValueError."""
    torch._dynamo.reset()
    hidden, weight, targets = make_inputs(12, 8, V, torch.float32, seed=4, ignore_frac=0.2)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(h, w, t):
        return linear_cross_entropy(h, w, t, chunk_size=5, use_triton=use_triton)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(hidden, weight, targets), step(hidden, weight, targets))
    with pytest.raises(ValueError, match=_message(V + 3, 11)):
        compiled(hidden, weight, _with_bad(targets, 11, V + 3))
    assert len(graphs) == 1, f"{len(graphs)} graphs"
    assert "lmforge.ce_target_scale" in str(graphs[0].code), "the check is not in the graph"
    torch._dynamo.reset()


def test_scale_op_passes_opcheck():
    targets = torch.tensor([3, -100, 0, 49, 7], device=DEVICE)
    for reduction in ("mean", "sum"):
        torch.library.opcheck(lce.ce_target_scale, (targets, V, -100, reduction))


@requires_cuda
def test_gpu_check_skipped_while_capturing_a_cuda_graph():
    """A CUDA graph cannot sync: the check steps aside while one is captured, and runs again after."""
    targets = torch.tensor([3, V, 0], device="cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        lce.check_target_range(targets, V, -100)
    with pytest.raises(ValueError, match=_message(V, 1)):
        lce.check_target_range(targets, V, -100)


# --------------------------------------------------------------------------------------------------
# without the check: NaN for those rows, the reference for the others, no out-of-bounds access
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def bounds_checked_interpreter():
    """Record every masked load and store of an interpreted kernel that reaches outside the storages
    of the tensors passed to it (the offending lanes are masked off, so nothing is read there)."""
    from triton.runtime import interpreter

    ranges, outside = [], []
    real_init = interpreter.GridExecutor._init_args_hst
    real_load = interpreter.InterpreterBuilder.create_masked_load
    real_store = interpreter.InterpreterBuilder.create_masked_store

    def init(self, args_dev, kwargs):
        args, kwargs = real_init(self, args_dev, kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        ranges[:] = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors]
        return args, kwargs

    def inside(ptrs, mask, what):
        addr = ptrs.data.astype(np.uint64)
        mask = np.broadcast_to(mask.data, addr.shape)
        size = np.uint64(ptrs.get_element_ty().primitive_bitwidth // 8)
        ok = np.zeros(addr.shape, dtype=bool)
        for start, nbytes in ranges:
            ok |= (addr >= np.uint64(start)) & (addr + size <= np.uint64(start + nbytes))
        if (mask & ~ok).any():
            outside.append(f"{what} at {int((mask & ~ok).sum())} lanes")
        return interpreter.TensorHandle(np.asarray(mask & ok), tl.int1)

    def load(self, ptrs, mask, other, *args):
        return real_load(self, ptrs, inside(ptrs, mask, "load"), other, *args)

    def store(self, ptrs, value, mask, *args):
        return real_store(self, ptrs, value, inside(ptrs, mask, "store"), *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter.GridExecutor, "_init_args_hst", init)
        patch.setattr(interpreter.InterpreterBuilder, "create_masked_load", load)
        patch.setattr(interpreter.InterpreterBuilder, "create_masked_store", store)
        yield outside


@triton.jit
def _gather_kernel(X, IDX, OUT):
    tl.store(OUT, tl.load(X + tl.load(IDX)))


@pytest.mark.skipif(not INTERPRETED, reason="checks the Triton interpreter's loads")
def test_the_bounds_probe_sees_an_out_of_bounds_read():
    x = torch.arange(8.0)
    out = torch.zeros(1)
    with bounds_checked_interpreter() as outside:
        _gather_kernel[(1,)](x, torch.tensor([3]), out)
    assert not outside and out.item() == 3.0
    with bounds_checked_interpreter() as outside:
        _gather_kernel[(1,)](x, torch.tensor([10**12]), out)
    assert outside == ["load at 1 lanes"], outside


def _rows(use_triton, logits, targets, **options):
    """(per-row losses, gradient) of the Triton or torch rows, logits untouched."""
    unit = torch.ones((), device=logits.device)
    rows = ce_rows_ if use_triton else torch_rows
    loss, grad = rows(logits.clone(), targets, unit, **options)
    return loss, grad.float()


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_unchecked_rows_are_nan_and_read_nothing_outside(use_triton):
    """The row implementations, given bad targets in the first and last rows (where an unclamped read
    leaves the tensor) and in between: NaN loss and gradient rows there, the reference elsewhere."""
    N = 6
    options = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    logits, targets = make_logits(N, V, torch.float32, seed=5, logit_std=5.0)
    targets[2] = -100
    for first, middle, last in ((-1, V, V), (-7, 10**12, V + 3), (10**12, -3, 10**12)):
        bad = targets.clone()
        bad[0], bad[3], bad[N - 1] = first, middle, last
        probe = bounds_checked_interpreter() if use_triton and INTERPRETED else contextlib.nullcontext([])
        with probe as outside:
            loss, grad = _rows(use_triton, logits, bad, **options)
        assert not outside, f"targets {bad.tolist()}: the row kernel went outside its tensors: {outside}"
        nan_rows = [0, 3, N - 1]
        good = [r for r in range(N) if r not in nan_rows]
        assert loss[nan_rows].isnan().all(), f"targets {bad.tolist()}: losses {loss.tolist()}"
        assert grad[nan_rows].isnan().all(), f"targets {bad.tolist()}: gradient rows not NaN"
        for row in good:
            ref_loss, ref_dz = reference_logits(logits[row : row + 1], bad[row : row + 1], reduction="sum", **options)
            assert_close(loss[row], ref_loss, 1e-5, f"row {row}: loss")
            assert_close(grad[row : row + 1], ref_dz, 1e-4, f"row {row}: gradient")


@pytest.mark.parametrize("use_triton", PATHS, ids=path_id)
def test_unchecked_loss_is_nan(use_triton):
    """``check_targets=False`` end to end: the loss and the gradients are NaN, nothing raises."""
    hidden, weight, targets = make_inputs(12, 8, V, torch.float32, seed=6)
    for value in (-1, V, 10**12):
        bad = _with_bad(targets, 11, value)
        h, w = (t.detach().requires_grad_() for t in (hidden, weight))
        probe = bounds_checked_interpreter() if use_triton and INTERPRETED else contextlib.nullcontext([])
        with probe as outside:
            loss = linear_cross_entropy(h, w, bad, chunk_size=5, use_triton=use_triton, check_targets=False)
        assert not outside, outside
        loss.backward()
        assert loss.isnan(), f"target {value}: loss {loss.item()}"
        assert h.grad[11].isnan().all() and torch.isfinite(h.grad[:11]).all()
        assert w.grad.isnan().all()
        logits, _ = make_logits(4, V, torch.float32, seed=7)
        ce = cross_entropy(logits, _with_bad(torch.tensor([1, 2, 3, 4], device=DEVICE), 2, value), check_targets=False)
        assert ce.isnan(), f"cross_entropy, target {value}: {ce.item()}"
