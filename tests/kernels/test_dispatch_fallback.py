"""``attention: auto`` and ``loss: auto`` survive a Triton kernel that cannot be built on this GPU.

The kernels have tuned configurations for Ampere and Hopper; a card, driver or Triton version where
one fails to compile (or to fit in shared memory) must not stop a training run that left the choice
to lmforge: ``lmforge.ops`` warns once, runs that case through torch from then on, and gives the
torch path's results. A forced ``triton`` backend lets the error through. The failures are simulated
by raising Triton's own exception types (``lmforge.kernels.build_errors``).
"""

from __future__ import annotations

import logging

import lmforge.kernels
import lmforge.kernels.attention as attention_kernels
import lmforge.kernels.linear_cross_entropy as lce_kernels
import pytest
import torch
from triton.runtime.errors import OutOfResources

from lmforge import ops


@pytest.fixture(autouse=True)
def _fresh_dispatch_state(monkeypatch):
    monkeypatch.setattr(lmforge.kernels, "_failures", {})
    monkeypatch.setattr(ops, "_told", set())
    monkeypatch.setattr(attention_kernels, "_fallback_warned", False)


def _qkv(B=2, H=4, N=9, D=16, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3)]


def _failing_kernel(calls):
    def flash_attention(q, *args, **kwargs):
        calls.append(q.size(-1))
        raise OutOfResources(300_000, 232_448, "shared memory")

    return flash_attention


def test_attention_auto_falls_back_once_per_case(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(attention_kernels, "flash_attention", _failing_kernel(calls))
    q, k, v = _qkv()
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, 6:] = False
    expected = ops.attention(q, k, v, backend="torch", key_padding_mask=padding)
    with caplog.at_level(logging.INFO, logger="lmforge.ops"):
        first = ops.attention(q, k, v, backend="auto", key_padding_mask=padding)
        second = ops.attention(q, k, v, backend="auto", key_padding_mask=padding)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert calls == [16], "the kernel was retried for a case that already failed to build"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "OutOfResources" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    # another case (head dim 32) is its own kernel build: tried again
    q32, k32, v32 = _qkv(D=32)
    ops.attention(q32, k32, v32, backend="auto")
    assert calls == [16, 32]


def test_attention_triton_backend_lets_the_error_through(monkeypatch):
    monkeypatch.setattr(attention_kernels, "flash_attention", _failing_kernel([]))
    q, k, v = _qkv()
    with pytest.raises(OutOfResources):
        ops.attention(q, k, v, backend="triton")


def test_attention_backward_falls_back_through_torch(monkeypatch, caplog):
    """The forward kernel runs (interpreted here); the backward fails to build: gradients come from
    recomputing through the torch path, with the same causal, padding and document masks."""

    def failing_backward(*args, **kwargs):
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(attention_kernels, "_backward", failing_backward)
    q, k, v = _qkv(N=11)
    padding = torch.ones(2, 11, dtype=torch.bool)
    padding[0, 8:] = False
    masks = dict(key_padding_mask=padding, segment_ids=torch.tensor([[0] * 5 + [1] * 6, [0] * 11]))
    do = torch.randn_like(q)
    outs, grads = {}, {}
    for backend in ("torch", "auto"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = ops.attention(*leaves, backend=backend, **masks)
        with caplog.at_level(logging.WARNING):
            out.backward(do)
        outs[backend], grads[backend] = out.detach(), [t.grad for t in leaves]
    torch.testing.assert_close(outs["auto"], outs["torch"], rtol=2e-3, atol=2e-3)  # the kernel's forward
    for name, got, want in zip("qkv", grads["auto"], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"d{name}: the torch path's own gradients")
    assert any("OutOfResources" in r.getMessage() for r in caplog.records)


def test_loss_auto_falls_back_once(monkeypatch, caplog):
    real = lce_kernels.linear_cross_entropy
    triton_calls = []

    def flaky(hidden, weight, targets, *, use_triton=False, **kwargs):
        if use_triton:
            triton_calls.append(1)
            raise OutOfResources(300_000, 232_448, "shared memory")
        return real(hidden, weight, targets, use_triton=False, **kwargs)

    monkeypatch.setattr(lce_kernels, "linear_cross_entropy", flaky)
    monkeypatch.setattr(ops, "_on_cuda", lambda t: True)  # pretend: auto picks the Triton rows on CUDA
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(20, 8, generator=g), torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (20,), generator=g)
    expected = ops.linear_cross_entropy(hidden, weight, targets, backend="torch")
    with caplog.at_level(logging.INFO, logger="lmforge.ops"):
        for _ in range(2):
            torch.testing.assert_close(ops.linear_cross_entropy(hidden, weight, targets, backend="auto"), expected)
    assert triton_calls == [1], "the Triton rows were retried after failing to build"
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    with pytest.raises(OutOfResources):
        ops.linear_cross_entropy(hidden, weight, targets, backend="triton")
