"""Triton kernels for lmforge, installed as ``lmforge.kernels``.

This package depends on torch and triton only (no Lightning, nothing else from lmforge), so the
kernels can be used on their own. The model reaches them through ``lmforge.ops``, its single
dispatch point for attention and the loss.

Each kernel launch sits behind a ``torch.library`` custom op in the ``lmforge`` namespace
(``lmforge::flash_attn_fwd``, ``lmforge::linear_ce_fwd``, ...), with a fake (meta) implementation
and an autograd formula, so ``torch.compile`` keeps it in the graph as one opaque node instead of
breaking the graph or tracing into Triton. This module itself imports torch only, never triton.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F


def triton_available() -> bool:
    """True when triton is importable (it is not on macOS or Windows)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def build_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this kernel could not be compiled or launched on this GPU".

    Callers that have a torch fallback (``attention: auto``, ``loss: auto``) catch these and fall
    back; every other error, and every error under a forced ``triton`` backend, propagates.
    """
    import triton.compiler.errors as compiler_errors
    import triton.runtime.errors as runtime_errors

    names = (
        (compiler_errors, "CompilationError"),
        (runtime_errors, "OutOfResources"),
        (runtime_errors, "PTXASError"),
        (runtime_errors, "AutotunerError"),
    )
    return tuple(getattr(module, name) for module, name in names if hasattr(module, name))


# -- what failed to build here -------------------------------------------------------------------------
# One memory, for the whole process, of the kernel cases that could not be compiled or launched on this
# machine: a case is a tuple naming the op and what its compiled kernel is specialised on, e.g.
# ("flash_attn_bwd", "cuda:0", torch.bfloat16, 128, True, True, True). Whoever has a torch fallback for
# a case goes straight to it once the case is here, instead of rebuilding the kernel every step.
_failures: dict[tuple, str] = {}


def build_failed(case: tuple, error: BaseException) -> str:
    """Remember that ``case`` cannot be built or launched here; returns why, one line ("Name: first line")."""
    lines = str(error).strip().splitlines()
    why = f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
    _failures[case] = why
    return why


def known_failure(case: tuple) -> str:
    """Why ``case`` failed to build here before ("" when it has not)."""
    return _failures.get(case, "")


# The ops defined in this process, and the function each one runs now (see custom_op).
_ops: dict[str, torch.library.CustomOpDef] = {}
_impls: dict[str, Callable] = {}


def custom_op(name: str, schema: str, *, mutates_args: tuple[str, ...] = ()):
    """Decorator: the function as the custom op ``lmforge::<name>`` with ``schema``; returns the op.

    torch refuses to define an op twice, and a kernel module may run twice in one process:
    ``tests/kernels/conftest.py`` reloads the kernel modules to rebuild their jit functions as
    interpreted ones. The op is therefore defined once, around a trampoline to the latest decorated
    function; a second run of the module re-points it (and its fake and autograd registrations,
    which simply replace the earlier ones).
    """

    def define(fn: Callable) -> torch.library.CustomOpDef:
        _impls[name] = fn
        if name not in _ops:

            def run(*args, **kwargs):
                return _impls[name](*args, **kwargs)

            run.__name__ = run.__qualname__ = name
            _ops[name] = torch.library.custom_op(f"lmforge::{name}", run, mutates_args=mutates_args, schema=schema)
        return _ops[name]

    return define


def check_window(window: int | None, causal: bool) -> None:
    """Refuse a sliding window that is not a positive int, or one without causal attention."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"attention window must be a positive int or None, got {window!r}")
    if not causal:
        raise ValueError(f"attention window={window} needs causal=True (a bidirectional window is not supported)")


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    window: int | None = None,
) -> torch.Tensor:
    """The same attention as the Triton kernel, in plain torch (``scaled_dot_product_attention``).

    q: (B, H, N, D); k, v: (B, H_kv, N, D). key_padding_mask (B, N, nonzero = real token) and
    segment_ids (B, N) restrict the keys a query sees; rows that can see nothing give zeros (and
    zero gradients). ``window`` (a positive int, causal only; None = unlimited) is Mistral's sliding
    window: query i sees keys j with i - W < j <= i, as transformers' ``sliding_window_overlay``.
    ``lmforge.ops`` runs it as the torch path, and the kernels' fallback (a kernel that cannot be
    built here) computes with it, so both give the very same numbers.
    """
    check_window(window, causal)
    gqa = k.size(1) != q.size(1)
    if key_padding_mask is None and segment_ids is None and window is None:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
        )
    T = q.size(-2)
    mask = torch.ones(q.size(0), 1, T, T, dtype=torch.bool, device=q.device)  # (B, 1, T, T)
    if causal:
        # diagonals 0 (the query itself) down to -(W - 1): the W most recent keys
        band = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
        mask = mask & (band if window is None else band.triu(1 - window))
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    has_key = mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    # a row with no key would be NaN: let it see every key, then zero its output (and so its gradients)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask | ~has_key, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
    )
    return y * has_key.to(y.dtype)
