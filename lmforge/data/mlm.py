"""Masked-LM data: corpus -> WordPiece tokens (cached) -> ``[CLS] a [SEP]`` (or ``[CLS] a [SEP] b [SEP]``) -> masking.

:class:`MaskingCollator` is BERT's masking: 15% of the non-special tokens are selected (whole words when the
tokenizer marks ``##`` continuation pieces), of those 80% become [MASK], 10% a random token and 10% stay; the
labels hold the original token at selected positions and -100 everywhere else. Special tokens and padding are
never selected. Every random choice of an example is drawn from a generator seeded by (seed, the example's
key), so masks are the same for a seed whatever the number of loader workers, and a resumed run sees the same
ones (static masking, as BERT's original data; the ``seed`` changes them).

:class:`MLMDataModule` reads the corpus through the dataset and tokenizer plugins into the same token cache as
pretraining (:mod:`lmforge.data.cache`) and cuts it into fixed windows; with ``nsp: true`` each window is split
into segments a and b, and half of the b segments are replaced by a random stretch of the corpus
(``next_sentence_label`` 1; 0 when b follows a), as BERT's next-sentence prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmforge.data.cache import TokenDType, TokenFile
from lmforge.data.corpus import CorpusDataModule
from lmforge.data.sources import CorpusError
from lmforge.errors import UserError
from lmforge.tokenizers import Tokenizer

IGNORE_INDEX = -100


class MaskingCollator:
    """Pads a list of examples into a batch and masks it (BERT's 80/10/10 rule), deterministically per seed.

    An example is a dict with ``input_ids`` (T,) ints, optional ``token_type_ids`` (T,), ``key`` (ints that
    identify it, seeding its draws with ``seed``) and optional ``next_sentence_label``. The batch holds
    ``input_ids``, ``token_type_ids`` and ``labels`` (B, T) int64, ``attention_mask`` (B, T) bool (True = real
    token; only when some example is shorter than the longest, so padding exists) and, when the examples have
    one, ``next_sentence_label`` (B,).
    """

    def __init__(
        self,
        vocab_size: int,
        mask_id: int,
        pad_id: int,
        special_ids: list[int],
        *,
        mlm_probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        continuation: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            vocab_size: Ids are in [0, vocab_size); random replacements are drawn from its non-special ids.
            mask_id, pad_id: The [MASK] and [PAD] ids.
            special_ids: Ids that are never selected ([CLS], [SEP], [PAD], [MASK], [UNK], ...).
            mlm_probability: Fraction of the non-special tokens (of words, with ``continuation``) selected.
            mask_fraction: Of the selected, the fraction replaced by [MASK].
            random_fraction: Of the selected, the fraction replaced by a random token; the rest stay.
            continuation: (vocab_size,) bool, True for pieces that continue the word before them (WordPiece's
                ``##``): a word is selected, and replaced, as a whole. None: every token is its own word.
            seed: With each example's key, seeds its draws.
        """
        if not 0.0 < mlm_probability <= 1.0:
            raise UserError(f"data.mlm_probability={mlm_probability} must be in (0, 1]")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1.0:
            raise UserError(
                f"data.mask_fraction={mask_fraction} and data.random_fraction={random_fraction} must be "
                "non-negative and add up to at most 1"
            )
        self.mask_id, self.pad_id = mask_id, pad_id
        self.mlm_probability, self.mask_fraction, self.random_fraction = mlm_probability, mask_fraction, random_fraction
        self.special = np.zeros(vocab_size, dtype=bool)
        self.special[[i for i in special_ids if 0 <= i < vocab_size]] = True
        self.replacements = np.flatnonzero(~self.special)  # ids a random replacement may take
        self.continuation = continuation
        self.seed = seed

    def mask(self, ids: np.ndarray, key: tuple[int, ...] | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(masked input ids, labels) of one sequence ``ids`` (T,); the draws are seeded by (seed, *key)."""
        rng = np.random.default_rng([self.seed, *key])
        ids = np.asarray(ids, dtype=np.int64)
        candidate = ~self.special[ids]  # (T,)
        start = candidate.copy()
        if self.continuation is not None:  # a ## piece joins the word before it, unless that is a special token
            previous = np.concatenate(([False], candidate[:-1]))
            start &= ~(self.continuation[ids] & previous)
        word = np.cumsum(start) - 1  # (T,) word index of each token (meaningless where not a candidate)
        n_words = int(start.sum())
        chosen = rng.random(n_words) < self.mlm_probability  # (W,)
        action = rng.random(n_words)  # (W,): < mask_fraction -> [MASK], next random_fraction -> random, else kept
        selected = candidate & chosen[word.clip(min=0)] if n_words else np.zeros_like(candidate)
        labels = np.where(selected, ids, IGNORE_INDEX)
        inputs = ids.copy()
        act = action[word.clip(min=0)] if n_words else np.zeros(ids.shape)
        inputs[selected & (act < self.mask_fraction)] = self.mask_id
        randomized = selected & (act >= self.mask_fraction) & (act < self.mask_fraction + self.random_fraction)
        inputs[randomized] = rng.choice(self.replacements, size=int(randomized.sum()))
        return inputs, labels

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        T = max(len(e["input_ids"]) for e in examples)
        B = len(examples)
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        types = np.zeros((B, T), dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        real = np.zeros((B, T), dtype=bool)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n], labels[row, :n] = self.mask(example["input_ids"], example.get("key", (row,)))
            if example.get("token_type_ids") is not None:
                types[row, :n] = example["token_type_ids"]
            real[row, :n] = True
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(types),
            "labels": torch.from_numpy(labels),
        }
        if not real.all():  # no mask when nothing is padding: attention then takes its unmasked (fast) path
            batch["attention_mask"] = torch.from_numpy(real)
        if "next_sentence_label" in examples[0]:
            batch["next_sentence_label"] = torch.tensor([int(e["next_sentence_label"]) for e in examples])
        return batch


class SegmentDataset(Dataset):
    """Windows of a token-file slice as BERT inputs: item i is window i as ``[CLS] w [SEP]``, or with ``nsp`` split
    into ``[CLS] a [SEP] b [SEP]`` (token types 0/1), b replaced by a random stretch of the slice for half the
    items (``next_sentence_label`` 1). Items carry ``key`` = (stream, i) for the masking draws."""

    def __init__(
        self,
        token_file: TokenFile,
        start: int,
        end: int,
        seq_len: int,
        *,
        cls_id: int,
        sep_id: int,
        nsp: bool,
        seed: int,
        stream: int,
    ) -> None:
        self.token_file = token_file
        self.start, self.end = start, end
        self.body = seq_len - (3 if nsp else 2)  # tokens of text per item, the special tokens aside
        self.cls_id, self.sep_id, self.nsp, self.seed, self.stream = cls_id, sep_id, nsp, seed, stream
        self._tokens: np.memmap | None = None  # opened lazily in each worker, never pickled

    def __len__(self) -> int:
        return max(0, (self.end - self.start) // self.body)

    def _window(self, i: int, length: int) -> np.ndarray:
        if self._tokens is None:
            self._tokens = self.token_file.open()
        offset = self.start + i * self.body
        window = self._tokens[offset : offset + length].astype(np.int64)
        vocab = self.token_file.meta.get("vocab_size")
        if vocab is not None and window.size and window.max() >= vocab:  # damage the reuse check did not sample
            self.token_file.path.with_suffix(".json").unlink(missing_ok=True)  # the next run rebuilds it
            raise CorpusError(f"token cache: {self.token_file.path} is corrupt (token id {int(window.max())} is "
                              f"beyond the vocabulary of {vocab}); run again to rebuild it")  # fmt: skip
        return window

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        key = (self.stream, i)
        window = self._window(i, self.body)
        cls, sep = np.array([self.cls_id]), np.array([self.sep_id])
        if not self.nsp:
            ids = np.concatenate((cls, window, sep))
            return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "key": key}
        rng = np.random.default_rng([self.seed, *key, 1])  # a stream apart from the masking draws
        split = int(rng.integers(1, self.body))  # a: window[:split], b: the next body - split tokens
        a, b = window[:split], window[split:]
        is_random = len(self) > 1 and rng.random() < 0.5
        if is_random:
            other = int(rng.integers(len(self) - 1))
            b = self._window(other + (other >= i), self.body - split)  # the start of another window
        ids = np.concatenate((cls, a, sep, b, sep))
        types = np.concatenate((np.zeros(split + 2, dtype=np.int64), np.ones(len(b) + 1, dtype=np.int64)))
        return {"input_ids": ids, "token_type_ids": types, "key": key, "next_sentence_label": int(is_random)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class MLMDataModule(CorpusDataModule):
    """Tokenizes a corpus once (cached, as pretraining does), cuts it into BERT inputs and masks them.

    The tokenizer must have [CLS], [SEP], [PAD] and [MASK] tokens (``{name: wordpiece}``, the default, trained on
    the corpus). The last ``val_fraction`` of the tokens is the validation split, masked the same way every time.
    """

    length_field = "max_positions"
    hub_datasets = False  # describe_data names the dataset spec and description only

    def __init__(
        self,
        dataset: dict[str, Any] = {"name": "embedded"},
        tokenizer: dict[str, Any] = {"name": "wordpiece", "vocab_size": 8192},
        seq_len: int = 128,
        batch_size: int = 32,
        nsp: bool = False,
        mlm_probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        whole_word: bool = True,
        val_fraction: float = 0.05,
        num_workers: int = 1,
        cache_dir: str | None = None,
        token_dtype: TokenDType = "auto",
        seed: int | None = None,
        pipeline: list[dict[str, Any]] | None = None,
        num_proc: int = 1,
    ) -> None:
        """
        Args:
            dataset: A dataset plugin and its arguments: embedded (size_bytes, seed, branching), files (paths, ...).
            tokenizer: A tokenizer plugin with BERT's special tokens: wordpiece (vocab_size, min_frequency, path,
                lowercase, strip_accents).
            seq_len: Tokens per sequence, [CLS] and [SEP] included (the model's max_positions at most).
            batch_size: Sequences per batch.
            nsp: Build ``[CLS] a [SEP] b [SEP]`` pairs for next-sentence prediction, half of b random.
            mlm_probability: Fraction of the non-special tokens selected for the masked-LM loss.
            mask_fraction: Of the selected tokens, the fraction replaced by [MASK].
            random_fraction: Of the selected tokens, the fraction replaced by a random token (the rest stay).
            whole_word: Select whole words (a piece and the ``##`` pieces after it) when the tokenizer marks them.
            val_fraction: Fraction of tokens (the tail of the corpus) held out for validation.
            num_workers: DataLoader worker processes.
            cache_dir: Where token files live; default $LMFORGE_CACHE or ~/.cache/lmforge.
            token_dtype: auto picks uint16 when the vocabulary fits, else uint32.
            seed: Seeds the shuffle, the masks and the NSP pairs; default the run's seed_everything.
            pipeline: Cleaning steps (filter plugins) between the dataset and the tokenizer, in order, e.g.
                [{name: normalize}, {name: quality}, {name: dedup}, {name: pii}].
            num_proc: Processes that clean (the pipeline's steps before dedup) and tokenize the corpus when it is
                prepared; the token file is the same for any number.
        """
        if seq_len < (5 if nsp else 3):
            raise UserError(f"data.seq_len={seq_len} is too short: at least {5 if nsp else 3} with nsp={nsp}")
        super().__init__(
            dataset, tokenizer, seq_len, batch_size, val_fraction, num_workers, cache_dir, token_dtype, seed,
            pipeline=pipeline, num_proc=num_proc,
        )  # fmt: skip
        MaskingCollator(1, 0, 0, [], mlm_probability=mlm_probability, mask_fraction=mask_fraction,
                        random_fraction=random_fraction)  # fmt: skip  # a bad fraction fails now
        self.nsp = nsp
        self.mlm_probability, self.mask_fraction, self.random_fraction = mlm_probability, mask_fraction, random_fraction
        self.whole_word = whole_word
        self.collator: MaskingCollator | None = None

    def _check_tokenizer(self, tokenizer: Tokenizer) -> None:
        missing = [name for name in ("cls_id", "sep_id", "pad_id", "mask_id") if getattr(tokenizer, name, None) is None]
        if missing:
            raise UserError(
                f"data.tokenizer: {type(tokenizer).__name__} has no {', '.join(missing)} (BERT's special tokens); "
                "use data.tokenizer: {name: wordpiece}"
            )

    # -- LightningDataModule ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        tok = self.tokenizer
        seed = self._train_seed()
        special = {tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.eos_id}
        special |= set(getattr(tok, "special_tokens", dict)().values())
        continuation = getattr(tok, "continuation_mask", None) if self.whole_word else None
        self.collator = MaskingCollator(
            tok.vocab_size, tok.mask_id, tok.pad_id, sorted(special),
            mlm_probability=self.mlm_probability, mask_fraction=self.mask_fraction,
            random_fraction=self.random_fraction, continuation=continuation() if continuation else None, seed=seed,
        )  # fmt: skip
        self.split, n = self._split(self.seq_len - (3 if self.nsp else 2), "sequence", "tokens of text")
        common = dict(seq_len=self.seq_len, cls_id=tok.cls_id, sep_id=tok.sep_id, nsp=self.nsp, seed=seed)
        self.train_set = SegmentDataset(self.token_file, 0, self.split, stream=0, **common)
        self.val_set = SegmentDataset(self.token_file, self.split, n, stream=1, **common)

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(
            self.train_set, self.batch_size, drop_last=True, num_workers=self.num_workers, collate_fn=self.collator
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, collate_fn=self.collator)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def unigram_entropy_nats(self) -> float:
        """Entropy of the training split's token frequencies (nats per token): the masked-LM loss of a model that
        ignores the context, which any useful encoder must beat."""
        tokens = self.token_file.open()[: self.split]
        counts = np.bincount(tokens, minlength=self.tokenizer.vocab_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
