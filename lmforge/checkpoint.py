"""Reading checkpoints and base models, without running code from any file.

- :func:`torch_load` is the one place lmforge unpickles a file: ``torch.load(weights_only=True)``, with
  only the few classes lmforge's own checkpoints hold allowed (:data:`SAFE_GLOBALS`). A file that would
  import anything else (a pickle whose ``__reduce__`` calls ``os.system``, say) is refused before any of
  it runs, and every other failure (a folder, an empty, truncated or random file) is one
  :class:`~lmforge.errors.CheckpointError` line naming the file.
- :func:`load_checkpoint` reads a ``.ckpt`` written by ``lmforge fit`` into a :class:`Checkpoint`: the
  model config, the model weights with any LoRA merged, the tokenizer, the task and what the run recorded.
  Exporter plugins read checkpoints with it.
- :func:`load_base` loads any model lmforge can start from: a ``.ckpt``, a folder written by
  ``lmforge export``, or a Hugging Face folder or Hub id (safetensors, or ``.bin`` with weights_only).
- :func:`previous_good` finds the newest other readable checkpoint beside a damaged one.

Nothing here imports Lightning, so ``lmforge generate`` and ``lmforge export`` start fast.
"""

from __future__ import annotations

import json
import logging
import pathlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.encoder import EncoderConfig
from lmforge.errors import CheckpointError, MissingFileError, UserError
from lmforge.families import ModelConfig, build_model, config_from_dict
from lmforge.model import GPTConfig
from lmforge.tokenizers import Tokenizer, load_tokenizer, tokenizer_from_dict

log = logging.getLogger("lmforge")

# What lmforge's checkpoints may hold beyond tensors and plain containers: hyperparameters given as objects
# (a GPTConfig, a path) by code that builds the modules itself rather than through the command line.
SAFE_GLOBALS: list[Any] = [GPTConfig, EncoderConfig, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath]


