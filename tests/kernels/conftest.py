"""Run lmforge's Triton kernels under the Triton interpreter when there is no GPU.

Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated* (``@triton.jit`` runs at import of
the kernel module), so the variable must be set before ``lmforge.kernels.attention`` is imported.
pytest imports this conftest before it collects any test module of this folder, which is early
enough in the usual case. When an earlier test module of the same session already imported a kernel
module compiled for a GPU (for instance through ``lmforge.ops``), that module is reloaded here so
its kernels become interpreted ones, and ``lmforge.ops`` is reloaded to pick them up.

On a machine with CUDA nothing is set: the kernels compile for the GPU as in training.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_compiled_kernels(module: object) -> bool:
    """True when ``module`` holds a ``@triton.jit`` kernel built for a GPU rather than interpreted."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:  # no triton at all: nothing to reload
        return False
    for value in vars(module).values():
        for _ in range(4):  # autotune / heuristics wrappers keep the kernel in .fn
            if isinstance(value, JITFunction):
                return True
            value = getattr(value, "fn", None)
            if value is None:
                break
    return False


def _reload_interpreted() -> None:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        return
    stale = [
        name
        for name, module in list(sys.modules.items())
        if name.startswith("lmforge.kernels.") and module is not None and _has_compiled_kernels(module)
    ]
    for name in stale:
        importlib.reload(sys.modules[name])
    if stale and "lmforge.ops" in sys.modules:
        importlib.reload(sys.modules["lmforge.ops"])


_reload_interpreted()
