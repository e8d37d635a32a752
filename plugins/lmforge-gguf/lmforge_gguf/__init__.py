"""lmforge-gguf: export lmforge checkpoints to GGUF, the file format of llama.cpp.

The ``gguf`` plugin of the ``lmforge.exporters`` group (see pyproject.toml)::

    lmforge export runs/gpt-tiny/checkpoints/last.ckpt --to out/gguf --format gguf --arg dtype=q8_0
"""

from lmforge_gguf.errors import GGUFError
from lmforge_gguf.exporter import ARCHS, DTYPES, choose_arch, export_gguf, permute_rope
from lmforge_gguf.vocab import bytes_to_unicode, vocab_for

__all__ = [
    "ARCHS",
    "DTYPES",
    "GGUFError",
    "bytes_to_unicode",
    "choose_arch",
    "export_gguf",
    "permute_rope",
    "vocab_for",
]
