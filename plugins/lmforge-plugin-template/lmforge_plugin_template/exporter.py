"""The ``npz`` exporter: the GPT's weights as one NumPy ``model.npz``, its config as ``config.json``, and the
tokenizer in ``tokenizer/`` (:func:`load_npz` reads the folder back).

An exporter plugin is a factory ``(checkpoint, out_dir, **kwargs)``: ``checkpoint`` is the path of a
``.ckpt`` written by ``lmforge fit``, read with :func:`lmforge.checkpoint.load_checkpoint` (weights only,
LoRA merged: a :class:`~lmforge.checkpoint.Checkpoint` with ``config``, ``state``, ``tokenizer``, ``task``,
``labels``, ``metrics``, ...); ``out_dir`` is an empty folder that lmforge created, already named like the
final folder. The exporter writes into it; lmforge renames it to ``--to`` when the exporter returns, and
removes it when the exporter fails, so a failed export leaves nothing.

    lmforge export runs/gpt-tiny/checkpoints/last.ckpt --to tiny-npz --format npz --arg dtype=float16
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

import lmforge
from lmforge.checkpoint import load_checkpoint
from lmforge.tokenizers import load_tokenizer, save_tokenizer

FORMAT = "lmforge-npz-v1"


def export_npz(checkpoint: str | Path, out_dir: str | Path, dtype: Literal["float32", "float16"] = "float32") -> Path:
    """Write ``model.npz``, ``config.json`` and ``tokenizer/`` for the checkpoint into ``out_dir``.

    Args:
        dtype: The arrays' type: float32 or float16.
    """
    out_dir = Path(out_dir)
    ckpt = load_checkpoint(checkpoint)
    arrays = {name: t.float().numpy().astype(dtype) for name, t in ckpt.state.items() if t.is_floating_point()}
    np.savez(out_dir / "model.npz", **arrays)
    meta = {
        "format": FORMAT,
        "lmforge_version": lmforge.__version__,
        "dtype": dtype,
        "task": ckpt.task,
        "global_step": ckpt.global_step,
        "model_config": ckpt.config.to_dict(),
    }
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if ckpt.tokenizer is not None:
        save_tokenizer(ckpt.tokenizer, out_dir / "tokenizer")
    return out_dir


def load_npz(folder: str | Path):
    """(GPT, tokenizer or None) from a folder written by :func:`export_npz`."""
    import torch

    from lmforge.model import GPT, GPTConfig

    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = GPT(GPTConfig.from_dict(meta["model_config"]))
    with np.load(folder / "model.npz") as arrays:
        model.load_state_dict({k: torch.from_numpy(arrays[k].astype(np.float32)) for k in arrays.files})
    tokenizer = load_tokenizer(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
    return model, tokenizer
