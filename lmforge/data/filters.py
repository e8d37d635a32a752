"""lmforge's own cleaning steps (the ``lmforge.filters`` plugins): normalize, quality, dedup and pii.

A step is what a filter plugin's factory returns when called with the options of its ``data.pipeline`` entry
(``{name: quality, min_words: 20}``). It has a ``name``, a ``version`` (a str: bump it when the output for the
same input changes, so the token cache is rebuilt), ``process(doc) -> str | None`` (the document, changed or not,
or None to drop it) and ``stats() -> dict`` (plain ints, floats, strs and dicts of them). :class:`Filter` is a base
class that keeps the counts every step reports: documents and bytes in and out, and the drops by reason
(``dropped: {too_few_words: 12}``). A step with ``stateful = True`` (dedup: it remembers what it has seen) runs in
the main process, in document order; the others must be picklable and depend on nothing but the document, so
they can run in worker processes. Options that are wrong raise :class:`OptionError` from the constructor, which
names the option (``near.threshold=1.5 must be in (0, 1]``); the pipeline prefixes ``data.pipeline[i].``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections import Counter
from typing import Any, Literal

from lmforge.errors import UserError


class OptionError(UserError):
    """A filter option with a bad value; ``option`` is its dotted name within the step (``near.threshold``)."""

    def __init__(self, option: str, value: Any, problem: str) -> None:
        self.option, self.value, self.problem = option, value, problem
        super().__init__(f"{option}={value!r} {problem}")


class Filter:
    """The base of lmforge's steps: counts in and out, drops by reason. Subclasses implement :meth:`apply` and
    call :meth:`drop` (which returns None) to drop a document."""

    name = "filter"
    version = "1"
    stateful = False

    def __init__(self) -> None:
        self.docs_in = self.docs_out = self.bytes_in = self.bytes_out = 0
        self.dropped: Counter[str] = Counter()

    def config(self) -> dict[str, Any]:
        """The step's options with their defaults filled in (part of the corpus key)."""
        return {}

    def apply(self, doc: str) -> str | None:
        raise NotImplementedError

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        return None

    def process(self, doc: str) -> str | None:
        self.docs_in += 1
        self.bytes_in += _size(doc)
        out = self.apply(doc)
        if out is not None and not out.strip():
            out = self.drop("empty")
        if out is not None:
            self.docs_out += 1
            self.bytes_out += _size(out)
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dropped": dict(sorted(self.dropped.items())),
        }


def _size(doc: str) -> int:
    return len(doc.encode("utf-8", errors="surrogatepass"))


