"""The pretraining data module: corpus -> tokenizer -> cached token file -> fixed-length windows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmforge.data.cache import TokenDType, TokenFile, build_token_file, default_cache_dir
from lmforge.data.sources import Corpus, CorpusError, DecodeErrors, EmbeddedCorpus, FileCorpus, resolve_files
from lmforge.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TokenizerSpec:
    """Which tokenizer to use."""

    name: Literal["bytes", "bpe", "hf"] = "bytes"
    """bytes: exact UTF-8 bytes (257 ids); bpe: train a byte-level BPE on the corpus; hf: load a tokenizer.json."""
    vocab_size: int = 4096
    """For bpe: the vocabulary size to train, the end-of-text token included."""
    min_frequency: int = 2
    """For bpe: merges seen fewer times are not learned."""
    path: str | None = None
    """For hf: a folder holding tokenizer.json, or the file itself."""
    eos_token: str = "<|endoftext|>"
    """For hf: the token that separates documents."""


@dataclass
class EmbeddedCorpusSpec:
    """Size and seed of the built-in synthetic corpus (used when data.corpus is empty)."""

    size_bytes: int = 2_000_000
    """Bytes of text to generate."""
    seed: int = 0
    """Seed of the grammar and of the text."""
    branching: int = 6
    """Favourite words per context: higher means more entropy."""


class TokenWindowDataset(Dataset):
    """Fixed-length windows over a slice of a token file: item i is (x, y) with y = x shifted by one."""

    def __init__(self, token_file: TokenFile, start: int, end: int, seq_len: int, stride: int | None = None) -> None:
        self.token_file = token_file
        self.start, self.end, self.seq_len = start, end, seq_len
        self.stride = stride or seq_len
        self._tokens: np.memmap | None = None  # opened lazily in each worker, never pickled

    def __len__(self) -> int:
        return max(0, (self.end - self.start - 1 - self.seq_len) // self.stride + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._tokens is None:
            self._tokens = self.token_file.open()
        offset = self.start + i * self.stride
        window = torch.from_numpy(self._tokens[offset : offset + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class PretrainDataModule(L.LightningDataModule):
    """Tokenizes a corpus once (cached), splits it and serves windows of ``seq_len`` + 1 tokens.

    With no ``corpus`` the embedded synthetic corpus is used: no download, known entropy.
    """

    def __init__(
        self,
        corpus: list[str] | str | None = None,
        text_field: str = "text",
        decode_errors: DecodeErrors = "replace",
        embedded: EmbeddedCorpusSpec = EmbeddedCorpusSpec(),
        tokenizer: TokenizerSpec = TokenizerSpec(),
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 1,
        cache_dir: str | None = None,
        token_dtype: TokenDType = "auto",
        predict_prompts: list[str] | None = None,
    ) -> None:
        """
        Args:
            corpus: Text files, folders, glob patterns or .jsonl files; empty means the embedded corpus.
            text_field: The field holding the text in .jsonl records.
            decode_errors: Invalid UTF-8 in a text file: replace (U+FFFD, with a warning) or strict (an error).
            embedded: The built-in synthetic corpus.
            tokenizer: The tokenizer.
            seq_len: Tokens per training window (the model's block_size at most).
            batch_size: Windows per batch.
            val_fraction: Fraction of tokens (the tail of the corpus) held out for validation.
            num_workers: DataLoader worker processes.
            cache_dir: Where token files live; default $LMFORGE_CACHE or ~/.cache/lmforge.
            token_dtype: auto picks uint16 when the vocabulary fits, else uint32.
            predict_prompts: Prompts that ``lmforge predict`` continues.
        """
        super().__init__()
        if isinstance(embedded, dict):
            embedded = EmbeddedCorpusSpec(**embedded)
        if isinstance(tokenizer, dict):
            tokenizer = TokenizerSpec(**tokenizer)
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len} must be positive")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must be between 0 and 1")
        self.corpus_patterns = [corpus] if isinstance(corpus, str) else list(corpus or [])
        self.text_field = text_field
        self.decode_errors = decode_errors
        self.embedded = embedded
        self.tokenizer_spec = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.token_dtype = token_dtype
        self.predict_prompts = predict_prompts or ["The "]
        self.tokenizer: Tokenizer | None = None
        self.token_file: TokenFile | None = None

    # -- corpus and tokenizer -------------------------------------------------------------
    def corpus(self) -> Corpus:
        if not self.corpus_patterns:
            e = self.embedded
            return EmbeddedCorpus(num_bytes_target=e.size_bytes, seed=e.seed, branching=e.branching)
        return FileCorpus(resolve_files(self.corpus_patterns), self.text_field, self.decode_errors)

    def entropy_nats_per_token(self) -> float | None:
        """The corpus entropy in nats per token when it is known (the embedded corpus with byte tokens)."""
        if self.corpus_patterns or self.tokenizer_spec.name != "bytes":
            return None
        e = self.embedded
        return EmbeddedCorpus(e.size_bytes, e.seed, e.branching).grammar.entropy_nats_per_byte()

    def build_tokenizer(self, corpus: Corpus) -> Tokenizer:
        spec = self.tokenizer_spec
        if spec.name == "bytes":
            return ByteTokenizer()
        if spec.name == "hf":
            if not spec.path:
                raise ValueError("data.tokenizer.path: required for name: hf (a folder with tokenizer.json)")
            return HFTokenizer.from_file(spec.path, spec.eos_token)
        folder = self.cache_dir / f"bpe-{corpus.key()}-{spec.vocab_size}-{spec.min_frequency}"
        if (folder / "tokenizer.json").is_file():
            return load_tokenizer(folder)
        log.info("training a byte-level BPE tokenizer of %d tokens on the corpus", spec.vocab_size)
        tokenizer = HFTokenizer.train_bpe(corpus.documents(), spec.vocab_size, spec.min_frequency)
        tokenizer.save(folder)
        return tokenizer

    def _prepare(self, progress: bool) -> None:
        corpus = self.corpus()
        self.tokenizer = self.build_tokenizer(corpus)
        self.token_file = build_token_file(corpus, self.tokenizer, self.cache_dir, self.token_dtype, progress)

    # -- LightningDataModule ----------------------------------------------------------------
    def prepare_data(self) -> None:
        self._prepare(progress=True)

    def setup(self, stage: str | None = None) -> None:
        if self.token_file is None:
            self._prepare(progress=False)
        n = self.token_file.num_tokens
        window = self.seq_len + 1
        val_tokens = max(window, int(n * self.val_fraction))
        if n - val_tokens < window:
            raise CorpusError(
                f"corpus: {n} tokens is shorter than one training window plus one validation window "
                f"({2 * window} tokens at seq_len={self.seq_len}); add text or lower data.seq_len"
            )
        self.split = n - val_tokens
        self.train_set = TokenWindowDataset(self.token_file, 0, self.split, self.seq_len)
        self.val_set = TokenWindowDataset(self.token_file, self.split, n, self.seq_len)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        prompts = [torch.tensor(self.tokenizer.encode(p) or [self.tokenizer.eos_id]) for p in self.predict_prompts]
        return DataLoader(prompts, batch_size=1)

    def state_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.to_dict()} if self.tokenizer is not None else {}