def torch_load(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one clear line for every way it can fail.

    ``mmap=True`` maps the tensors instead of reading them (cheap: for checking a file before a run).
    """
    path = Path(path)
    if is_sharded(path):
        return read_sharded(path, what)
    if path.is_dir():
        last = path / "last.ckpt"
        hint = f"; did you mean {last}?" if last.is_file() else "; give the path of a .ckpt file"
        raise CheckpointError(f"{what} {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise MissingFileError(f"{what} {path} not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes: a write that failed?); use another checkpoint")
    mmap = mmap and zipfile.is_zipfile(path)  # an old-format (plain pickle) file cannot be mapped: read it
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if re.search(r"global|reduce|call", str(err), re.I):
            raise CheckpointError(_refusal(path, what, str(err))) from None
        raise CheckpointError(f"{what} {path} {_damage(err, path)}") from None
    except Exception as err:  # zip, EOF and format errors of a damaged or foreign file
        raise CheckpointError(f"{what} {path} {_damage(err, path)}") from None


SHARDED_META = "meta.pt"  # what Lightning's ModelParallelStrategy (lmforge's fsdp2) writes beside the shards


def is_sharded(path: str | Path) -> bool:
    """A sharded checkpoint: a folder of torch.distributed.checkpoint shards written by ``strategy: fsdp2``."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / SHARDED_META).is_file()


class _ShardIndexUnpickler(pickle.Unpickler):
    """Reads the shard index (``.metadata``, a pickle) allowing only torch.distributed.checkpoint's own
    record classes, sizes, dtypes and paths: a hostile index cannot run code."""

    MODULES = {"torch.distributed.checkpoint.metadata"}
    NAMES = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module in self.MODULES and not name.startswith("__") or (module, name) in self.NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def read_sharded(path: Path, what: str = "checkpoint") -> dict:
    """A sharded checkpoint as one ordinary checkpoint dict (full ``state_dict``, no optimizer state), in one
    process on the CPU: the metadata file through :func:`torch_load`, the shards through
    torch.distributed.checkpoint with the index read by :class:`_ShardIndexUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    try:
        with open(path / ".metadata", "rb") as f:
            index = _ShardIndexUnpickler(f).load()
    except pickle.UnpicklingError as err:
        if re.search(r"global|reduce|call", str(err), re.I):
            raise CheckpointError(_refusal(path / ".metadata", what, str(err))) from None
        raise CheckpointError(f"{what} {path}: its shard index .metadata {_damage(err, path)}") from None
    except Exception as err:
        raise CheckpointError(f"{what} {path}: its shard index .metadata {_damage(err, path)}") from None
    if not hasattr(index, "state_dict_metadata"):
        raise CheckpointError(f"{what} {path}: .metadata is not a torch.distributed.checkpoint index")

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    checkpoint = torch_load(path / SHARDED_META, what)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{what} {path}: {SHARDED_META} is not a checkpoint's metadata; use another checkpoint")
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=SafeReader(path), planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
                         no_dist=True)  # fmt: skip
    except (
        Exception,
        CheckpointException,
    ) as err:  # a missing or truncated shard (CheckpointException is a BaseException)
        causes = list(getattr(err, "failures", {}).values()) or [err]
        cause = causes[0]
        if isinstance(cause, tuple) and cause and isinstance(cause[0], BaseException):
            cause = cause[0]  # a rank's failure: (exception, its stack)
        text = _first_line(str(cause)) or "the file ends early"
        raise CheckpointError(
            f"{what} {path} is a sharded checkpoint with a missing or damaged shard ({type(cause).__name__}: {text}); "
            "use another checkpoint"
        ) from None
    checkpoint["state_dict"] = state.get("state_dict", {})
    return checkpoint


def _refusal(path: Path, what: str, message: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Unsupported global: ([\w.]+)", message)
    reason = f"it would call {found.group(1)}" if found else _first_line(message.split("Please file an issue")[0])
    return (
        f"{what} {path} was refused: loading it would run code ({reason}), which an lmforge checkpoint never "
        "does; lmforge only loads weights (torch.load weights_only=True). Do not use this file"
    )


def _damage(err: BaseException, path: Path) -> str:
    text = _first_line(str(err)) or type(err).__name__
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # the start of a zip or a pickle: the rest is damaged
        return f"is truncated or corrupt ({text}); use another checkpoint"
    return f"is not a PyTorch checkpoint ({text})"


def _first_line(text: str) -> str:
    """The first sentence of an error message (torch's go on for lines)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    end = first.find(". ", 20)
    return (first[:end] if end > 0 else first)[:200]


def read_lmforge_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The raw dict of a checkpoint written by ``lmforge fit``; CheckpointError for anything else."""
    ckpt = torch_load(path, mmap=mmap)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        kind = type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a Lightning checkpoint (a plain torch.save file holding a {kind}?); "
            "give a .ckpt written by lmforge fit"
        )
    meta = ckpt.get("lmforge")
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"checkpoint {path} was not written by lmforge fit (no model config in it)")
    return ckpt


def previous_good(path: str | Path) -> Path | None:
    """The newest other checkpoint in ``path``'s folder that reads as an lmforge checkpoint, or None."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        return None
    others = [p for p in folder.glob("*.ckpt") if p.is_file() and p.resolve() != path.resolve()]
    for candidate in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            read_lmforge_checkpoint(candidate, mmap=True)
        except UserError:
            continue
        return candidate
    return None


def refuse_damaged(path: str | Path, err: CheckpointError) -> CheckpointError:
    """``err`` with the previous good checkpoint beside ``path`` offered (for a resume that cannot start)."""
    good = previous_good(path)
    if good is None:
        return err
    return CheckpointError(f"{err}; the newest readable checkpoint beside it is {good}: pass --ckpt_path {good}")


# -- lmforge checkpoints --------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What an lmforge checkpoint holds, ready to export: the model's weights with any LoRA merged."""

    path: Path
    config: ModelConfig
    """A GPTConfig (decoder) or an EncoderConfig (encoder)."""
    state: dict[str, torch.Tensor]
    """The model's state dict (lmforge names), LoRA adapters merged into the weights."""
    tokenizer: Tokenizer | None
    task: str = "lm"
    """lm (pretraining), masked_lm (encoder pretraining), sft or classify."""
    labels: list[str] | None = None
    """Class names in id order (classify)."""
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors outside the model: a classifier's ``score.weight`` (decoders) or ``classifier.*`` and
    ``pre_classifier.*`` (encoders), under transformers' names."""
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
    data: dict = field(default_factory=dict)
    """What the run trained on: ``dataset`` (the dataset plugin and its arguments, local paths reduced to file
    names) or ``train_file``, and ``hub_datasets`` (Hugging Face dataset ids, when the data came from the Hub)."""


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``lmforge fit`` (pretraining or fine-tuning); one-line errors."""
    path = Path(path)
    ckpt = read_lmforge_checkpoint(path)
    meta = ckpt["lmforge"]
    try:
        config = config_from_dict(meta["model_config"])
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path}: its model config is not valid ({err})") from None
    raw = {k.replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items()}
    state = {k.removeprefix("model."): v for k, v in raw.items() if k.startswith("model.")}
    head = {k: v for k, v in raw.items() if not k.startswith("model.")}
    adapters = {k: state.pop(k) for k in list(state) if k.endswith((".lora_A", ".lora_B"))}
    tokenizer = tokenizer_from_dict(meta["tokenizer"]) if meta.get("tokenizer") else None
    lora = meta.get("lora")
    if lora:
        from lmforge.lora import merge_state

        if meta.get("lora_base_saved") is False:  # only the adapters were saved: rebuild the base
            base_model, _, _ = load_base(meta["base"]["source"], meta["base"].get("revision"))
            base_state = base_model.state_dict()
            if "wpe.weight" in base_state:  # the fine-tune may have used a shorter context
                base_state["wpe.weight"] = base_state["wpe.weight"][: config.block_size]
            base_state = {k: v for k, v in base_state.items() if not k.startswith(_UNUSED_HEADS)}
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
        data=dict(meta.get("data") or {}),
    )


_UNUSED_HEADS = ("mlm_head.", "nsp_head.")
"""An encoder's pretraining heads, which its classifier leaves out (they would get no gradient)."""


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """(model config, model state dict, tokenizer) of a checkpoint written by ``lmforge fit``."""
    ckpt = load_checkpoint(path)
    return ckpt.config, ckpt.state, ckpt.tokenizer


def load_exported(directory: str | Path) -> tuple[Any, Tokenizer | None]:
    """The model (and tokenizer) from a folder written by :func:`lmforge.export.export_safetensors`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        raise MissingFileError(f"{directory} has no model.safetensors; is it a complete lmforge export?")
    try:
        values = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        model = build_model(config_from_dict(values))
    except (UnicodeDecodeError, ValueError, TypeError, AttributeError) as err:
        raise UserError(f"{directory / 'config.json'}: not an lmforge model config ({err})") from None
    try:
        state = load_file(str(directory / "model.safetensors"))
    except Exception as err:  # SafetensorError: a damaged file
        raise UserError(f"{directory / 'model.safetensors'} cannot be read ({str(err).strip()[:200]})") from None
    if getattr(model.config, "tie_embeddings", False):
        state["lm_head.weight"] = state["wte.weight"]
    _load_weights(model, {k: v.float() for k, v in state.items()}, f"{directory}")
    has_tokenizer = (directory / "lmforge_tokenizer.json").is_file() or (directory / "tokenizer.json").is_file()
    return model, load_tokenizer(directory) if has_tokenizer else None


# -- base models ----------------------------------------------------------------------------------------


def _load_weights(model: Any, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``; the heads a classifier leaves out (a decoder's ``lm_head``, an encoder's
    masked-LM and next-sentence heads) keep their initial values, with a warning. Anything else that does not fit
    is a CheckpointError."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    heads = ("mlm_head.", "nsp_head.", "pooler.") if isinstance(model.config, EncoderConfig) else ("lm_head.",)
    if unexpected or [k for k in missing if not k.startswith(heads)]:
        raise CheckpointError(f"{where}: its weights do not fit its model config")
    if missing:
        names = ", ".join(sorted({k.split(".", 1)[0] for k in missing}))
        log.warning("%s has no %s (a classifier's checkpoint?): it starts from random values", where, names)


def load_base(source: str, revision: str | None = None) -> tuple[Any, Any, dict]:
    """(model, tokenizer, info) from an lmforge checkpoint or export, or a Hugging Face folder or Hub id.

    The model is a :class:`~lmforge.model.GPT` or, for BERT and DistilBERT sources and lmforge's masked-LM
    checkpoints, an :class:`~lmforge.encoder.Encoder` with a WordPiece tokenizer.

    info: ``source``, ``kind`` (lmforge or hf), ``family`` (gpt2, llama, bert, ... or None) and, for Hugging
    Face models, ``revision``, ``architectures`` and ``initialized`` (heads the checkpoint lacked).
    """
    from lmforge import hf

    path = Path(str(source)).expanduser()
    if path.is_file():
        ckpt = load_checkpoint(path)
        model = build_model(ckpt.config)
        _load_weights(model, ckpt.state, f"model.base={source!r}")
        tokenizer = ckpt.tokenizer
        info = {"source": str(source), "kind": "lmforge"}
    elif path.is_dir() and (path / "config.json").is_file() and not hf.is_hf_folder(path):
        model, tokenizer = load_exported(path)
        info = {"source": str(source), "kind": "lmforge"}
    else:
        model, tokenizer, hf_info = hf.load_model(str(source), revision)
        info = {"source": str(source), "kind": "hf", "revision": revision}
        info["architectures"] = hf_info["architectures"]
        info["initialized"] = hf_info["initialized"]
    try:
        info["family"] = hf.family_of(model.config)
    except hf.HFError:
        info["family"] = None
    if tokenizer is None:
        raise UserError(
            f"model.base={source!r} has no tokenizer files; fine-tuning needs the tokenizer it was trained with"
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"model.base={source!r}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size} embeddings; the checkpoint and tokenizer do not belong together"
        )
    return model, tokenizer, info