def _number(option: str, value: Any, low: float | None = None, high: float | None = None, *, integer: bool = False,
            open_low: bool = False) -> float:  # fmt: skip
    """``value`` checked to be a number (an int when ``integer``) within [low, high] (low excluded if ``open_low``)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise OptionError(option, value, f"must be {kind}")
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        if high is None:
            raise OptionError(option, value, f"must be {'>' if open_low else '>='} {low}")
        raise OptionError(option, value, f"must be in {'(' if open_low else '['}{low}, {high}]")
    return value


# -- normalize ---------------------------------------------------------------------------------------------------

_TRAILING_SPACE = re.compile(r"[ \t\u00a0\u3000]+$", re.M)


class Normalize(Filter):
    """Unicode normalisation (``form``), mojibake repair with ftfy (``fix_mojibake``: "cafÃ©" -> "café"),
    optional lowercasing, and whitespace cleanup: trailing spaces stripped, runs of more than ``max_blank_lines``
    blank lines cut to that many, blank lines at the start and end removed. A document left empty is dropped
    (reason ``empty``)."""

    name = "normalize"
    version = "1"

    def __init__(
        self,
        form: Literal["NFC", "NFKC", "NFD", "NFKD"] | None = "NFKC",
        fix_mojibake: bool = True,
        lowercase: bool = False,
        whitespace: bool = True,
        max_blank_lines: int = 2,
    ) -> None:
        super().__init__()
        if form is not None and form not in ("NFC", "NFKC", "NFD", "NFKD"):
            raise OptionError("form", form, "must be one of NFC, NFKC, NFD, NFKD or null")
        _number("max_blank_lines", max_blank_lines, 0, integer=True)
        self.form, self.fix_mojibake, self.lowercase = form, fix_mojibake, lowercase
        self.whitespace, self.max_blank_lines = whitespace, max_blank_lines
        self._blank_run = re.compile(r"\n(?:[ \t]*\n){" + str(max_blank_lines + 1) + ",}")

    def config(self) -> dict[str, Any]:
        return {"form": self.form, "fix_mojibake": self.fix_mojibake, "lowercase": self.lowercase,
                "whitespace": self.whitespace, "max_blank_lines": self.max_blank_lines}  # fmt: skip

    def apply(self, doc: str) -> str | None:
        if self.fix_mojibake:
            import ftfy

            # encoding repairs only: quotes, HTML entities and normalisation are left to the options here
            doc = ftfy.fix_text(doc, unescape_html=False, uncurl_quotes=False, fix_latin_ligatures=False,
                                fix_character_width=False, normalization=None)  # fmt: skip
        if self.form is not None:
            doc = unicodedata.normalize(self.form, doc)
        if self.lowercase:
            doc = doc.lower()
        if self.whitespace:
            doc = _TRAILING_SPACE.sub("", doc.replace("\r\n", "\n"))
            doc = self._blank_run.sub("\n" * (self.max_blank_lines + 1), doc).strip("\n")
        return doc


# -- quality -----------------------------------------------------------------------------------------------------

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
"""Gopher's stop words: a document with fewer than ``min_stop_words`` of them is not ordinary English prose."""
BULLETS = ("•", "●", "○", "▪", "◦", "‣", "⁃", "-", "*", "·", "–", "—")
ELLIPSES = ("...", "…")
_WORD_STRIP = "\"'()[]{}<>.,;:!?«»“”‘’`"


