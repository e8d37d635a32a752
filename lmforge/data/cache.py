"""Tokenize a corpus once into a memory-mapped token file, cached by corpus content and tokenizer.

Layout in the cache folder: ``<key>.bin`` (raw little-endian uint16 or uint32 tokens, documents
separated by the end-of-text token) and ``<key>.json`` (what it holds). Both are written to
temporary names and renamed into place, the metadata last, so a killed run never leaves a file
that looks complete; a token file whose size disagrees with its metadata is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lmforge.data.sources import Corpus, CorpusError
from lmforge.tokenizers import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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


def _load_valid(bin_path: Path, meta_path: Path) -> TokenFile | None:
    """The cached token file if it is complete; None if absent; None with a warning if damaged."""
    if not meta_path.exists():
        if bin_path.exists():
            log.warning("token cache: %s has no metadata (an interrupted run?); rebuilding it", bin_path)
        return None
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        expected = int(meta["num_tokens"]) * dtype.itemsize
    except (ValueError, KeyError, TypeError):
        log.warning("token cache: %s is unreadable; rebuilding", meta_path)
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
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".bin.tmp")
    tmp = Path(tmp_name)
    num_tokens = num_docs = 0
    limit = np.iinfo(dtype).max
    try:
        with os.fdopen(fd, "wb") as out, _progress(corpus.num_bytes(), progress) as bar:
            for batch in _batches(corpus.documents(), 256):
                encoded = tokenizer.encode_batch(batch)
                for ids in encoded:
                    arr = np.append(np.asarray(ids, dtype=np.int64), tokenizer.eos_id)
                    if arr.max() > limit:
                        raise CorpusError(f"data: token id {arr.max()} does not fit in {dtype.name}")
                    out.write(arr.astype(dtype).tobytes())
                    num_tokens += arr.size
                num_docs += len(batch)
                bar.update(sum(len(doc.encode("utf-8")) for doc in batch))
            out.flush()
            os.fsync(out.fileno())
        if num_docs == 0:
            raise CorpusError("corpus: no text found (every file or record is empty); point data.corpus at real text")
        os.replace(tmp, bin_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "num_documents": num_docs,
        "corpus_key": corpus_key,
        "tokenizer": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "seconds": round(time.perf_counter() - start, 3),
    }
    fd, tmp_meta = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp_meta, meta_path)
    except BaseException:
        Path(tmp_meta).unlink(missing_ok=True)
        raise
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
