"""The error the gguf exporter raises for what it is given (a dtype, a file name, a model or tokenizer that
llama.cpp cannot take): an :class:`lmforge.errors.UserError`, so ``lmforge export`` prints it as one line."""

from __future__ import annotations

from lmforge.errors import UserError


class GGUFError(UserError):
    """An export llama.cpp's format cannot take as asked (one line: what and what to do)."""