class Quality(Filter):
    """The heuristics of Gopher (Rae et al., 2021, appendix A.1.1), each threshold an option, defaults the paper's.

    Words are whitespace-separated tokens. Drop reasons: ``too_few_words``, ``too_many_words``,
    ``mean_word_length``, ``symbol_ratio`` ("#" and ellipses per word), ``bullet_lines``, ``ellipsis_lines``,
    ``alpha_words`` (the fraction of words with a letter), ``stop_words``, ``duplicate_lines``,
    ``duplicate_line_chars``, ``duplicate_paragraphs``, ``duplicate_paragraph_chars``, ``top_{n}gram`` (the
    characters in the most frequent n-gram, n = 2..4) and ``duplicate_{n}gram`` (the characters in n-grams seen
    more than once, n = 5..10). A threshold set to null is not checked.
    """

    name = "quality"
    version = "1"

    def __init__(
        self,
        min_words: int | None = 50,
        max_words: int | None = 100_000,
        min_mean_word_length: float | None = 3.0,
        max_mean_word_length: float | None = 10.0,
        max_symbol_word_ratio: float | None = 0.1,
        max_bullet_lines_ratio: float | None = 0.9,
        max_ellipsis_lines_ratio: float | None = 0.3,
        min_alpha_words_ratio: float | None = 0.8,
        min_stop_words: int | None = 2,
        stop_words: list[str] = list(STOP_WORDS),
        max_duplicate_line_fraction: float | None = 0.3,
        max_duplicate_line_char_fraction: float | None = 0.2,
        max_duplicate_paragraph_fraction: float | None = 0.3,
        max_duplicate_paragraph_char_fraction: float | None = 0.2,
        max_top_ngram_char_fraction: dict | None = {2: 0.2, 3: 0.18, 4: 0.16},
        max_duplicate_ngram_char_fraction: dict | None = {
            5: 0.15,
            6: 0.14,
            7: 0.13,
            8: 0.12,
            9: 0.11,
            10: 0.10,
        },  # fmt: skip
    ) -> None:
        super().__init__()
        counts = {"min_words": min_words, "max_words": max_words, "min_stop_words": min_stop_words}
        for key, value in counts.items():
            if value is not None:
                _number(key, value, 0, integer=True)
        ratios = {
            "max_symbol_word_ratio": max_symbol_word_ratio,
            "max_bullet_lines_ratio": max_bullet_lines_ratio,
            "max_ellipsis_lines_ratio": max_ellipsis_lines_ratio,
            "min_alpha_words_ratio": min_alpha_words_ratio,
            "max_duplicate_line_fraction": max_duplicate_line_fraction,
            "max_duplicate_line_char_fraction": max_duplicate_line_char_fraction,
            "max_duplicate_paragraph_fraction": max_duplicate_paragraph_fraction,
            "max_duplicate_paragraph_char_fraction": max_duplicate_paragraph_char_fraction,
        }
        for key, value in ratios.items():
            if value is not None:
                _number(key, value, 0, 1)
        for key, value in (
            ("min_mean_word_length", min_mean_word_length),
            ("max_mean_word_length", max_mean_word_length),
        ):
            if value is not None:
                _number(key, value, 0)
        if min_words is not None and max_words is not None and min_words > max_words:
            raise OptionError("min_words", min_words, f"must not exceed max_words={max_words}")
        self.top_ngrams = self._ngram_table("max_top_ngram_char_fraction", max_top_ngram_char_fraction)
        self.dup_ngrams = self._ngram_table("max_duplicate_ngram_char_fraction", max_duplicate_ngram_char_fraction)
        if not isinstance(stop_words, (list, tuple)) or not all(isinstance(w, str) for w in stop_words):
            raise OptionError("stop_words", stop_words, "must be a list of words")
        self.min_words, self.max_words, self.min_stop_words = min_words, max_words, min_stop_words
        self.min_mean_word_length, self.max_mean_word_length = min_mean_word_length, max_mean_word_length
        self.ratios = ratios
        self.stop_words = frozenset(w.lower() for w in stop_words)

    @staticmethod
    def _ngram_table(option: str, table: Any) -> dict[int, float]:
        if table is None:
            return {}
        if not isinstance(table, dict):
            raise OptionError(option, table, "must be a mapping of n to a fraction, e.g. {2: 0.2}")
        out = {}
        for n, value in table.items():
            try:
                size = int(n)
            except (TypeError, ValueError):
                raise OptionError(f"{option}.{n}", value, "is not under an integer n") from None
            if size < 1:
                raise OptionError(f"{option}.{n}", value, "is under an n below 1")
            if value is not None:
                out[size] = float(_number(f"{option}.{n}", value, 0, 1))
        return dict(sorted(out.items()))

    def config(self) -> dict[str, Any]:
        return {
            "min_words": self.min_words, "max_words": self.max_words, "min_stop_words": self.min_stop_words,
            "min_mean_word_length": self.min_mean_word_length, "max_mean_word_length": self.max_mean_word_length,
            **self.ratios, "stop_words": sorted(self.stop_words),
            "max_top_ngram_char_fraction": {str(n): v for n, v in self.top_ngrams.items()},
            "max_duplicate_ngram_char_fraction": {str(n): v for n, v in self.dup_ngrams.items()},
        }  # fmt: skip

    def apply(self, doc: str) -> str | None:
        reason = self.check(doc)
        return doc if reason is None else self.drop(reason)

    def check(self, doc: str) -> str | None:
        """The first reason ``doc`` fails (the names of the class docstring), or None when it passes."""
        words = doc.split()
        n = len(words)
        if self.min_words is not None and n < self.min_words:
            return "too_few_words"
        if self.max_words is not None and n > self.max_words:
            return "too_many_words"
        if n == 0:
            return "too_few_words"
        stripped = [w.strip(_WORD_STRIP) for w in words]
        lengths = [len(w) for w in stripped if w]
        mean = sum(lengths) / len(lengths) if lengths else 0.0
        if (self.min_mean_word_length is not None and mean < self.min_mean_word_length) or (
            self.max_mean_word_length is not None and mean > self.max_mean_word_length
        ):
            return "mean_word_length"
        r = self.ratios
        if r["max_symbol_word_ratio"] is not None:
            symbols = doc.count("#") + doc.count("...") + doc.count("…")
            if symbols / n > r["max_symbol_word_ratio"]:
                return "symbol_ratio"
        lines = [line.strip() for line in doc.splitlines()]
        lines = [line for line in lines if line] or [""]
        if r["max_bullet_lines_ratio"] is not None:
            bullets = sum(line.startswith(BULLETS) for line in lines)
            if bullets / len(lines) > r["max_bullet_lines_ratio"]:
                return "bullet_lines"
        if r["max_ellipsis_lines_ratio"] is not None:
            ellipses = sum(line.endswith(ELLIPSES) for line in lines)
            if ellipses / len(lines) > r["max_ellipsis_lines_ratio"]:
                return "ellipsis_lines"
        if r["min_alpha_words_ratio"] is not None:
            alpha = sum(any(c.isalpha() for c in w) for w in words)
            if alpha / n < r["min_alpha_words_ratio"]:
                return "alpha_words"
        if self.min_stop_words is not None:
            stops = sum(w.lower() in self.stop_words for w in stripped)
            if stops < self.min_stop_words:
                return "stop_words"
        reason = self._repeated(lines, "line", r["max_duplicate_line_fraction"], r["max_duplicate_line_char_fraction"])
        if reason:
            return reason
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
        reason = self._repeated(paragraphs, "paragraph", r["max_duplicate_paragraph_fraction"],
                                r["max_duplicate_paragraph_char_fraction"])  # fmt: skip
        if reason:
            return reason
        lowered = [w.lower() for w in words]
        total_chars = sum(len(w) for w in lowered)
        for size, limit in self.top_ngrams.items():
            if _top_ngram_fraction(lowered, size, total_chars) > limit:
                return f"top_{size}gram"
        for size, limit in self.dup_ngrams.items():
            if _duplicate_ngram_fraction(lowered, size, total_chars) > limit:
                return f"duplicate_{size}gram"
        return None

    @staticmethod
    def _repeated(pieces: list[str], what: str, max_fraction: float | None, max_chars: float | None) -> str | None:
        """Gopher's repetition of whole lines (or paragraphs): the fraction of them that repeat an earlier one, and
        the fraction of characters in those repeats."""
        if len(pieces) < 2 or (max_fraction is None and max_chars is None):
            return None
        seen: set[str] = set()
        dup = dup_chars = 0
        for piece in pieces:
            if piece in seen:
                dup += 1
                dup_chars += len(piece)
            seen.add(piece)
        if max_fraction is not None and dup / len(pieces) > max_fraction:
            return f"duplicate_{what}s"
        total = sum(len(p) for p in pieces)
        if max_chars is not None and total and dup_chars / total > max_chars:
            return f"duplicate_{what}_chars"
        return None


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """The characters of the most frequent word n-gram (times its count) over all characters of the words."""
    if len(words) < n or not total_chars:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(len(w) for w in gram) * count / total_chars


