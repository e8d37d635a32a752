"""The cleaning pipeline of ``data.pipeline``: filter plugins applied between the dataset and the tokenizer.

``data.pipeline: [{name: normalize, form: NFKC}, {name: quality}, {name: dedup, near: {threshold: 0.8}}, {name: pii}]``
lists steps (plugins of the ``lmforge.filters`` group, :mod:`lmforge.data.filters` for lmforge's own) with their
options, applied in order to every document. :func:`check_pipeline` checks a pipeline before anything runs (one
line naming the key: ``data.pipeline[2].near.threshold=1.5 must be in (0, 1]``). :class:`FilteredCorpus` wraps the
dataset's corpus: its ``key()`` hashes the inner key, the steps' options (defaults filled in) and their versions,
so the token cache follows the pipeline; each pass over ``documents()`` builds the steps afresh (dedup starts
empty), and when a pass ends, :meth:`FilteredCorpus.report` holds each step's stats and one INFO line per step is
logged on ``lmforge.data.pipeline``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

from lmforge import plugins
from lmforge.data.sources import CorpusError
from lmforge.errors import UserError

log = logging.getLogger(__name__)

STEP_MEMBERS = ("name", "version", "process", "stats")
COUNTS = ("docs_in", "docs_out", "bytes_in", "bytes_out")


class PipelineError(UserError):
    """A ``data.pipeline`` that cannot be built; the message names the step and the key."""


def _where(where: str, i: int) -> str:
    return f"{where}[{i}]"


def _split(where: str, i: int, spec: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise PipelineError(f"{_where(where, i)}: expected {{name: <filter>, <options>}}, got {spec!r}")
    options = dict(spec)
    return options.pop("name"), options


def build_step(spec: Any, i: int = 0, where: str = "data.pipeline") -> Any:
    """The step ``spec`` names, built with its options; a one-line PipelineError naming the key otherwise."""
    from lmforge.data.filters import OptionError

    name, options = _split(where, i, spec)
    here = _where(where, i)
    installed = plugins.names("filter")
    if name not in installed:
        close = difflib.get_close_matches(name, installed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PipelineError(f"{here}: no filter named {name!r}; installed: {', '.join(installed) or 'none'}{hint}")
    try:
        step = plugins.build("filter", {"name": name, **options})
    except OptionError as err:
        raise PipelineError(f"{here}.{err}") from None
    except plugins.PluginError as err:
        raise PipelineError(f"{here}: {err}") from None
    except UserError as err:
        raise PipelineError(f"{here} (filter {name!r}): {err}") from None
    except Exception as err:  # a third-party factory refusing its options in its own words
        raise PipelineError(f"{here} (filter {name!r}): {plugins.error_text(err)}") from None
    for member, kind in (("name", str), ("version", str)):
        if not isinstance(getattr(step, member), kind):
            raise PipelineError(f"{here}: filter {name!r} breaks the protocol: its {member} is not a str")
    return step


def step_config(step: Any, options: dict[str, Any]) -> dict[str, Any]:
    """A step's options with defaults filled in: its ``config()`` when it has one, else the options given."""
    config = getattr(step, "config", None)
    return dict(config()) if callable(config) else dict(options)


def check_pipeline(pipeline: Any, where: str = "data.pipeline") -> list[dict[str, Any]]:
    """The pipeline as a list of ``{name, **options}`` (every step built once, so a bad option fails now)."""
    if pipeline is None:
        return []
    if not isinstance(pipeline, (list, tuple)):
        raise PipelineError(f"{where} must be a list of steps such as [{{name: normalize}}, {{name: dedup}}]")
    out = []
    for i, spec in enumerate(pipeline):
        name, options = _split(where, i, spec)
        build_step(spec, i, where)
        out.append({"name": name, **options})
    return out


def pipeline_key(inner_key: str, steps: list[dict[str, Any]], where: str = "data.pipeline") -> str:
    """The key of a corpus filtered by ``steps``: a hash of the inner key, each step's name, version and options
    (defaults filled in), in order."""
    described = []
    for i, spec in enumerate(steps):
        step = build_step(spec, i, where)
        _, options = _split(where, i, spec)
        described.append({"name": step.name, "version": step.version, "options": step_config(step, options)})
    payload = json.dumps({"corpus": inner_key, "steps": described}, sort_keys=True, default=str)
    return f"filtered-{hashlib.sha256(payload.encode()).hexdigest()[:32]}"


