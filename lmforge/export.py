"""Reading lmforge checkpoints, and the built-in ``safetensors`` exporter (an ``lmforge.exporters`` plugin).

The ``safetensors`` export is lmforge's own portable format: ``model.safetensors`` (the GPT's
weights, a tied head stored once), ``config.json`` (the GPTConfig) and the tokenizer files. It is
written to a temporary folder that is renamed into place at the end, so an interrupted export
never leaves a half-written folder. :func:`load_exported` reads it back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

import lmforge
from lmforge.model import GPT, GPTConfig
from lmforge.tokenizers import Tokenizer, load_tokenizer, tokenizer_from_dict

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_checkpoint(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """(model config, GPT state dict, tokenizer) of a checkpoint written by ``lmforge fit``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    meta = ckpt.get("lmforge") if isinstance(ckpt, dict) else None
    if not meta or "model_config" not in meta or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {path} was not written by lmforge fit (no model config in it)")
    state = {k.removeprefix("model.").replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items()}
    tokenizer = tokenizer_from_dict(meta["tokenizer"]) if meta.get("tokenizer") else None
    return GPTConfig.from_dict(meta["model_config"]), state, tokenizer


def export_safetensors(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the model of ``checkpoint`` to the folder ``out_dir`` (which must not exist yet)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"exporter safetensors: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"export folder {out_dir} already exists; remove it or choose another --to")
    config, state, tokenizer = read_checkpoint(checkpoint)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as wte.weight
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items() if v.is_floating_point()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "lmforge": lmforge.__version__})
        meta = {"lmforge_version": lmforge.__version__, "torch_dtype": dtype, **config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_exported(directory: str | Path) -> tuple[GPT, Tokenizer | None]:
    """The GPT (and tokenizer) from a folder written by :func:`export_safetensors`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    values = json.loads((directory / "config.json").read_text())
    model = GPT(GPTConfig.from_dict(values))
    state = load_file(str(directory / "model.safetensors"))
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    has_tokenizer = (directory / "lmforge_tokenizer.json").is_file() or (directory / "tokenizer.json").is_file()
    return model, load_tokenizer(directory) if has_tokenizer else None
