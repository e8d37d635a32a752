"""The pretraining data module: corpus -> tokenizer -> cached token file -> fixed-length windows."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmforge.data.cache import TokenDType, TokenFile
from lmforge.data.corpus import CorpusDataModule
from lmforge.data.sources import CorpusError
from lmforge.errors import UserError
from lmforge.tokenizers import ByteTokenizer


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
        window = self._tokens[offset : offset + self.seq_len + 1].astype(np.int64)
        vocab = self.token_file.meta.get("vocab_size")
        if vocab is not None and window.max() >= vocab:  # damage the reuse check did not sample
            self.token_file.path.with_suffix(".json").unlink(missing_ok=True)  # the next run rebuilds it
            raise CorpusError(
                f"token cache: {self.token_file.path} is corrupt (token id {int(window.max())} at offset "
                f"{offset + int(window.argmax())} is beyond the vocabulary of {vocab}); run again to rebuild it"
            )
        window = torch.from_numpy(window)
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class PretrainDataModule(CorpusDataModule):
    """Tokenizes a corpus once (cached), splits it and serves windows of ``seq_len`` + 1 tokens.

    The dataset and the tokenizer are plugins named in the config with their arguments, e.g.
    ``dataset: {name: files, paths: [books/]}`` and ``tokenizer: {name: bpe, vocab_size: 8192}``;
    ``lmforge plugins`` lists what is installed. The default is the embedded synthetic corpus: no
    download, known entropy.
    """

    def __init__(
        self,
        dataset: dict[str, Any] = {"name": "embedded"},
        tokenizer: dict[str, Any] = {"name": "bytes"},
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 1,
        cache_dir: str | None = None,
        token_dtype: TokenDType = "auto",
        predict_prompts: list[str] | None = None,
        seed: int | None = None,
        canaries: dict[str, Any] | None = None,
        pipeline: list[dict[str, Any]] | None = None,
        num_proc: int = 1,
    ) -> None:
        """
        Args:
            dataset: A dataset plugin and its arguments: embedded (size_bytes, seed, branching),
                files (paths, text_field, decode_errors), or any installed one.
            tokenizer: A tokenizer plugin and its arguments: bytes, bpe (vocab_size, min_frequency),
                hf (path, eos_token), or any installed one.
            seq_len: Tokens per training window (the model's block_size at most).
            batch_size: Windows per batch.
            val_fraction: Fraction of tokens (the tail of the corpus) held out for validation.
            num_workers: DataLoader worker processes.
            cache_dir: Where token files live; default $LMFORGE_CACHE or ~/.cache/lmforge.
            token_dtype: auto picks uint16 when the vocabulary fits, else uint32.
            predict_prompts: Prompts that ``lmforge predict`` continues.
            seed: Seeds the training windows' shuffle (each epoch seed + epoch); default the run's
                seed_everything. A checkpoint records the order's position, so a resumed run continues it.
            canaries: Put random secrets into the training text to measure memorisation afterwards
                (``lmforge evaluate --task memorization``): {count, repeats: [1, 10, 100], seed}.
            pipeline: Cleaning steps (filter plugins) between the dataset and the tokenizer, in order, e.g.
                [{name: normalize}, {name: quality}, {name: dedup, near: {threshold: 0.8}}, {name: pii}];
                canaries go in after them.
            num_proc: Processes that clean (the pipeline's steps before dedup) and tokenize the corpus when it is
                prepared; the token file is the same for any number.
        """
        if seq_len < 1:
            raise UserError(f"data.seq_len={seq_len} must be positive")
        super().__init__(
            dataset, tokenizer, seq_len, batch_size, val_fraction, num_workers, cache_dir, token_dtype, seed, canaries,
            pipeline, num_proc,
        )  # fmt: skip
        self.predict_prompts = predict_prompts or ["The "]

    def entropy_nats_per_token(self) -> float | None:
        """The corpus entropy in nats per token, when the dataset knows it and tokens are bytes."""
        entropy = getattr(self.corpus, "entropy_nats_per_byte", None)
        if entropy is None or not isinstance(self.tokenizer, ByteTokenizer):
            return None
        return entropy()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.split, n = self._split(self.seq_len + 1, "window")
        self.train_set = TokenWindowDataset(self.token_file, 0, self.split, self.seq_len)
        self.val_set = TokenWindowDataset(self.token_file, self.split, n, self.seq_len)

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.train_set, self.batch_size, drop_last=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        prompts = [torch.tensor(self.tokenizer.encode(p) or [self.tokenizer.eos_id]) for p in self.predict_prompts]
        return DataLoader(prompts, batch_size=1)
