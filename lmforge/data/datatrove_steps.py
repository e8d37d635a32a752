"""lmforge's cleaning steps on datatrove, to clean a corpus past one machine.

``data.pipeline``'s per-document steps (``normalize``, ``quality``, ``pii`` and any third-party filter that is not
stateful) become datatrove pipeline steps, so datatrove's executors run them: ``LocalPipelineExecutor`` here,
``SlurmPipelineExecutor`` or ``RayPipelineExecutor`` over many machines, each task on its shard of the files::

    from datatrove.executor import SlurmPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from lmforge.data.datatrove_steps import pipeline_steps

    steps = pipeline_steps([{"name": "normalize"}, {"name": "quality"}, {"name": "pii"}])
    SlurmPipelineExecutor(pipeline=[JsonlReader("s3://raw/"), *steps, JsonlWriter("s3://clean/")],
                          tasks=512, time="4:00:00", partition="cpu", logging_dir="logs/clean").run()

A document's text is what the lmforge step returns (the same as ``data.pipeline`` gives, tested); a dropped one is
counted in datatrove's stats as ``dropped`` and ``dropped_<reason>``, redactions as ``redacted_<TYPE>``. ``dedup``
is refused: it must see every document in one place; across machines use datatrove's MinHash stages
(signatures, buckets, clusters, filter), then point ``data.dataset`` at the cleaned files. Needs ``pip install
datatrove orjson``.
"""

from __future__ import annotations

from typing import Any

from datatrove.pipeline.base import PipelineStep

from lmforge.data.pipeline import build_step, check_pipeline
from lmforge.errors import UserError


class LmforgeStep(PipelineStep):
    """One ``data.pipeline`` step (its spec, e.g. ``{"name": "quality", "min_words": 20}``) as a datatrove step."""

    type = "LMFORGE"

    def __init__(self, spec: dict[str, Any], index: int = 0, where: str = "pipeline") -> None:
        self.spec, self.index, self.where = dict(spec), index, where
        step = build_step(self.spec, index, where)  # a bad option fails here, before any task starts
        if getattr(step, "stateful", False):
            raise UserError(
                f"{where}[{index}]: filter {step.name!r} is stateful (it must see every document in one place) and "
                "cannot run split over datatrove tasks; for near-duplicates across machines use datatrove's MinHash "
                "stages, then point data.dataset at their output"
            )
        self.name = f"lmforge {step.name}"
        super().__init__()  # after the name: datatrove names the step's stats by it

    def run(self, data, rank: int = 0, world_size: int = 1):
        step = build_step(self.spec, self.index, self.where)  # each task its own: counts are per task
        for doc in data or ():
            self.stat_update("total")
            with self.track_time():
                out = step.process(doc.text)
            if out is None:
                self.stat_update("dropped")
                continue
            self.stat_update("forwarded")
            doc.text = out
            self.update_doc_stats(doc)
            yield doc
        stats = step.stats()
        for reason, n in (stats.get("dropped") or {}).items():
            if n:
                self.stat_update(f"dropped_{reason}", value=int(n))
        for kind, n in (stats.get("redactions") or {}).items():
            if n:
                self.stat_update(f"redacted_{kind}", value=int(n))


def pipeline_steps(pipeline: list[dict[str, Any]], where: str = "pipeline") -> list[LmforgeStep]:
    """``data.pipeline``'s steps as datatrove steps, checked as ``data.pipeline`` is."""
    return [LmforgeStep(spec, i, where) for i, spec in enumerate(check_pipeline(pipeline, where))]
