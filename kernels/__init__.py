"""Triton kernels for lmforge, installed as ``lmforge.kernels``.

This package depends on torch and triton only (no Lightning, nothing else from lmforge), so the
kernels can be used on their own. The model reaches them through ``lmforge.ops``, its single
dispatch point for attention and the loss.
"""

from __future__ import annotations

import functools
import importlib.util


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
