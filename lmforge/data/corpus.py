"""What the corpus-backed data modules share (pretraining's windows, masked-LM's BERT inputs): the dataset and
tokenizer plugins, the token cache they fill once, the tail of the tokens held out for validation, connect(),
the description of the data for checkpoints and model cards, and the checkpoint state (data order, tokenizer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lmforge import plugins
from lmforge.data.cache import TokenDType, TokenFile, build_token_file, default_cache_dir
from lmforge.data.sampling import ResumableData
from lmforge.data.sources import Corpus, CorpusError, public_spec
from lmforge.errors import UserError
from lmforge.tokenizers import Tokenizer, tokenizer_to_dict

log = logging.getLogger(__name__)


class CorpusDataModule(ResumableData, L.LightningDataModule):
    """Builds the dataset and tokenizer plugins, tokenizes the corpus once into a cached token file and splits
    it: the tail (``val_fraction`` of the tokens) is the validation split. Subclasses cut the splits into what
    their task reads (:meth:`setup`) and check ``seq_len`` before calling this ``__init__``.
    """

    length_field = "block_size"
    """The model config's field that bounds ``seq_len`` (named when connect() refuses a too long one)."""
    hub_datasets = True
    """Whether :meth:`describe_data` names the corpus's Hugging Face dataset (``hub_datasets``)."""

    def __init__(
        self,
        dataset: dict[str, Any],
        tokenizer: dict[str, Any],
        seq_len: int,
        batch_size: int,
        val_fraction: float,
        num_workers: int,
        cache_dir: str | None,
        token_dtype: TokenDType,
        seed: int | None,
        canaries: dict | None = None,
        pipeline: list[dict[str, Any]] | None = None,
        num_proc: int = 1,
    ) -> None:
        super().__init__()
        from lmforge.data.canaries import check_settings
        from lmforge.data.pipeline import check_pipeline

        self.canaries = check_settings(canaries) or None
        self.pipeline = check_pipeline(pipeline) or None  # every step built once: a bad option fails here
        if batch_size < 1:
            raise UserError(f"data.batch_size={batch_size} must be positive")
        if not isinstance(num_proc, int) or num_proc < 1:
            raise UserError(f"data.num_proc={num_proc!r} must be a positive number of processes")
        self.num_proc = num_proc
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
        self.seed = seed
        self.corpus: Corpus | None = None
        self.filtered: Any = None
        """The FilteredCorpus of ``data.pipeline`` (its report() holds each step's stats), or None."""
        self.tokenizer: Tokenizer | None = None
        self.token_file: TokenFile | None = None

    def _check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse a tokenizer the task cannot use (before any token is cached); any by default."""

    def _prepare(self, progress: bool) -> None:
        self.corpus = plugins.build("dataset", self.dataset_spec)
        if self.pipeline:  # cleaning steps between the dataset and the tokenizer (lmforge.data.pipeline)
            from lmforge.data.pipeline import FilteredCorpus

            # the canaries' positions need the size after cleaning: measured by a pass when first asked for
            self.corpus = self.filtered = FilteredCorpus(
                self.corpus, self.pipeline, exact_size=bool(self.canaries), num_proc=self.num_proc
            )
        if self.canaries:  # secrets put in on purpose, within the training part, after cleaning (no step removes them)
            from lmforge.data.canaries import CanaryCorpus

            self.corpus = CanaryCorpus(self.corpus, self.canaries, within=0.95 * (1.0 - self.val_fraction))
        tokenizer = plugins.build("tokenizer", self.tokenizer_spec, self.corpus, self.cache_dir)
        self._check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        report = self.filtered.report if self.filtered is not None else None
        self.token_file = build_token_file(
            self.corpus, tokenizer, self.cache_dir, self.token_dtype, progress, self.num_proc, report
        )
        if progress and self.filtered is not None and not self.filtered.report():  # reused: say what it did then
            from lmforge.data.pipeline import summary_line

            for entry in self.pipeline_report():
                log.info("%s (when the token cache was written)", summary_line(entry))

    def pipeline_report(self) -> list[dict[str, Any]]:
        """What each ``data.pipeline`` step did: from this preparation, or from the token cache's metadata when it
        was reused (empty without a pipeline)."""
        if self.filtered is None:
            return []
        return self.filtered.report() or list(
            (self.token_file.meta if self.token_file else {}).get("pipeline_report") or []
        )

    def connect(self, tokenizer: Tokenizer | None = None, batch_size: int | None = None,
                max_seq_length: int | None = None) -> None:  # fmt: skip
        """What the task hands down before the run. The tokenizer is built from the corpus (the config's
        ``tokenizer``), so a task's is not taken; sequences must fit ``max_seq_length``."""
        if batch_size is not None:
            self.batch_size = batch_size
        if max_seq_length is not None and self.seq_len > max_seq_length:
            raise UserError(
                f"data.seq_len={self.seq_len} exceeds the model's {self.length_field}={max_seq_length}; "
                f"lower data.seq_len or raise model.config.{self.length_field}"
            )

    def _split(self, unit: int, item: str, text: str = "tokens") -> tuple[int, int]:
        """(tokens of the training split, all tokens): the tail of the token file, ``val_fraction`` of it and at
        least ``unit`` tokens (one ``item``), is the validation split; the training split needs one too."""
        n = self.token_file.num_tokens
        val_tokens = max(unit, int(n * self.val_fraction))
        if n - val_tokens < unit:
            raise CorpusError(
                f"corpus: {n} tokens is shorter than one training {item} plus one validation {item} "
                f"({2 * unit} {text} at seq_len={self.seq_len}); add text or lower data.seq_len"
            )
        return n - val_tokens, n

    def _eval_loader(self, dataset: Dataset, collate_fn=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=False,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(0),  # worker seeds: never drawn from torch's global state
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    # -- LightningDataModule ----------------------------------------------------------------
    def prepare_data(self) -> None:
        self._prepare(progress=True)

    def setup(self, stage: str | None = None) -> None:
        if self.token_file is None:
            self._prepare(progress=False)

    def describe_data(self) -> dict:
        """What the run trains on, for the checkpoint and the model card (local paths reduced to file names)."""
        facts: dict[str, Any] = {"dataset": public_spec(self.dataset_spec)}
        hub = getattr(self.corpus, "hub_dataset", None)
        if self.hub_datasets and isinstance(hub, str) and hub:
            facts["hub_datasets"] = [hub]
        describe = getattr(self.corpus, "describe", None)
        if callable(describe):
            facts["description"] = str(describe())
        if self.canaries:
            facts["canaries"] = dict(self.canaries)
        if self.pipeline:
            facts["pipeline"] = [dict(step) for step in self.pipeline]
            report = self.pipeline_report()
            if report:
                facts["pipeline_report"] = report
        return facts

    def state_dict(self) -> dict:
        state = {"data_order": self._data_order()}
        if self.tokenizer is not None:
            state["tokenizer"] = tokenizer_to_dict(self.tokenizer)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._restore_data_order(state_dict)
