"""Running exporters, and the built-in ``safetensors`` exporter (an ``lmforge.exporters`` plugin).

:func:`export` runs any exporter plugin the way ``lmforge export`` does: the checkpoint is checked first,
the plugin writes into an empty staging folder beside ``--to`` that lmforge created, and lmforge renames
that folder to ``--to`` once the plugin returns. A plugin that fails (or a Ctrl-C) leaves nothing, and
stale staging folders of killed exports are removed by the next export into the same parent folder.

The ``safetensors`` export is lmforge's own portable format: ``model.safetensors`` (the model's
weights, a tied head stored once), ``config.json`` (the GPTConfig or EncoderConfig) and the tokenizer files.
:func:`lmforge.checkpoint.load_exported` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import lmforge
from lmforge import plugins
from lmforge.atomic import staged_folder
from lmforge.checkpoint import (  # noqa: F401 (Checkpoint and load_checkpoint: exporters imported them from here)
    Checkpoint,
    load_checkpoint,
    read_checkpoint,
    read_lmforge_checkpoint,
)
from lmforge.errors import ExistingPathError, UserError
from lmforge.tokenizers import save_tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export(checkpoint: str | Path, out_dir: str | Path, format: str = "safetensors", **kwargs: Any) -> Path:
    """Run the exporter plugin ``format`` on ``checkpoint`` into the new folder ``out_dir``, atomically.

    The plugin and its arguments are checked and the checkpoint is read (weights only) before anything
    is written; the plugin then fills an empty staging folder, which becomes ``out_dir`` when it returns.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists():
        raise ExistingPathError(f"export folder {out_dir} already exists; remove it or choose another --to")
    spec = {"name": format, **kwargs}
    plugins.validate("exporter", spec)
    read_lmforge_checkpoint(checkpoint, mmap=True)  # a missing, damaged or foreign file: one line, nothing written
    with staged_folder(out_dir, keep_name=True) as staging:  # the exporter sees the final name (a card's title)
        plugins.build("exporter", spec, checkpoint, staging)
        if not any(staging.iterdir()):
            raise UserError(f"exporter {format!r} wrote nothing; {out_dir} was not created")
    return out_dir


def export_safetensors(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the model of ``checkpoint`` into the (empty) folder ``out_dir``."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise UserError(f"exporter safetensors: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    config, state, tokenizer = read_checkpoint(checkpoint)
    if getattr(config, "tie_embeddings", False):  # an encoder's masked-LM decoder is wte itself: no second name
        state.pop("lm_head.weight", None)  # the same tensor as wte.weight
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items() if v.is_floating_point()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt", "lmforge": lmforge.__version__})
    meta = {"lmforge_version": lmforge.__version__, "torch_dtype": dtype, **config.to_dict()}
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
    return out_dir
