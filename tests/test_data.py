"""Corpus sources, the token cache and the pretraining data module."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lmforge.data import sources
from lmforge.data.cache import build_token_file, token_dtype
from lmforge.data.pretrain import PretrainDataModule, TokenWindowDataset
from lmforge.data.sources import CorpusError, EmbeddedCorpus, FileCorpus, resolve_files
from lmforge.data.synthetic import SyntheticGrammar
from lmforge.errors import UserError
from lmforge.plugins import PluginError
from lmforge.tokenizers import ByteTokenizer, HFTokenizer

SMALL = {"size_bytes": 60_000, "seed": 0, "branching": 6}
EMBEDDED = {"name": "embedded", **SMALL}

DOCS = {
    "a.txt": "First document.\nWith two lines, ASCII only.\n",
    "b.md": "# Zweites Dokument\nGrüße aus Köln — naïve café, 東京 😀\n",
    "c.txt": "third one " * 50,
}


def write_corpus(folder: Path, docs: dict[str, str] = DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def expected_tokens(tokenizer, docs) -> np.ndarray:
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc) + [tokenizer.eos_id]
    return np.asarray(ids)


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# -- resolve_files -----------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for rel in ["a.txt", "b.md", "sub/c.rst", "sub/deep/d.TXT", "sub/e.jsonl", "f.text", "skip.csv", "sub/skip.py"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x\n")
    return root


def test_resolve_single_file(tree):
    assert resolve_files([str(tree / "skip.csv")]) == [(tree / "skip.csv").resolve()]  # a named file is always taken


def test_resolve_folder_recursive_text_suffixes_only(tree):
    found = resolve_files([str(tree)])
    expected = ["a.txt", "b.md", "f.text", "sub/c.rst", "sub/deep/d.TXT", "sub/e.jsonl"]
    assert found == sorted((tree / rel).resolve() for rel in expected)


def test_resolve_glob_and_dedup(tree):
    assert resolve_files([str(tree / "**" / "*.rst")]) == [(tree / "sub/c.rst").resolve()]
    assert resolve_files([str(tree / "*.t*t")]) == [(tree / "a.txt").resolve(), (tree / "f.text").resolve()]
    # the same file named twice (directly and through its folder) appears once
    files = resolve_files([str(tree / "a.txt"), str(tree)])
    assert len(files) == len(set(files)) == 6


def test_resolve_missing_path(tmp_path):
    missing = tmp_path / "no" / "such.txt"
    with pytest.raises(CorpusError, match=re.escape(str(missing)) + ".*does not exist"):
        resolve_files([str(missing)])


def test_resolve_folder_without_text_files(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(CorpusError, match=re.escape(str(folder))):
        resolve_files([str(folder)])
    (folder / "data.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=re.escape(str(folder)) + ".*\\.txt"):
        resolve_files([str(folder)])


def test_resolve_glob_matching_nothing(tree):
    pattern = str(tree / "*.nothing")
    with pytest.raises(CorpusError, match=re.escape(repr(pattern)) + " matches no file"):
        resolve_files([pattern])


# -- the token cache ---------------------------------------------------------------------------


def test_token_file_contents_and_reuse(tmp_path):
    folder = write_corpus(tmp_path / "corpus")
    corpus = FileCorpus(resolve_files([str(folder)]))
    tok = ByteTokenizer()
    cache = tmp_path / "cache"
    first = build_token_file(corpus, tok, cache, progress=False)
    assert first.dtype == np.uint16
    # documents in sorted file order, each followed by the end-of-text token
    expected = expected_tokens(tok, [DOCS["a.txt"], DOCS["b.md"], DOCS["c.txt"]])
    np.testing.assert_array_equal(np.fromfile(first.path, dtype="<u2"), expected)
    np.testing.assert_array_equal(np.asarray(first.open()), expected)
    assert first.num_tokens == len(expected)
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["num_tokens"] == len(expected) and meta["num_documents"] == 3 and meta["dtype"] == "uint16"

    # The second build reuses the file: same path, not rewritten.
    old = 1_000_000_000_000_000_000  # an mtime no rewrite could produce
    os.utime(first.path, ns=(old, old))
    os.utime(first.path.with_suffix(".json"), ns=(old, old))
    before = first.path.stat()
    second = build_token_file(FileCorpus(resolve_files([str(folder)])), tok, cache, progress=False)
    assert second.path == first.path and second.num_tokens == first.num_tokens
    after = second.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, old)
    assert second.path.with_suffix(".json").stat().st_mtime_ns == old
    assert cache_files(cache) == sorted([first.path.name, first.path.with_suffix(".json").name])


def test_token_file_with_bpe_matches_encode(tmp_path):
    folder = write_corpus(tmp_path / "corpus")
    corpus = FileCorpus(resolve_files([str(folder)]))
    tok = HFTokenizer.train_bpe(corpus.documents(), vocab_size=300, min_frequency=1)
    built = build_token_file(corpus, tok, tmp_path / "cache", progress=False)
    docs = list(corpus.documents())
    np.testing.assert_array_equal(np.asarray(built.open()), expected_tokens(tok, docs))
    # another tokenizer gets another file in the same cache
    other = build_token_file(corpus, ByteTokenizer(), tmp_path / "cache", progress=False)
    assert other.path != built.path


def test_corpus_key_is_content_keyed(tmp_path):
    one = write_corpus(tmp_path / "one")
    key = FileCorpus(resolve_files([str(one)])).key()
    # same bytes, other folder and other file names (same suffixes): same key
    renamed = {"x.txt": DOCS["a.txt"], "y.md": DOCS["b.md"], "z.txt": DOCS["c.txt"]}
    two = write_corpus(tmp_path / "elsewhere" / "two", renamed)
    assert FileCorpus(resolve_files([str(two)])).key() == key
    # ... and therefore the same token file
    cache = tmp_path / "cache"
    a = build_token_file(FileCorpus(resolve_files([str(one)])), ByteTokenizer(), cache, progress=False)
    b = build_token_file(FileCorpus(resolve_files([str(two)])), ByteTokenizer(), cache, progress=False)
    assert a.path == b.path
    # one changed byte: another key
    (two / "y.md").write_text(DOCS["b.md"].replace("Köln", "Kiel"), encoding="utf-8")
    assert FileCorpus(resolve_files([str(two)])).key() != key
    # the text field and decoding policy are part of the key too
    files = resolve_files([str(one)])
    assert FileCorpus(files, text_field="body").key() != key
    assert FileCorpus(files, decode_errors="strict").key() != key


def test_embedded_corpus_key():
    assert EmbeddedCorpus(50_000, 0, 6).key() == EmbeddedCorpus(50_000, 0, 6).key()
    specs = [(50_000, 0, 6), (50_001, 0, 6), (50_000, 1, 6), (50_000, 0, 5)]
    keys = {EmbeddedCorpus(*spec).key() for spec in specs}
    assert len(keys) == 4


def test_truncated_token_file_is_rebuilt(tmp_path, caplog):
    corpus = EmbeddedCorpus(size_bytes=50_000)
    cache = tmp_path / "cache"
    built = build_token_file(corpus, ByteTokenizer(), cache, progress=False)
    good = np.fromfile(built.path, dtype=np.uint16)
    text, _ = SyntheticGrammar().generate(50_000)
    np.testing.assert_array_equal(good, expected_tokens(ByteTokenizer(), [text]))

    size = built.path.stat().st_size
    with open(built.path, "r+b") as f:
        f.truncate(size // 2)
    caplog.set_level(logging.WARNING, logger="lmforge.data.cache")
    rebuilt = build_token_file(corpus, ByteTokenizer(), cache, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(built.path) in m and "rebuilding" in m for m in warnings), warnings
    assert rebuilt.path == built.path and rebuilt.num_tokens == good.size
    assert rebuilt.path.stat().st_size == size
    np.testing.assert_array_equal(np.fromfile(rebuilt.path, dtype=np.uint16), good)


def test_missing_metadata_is_rebuilt(tmp_path, caplog):
    corpus = EmbeddedCorpus(size_bytes=50_000)
    cache = tmp_path / "cache"
    built = build_token_file(corpus, ByteTokenizer(), cache, progress=False)
    good = np.fromfile(built.path, dtype=np.uint16)
    meta_path = built.path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta_path.unlink()
    caplog.set_level(logging.WARNING, logger="lmforge.data.cache")
    rebuilt = build_token_file(corpus, ByteTokenizer(), cache, progress=False)
    assert any(str(built.path) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert meta_path.is_file()
    new_meta = json.loads(meta_path.read_text())
    assert {k: v for k, v in new_meta.items() if k != "seconds"} == {k: v for k, v in meta.items() if k != "seconds"}
    np.testing.assert_array_equal(np.fromfile(rebuilt.path, dtype=np.uint16), good)
    assert not [n for n in cache_files(cache) if n.endswith(".tmp") or ".lmtmp-" in n]


def test_corrupt_token_file_of_the_right_size_is_rebuilt(tmp_path, caplog):
    """Same size, damaged content: the block checksums in the metadata catch it, and the file is rebuilt."""
    corpus = EmbeddedCorpus(size_bytes=50_000)
    cache = tmp_path / "cache"
    built = build_token_file(corpus, ByteTokenizer(), cache, progress=False)
    good = np.fromfile(built.path, dtype=np.uint16)
    with open(built.path, "r+b") as f:
        f.seek(built.path.stat().st_size // 2)
        f.write(b"\xff\xff\x07\x00" * 8)  # ids far beyond the vocabulary, and one that is in it
    caplog.set_level(logging.WARNING, logger="lmforge.data.cache")
    rebuilt = build_token_file(corpus, ByteTokenizer(), cache, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("is corrupt" in m and str(built.path) in m and "rebuilding" in m for m in warnings), warnings
    np.testing.assert_array_equal(np.fromfile(rebuilt.path, dtype=np.uint16), good)
    caplog.clear()
    assert build_token_file(corpus, ByteTokenizer(), cache, progress=False).num_tokens == good.size
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # an intact file is reused quietly


def test_block_checksums_cover_every_block(monkeypatch, tmp_path):
    from lmforge.data import cache as cache_mod

    monkeypatch.setattr(cache_mod, "BLOCK_BYTES", 4096)
    built = build_token_file(EmbeddedCorpus(size_bytes=20_000), ByteTokenizer(), tmp_path / "cache", progress=False)
    crcs = built.meta["block_crc32"]
    assert len(crcs) == -(-built.path.stat().st_size // 4096)
    import zlib

    data = built.path.read_bytes()
    assert crcs == [zlib.crc32(data[i : i + 4096]) for i in range(0, len(data), 4096)]


def test_a_window_with_ids_beyond_the_vocabulary_stops_with_one_line(tmp_path):
    """Damage a sampled check could miss (very large files) still never reaches the model."""
    built = build_token_file(EmbeddedCorpus(size_bytes=5_000), ByteTokenizer(), tmp_path / "cache", progress=False)
    with open(built.path, "r+b") as f:
        f.seek(200)
        f.write(np.array([60000], dtype=np.uint16).tobytes())
    windows = TokenWindowDataset(built, 0, built.num_tokens, 64)
    assert windows[5] is not None  # windows elsewhere are fine
    with pytest.raises(CorpusError, match=r"is corrupt \(token id 60000 at offset 100.*run again to rebuild it"):
        windows[1]
    assert not built.path.with_suffix(".json").exists()  # the next run rebuilds it


def test_token_dtype():
    assert token_dtype(ByteTokenizer.vocab_size) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(70000) == np.uint32
    assert token_dtype(257, "uint32") == np.uint32
    with pytest.raises(CorpusError, match="uint16.*70000"):
        token_dtype(70000, "uint16")


def test_requested_uint32_token_file(tmp_path):
    corpus = FileCorpus(resolve_files([str(write_corpus(tmp_path / "corpus"))]))
    built = build_token_file(corpus, ByteTokenizer(), tmp_path / "cache", "uint32", progress=False)
    assert built.dtype == np.uint32 and built.path.stat().st_size == 4 * built.num_tokens
    np.testing.assert_array_equal(np.asarray(built.open()), expected_tokens(ByteTokenizer(), corpus.documents()))


def test_empty_corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"")
    (folder / "b.txt").write_bytes(b"")
    (folder / "c.jsonl").write_text('{"text": ""}\n\n')
    cache = tmp_path / "cache"
    with pytest.raises(CorpusError, match="no text.*point data.dataset at real text"):
        build_token_file(FileCorpus(resolve_files([str(folder)])), ByteTokenizer(), cache, progress=False)
    leftovers = [n for n in cache_files(cache) if n.endswith((".tmp", ".bin", ".json")) or ".lmtmp-" in n]
    assert not leftovers, cache_files(cache)
    # through the data module too
    dm = PretrainDataModule(
        dataset={"name": "files", "paths": str(folder)}, cache_dir=str(tmp_path / "cache2"), num_workers=0
    )
    with pytest.raises(CorpusError, match="no text"):
        dm.prepare_data()
    assert not [n for n in cache_files(tmp_path / "cache2") if n.endswith((".tmp", ".bin")) or ".lmtmp-" in n]


# -- decoding and JSONL ------------------------------------------------------------------------


def test_undecodable_bytes_replace_warns(tmp_path, caplog):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc\xff\xfedef")
    caplog.set_level(logging.WARNING, logger="lmforge.data.sources")
    docs = list(FileCorpus([path], decode_errors="replace").documents())
    assert docs == ["abc\ufffd\ufffddef"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "byte 3" in warnings[0], warnings
    assert "2 character(s)" in warnings[0]


def test_undecodable_bytes_strict_raises(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc\xff\xfedef")
    with pytest.raises(CorpusError, match=re.escape(str(path)) + ".*byte 3"):
        list(FileCorpus([path], decode_errors="strict").documents())


def test_valid_utf8_logs_nothing(tmp_path, caplog):
    path = tmp_path / "good.txt"
    path.write_text("Grüße \ufffd literal replacement char", encoding="utf-8")
    caplog.set_level(logging.WARNING, logger="lmforge.data.sources")
    assert list(FileCorpus([path], decode_errors="strict").documents()) == [path.read_text(encoding="utf-8")]
    assert not caplog.records


def test_jsonl_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"text": "first"}, {"text": "zweite Zeile: Grüße", "id": 2}, {"text": ""}, {"text": "multi\nline"}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n   \n", encoding="utf-8")
    txt = tmp_path / "plain.txt"
    txt.write_text("a text file")
    corpus = FileCorpus(resolve_files([str(path), str(txt)]))
    assert list(corpus.documents()) == ["first", "zweite Zeile: Grüße", "multi\nline", "a text file"]


def test_jsonl_bad_json_names_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken}\n{"text": "after"}\n')
    with pytest.raises(CorpusError, match=re.escape(f"{path}:3") + ".*not valid JSON"):
        list(FileCorpus([path]).documents())


def test_jsonl_missing_field_names_field_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text here"}\n')
    with pytest.raises(CorpusError, match=re.escape(f"{path}:2") + ".*'text'"):
        list(FileCorpus([path]).documents())
    path.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(CorpusError, match=re.escape(f"{path}:2") + ".*'text'"):
        list(FileCorpus([path]).documents())
    path.write_text('{"text": 42}\n')
    with pytest.raises(CorpusError, match=re.escape(f"{path}:1") + ".*int, not text"):
        list(FileCorpus([path]).documents())


def test_jsonl_custom_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "one", "text": "ignored"}\n{"body": "two"}\n')
    assert list(FileCorpus([path], text_field="body").documents()) == ["one", "two"]
    with pytest.raises(CorpusError, match="'body'"):
        path.write_text('{"text": "x"}\n')
        list(FileCorpus([path], text_field="body").documents())


def test_jsonl_line_separator_inside_string(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"text": "para\u2028graph"}, {"text": "next\u0085line"}, {"text": "third"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert list(FileCorpus([path]).documents()) == [r["text"] for r in records]


# -- the data module ---------------------------------------------------------------------------


def make_dm(cache: Path, **kwargs) -> PretrainDataModule:
    args = {"dataset": EMBEDDED, "seq_len": 64, "batch_size": 4, "num_workers": 0, "cache_dir": str(cache)}
    return PretrainDataModule(**{**args, **kwargs})


def test_data_module_is_deterministic(tmp_path):
    a, b = make_dm(tmp_path / "c1"), make_dm(tmp_path / "c2")
    assert a.corpus is None and a.tokenizer is None and a.token_file is None  # nothing is built before prepare_data
    assert not (tmp_path / "c1").exists()
    for dm in (a, b):
        dm.prepare_data()
        assert dm.corpus == EmbeddedCorpus(**SMALL) and isinstance(dm.tokenizer, ByteTokenizer)
        dm.setup("fit")
    assert a.token_file.path.parent == tmp_path / "c1" and b.token_file.path.parent == tmp_path / "c2"
    assert a.token_file.path.name == b.token_file.path.name
    tokens = np.asarray(a.token_file.open())
    np.testing.assert_array_equal(tokens, np.asarray(b.token_file.open()))
    text, _ = SyntheticGrammar(seed=0, branching=6).generate(SMALL["size_bytes"])
    np.testing.assert_array_equal(tokens, expected_tokens(ByteTokenizer(), [text]))
    n = len(tokens)
    assert a.split == b.split == n - max(65, int(n * 0.05))
    # setup alone (no prepare_data) gives the same result
    c = make_dm(tmp_path / "c1")
    c.setup("fit")
    assert c.split == a.split and c.token_file.path == a.token_file.path
    assert c.corpus == a.corpus and isinstance(c.tokenizer, ByteTokenizer)


def test_windows_are_shifted_slices(tmp_path):
    dm = make_dm(tmp_path / "cache", seq_len=50, val_fraction=0.1)
    dm.setup("fit")
    tokens = torch.from_numpy(np.asarray(dm.token_file.open()).astype(np.int64))
    split, n, s = dm.split, dm.token_file.num_tokens, 50
    assert len(dm.train_set) == (split - 1) // s
    assert len(dm.val_set) == (n - split - 1) // s
    for ds, start, end in ((dm.train_set, 0, split), (dm.val_set, split, n)):
        for i in (0, 1, len(ds) // 2, len(ds) - 1):
            x, y = ds[i]
            assert x.shape == y.shape == (s,) and x.dtype == y.dtype == torch.int64
            assert torch.equal(x[1:], y[:-1])
            offset = start + i * s
            assert torch.equal(x, tokens[offset : offset + s])
            assert torch.equal(y, tokens[offset + 1 : offset + s + 1])
            assert start <= offset and offset + s + 1 <= end  # never crosses the split
        with pytest.raises(IndexError):
            ds[len(ds)]


def test_window_dataset_lengths(tmp_path):
    built = build_token_file(EmbeddedCorpus(size_bytes=2_000), ByteTokenizer(), tmp_path, progress=False)
    assert len(TokenWindowDataset(built, 0, 11, 10)) == 1  # exactly seq_len + 1 tokens
    assert len(TokenWindowDataset(built, 0, 10, 10)) == 0
    assert len(TokenWindowDataset(built, 0, 3, 10)) == 0
    assert len(TokenWindowDataset(built, 100, 131, 10)) == 3
    assert len(TokenWindowDataset(built, 0, 16, 10, stride=5)) == 2


def test_corpus_shorter_than_a_window(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("hello world, far too short for a window")
    dm = PretrainDataModule(
        dataset={"name": "files", "paths": [str(path)]}, seq_len=256, num_workers=0, cache_dir=str(tmp_path / "cache")
    )
    dm.prepare_data()
    with pytest.raises(CorpusError, match="seq_len=256"):
        dm.setup("fit")


def test_constructor_validation(tmp_path):
    with pytest.raises(ValueError, match="seq_len=0"):
        make_dm(tmp_path, seq_len=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        make_dm(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="val_fraction=1.0"):
        make_dm(tmp_path, val_fraction=1.0)


def test_unknown_plugin_name(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(PluginError, match=r"unknown dataset 'embeded'; did you mean 'embedded'\? Available: ") as err:
        make_dm(cache, dataset={"name": "embeded"})
    assert isinstance(err.value, ValueError)
    available = str(err.value).split("Available: ")[1].split(" (")[0].split(", ")
    assert available == sorted(available) and {"embedded", "files"} <= set(available), err.value
    with pytest.raises(
        PluginError, match=r"unknown tokenizer 'bpee'; did you mean 'bpe'\? Available: .*bpe.*bytes.*hf"
    ):
        make_dm(cache, tokenizer={"name": "bpee"})
    # nothing close: no suggestion, still the list
    with pytest.raises(PluginError, match=r"unknown dataset 'zzzz' Available: .*embedded") as err:
        make_dm(cache, dataset={"name": "zzzz"})
    assert "did you mean" not in str(err.value)
    assert not cache.exists()  # the constructor fails before anything is written


def test_wrong_plugin_argument(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(
        PluginError, match=r"dataset 'embedded' has no argument 'sise_bytes'; did you mean 'size_bytes'\?"
    ):
        make_dm(cache, dataset={"name": "embedded", "sise_bytes": 10})
    with pytest.raises(PluginError, match=r"tokenizer 'bpe' has no argument 'vocab'; did you mean 'vocab_size'\?"):
        make_dm(cache, tokenizer={"name": "bpe", "vocab": 300})
    # no close name: the accepted ones are listed
    with pytest.raises(
        PluginError, match=r"dataset 'embedded' has no argument 'paths'; it accepts size_bytes, seed, branching"
    ):
        make_dm(cache, dataset={"name": "embedded", "paths": ["x.txt"]})
    with pytest.raises(PluginError, match=r"tokenizer 'bytes' has no argument 'vocab_size'; it accepts no arguments"):
        make_dm(cache, tokenizer={"name": "bytes", "vocab_size": 300})
    # required arguments
    with pytest.raises(PluginError, match=r"dataset 'files' needs the argument 'paths'"):
        make_dm(cache, dataset={"name": "files"})
    with pytest.raises(PluginError, match=r"tokenizer 'hf' needs the argument 'path'"):
        make_dm(cache, tokenizer={"name": "hf"})
    # a spec without a name
    with pytest.raises(PluginError, match=r"dataset: expected \{name: \.\.\., <arguments>\}"):
        make_dm(cache, dataset={"size_bytes": 10})
    assert not cache.exists()


def test_plugin_spec_as_a_name(tmp_path):
    dm = make_dm(tmp_path / "cache", dataset="embedded", tokenizer="bytes")
    assert dm.dataset_spec == "embedded" and dm.tokenizer_spec == "bytes"


def test_files_factory(tmp_path):
    folder = write_corpus(tmp_path / "corpus")
    corpus = sources.files(str(folder))  # one path or a list
    assert corpus == FileCorpus(resolve_files([str(folder)]), "text", "replace")
    assert sources.files([str(folder / "a.txt")], text_field="body", decode_errors="strict") == FileCorpus(
        [(folder / "a.txt").resolve()], "body", "strict"
    )
    with pytest.raises(CorpusError, match="decode_errors='ignore' must be replace or strict"):
        sources.files(str(folder), decode_errors="ignore")
    with pytest.raises(CorpusError, match="does not exist"):
        sources.files([str(tmp_path / "missing.txt")])
    # through the data module: the plugin's annotation (a Literal) refuses it before anything is read
    with pytest.raises(UserError, match="decode_errors='ignore' is not one of 'replace', 'strict'"):
        make_dm(
            tmp_path / "cache", dataset={"name": "files", "paths": str(folder), "decode_errors": "ignore"}
        ).prepare_data()


def test_embedded_factory(tmp_path):
    assert sources.embedded() == EmbeddedCorpus(size_bytes=2_000_000, seed=0, branching=6)
    corpus = sources.embedded(size_bytes=5_000, seed=3, branching=2)
    assert corpus == EmbeddedCorpus(size_bytes=5_000, seed=3, branching=2) and corpus.num_bytes() == 5_000
    assert corpus.entropy_nats_per_byte() == SyntheticGrammar(seed=3, branching=2).entropy_nats_per_byte()
    assert list(corpus.documents()) == [SyntheticGrammar(seed=3, branching=2).generate(5_000)[0]]
    for size in (0, -1):
        with pytest.raises(CorpusError, match=f"size_bytes={size} must be positive"):
            sources.embedded(size_bytes=size)
    with pytest.raises(CorpusError, match="size_bytes=0"):
        make_dm(tmp_path / "cache", dataset={"name": "embedded", "size_bytes": 0}).prepare_data()


def test_file_corpus_end_to_end(tmp_path):
    docs = {f"doc{i}.txt": f"Document {i}: " + "lorem ipsum " * 40 for i in range(5)}
    folder = write_corpus(tmp_path / "corpus", docs)
    dm = PretrainDataModule(
        dataset={"name": "files", "paths": [str(folder)]},
        seq_len=32,
        batch_size=2,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == y.shape == (2, 32)
    np.testing.assert_array_equal(np.asarray(dm.token_file.open()), expected_tokens(ByteTokenizer(), docs.values()))
    assert dm.entropy_nats_per_token() is None


def test_bpe_data_module_end_to_end(tmp_path):
    cache = tmp_path / "cache"
    spec = {"name": "bpe", "vocab_size": 300}
    dm = make_dm(cache, tokenizer=spec, seq_len=32)
    dm.prepare_data()
    dm.setup("fit")
    assert isinstance(dm.tokenizer, HFTokenizer) and dm.tokenizer.vocab_size <= 300
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert 0 <= int(x.min()) and int(x.max()) < dm.tokenizer.vocab_size
    # the token file decodes back to exactly the embedded text
    tokens = np.asarray(dm.token_file.open())
    text, _ = SyntheticGrammar().generate(SMALL["size_bytes"])
    assert int(tokens[-1]) == dm.tokenizer.eos_id
    assert dm.tokenizer.decode(tokens.tolist()) == text
    assert dm.token_file.num_tokens < 0.8 * len(text)  # merges were learned
    assert dm.entropy_nats_per_token() is None

    # The trained tokenizer is cached: a second module reuses it without retraining.
    (folder,) = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith("bpe-")]
    assert folder.name == f"bpe-{dm.corpus.key()}-300-2"
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    again = make_dm(cache, tokenizer=spec, seq_len=32)
    again.prepare_data()
    assert again.tokenizer.fingerprint() == dm.tokenizer.fingerprint()
    assert again.token_file.path == dm.token_file.path
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp
    assert again.state_dict()["tokenizer"] == dm.tokenizer.to_dict()

    # The same tokenizer loaded through the hf plugin gives the same token file.
    loaded = make_dm(cache, tokenizer={"name": "hf", "path": str(folder)}, seq_len=32)
    loaded.prepare_data()
    assert loaded.tokenizer.fingerprint() == dm.tokenizer.fingerprint()
    assert loaded.token_file.path == dm.token_file.path


def test_entropy_nats_per_token(tmp_path):
    cache = tmp_path / "cache"
    dm = make_dm(cache)
    assert dm.entropy_nats_per_token() is None  # the corpus and tokenizer are not built yet
    dm.prepare_data()
    value = dm.entropy_nats_per_token()
    assert isinstance(value, float)
    assert value == pytest.approx(SyntheticGrammar(seed=0, branching=6).entropy_nats_per_byte())
    other_dm = make_dm(cache, dataset={**EMBEDDED, "branching": 2})
    other_dm.setup("fit")  # setup alone builds them too
    other = other_dm.entropy_nats_per_token()
    assert other == pytest.approx(SyntheticGrammar(seed=0, branching=2).entropy_nats_per_byte()) and other < value
    # unknown for other tokenizers and for datasets that do not know their entropy
    small = {**EMBEDDED, "size_bytes": 5_000}
    bpe = make_dm(cache, dataset=small, tokenizer={"name": "bpe", "vocab_size": 300})
    bpe.prepare_data()
    assert bpe.entropy_nats_per_token() is None
    folder = write_corpus(tmp_path / "corpus")
    files = make_dm(cache, dataset={"name": "files", "paths": [str(folder)]})
    files.prepare_data()
    assert files.entropy_nats_per_token() is None


def test_dataset_pickles_without_memmap(tmp_path):
    dm = make_dm(tmp_path / "cache")
    dm.setup("fit")
    ds = dm.train_set
    x0, y0 = ds[0]  # opens the memmap
    assert ds._tokens is not None
    blob = pickle.dumps(ds)
    assert len(blob) < dm.token_file.path.stat().st_size // 4  # the tokens themselves are not in it
    clone = pickle.loads(blob)
    assert clone._tokens is None and ds._tokens is not None
    x1, y1 = clone[0]
    assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_dataloader_with_a_worker(tmp_path):
    dm = make_dm(tmp_path / "cache", num_workers=1)
    dm.setup("fit")
    ds = dm.val_set
    ds[0]  # an open memmap in the parent must not reach the worker
    batch_x, batch_y = next(iter(dm.val_dataloader()))
    expected = [ds[i] for i in range(min(len(ds), dm.batch_size))]
    assert torch.equal(batch_x, torch.stack([x for x, _ in expected]))
    assert torch.equal(batch_y, torch.stack([y for _, y in expected]))
    # a spawned worker receives the dataset by pickling
    loader = DataLoader(ds, batch_size=2, num_workers=1, multiprocessing_context="spawn")
    x, y = next(iter(loader))
    assert torch.equal(x, torch.stack([ds[0][0], ds[1][0]])) and torch.equal(y[:, :-1], x[:, 1:])
