"""Reading lmforge checkpoints, and the built-in ``safetensors`` exporter (an ``lmforge.exporters`` plugin).

The ``safetensors`` export is lmforge's own portable format: ``model.safetensors`` (the GPT's
weights, a tied head stored once), ``config.json`` (the GPTConfig) and the tokenizer files. It is
written to a temporary folder that is renamed into place at the end, so an interrupted export
never leaves a half-written folder. :func:`load_exported` reads it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lmforge
from lmforge.atomic import staged_folder
from lmforge.model import GPT, GPTConfig
from lmforge.tokenizers import Tokenizer, load_tokenizer, tokenizer_from_dict

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Checkpoint:
    """What an lmforge checkpoint holds, ready to export: the GPT's weights with any LoRA merged."""

    path: Path
    config: GPTConfig
    state: dict[str, torch.Tensor]
    """The GPT state dict (lmforge names), LoRA adapters merged into the weights."""
    tokenizer: Tokenizer | None
    task: str = "lm"
    """lm (pretraining), sft or classify."""
    labels: list[str] | None = None
    """Class names in id order (classify)."""
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors outside the GPT: a classifier's ``score.weight``."""
    lora: dict | None = None
    """LoRA settings (r, alpha, dropout, targets) when the run trained adapters."""
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)
    """The LoRA tensors (lmforge names, e.g. ``blocks.0.attn.q_proj.lora_A``), unmerged."""
    base: dict | None = None
    """Where a fine-tune started: source (path or Hub id), family, kind (hf or lmforge)."""
    metrics: dict = field(default_factory=dict)
    """The last logged metrics (val/test loss, ppl, accuracy, ...)."""
    global_step: int = 0
    hparams: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    """What the run recorded about itself: hardware, devices, precision, tokens_seen."""


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``lmforge fit`` (pretraining or fine-tuning)."""
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
    config = GPTConfig.from_dict(meta["model_config"])
    raw = {k.replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items()}
    state = {k.removeprefix("model."): v for k, v in raw.items() if k.startswith("model.")}
    head = {k: v for k, v in raw.items() if not k.startswith("model.")}
    adapters = {k: state.pop(k) for k in list(state) if k.endswith((".lora_A", ".lora_B"))}
    tokenizer = tokenizer_from_dict(meta["tokenizer"]) if meta.get("tokenizer") else None
    lora = meta.get("lora")
    if lora:
        from lmforge.lora import merge_state

        if meta.get("lora_base_saved") is False:  # only the adapters were saved: rebuild the base
            from lmforge.finetune import load_base

            base_model, _, _ = load_base(meta["base"]["source"], meta["base"].get("revision"))
            base_state = base_model.state_dict()
            if "wpe.weight" in base_state:  # the fine-tune may have used a shorter context
                base_state["wpe.weight"] = base_state["wpe.weight"][: config.block_size]
            base_state.update(state)
            state = base_state
        state = merge_state(state, adapters, lora)
    return Checkpoint(
        path=path,
        config=config,
        state=state,
        tokenizer=tokenizer,
        task=meta.get("task", "lm"),
        labels=meta.get("labels"),
        head=head,
        lora=lora,
        adapters=adapters,
        base=meta.get("base"),
        metrics=meta.get("metrics") or {},
        global_step=int(ckpt.get("global_step", 0)),
        hparams=dict(ckpt.get("hyper_parameters") or {}),
        run=dict(meta.get("run") or {}),
    )


def read_checkpoint(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """(model config, GPT state dict, tokenizer) of a checkpoint written by ``lmforge fit``."""
    ckpt = load_checkpoint(path)
    return ckpt.config, ckpt.state, ckpt.tokenizer


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
    with staged_folder(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "lmforge": lmforge.__version__})
        meta = {"lmforge_version": lmforge.__version__, "torch_dtype": dtype, **config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
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
