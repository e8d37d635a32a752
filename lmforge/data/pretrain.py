"""The pretraining data module: corpus -> tokenizer -> cached token file -> fixed-length windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmforge import plugins
from lmforge.data.cache import TokenDType, TokenFile, build_token_file, default_cache_dir
from lmforge.data.sampling import ResumableData
from lmforge.data.sources import Corpus, CorpusError, public_spec
from lmforge.errors import UserError
from lmforge.tokenizers import ByteTokenizer, Tokenizer, tokenizer_to_dict


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


class PretrainDataModule(ResumableData, L.LightningDataModule):
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
        """
        super().__init__()
        if seq_len < 1:
            raise UserError(f"data.seq_len={seq_len} must be positive")
        if batch_size < 1:
            raise UserError(f"data.batch_size={batch_size} must be positive")
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction={val_fraction} must be between 0 and 1")
        plugins.validate("dataset", dataset)
        plugins.validate("tokenizer", tokenizer)
        self.dataset_spec = dataset
        self.tokenizer_spec = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.token_dtype = token_dtype
        self.predict_prompts = predict_prompts or ["The "]
        self.seed = seed
        self.corpus: Corpus | None = None
        self.tokenizer: Tokenizer | None = None
        self.token_file: TokenFile | None = None

    def entropy_nats_per_token(self) -> float | None:
        """The corpus entropy in nats per token, when the dataset knows it and tokens are bytes."""
        entropy = getattr(self.corpus, "entropy_nats_per_byte", None)
        if entropy is None or not isinstance(self.tokenizer, ByteTokenizer):
            return None
        return entropy()

    def _prepare(self, progress: bool) -> None:
        self.corpus = plugins.build("dataset", self.dataset_spec)
        self.tokenizer = plugins.build("tokenizer", self.tokenizer_spec, self.corpus, self.cache_dir)
        self.token_file = build_token_file(self.corpus, self.tokenizer, self.cache_dir, self.token_dtype, progress)

    def connect(self, tokenizer: Tokenizer | None = None, batch_size: int | None = None,
                max_seq_length: int | None = None) -> None:  # fmt: skip
        """What the task hands down before the run. Pretraining builds its tokenizer from the corpus (the
        config's ``tokenizer``), so a task's tokenizer is not taken; windows must fit ``max_seq_length``."""
        if batch_size is not None:
            self.batch_size = batch_size
        if max_seq_length is not None and self.seq_len > max_seq_length:
            raise UserError(
                f"data.seq_len={self.seq_len} exceeds the model's block_size={max_seq_length}; "
                f"lower data.seq_len or raise model.config.block_size"
            )

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
            generator=torch.Generator().manual_seed(0),  # worker seeds: never drawn from torch's global state
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.train_set, self.batch_size, drop_last=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        prompts = [torch.tensor(self.tokenizer.encode(p) or [self.tokenizer.eos_id]) for p in self.predict_prompts]
        return DataLoader(prompts, batch_size=1)

    def describe_data(self) -> dict:
        """What the run trains on, for the checkpoint and the model card (local paths reduced to file names)."""
        facts: dict[str, Any] = {"dataset": public_spec(self.dataset_spec)}
        hub = getattr(self.corpus, "hub_dataset", None)
        if isinstance(hub, str) and hub:
            facts["hub_datasets"] = [hub]
        describe = getattr(self.corpus, "describe", None)
        if callable(describe):
            facts["description"] = str(describe())
        return facts

    def state_dict(self) -> dict:
        state = {"data_order": self._data_order()}
        if self.tokenizer is not None:
            state["tokenizer"] = tokenizer_to_dict(self.tokenizer)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._restore_data_order(state_dict)
