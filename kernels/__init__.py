"""Triton kernels for lmforge, installed as ``lmforge.kernels``.

This package depends on torch and triton only (no Lightning, nothing else from lmforge), so the
kernels can be used on their own. The model reaches them through ``lmforge.ops``, its single
dispatch point for attention and the loss.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """True when triton is importable (it is not on macOS or Windows)."""
    return importlib.util.find_spec("triton") is not None
