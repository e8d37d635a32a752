"""data.pipeline's per-document steps on datatrove's executor (how lmforge cleans past one machine): the local
executor, several tasks over several files, gives the documents lmforge's own pipeline gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("datatrove")
pytest.importorskip("orjson")

from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402

from lmforge.data.datatrove_steps import pipeline_steps  # noqa: E402
from lmforge.data.pipeline import FilteredCorpus  # noqa: E402
from lmforge.data.sources import embedded, files  # noqa: E402
from lmforge.errors import UserError  # noqa: E402

STEPS = [{"name": "normalize"}, {"name": "quality"}, {"name": "pii"}]


def corpus(folder: Path, shards: int = 3) -> list[str]:
    (text,) = embedded(size_bytes=200_000, seed=4).documents()
    docs = [text[i : i + 1200] for i in range(0, len(text) - 1200, 1200)]
    docs[3] = "Mail ann@example.com or see 10.0.0.1. " + docs[3]
    docs[5] = "$$$ ### !!! ... " * 20
    docs[7] = "Le cafÃ© ﬁne. " + docs[7]
    folder.mkdir()
    paths = [folder / f"part-{i}.jsonl" for i in range(shards)]
    with_handles = [p.open("w", encoding="utf-8") for p in paths]
    for i, doc in enumerate(docs):
        with_handles[i % shards].write(json.dumps({"text": doc, "id": str(i)}, ensure_ascii=False) + "\n")
    for h in with_handles:
        h.close()
    return [str(p) for p in paths]


def test_the_local_executor_cleans_as_data_pipeline_does(tmp_path):
    paths = corpus(tmp_path / "raw")
    pipeline = [JsonlReader(str(tmp_path / "raw")), *pipeline_steps(STEPS),
                JsonlWriter(str(tmp_path / "clean"), compression=None)]  # fmt: skip
    LocalPipelineExecutor(pipeline=pipeline, tasks=3, workers=2, logging_dir=str(tmp_path / "logs")).run()
    cleaned = []
    for path in sorted((tmp_path / "clean").glob("*.jsonl")):
        cleaned += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    ours = FilteredCorpus(files(paths), STEPS)
    expected = list(ours.documents())
    assert sorted(cleaned) == sorted(expected) and len(cleaned) == len(expected)
    assert any("<EMAIL>" in t and "<IP_ADDRESS>" in t for t in cleaned) and any("Le café fine." in t for t in cleaned)
    stats = json.loads((tmp_path / "logs" / "stats.json").read_text())
    quality = next(s for s in stats if s["name"] == "LMFORGE: lmforge quality")
    report = {e["name"]: e for e in ours.report()}
    assert quality["stats"]["dropped_symbol_ratio"] == report["quality"]["dropped"]["symbol_ratio"] == 1
    pii = next(s for s in stats if s["name"] == "LMFORGE: lmforge pii")
    assert pii["stats"]["redacted_EMAIL"] == 1


def test_dedup_and_bad_steps_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"pipeline\[1\]: filter 'dedup' is stateful"):
        pipeline_steps([{"name": "normalize"}, {"name": "dedup"}])
    with pytest.raises(UserError, match=r"pipeline\[0\]: no filter named 'qualty'"):
        pipeline_steps([{"name": "qualty"}])