def _duplicate_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """The characters of the words covered by word n-grams that occur more than once, over all characters."""
    if len(words) < n or not total_chars:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


# -- dedup -------------------------------------------------------------------------------------------------------

NEAR_DEFAULTS: dict[str, Any] = {"threshold": 0.8, "num_perm": 128, "ngram": 5, "seed": 0, "shingle": "word",
                                 "backend": "datasketch"}  # fmt: skip


class Dedup(Filter):
    """Removes exact duplicates (``exact``: the same text up to case and whitespace, by a hash) and near duplicates
    (``near``: MinHash LSH over word or character shingles, ``{threshold: 0.8, num_perm: 128, ngram: 5, seed: 0,
    shingle: word, backend: datasketch}``; ``backend: rensa`` is about ten times faster, if installed). The first
    document of each cluster is kept; an LSH candidate counts only when its estimated Jaccard similarity reaches
    the threshold. Reasons: ``exact``, ``near``; ``clusters`` (kept documents with duplicates), ``largest_cluster``
    and ``cluster_sizes`` ({size: clusters}) in stats. Stateful: it runs in the main process."""

    name = "dedup"
    version = "1"
    stateful = True

    def __init__(self, exact: bool = True, near: dict[str, Any] | bool | None = None) -> None:
        super().__init__()
        if not isinstance(exact, bool):
            raise OptionError("exact", exact, "must be true or false")
        self.exact = exact
        self.near = check_near(near)
        if not exact and not self.near:
            raise OptionError("exact", exact, "leaves nothing to do: set exact: true or near: {threshold: 0.8}")
        self._hashes: dict[bytes, int] = {}  # text hash -> id of the kept document
        self._cluster: Counter[int] = Counter()  # kept id -> duplicates removed
        self._lsh: Any = None
        self._signatures: dict[int, Any] = {}

    def config(self) -> dict[str, Any]:
        return {"exact": self.exact, "near": dict(self.near) if self.near else None}

    def apply(self, doc: str) -> str | None:
        doc_id = self.docs_in
        if self.exact:
            digest = hashlib.blake2b(" ".join(doc.casefold().split()).encode("utf-8", "surrogatepass"),
                                     digest_size=16).digest()  # fmt: skip
            first = self._hashes.get(digest)
            if first is not None:
                self._cluster[first] += 1
                return self.drop("exact")
            self._hashes[digest] = doc_id
        if self.near:
            signature = self._signature(doc)
            match = self._match(signature)
            if match is not None:
                self._cluster[match] += 1
                return self.drop("near")
            self._lsh.insert(doc_id, signature)
            self._signatures[doc_id] = signature
        return doc

    def _shingles(self, doc: str) -> list[str]:
        n = self.near["ngram"]
        if self.near["shingle"] == "char":
            text = " ".join(doc.casefold().split())
            return [text[i : i + n] for i in range(max(1, len(text) - n + 1))]
        words = doc.casefold().split()
        return [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))]

    def _signature(self, doc: str) -> Any:
        near = self.near
        shingles = self._shingles(doc)
        if near["backend"] == "rensa":
            import rensa

            if self._lsh is None:
                bands = _bands(near["threshold"], near["num_perm"])
                self._lsh = _RensaLSH(rensa.RMinHashLSH(near["threshold"], near["num_perm"], bands))
            sig = rensa.RMinHash(num_perm=near["num_perm"], seed=near["seed"])
            sig.update(shingles)
            return sig
        from datasketch import MinHash, MinHashLSH

        if self._lsh is None:
            self._lsh = MinHashLSH(threshold=near["threshold"], num_perm=near["num_perm"])
        sig = MinHash(num_perm=near["num_perm"], seed=near["seed"])
        sig.update_batch([s.encode("utf-8", "surrogatepass") for s in shingles])
        return sig

    def _match(self, signature: Any) -> int | None:
        """The kept document most similar to ``signature`` at or above the threshold (the earliest on ties)."""
        best, best_sim = None, -1.0
        for candidate in sorted(self._lsh.query(signature)):
            sim = signature.jaccard(self._signatures[candidate])
            if sim >= self.near["threshold"] and sim > best_sim:
                best, best_sim = candidate, sim
        return best

    def stats(self) -> dict[str, Any]:
        sizes = Counter(count + 1 for count in self._cluster.values())
        return {
            **super().stats(),
            "clusters": len(self._cluster),
            "largest_cluster": max(sizes, default=0),
            "cluster_sizes": {str(size): n for size, n in sorted(sizes.items())},
        }


