"""The cleaning pipeline at scale and its report: ``data.num_proc`` gives the same tokens and the same counts as one
process, the counts survive a reused token cache, ``lmforge data report`` tells what each step removed and why,
and the model card carries it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lmforge.data.cache import TokenFile
from lmforge.data.pretrain import PretrainDataModule
from lmforge.data.report import token_statistics
from lmforge.data.sources import embedded
from lmforge.tokenizers import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = [{"name": "normalize"}, {"name": "quality"}, {"name": "dedup", "near": {"threshold": 0.7, "ngram": 3}},
            {"name": "pii"}]  # fmt: skip
JUNK = "$$$ ### !!! ... " * 20


def dirty_corpus(path: Path) -> dict[str, int]:
    """A JSONL corpus with what each step must find, and how many of each: unique documents of the embedded text
    (600-3000 bytes), exact and near copies of some, symbol junk, e-mail addresses and a phone number in unique
    documents, and one with mojibake."""
    (text,) = embedded(size_bytes=700_000, seed=2).documents()
    rng = random.Random(0)
    docs, start = [], 0
    while start < len(text) - 3000:
        n = rng.randint(600, 3000)  # 100 words and more: quality keeps every real document
        docs.append(text[start : start + n])
        start += n
    out, expected = [], {"exact": 0, "near": 0, "junk": 0, "email": 0, "phone": 0}
    for i, doc in enumerate(docs):
        if i % 9 == 4:  # unique documents that carry PII
            doc = f"Write to person{i}@example.org today. " + doc
            expected["email"] += 1
        if i == 6:
            doc = "Or call +44 20 7946 0958 after six. " + doc
            expected["phone"] += 1
        out.append(doc)
        if i % 10 == 0 and len(doc.split()) > 60:
            out.append(doc)
            expected["exact"] += 1
        if i % 15 == 1 and len(doc.split()) > 150:
            words = doc.split(" ")
            words[len(words) // 2] = "zebra"
            out.append(" ".join(words))
            expected["near"] += 1
        if i % 20 == 3:
            out.append(JUNK)
            expected["junk"] += 1
    out.append("A cafÃ© and a ﬁne day. " + text[-2900:])  # text no other document holds
    expected["documents"] = len(out)
    with path.open("w", encoding="utf-8") as f:
        for doc in out:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("dirty") / "corpus.jsonl"
    return path, dirty_corpus(path)


def module(path: Path, cache: Path, num_proc: int) -> PretrainDataModule:
    return PretrainDataModule(dataset={"name": "files", "paths": [str(path)]}, tokenizer={"name": "bytes"}, seq_len=64,
                              cache_dir=str(cache), pipeline=PIPELINE, num_proc=num_proc)  # fmt: skip


def test_parallel_pipeline_gives_the_same_tokens_and_counts(corpus, tmp_path):
    path, expected = corpus
    one, three = module(path, tmp_path / "one", 1), module(path, tmp_path / "three", 3)
    one.prepare_data()
    three.prepare_data()
    assert one.token_file.path.read_bytes() == three.token_file.path.read_bytes()
    assert one.pipeline_report() == three.pipeline_report()
    steps = {e["name"]: e for e in one.pipeline_report()}
    assert steps["normalize"]["docs_in"] == expected["documents"]
    assert steps["quality"]["dropped"].get("symbol_ratio", 0) == expected["junk"]
    assert steps["dedup"]["dropped"] == {"exact": expected["exact"], "near": expected["near"]}
    assert steps["pii"]["redactions"]["EMAIL"] == expected["email"] and steps["pii"]["redactions"]["PHONE"] == 1
    kept = expected["documents"] - expected["junk"] - expected["exact"] - expected["near"]
    assert steps["pii"]["docs_out"] == kept == one.token_file.meta["num_documents"]
    ids = np.asarray(one.token_file.open())
    text = ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8")  # the byte tokenizer: ids are the bytes
    assert "café and a fine day" in text and "person4@example.org" not in text and "<EMAIL>" in text


def test_a_reused_cache_still_reports_what_the_steps_did(corpus, tmp_path):
    path, _ = corpus
    first = module(path, tmp_path, 1)
    first.prepare_data()
    again = module(path, tmp_path, 2)
    again.prepare_data()  # the same key (num_proc is not part of it): reused, nothing runs
    assert again.filtered.report() == [] and again.token_file.path == first.token_file.path
    assert again.pipeline_report() == first.pipeline_report()
    assert again.describe_data()["pipeline_report"] == first.pipeline_report()


def test_token_statistics_on_a_known_file(tmp_path):
    tok = ByteTokenizer()
    docs = [b"ab", b"", b"abcd" * 3, b"a"]
    ids = np.concatenate([[*d, tok.eos_id] for d in docs]).astype(np.uint16)
    path = tmp_path / "t.bin"
    ids.tofile(path)
    stats = token_statistics(TokenFile(path, np.dtype("uint16"), ids.size, {"num_bytes": 15}), tok)
    assert stats["tokens"] == 19 and stats["documents"] == 4
    d = stats["document_tokens"]
    assert (d["min"], d["max"], d["mean"]) == (0, 12, 15 / 4)
    edges, counts = d["histogram"]["edges"], d["histogram"]["counts"]
    assert edges[:6] == [0, 1, 2, 4, 8, 16] and counts[:5] == [1, 1, 1, 0, 1]
    assert stats["vocab_used"] == 5  # a, b, c, d and the end-of-text token
    assert stats["top_tokens"][0] == {"id": 97, "text": "a", "share": 5 / 19}
    assert stats["bytes_per_token"] == 1.0


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_data_report_command(corpus, tmp_path):
    path, expected = corpus
    args = ["data", "report", "-c", str(ROOT / "configs/gpt-tiny.yaml"), "--data.dataset",
            json.dumps({"name": "files", "paths": [str(path)]}), "--data.pipeline", json.dumps(PIPELINE),
            "--data.cache_dir", str(tmp_path / "cache"), "--data.num_proc", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    table = run(*args)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "dedup" in table.stdout and f"exact {expected['exact']}" in table.stdout
    assert "EMAIL" in table.stdout and "vocabulary used" in table.stdout
    assert "pipeline dedup:" in table.stderr  # fit's summary lines, as prepare_data logs them
    report = json.loads(run(*args, "--json").stdout)  # the second time from the cache: the same counts
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    steps = {e["name"]: e for e in report["pipeline"]}
    assert steps["dedup"]["clusters"] >= expected["exact"] and steps["pii"]["redactions"]["EMAIL"] == expected["email"]
    assert report["tokens"]["documents"] == steps["pii"]["docs_out"]
    assert report["split"]["train_tokens"] + report["split"]["val_tokens"] == report["tokens"]["tokens"]
    for name in ("document-lengths.png", "rank-frequency.png", "pipeline.png"):  # matplotlib: a dev dependency
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, words",
    [
        (["data", "report", "-c", "configs/finetune-sft.yaml"], "covers pretraining corpora"),
        (["data", "clean"], "unknown subcommand 'clean'"),
        (["data", "report"], "give the run's config"),
        (["data", "report", "-c", "configs/gpt-tiny.yaml", "--data.pipeline", '[{name: dedupe}]'],
         "data.pipeline[0]: no filter named 'dedupe'"),
        (["data", "report", "-c", "configs/gpt-tiny.yaml", "--data.num_proc", "0"], "data.num_proc=0"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(args, words, capsys, monkeypatch):
    from lmforge.cli import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert words in err and len(err.splitlines()) == 1, err


def test_the_card_tells_how_the_data_was_cleaned(corpus, tmp_path):
    from lmforge.hf_export import _data_lines

    path, _ = corpus
    dm = module(path, tmp_path, 1)
    dm.prepare_data()
    lines = _data_lines(SimpleNamespace(data=dm.describe_data(), base=None), [])
    text = "\n".join(lines)
    assert "cleaned before tokenizing (`data.pipeline`): `normalize` -> `quality` -> `dedup` (near=" in text
    assert any(line.startswith("  - dedup: ") and "dropped exact" in line for line in lines), text
    assert any(line.startswith("  - pii: ") and "redacted EMAIL" in line for line in lines), text
