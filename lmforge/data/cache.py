"""Tokenize a corpus once into a memory-mapped token file, cached by corpus content and tokenizer.

Layout in the cache folder: ``<key>.bin`` (raw little-endian uint16 or uint32 tokens, documents
separated by the end-of-text token) and ``<key>.json`` (what it holds). Both are written to
temporary names and renamed into place, the metadata last, so a killed run never leaves a file
that looks complete, and the temporaries a killed run leaves are removed by the next build.

A cached file is checked before it is reused: its size against the metadata, and its content against
the CRC-32 of every 64 MiB block recorded when it was written (all blocks up to
``VERIFY_ALL_BYTES``; beyond that the first, the last and 16 random ones, about 1 GiB read). A file that
fails is rebuilt. Training windows also refuse token ids beyond the vocabulary, so damage in a block
the sample skipped stops the run with one line instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lmforge.atomic import staged_file, write_json
from lmforge.data.sources import Corpus, CorpusError
from lmforge.tokenizers import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: block checksums in the metadata
BLOCK_BYTES = 64 << 20
VERIFY_ALL_BYTES = 4 << 30
SAMPLED_BLOCKS = 16
TokenDType = Literal["auto", "uint16", "uint32"]


def default_cache_dir() -> Path:
    """``$LMFORGE_CACHE`` or ``$XDG_CACHE_HOME/lmforge`` (``~/.cache/lmforge``)."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "lmforge"


def token_dtype(vocab_size: int, requested: TokenDType = "auto") -> np.dtype:
    """The smallest unsigned dtype holding every token id, or the requested one if it fits."""
    needed = "uint16" if vocab_size <= 2**16 else "uint32" if vocab_size <= 2**32 else None
    if needed is None:
        raise CorpusError(f"data: a vocabulary of {vocab_size} tokens does not fit in uint32 token ids")
    if requested == "uint16" and needed == "uint32":
        raise CorpusError(
            f"data.token_dtype: uint16 holds at most 65536 token ids but the tokenizer has {vocab_size}; "
            "use token_dtype: uint32 or auto"
        )
    return np.dtype(needed if requested == "auto" else requested)


@dataclass(frozen=True)
class TokenFile:
    """A complete token file in the cache."""

    path: Path
    dtype: np.dtype
    num_tokens: int
    meta: dict

    def open(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


def cache_key(corpus_key: str, tokenizer: Tokenizer, dtype: np.dtype) -> str:
    spec = f"tokens-v{FORMAT_VERSION}|{corpus_key}|{tokenizer.fingerprint()}|{dtype.name}"
    return hashlib.sha256(spec.encode()).hexdigest()[:32]


class BlockChecksums:
    """CRC-32 of each ``BLOCK_BYTES`` block of a stream, fed as it is written."""

    def __init__(self) -> None:
        self.crcs: list[int] = []
        self._crc = 0
        self._filled = 0

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), BLOCK_BYTES - self._filled)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            view = view[take:]
            if self._filled == BLOCK_BYTES:
                self.crcs.append(self._crc)
                self._crc, self._filled = 0, 0

    def finish(self) -> list[int]:
        if self._filled:
            self.crcs.append(self._crc)
            self._crc, self._filled = 0, 0
        return self.crcs


def _damaged_block(path: Path, crcs: list[int], size: int) -> int | None:
    """The first block (of those checked) whose CRC-32 differs from the recorded one, or None."""
    blocks = list(range(len(crcs)))
    if size > VERIFY_ALL_BYTES:
        middle = blocks[1:-1]
        blocks = sorted({blocks[0], blocks[-1], *random.sample(middle, min(SAMPLED_BLOCKS, len(middle)))})
    with open(path, "rb") as f:
        for i in blocks:
            f.seek(i * BLOCK_BYTES)
            if zlib.crc32(f.read(BLOCK_BYTES)) != crcs[i]:
                return i
    return None


def _load_valid(bin_path: Path, meta_path: Path) -> TokenFile | None:
    """The cached token file if it is complete and intact; None if absent; None with a warning if damaged."""
    if not meta_path.exists():
        if bin_path.exists():
            log.warning("token cache: %s has no metadata (an interrupted run?); rebuilding it", bin_path)
        return None
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        expected = int(meta["num_tokens"]) * dtype.itemsize
        crcs = [int(c) for c in meta["block_crc32"]]
    except (ValueError, KeyError, TypeError):
        log.warning("token cache: %s is unreadable or from an older lmforge; rebuilding", meta_path)
        return None
    actual = bin_path.stat().st_size if bin_path.exists() else -1
    if actual != expected:
        log.warning(
            "token cache: %s holds %d bytes but should hold %d (truncated by a killed run?); rebuilding",
            bin_path,
            max(actual, 0),
            expected,
        )
        return None
    if len(crcs) != -(-expected // BLOCK_BYTES):
        log.warning("token cache: %s has a damaged checksum list; rebuilding", meta_path)
        return None
    damaged = _damaged_block(bin_path, crcs, expected)
    if damaged is not None:
        log.warning(
            "token cache: %s is corrupt (its content at bytes %d-%d differs from when it was written); rebuilding",
            bin_path,
            damaged * BLOCK_BYTES,
            min(expected, (damaged + 1) * BLOCK_BYTES) - 1,
        )
        return None
    return TokenFile(bin_path, dtype, int(meta["num_tokens"]), meta)


def build_token_file(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: Path,
    requested_dtype: TokenDType = "auto",
    progress: bool = True,
) -> TokenFile:
    """Return the token file for (corpus, tokenizer), tokenizing and writing it only if not cached."""
    dtype = token_dtype(tokenizer.vocab_size, requested_dtype)
    corpus_key = corpus.key()
    key = cache_key(corpus_key, tokenizer, dtype)
    bin_path, meta_path = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"
    cached = _load_valid(bin_path, meta_path)
    if cached is not None:
        log.info("token cache: reusing %s (%d tokens)", bin_path, cached.num_tokens)
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    start = time.perf_counter()
    num_tokens = num_docs = 0
    limit = np.iinfo(dtype).max
    checksums = BlockChecksums()
    with staged_file(bin_path) as tmp:
        with open(tmp, "wb") as out, _progress(corpus.num_bytes(), progress) as bar:
            for batch in _batches(corpus.documents(), 256):
                encoded = tokenizer.encode_batch(batch)
                for ids in encoded:
                    arr = np.append(np.asarray(ids, dtype=np.int64), tokenizer.eos_id)
                    if arr.max() > limit or arr.min() < 0:
                        raise CorpusError(f"data: the tokenizer returned token id {arr.max()}, outside {dtype.name}")
                    data = arr.astype(dtype).tobytes()
                    out.write(data)
                    checksums.update(data)
                    num_tokens += arr.size
                num_docs += len(batch)
                bar.update(sum(len(doc.encode("utf-8")) for doc in batch))
        if num_docs == 0:
            raise CorpusError("corpus: no text found (every file or record is empty); point data.dataset at real text")
    meta = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "num_documents": num_docs,
        "corpus_key": corpus_key,
        "tokenizer": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "block_bytes": BLOCK_BYTES,
        "block_crc32": checksums.finish(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(meta_path, meta)
    log.info("token cache: wrote %s (%d tokens, %d documents, %.1f s)", bin_path, num_tokens, num_docs, meta["seconds"])
    return TokenFile(bin_path, dtype, num_tokens, meta)


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="Tokenizing", disable=not enabled, leave=False)