class _RensaLSH:
    """rensa's LSH behind datasketch's insert/query names."""

    def __init__(self, lsh: Any) -> None:
        self.lsh = lsh

    def insert(self, key: int, signature: Any) -> None:
        self.lsh.insert(key, signature)

    def query(self, signature: Any) -> list[int]:
        return list(self.lsh.query(signature))


def _bands(threshold: float, num_perm: int) -> int:
    """The number of LSH bands datasketch would choose for ``threshold`` (equal false positive and negative
    weights), rounded up to a divisor of ``num_perm`` (rensa needs equal bands; more bands find more candidates,
    and every candidate is verified)."""
    from datasketch.lsh import _optimal_param

    bands, _ = _optimal_param(threshold, num_perm, 0.5, 0.5)
    while num_perm % bands:
        bands += 1
    return bands


def check_near(near: Any) -> dict[str, Any] | None:
    """The ``near`` option with defaults filled in (None when off); OptionError naming ``near.<key>``."""
    if near is None or near is False:
        return None
    if near is True:
        near = {}
    if not isinstance(near, dict):
        raise OptionError("near", near, "must be a mapping such as {threshold: 0.8} (or true, or null)")
    unknown = sorted(set(near) - set(NEAR_DEFAULTS))
    if unknown:
        raise OptionError(
            f"near.{unknown[0]}", near[unknown[0]], f"is not an option; the keys are {', '.join(NEAR_DEFAULTS)}"
        )
    values = {**NEAR_DEFAULTS, **near}
    values["threshold"] = float(_number("near.threshold", values["threshold"], 0, 1, open_low=True))
    _number("near.num_perm", values["num_perm"], 16, 1024, integer=True)
    _number("near.ngram", values["ngram"], 1, 64, integer=True)
    _number("near.seed", values["seed"], 0, integer=True)
    if values["shingle"] not in ("word", "char"):
        raise OptionError("near.shingle", values["shingle"], "must be word or char")
    if values["backend"] not in ("datasketch", "rensa"):
        raise OptionError("near.backend", values["backend"], "must be datasketch or rensa")
    if values["backend"] == "rensa":
        try:
            import rensa  # noqa: F401
        except ImportError:
            raise OptionError("near.backend", "rensa", "needs the rensa package: pip install rensa") from None
    return values


