"""Run lmforge's Triton kernels under the Triton interpreter when there is no GPU.

Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated* (``@triton.jit`` runs at import of
the kernel module), so the variable must be set before ``lmforge.kernels.attention`` is imported.
pytest imports this conftest before it collects any test module of this folder, which is early
enough in the usual case. When an earlier test module of the same session already imported triton
or a kernel module (decorating their jit functions for a GPU), those modules are reloaded here so
the functions become interpreted ones: triton's own library (triton.language.standard, .random and
the ``triton.language`` namespace), any ``lmforge.kernels.*`` module, then ``lmforge.ops``.

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
    """True when ``module`` holds a ``@triton.jit`` function built for a GPU rather than interpreted."""
    from triton.runtime.jit import JITFunction

    for value in list(vars(module).values()):
        for _ in range(4):  # autotune / heuristics wrappers keep the kernel in .fn
            if isinstance(value, JITFunction):
                return True
            value = getattr(value, "fn", None)
            if value is None:
                break
    return False


def _reload_interpreted() -> None:
    """Rebuild, as interpreted functions, the jit functions decorated before TRITON_INTERPRET was set.

    Triton's own library (``tl.zeros_like``, ``tl.max``, ... in triton.language.standard and .random)
    is decorated when triton is first imported, so a test module that imported triton earlier leaves
    those compiled too, and the interpreter then refuses to call them from a kernel.
    """
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in sys.modules:
        return
    triton_lib = [name for name in ("triton.language.standard", "triton.language.random") if name in sys.modules]
    if any(_has_compiled_kernels(sys.modules[name]) for name in triton_lib):
        for name in triton_lib:
            importlib.reload(sys.modules[name])
        importlib.reload(sys.modules["triton.language"])  # rebinds tl.zeros_like & co. to the new ones
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