class FilteredCorpus:
    """The documents of ``corpus`` that every step keeps, as the steps leave them (a corpus itself: key,
    documents, num_bytes)."""

    def __init__(self, corpus: Any, steps: list[dict[str, Any]], where: str = "data.pipeline",
                 exact_size: bool = False, num_proc: int = 1) -> None:  # fmt: skip
        self.corpus = corpus
        self.exact_size = exact_size
        self.num_proc = num_proc
        """Worker processes for the steps before the first stateful one (not part of the key: same output)."""
        self.steps = check_pipeline(steps, where)
        self.where = where
        self._key: str | None = None
        self._report: list[dict[str, Any]] | None = None
        self._bytes: int | None = None
        hub = getattr(corpus, "hub_dataset", None)
        if hub is not None:
            self.hub_dataset = hub

    def key(self) -> str:
        if self._key is None:
            self._key = pipeline_key(self.corpus.key(), self.steps, self.where)
        return self._key

    def describe(self) -> str:
        inner = getattr(self.corpus, "describe", None)
        base = str(inner()) if callable(inner) else type(self.corpus).__name__
        return f"{base}, cleaned by {' -> '.join(s['name'] for s in self.steps) or 'nothing'}"

    def num_bytes(self) -> int:
        """The filtered size once a pass has ended (:meth:`measure`), else the inner corpus's (an upper bound);
        with ``exact_size`` a pass is run for it first."""
        if self._bytes is None and self.exact_size and self.steps:
            self.measure()
        return self._bytes if self._bytes is not None else self.corpus.num_bytes()

    def build_steps(self) -> list[Any]:
        return [build_step(spec, i, self.where) for i, spec in enumerate(self.steps)]

    def documents(self) -> Iterator[str]:
        steps = self.build_steps()
        counts = [dict.fromkeys(COUNTS, 0) for _ in steps]
        # With num_proc, the steps before the first stateful one (dedup remembers what it saw, so it and what
        # follows run here, in order) run in worker processes over batches of documents, in order.
        cut = next((i for i, step in enumerate(steps) if getattr(step, "stateful", False)), len(steps))
        cut = cut if self.num_proc > 1 else 0
        merged: list[dict[str, Any]] = [{} for _ in range(cut)]
        source = self._parallel_prefix(cut, counts, merged) if cut else self.corpus.documents()
        for doc in source:
            doc = _apply(doc, steps[cut:], counts[cut:], self.where)
            if doc is not None:
                yield doc
        self._finish(steps, counts, merged)

    def _parallel_prefix(self, cut: int, counts: list[dict[str, int]], merged: list[dict[str, Any]]) -> Iterator[str]:
        """The documents after steps ``[0, cut)``, run by ``num_proc`` workers; their counts and stats (summed over
        batches: a stateless step's stats are counts) go into ``counts`` and ``merged``."""
        from lmforge.data.cache import BATCH_DOCUMENTS, _batches, ordered_map

        batches = _batches(self.corpus.documents(), BATCH_DOCUMENTS)
        for kept, batch_counts, batch_stats in ordered_map(_prefix_batch, batches, self.num_proc, _prefix_init,
                                                           (self.steps[:cut], self.where)):  # fmt: skip
            for total, part in zip(counts, batch_counts):
                for key in COUNTS:
                    total[key] += part[key]
            for i, stats in enumerate(batch_stats):
                merged[i] = _add_stats(merged[i], stats)
            yield from kept

    def _finish(
        self, steps: list[Any], counts: list[dict[str, int]], merged: list[dict[str, Any]] | None = None
    ) -> None:
        report = []
        merged = merged or []
        for i, (step, count) in enumerate(zip(steps, counts)):
            stats = merged[i] if i < len(merged) else step.stats()
            if not isinstance(stats, dict):
                raise PipelineError(f"{self.where}: filter {step.name!r} returned {type(stats).__name__} from stats()")
            entry = {"name": step.name, "version": step.version, **count, **stats}
            entry.setdefault("dropped", {})
            report.append(entry)
            log.info("%s", summary_line(entry))
        self._report = report
        self._bytes = report[-1]["bytes_out"] if report else None
        if report and report[-1]["docs_out"] == 0:
            raise CorpusError(f"{self.where} dropped every document: {'; '.join(summary_line(e) for e in report)}")

    def measure(self) -> int:
        """Run one pass (for the exact filtered size, :meth:`num_bytes`, and :meth:`report`); the bytes kept."""
        for _ in self.documents():
            pass
        return self.num_bytes()

    def report(self) -> list[dict[str, Any]]:
        """Each step's stats from the last complete pass over documents() (empty before one has ended, e.g. when
        the token cache was reused): name, version, docs_in, docs_out, bytes_in, bytes_out, dropped and the
        step's own keys."""
        return [dict(entry) for entry in self._report or []]


