"""lmforge-hf-datasets, offline: local files through Hugging Face datasets, found by lmforge by name."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import plugins
from lmforge.testing import assert_plugin_ok

HERE = Path(__file__).resolve().parents[1]
REPO = HERE.parents[1]
STORIES = HERE / "examples" / "stories.jsonl"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def expected_texts() -> list[str]:
    return [json.loads(line)["text"] for line in STORIES.read_text().splitlines()]


def test_registered_as_an_lmforge_dataset():
    (info,) = plugins.discover("dataset")["hf_datasets"]
    assert info.distribution == "lmforge-hf-datasets"


@pytest.mark.parametrize("streaming", [False, True])
def test_follows_the_lmforge_dataset_protocol(streaming):
    """lmforge's protocol checks (what `lmforge plugins check lmforge-hf-datasets` runs): key rule and stability,
    documents, num_bytes, hub_dataset; with the factory's example_args, and with the shipped stories."""
    if not streaming:
        assert_plugin_ok("dataset", "hf_datasets")
    assert_plugin_ok("dataset", "hf_datasets", path="json", data_files=[str(STORIES)], streaming=streaming)


@pytest.mark.parametrize("streaming", [False, True])
def test_local_jsonl_documents(streaming):
    corpus = plugins.build("dataset", {"name": "hf_datasets", "path": "json", "data_files": [str(STORIES)],
                                       "streaming": streaming})  # fmt: skip
    assert list(corpus.documents()) == expected_texts()
    assert corpus.num_bytes() == STORIES.stat().st_size


def test_csv_parquet_and_text_builders(tmp_path):
    texts = expected_texts()[:20]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "body"])
        writer.writerows([[i % 2, t] for i, t in enumerate(texts)])
    corpus = plugins.build("dataset", {"name": "hf_datasets", "path": "csv", "data_files": str(tmp_path / "d.csv"),
                                       "text_field": "body"})  # fmt: skip
    assert list(corpus.documents()) == texts
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    corpus = plugins.build(
        "dataset", {"name": "hf_datasets", "path": "parquet", "data_files": [str(tmp_path / "d.parquet")]}
    )
    assert list(corpus.documents()) == texts
    (tmp_path / "d.txt").write_text("\n".join(texts) + "\n")
    corpus = plugins.build("dataset", {"name": "hf_datasets", "path": "text", "data_files": [str(tmp_path / "d.txt")],
                                       "max_documents": 5})  # fmt: skip
    assert list(corpus.documents()) == texts[:5]


def test_key_follows_content(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(STORIES.read_text())
    spec = {"name": "hf_datasets", "path": "json", "data_files": [str(a)]}
    key = plugins.build("dataset", spec).key()
    assert key == plugins.build("dataset", {**spec, "data_files": [str(STORIES)]}).key()
    a.write_text(STORIES.read_text().replace("fox", "cat"))
    assert plugins.build("dataset", spec).key() != key


def test_bad_input_is_explained(tmp_path):
    with pytest.raises(ValueError, match="no column 'body'.*columns: id, text"):
        corpus = plugins.build("dataset", {"name": "hf_datasets", "path": "json", "data_files": [str(STORIES)],
                                           "text_field": "body"})  # fmt: skip
        next(corpus.documents())
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        plugins.build("dataset", {"name": "hf_datasets", "path": "json", "data_files": ["nope.jsonl"]})
    with pytest.raises(ValueError, match="give data_files"):
        plugins.build("dataset", {"name": "hf_datasets", "path": "json"})


def test_gpt_tiny_trains_on_it_from_yaml(tmp_path):
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "fit", "-c", "configs/gpt-tiny.yaml", "-c",
         "plugins/lmforge-hf-datasets/example.yaml", "--trainer.max_steps", "60", "--trainer.val_check_interval", "60",
         "--trainer.limit_val_batches", "4", "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(next((tmp_path / "run").glob("csv/version_*/metrics.csv")))))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert train[0] > 4.0 and val[-1] < 0.6 * train[0]
