"""Corpus preparation in worker processes (``data.num_proc``): the same token file, byte for byte, as one process;
a preparation killed with SIGKILL leaves nothing that looks complete, no worker behind, and the rerun is right."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.cache import build_token_file
from lmforge.data.sources import embedded, files
from lmforge.tokenizers import ByteTokenizer, HFTokenizer


def jsonl_corpus(folder: Path, documents: int, shards: int = 3) -> list[str]:
    """``documents`` records of the embedded text (about 600 bytes each, some empty-ish and non-ASCII ones) over
    ``shards`` JSONL files."""
    (text,) = embedded(size_bytes=documents * 600, seed=1).documents()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part-{i}.jsonl" for i in range(shards)]
    handles = [p.open("w", encoding="utf-8") for p in paths]
    for i in range(documents):
        doc = text[i * 600 : (i + 1) * 600]
        if i % 97 == 5:
            doc = "naïve café — 東京 " + doc
        handles[i % shards].write(json.dumps({"text": doc or "x"}, ensure_ascii=False) + "\n")
    for h in handles:
        h.close()
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    folder = tmp_path_factory.mktemp("bpe")
    (text,) = embedded(size_bytes=200_000, seed=3).documents()
    HFTokenizer.train_bpe(iter([text, "naïve café — 東京"]), 512, 2).save(folder)
    return HFTokenizer.from_file(folder)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_one_and_four_processes_write_the_same_file(tmp_path, bpe, tokenizer):
    tok = ByteTokenizer() if tokenizer == "bytes" else bpe
    corpus = files(jsonl_corpus(tmp_path / "corpus", 3000))
    one = build_token_file(corpus, tok, tmp_path / "one", progress=False, num_proc=1)
    four = build_token_file(corpus, tok, tmp_path / "four", progress=False, num_proc=4)
    assert one.path.name == four.path.name  # one cache entry, whatever num_proc
    assert one.path.read_bytes() == four.path.read_bytes()
    assert one.meta["block_crc32"] == four.meta["block_crc32"] and four.meta["num_proc"] == 4
    assert one.meta["num_documents"] == four.meta["num_documents"] == 3000
    # and both are what tokenizing document by document gives
    ids = []
    for doc in corpus.documents():
        ids += [*tok.encode_batch([doc])[0], tok.eos_id]
    np.testing.assert_array_equal(four.open(), np.asarray(ids, dtype=four.dtype))


KILLED = r"""
import sys
from lmforge.data.cache import build_token_file
from lmforge.data.sources import files
from lmforge.tokenizers import ByteTokenizer
build_token_file(files(sys.argv[1].split(",")), ByteTokenizer(), __import__("pathlib").Path(sys.argv[2]),
                 progress=False, num_proc=2)
"""


def _marked_processes(mark: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if f"LMFORGE_TEST_WORKER_MARK={mark}".encode() in environ.split(b"\0"):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_killed_parallel_preparation_leaves_no_shard_and_no_worker(tmp_path):
    paths = jsonl_corpus(tmp_path / "corpus", 25_000, shards=4)  # 15 MB: seconds of work on two workers
    cache = tmp_path / "cache"
    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "LMFORGE_TEST_WORKER_MARK": mark}  # inherited by the workers: how the test finds them
    proc = subprocess.Popen([sys.executable, "-c", KILLED, ",".join(paths), str(cache)], env=env)
    end = time.monotonic() + 120
    while not (cache.is_dir() and any(".lmtmp-" in p.name for p in cache.iterdir())):
        assert time.monotonic() < end and proc.poll() is None, "the build never started"
        time.sleep(0.02)
    time.sleep(0.3)  # some batches written, workers busy
    assert len(_marked_processes(mark)) >= 3  # the parent and its two workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    end = time.monotonic() + 30
    while _marked_processes(mark):  # the workers see their parent's pipe close and exit
        assert time.monotonic() < end, f"workers left running: {_marked_processes(mark)}"
        time.sleep(0.1)
    assert not list(cache.glob("*.json")), "a killed build must not leave metadata (what marks a file complete)"
    assert not [p for p in cache.iterdir() if p.suffix == ".bin" and ".lmtmp-" not in p.name]
    again = build_token_file(files(paths), ByteTokenizer(), cache, progress=False, num_proc=2)
    assert not [p for p in cache.iterdir() if ".lmtmp-" in p.name]
    reference = build_token_file(files(paths), ByteTokenizer(), tmp_path / "reference", progress=False)
    assert again.path.read_bytes() == reference.path.read_bytes()
