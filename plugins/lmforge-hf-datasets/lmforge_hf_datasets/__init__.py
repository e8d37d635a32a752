"""Hugging Face ``datasets`` as an lmforge dataset plugin.

``dataset: {name: hf_datasets, path: json, data_files: [train.jsonl]}`` reads local json, csv,
parquet or text files offline; ``path: <hub dataset id>`` loads from the Hub when online (or from
the local Hugging Face cache with ``HF_DATASETS_OFFLINE=1``); ``streaming: true`` iterates a corpus
larger than memory (or disk) without downloading it first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import MissingFileError, UserError

__version__ = "0.1.0"

BUILDERS = ("json", "csv", "parquet", "text", "arrow")


@dataclass
class HFDatasetCorpus:
    """One split of a Hugging Face dataset, read lazily; one document per row."""

    path: str
    split: str = "train"
    text_field: str = "text"
    config_name: str | None = None
    data_files: list[str] = field(default_factory=list)
    revision: str | None = None
    streaming: bool = False
    max_documents: int | None = None

    def _load(self):
        import datasets

        kwargs: dict[str, Any] = {"split": self.split, "streaming": self.streaming}
        if self.data_files:
            kwargs["data_files"] = self.data_files
        if self.revision:
            kwargs["revision"] = self.revision
        try:
            ds = datasets.load_dataset(self.path, self.config_name, **kwargs)
        except Exception as err:
            raise UserError(f"dataset hf_datasets: cannot load {self.path!r} ({type(err).__name__}: {err})") from None
        columns = ds.column_names
        if columns is not None and self.text_field not in columns:
            raise UserError(
                f"dataset hf_datasets: {self.path!r} split {self.split!r} has no column {self.text_field!r} "
                f"(columns: {', '.join(columns)}); set text_field"
            )
        return ds

    @property
    def hub_dataset(self) -> str | None:
        """The Hub dataset id (for model cards' ``datasets:``), or None for local files."""
        return None if self.path in BUILDERS else self.path

    def key(self) -> str:
        """Local files: their content. Hub datasets: id, config, split and revision (pin it for a stable cache)."""
        digest = hashlib.sha256(
            f"hf-datasets-v1|{self.path}|{self.config_name}|{self.split}|{self.text_field}".encode()
        )
        digest.update(f"|{self.revision}|{self.max_documents}".encode())
        for name in sorted(self.data_files):
            with open(name, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        return digest.hexdigest()[:32]

    def num_bytes(self) -> int:
        local = [Path(p) for p in self.data_files if Path(p).is_file()]
        return sum(p.stat().st_size for p in local)

    def documents(self) -> Iterator[str]:
        for i, row in enumerate(self._load()):
            if self.max_documents is not None and i >= self.max_documents:
                return
            text = row.get(self.text_field)
            if text is None:
                raise UserError(f"dataset hf_datasets: row {i} has no {self.text_field!r}; set text_field")
            if text:
                yield str(text)


def hf_datasets(
    path: str,
    data_files: list[str] | str | None = None,
    split: str = "train",
    text_field: str = "text",
    config_name: str | None = None,
    revision: str | None = None,
    streaming: bool = False,
    max_documents: int | None = None,
) -> HFDatasetCorpus:
    """A Hugging Face dataset as an lmforge corpus.

    Args:
        path: A builder for local files (json, csv, parquet, text, arrow) or a Hub dataset id.
        data_files: Local files (or globs) for a builder.
        split: The split to read.
        text_field: The column holding the text.
        config_name: The dataset configuration (subset), if it has several.
        revision: A Hub revision (commit, tag or branch); pin it so the token cache stays valid.
        streaming: Iterate without downloading the whole dataset first.
        max_documents: Read at most this many rows.
    """
    files = [data_files] if isinstance(data_files, str) else list(data_files or [])
    if path in BUILDERS and not files:
        raise UserError(f"dataset hf_datasets: path={path!r} reads local files; give data_files")
    for name in files:
        if not any(ch in name for ch in "*?[") and not Path(name).is_file():
            raise MissingFileError(f"dataset hf_datasets: data file {name} does not exist")
    return HFDatasetCorpus(path, split, text_field, config_name, files, revision, streaming, max_documents)


def _example_args(folder: Path) -> dict:
    """Sample arguments for ``lmforge plugins check`` (lmforge.testing): a small local JSON Lines file, written
    into ``folder`` and read offline through the ``json`` builder."""
    import json

    file = Path(folder) / "sample.jsonl"
    rows = [{"text": f"Story {i}: the fox jumps over the fence, {i} times."} for i in range(20)]
    file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {"path": "json", "data_files": [str(file)]}


hf_datasets.example_args = _example_args