# -- pii ---------------------------------------------------------------------------------------------------------

PII_TYPES = ("EMAIL", "IBAN", "CREDIT_CARD", "IP_ADDRESS", "PHONE")
"""In the order they are redacted: an email before the digits in it, cards before phones."""

IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip
"""IBAN lengths by country (the ISO 13616 registry)."""

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,63}(?![\w-])")  # fmt: skip
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")
_CARD = re.compile(r"(?<![\d+])(?<!\d[.,])\d(?:[ -]?\d){12,18}(?!\d|[.,-]\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:|\d{1,3}(?:\.\d{1,3}){3})(?![\w:]|\.\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?<!\d\.){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_PHONE = re.compile(r"(?<![\w+])(?<!\d[.-])(?:\+\d{10,15}|(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}"
                    r"(?:[ .-]\d{1,4}){0,6})(?!\w|[.-]\d| \d)")  # fmt: skip


def luhn_ok(digits: str) -> bool:
    """The Luhn check of a card number's digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: the country's length and the mod-97 check (``iban`` without spaces, upper case)."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def phone_ok(text: str) -> bool:
    """A phone number's shape: 10 to 15 digits, and a +country code, an (area) code, or at least three groups
    split by one kind of separator, the last of four digits (``415-555-2671``, ``020 7946 0958``), so dates,
    prices, ISBNs and plain numbers are not phones."""
    digits = sum(c.isdigit() for c in text)
    if not 10 <= digits <= 15:
        return False
    if text.startswith("+") or "(" in text:
        return True
    groups = re.split(r"[ .-]", text)
    separators = set(re.findall(r"[ .-]", text))
    return len(groups) >= 3 and len(separators) == 1 and len(groups[-1]) == 4 and all(len(g) <= 4 for g in groups)


class PII(Filter):
    """Redacts personal data into typed placeholders (``placeholder``, default ``<{type}>``): ``EMAIL``,
    ``PHONE`` (formats of :func:`phone_ok`), ``IP_ADDRESS`` (IPv4 with octets up to 255, and IPv6),
    ``CREDIT_CARD`` (13 to 19 digits, spaces or dashes allowed, passing the Luhn check) and ``IBAN`` (the
    country's length and the mod-97 check). ``types`` chooses which. Nothing is dropped; ``redactions``
    ({type: count}) and ``documents_redacted`` in stats."""

    name = "pii"
    version = "1"

    def __init__(self, types: list[str] = list(PII_TYPES), placeholder: str = "<{type}>") -> None:
        super().__init__()
        if not isinstance(types, (list, tuple)) or not types:
            raise OptionError("types", types, f"must be a non-empty list of {', '.join(PII_TYPES)}")
        chosen = []
        for t in types:
            if not isinstance(t, str) or t.upper() not in PII_TYPES:
                raise OptionError("types", types, f"has {t!r}; the types are {', '.join(PII_TYPES)}")
            chosen.append(t.upper())
        if not isinstance(placeholder, str) or "{type}" not in placeholder:
            raise OptionError("placeholder", placeholder, "must contain {type}, e.g. <{type}>")
        try:
            placeholder.format(type="EMAIL")
        except (KeyError, IndexError, ValueError):
            raise OptionError("placeholder", placeholder, "has braces other than {type}; double them: {{ }}") from None
        self.types = [t for t in PII_TYPES if t in chosen]
        self.placeholder = placeholder
        self.redactions: Counter[str] = Counter()
        self.documents_redacted = 0

    def config(self) -> dict[str, Any]:
        return {"types": list(self.types), "placeholder": self.placeholder}

    def _mark(self, kind: str) -> str:
        self.redactions[kind] += 1
        return self.placeholder.format(type=kind)

    def redact(self, doc: str) -> str:
        for kind in self.types:
            doc = getattr(self, f"_{kind.lower()}")(doc)
        return doc

    def apply(self, doc: str) -> str | None:
        before = sum(self.redactions.values())
        out = self.redact(doc)
        if sum(self.redactions.values()) > before:
            self.documents_redacted += 1
        return out

    def _email(self, doc: str) -> str:
        return _EMAIL.sub(lambda m: self._mark("EMAIL"), doc)

    def _iban(self, doc: str) -> str:
        def replace(m: re.Match) -> str:
            text = m.group(0)
            length = IBAN_LENGTHS.get(text[:2])
            if length is None:
                return text
            taken = end = 0
            while end < len(text) and taken < length:  # the shortest prefix holding the country's characters
                taken += text[end] != " "
                end += 1
            if taken < length or (end < len(text) and text[end] != " "):
                return text
            return self._mark("IBAN") + text[end:] if iban_ok(text[:end].replace(" ", "")) else text

        return _IBAN.sub(replace, doc)

    def _credit_card(self, doc: str) -> str:
        def replace(m: re.Match) -> str:
            digits = re.sub(r"\D", "", m.group(0))
            return self._mark("CREDIT_CARD") if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group(0)

        return _CARD.sub(replace, doc)

    def _ip_address(self, doc: str) -> str:
        def replace_v6(m: re.Match) -> str:
            text = m.group(0)
            if sum(c in "0123456789abcdefABCDEF" for c in text) < 2:
                return text
            try:
                ipaddress.IPv6Address(text)
            except ValueError:
                return text
            return self._mark("IP_ADDRESS")

        doc = _IPV6.sub(replace_v6, doc)
        return _IPV4.sub(lambda m: self._mark("IP_ADDRESS"), doc)

    def _phone(self, doc: str) -> str:
        return _PHONE.sub(lambda m: self._mark("PHONE") if phone_ok(m.group(0)) else m.group(0), doc)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "redactions": {t: self.redactions.get(t, 0) for t in self.types},
                "documents_redacted": self.documents_redacted}  # fmt: skip
