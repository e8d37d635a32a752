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
import threading
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


BATCH_DOCUMENTS = 256
"""Documents per unit of work: what one encode_batch call (and, with ``num_proc``, one worker task) gets."""


def build_token_file(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: Path,
    requested_dtype: TokenDType = "auto",
    progress: bool = True,
    num_proc: int = 1,
    report=None,
) -> TokenFile:
    """Return the token file for (corpus, tokenizer), tokenizing and writing it only if not cached.

    The corpus is streamed: documents are read in batches of :data:`BATCH_DOCUMENTS`, and with ``num_proc`` > 1
    the batches are tokenized by that many worker processes, at most ``2 * num_proc`` batches in flight, while
    this process writes their tokens in document order. The file is the same byte for byte whatever
    ``num_proc`` is, so it shares one cache entry. ``report``: called once the corpus is consumed, its value kept
    in the metadata as ``pipeline_report`` (what the cleaning steps did, for a run that reuses the file)."""
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
    num_tokens = num_docs = num_bytes = 0
    checksums = BlockChecksums()
    with staged_file(bin_path) as tmp:
        with open(tmp, "wb") as out, _progress(corpus.num_bytes(), progress) as bar:
            for data, docs, nbytes in _tokenized(corpus.documents(), tokenizer, dtype, num_proc):
                out.write(data)
                checksums.update(data)
                num_tokens += len(data) // dtype.itemsize
                num_docs += docs
                num_bytes += nbytes
                bar.update(nbytes)
        if num_docs == 0:
            raise CorpusError("corpus: no text found (every file or record is empty); point data.dataset at real text")
    meta = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "num_documents": num_docs,
        "num_bytes": num_bytes,
        "corpus_key": corpus_key,
        "tokenizer": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "block_bytes": BLOCK_BYTES,
        "block_crc32": checksums.finish(),
        "seconds": round(time.perf_counter() - start, 3),
        "num_proc": num_proc,
    }
    if report is not None:
        meta["pipeline_report"] = report()
    write_json(meta_path, meta)
    log.info(
        "token cache: wrote %s (%d tokens, %d documents, %.1f s, %d process%s)",
        bin_path, num_tokens, num_docs, meta["seconds"], num_proc, "" if num_proc == 1 else "es",
    )  # fmt: skip
    return TokenFile(bin_path, dtype, num_tokens, meta)


def encode_documents(tokenizer: Tokenizer, batch: list[str], dtype: np.dtype) -> tuple[bytes, int, int]:
    """(tokens as ``dtype`` bytes, each document followed by the end-of-text token; documents; UTF-8 bytes)."""
    limit = np.iinfo(dtype).max
    eos = np.asarray([tokenizer.eos_id], dtype=np.int64)
    parts = [np.concatenate([np.asarray(ids, dtype=np.int64), eos]) for ids in tokenizer.encode_batch(batch)]
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if arr.size and (arr.max() > limit or arr.min() < 0):
        bad = int(arr.max()) if arr.max() > limit else int(arr.min())
        raise CorpusError(f"data: the tokenizer returned token id {bad}, outside {dtype.name}")
    return arr.astype(dtype).tobytes(), len(batch), sum(len(doc.encode("utf-8")) for doc in batch)


_WORKER: dict = {}


def _worker_init(tokenizer: Tokenizer, dtype: np.dtype) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _WORKER["tokenizer"], _WORKER["dtype"] = tokenizer, dtype


def _worker_encode(batch: list[str]) -> tuple[bytes, int, int]:
    return encode_documents(_WORKER["tokenizer"], batch, _WORKER["dtype"])


def _tokenized(documents, tokenizer: Tokenizer, dtype: np.dtype, num_proc: int):
    """Yield :func:`encode_documents` of each batch of ``documents``, in order."""
    batches = _batches(documents, BATCH_DOCUMENTS)
    if num_proc <= 1:
        for batch in batches:
            yield encode_documents(tokenizer, batch, dtype)
        return
    yield from ordered_map(_worker_encode, batches, num_proc, _worker_init, (tokenizer, dtype))


def ordered_map(fn, items, num_proc: int, initializer, initargs: tuple):
    """``fn`` of each of ``items`` in ``num_proc`` worker processes, yielded in order, with at most ``2 *
    num_proc`` items in flight (``items`` is consumed as results are taken: never all in memory). The workers
    start with ``initializer(*initargs)`` and exit when this process is gone (a SIGKILL it could not pass on)."""
    import collections
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork where there is one: initargs (a tokenizer, filter steps) are inherited, not pickled, and no worker
    # re-imports torch
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pending: collections.deque = collections.deque()
    args = (initializer, initargs, os.getpid())
    with ProcessPoolExecutor(num_proc, mp.get_context(method), _start_worker, args) as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _start_worker(initializer, initargs: tuple, parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    initializer(*initargs)


def _exit_with_parent(parent: int) -> None:
    """A worker's watch: when the process that started it is gone (killed with SIGKILL, it could not tell its
    workers), the worker exits too instead of waiting forever on a queue no one writes to."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


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