_PREFIX: dict[str, Any] = {}


def _prefix_init(specs: list[dict[str, Any]], where: str) -> None:
    _PREFIX["specs"], _PREFIX["where"] = specs, where


def _prefix_batch(batch: list[str]) -> tuple[list[str], list[dict[str, int]], list[dict[str, Any]]]:
    """A worker's part of :meth:`FilteredCorpus._parallel_prefix`: the stateless steps, built afresh for each batch
    (so each batch's stats are its own), over ``batch``."""
    steps = [build_step(spec, i, _PREFIX["where"]) for i, spec in enumerate(_PREFIX["specs"])]
    counts = [dict.fromkeys(COUNTS, 0) for _ in steps]
    kept = [d for d in (_apply(doc, steps, counts, _PREFIX["where"]) for doc in batch) if d is not None]
    return kept, counts, [step.stats() for step in steps]


def _apply(doc: str, steps: list[Any], counts: list[dict[str, int]], where: str) -> str | None:
    """``doc`` through ``steps`` in order (None once one drops it), each step's entry of ``counts`` updated."""
    for step, count in zip(steps, counts):
        count["docs_in"] += 1
        count["bytes_in"] += _size(doc)
        out = step.process(doc)
        if out is None:
            return None
        if not isinstance(out, str):
            raise PipelineError(
                f"{where}: filter {step.name!r} returned {type(out).__name__} from process(); "
                "a filter returns the document (a str) or None to drop it"
            )
        doc = out
        count["docs_out"] += 1
        count["bytes_out"] += _size(doc)
    return doc


def _add_stats(total: Any, part: Any) -> Any:
    """Stats summed over batches: numbers added, dicts key by key; anything else the latest value."""
    if isinstance(total, dict) and isinstance(part, dict):
        out = dict(total)
        for key, value in part.items():
            out[key] = _add_stats(out[key], value) if key in out else value
        return out
    if isinstance(total, (int, float)) and isinstance(part, (int, float)) and not isinstance(part, bool):
        return total + part
    return part


def _size(doc: str) -> int:
    return len(doc.encode("utf-8", errors="surrogatepass"))


def bytes_text(n: int) -> str:
    """``1.2 MB``, ``3.4 kB``, ``12 B``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def summary_line(entry: dict[str, Any]) -> str:
    """``pipeline quality: 120 -> 97 documents, 1.2 MB -> 1.0 MB; dropped too_few_words 20, symbol_ratio 3``."""
    text = (
        f"pipeline {entry['name']}: {entry['docs_in']} -> {entry['docs_out']} documents, "
        f"{bytes_text(entry['bytes_in'])} -> {bytes_text(entry['bytes_out'])}"
    )
    dropped = {k: v for k, v in (entry.get("dropped") or {}).items() if v}
    if dropped:
        text += "; dropped " + ", ".join(f"{k} {v}" for k, v in dropped.items())
    redactions = {k: v for k, v in (entry.get("redactions") or {}).items() if v}
    if redactions:
        text += "; redacted " + ", ".join(f"{k} {v}" for k, v in redactions.items())
    if entry.get("clusters"):
        text += f"; {entry['clusters']} clusters, the largest of {entry['largest_cluster']}"
    return text
