"""The ``min_length`` filter: drops documents shorter than ``min_chars`` characters (surrounding whitespace not
counted), and optionally strips that whitespace from the documents it keeps.

A filter plugin is a factory ``(**options) -> step``, used as a step of ``data.pipeline``
(``pipeline: [{name: min_length, min_chars: 200}]``). The step has ``name`` and ``version`` (strs; bump the
version when the same input would give other output: it is part of the token cache's key), ``process(doc) ->
str | None`` (the document, or None to drop it) and ``stats() -> dict`` of plain data. It remembers nothing
between documents, so it must pickle (lmforge may run it in worker processes); a step that remembers documents
sets ``stateful = True``. ``lmforge.data.filters.Filter`` is a base class doing the counting for you; this one
shows the protocol without it.
"""

from __future__ import annotations

from lmforge.errors import UserError


class MinLength:
    name = "min_length"
    version = "1"
    stateful = False

    def __init__(self, min_chars: int, strip: bool) -> None:
        self.min_chars, self.strip = min_chars, strip
        self.docs_in = self.docs_out = self.too_short = 0

    def config(self) -> dict:
        return {"min_chars": self.min_chars, "strip": self.strip}

    def process(self, doc: str) -> str | None:
        self.docs_in += 1
        if len(doc.strip()) < self.min_chars:
            self.too_short += 1
            return None
        self.docs_out += 1
        return doc.strip() if self.strip else doc

    def stats(self) -> dict:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "dropped": {"too_short": self.too_short}}


def min_length(min_chars: int = 20, strip: bool = False) -> MinLength:
    """Drop documents shorter than ``min_chars`` characters.

    Args:
        min_chars: The fewest characters a document keeps, surrounding whitespace not counted.
        strip: Also strip surrounding whitespace from the documents kept.
    """
    if min_chars < 0:
        raise UserError(f"filter min_length: min_chars={min_chars} must be 0 or more")
    return MinLength(min_chars, strip)
