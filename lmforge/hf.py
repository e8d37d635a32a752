"""Hugging Face checkpoints: decoder (GPT-2, Llama, Qwen2, Mistral) and encoder (BERT, DistilBERT) folders (or
Hub ids) to lmforge and back.

Never ``trust_remote_code``: what each architecture is (its config.json keys, its weight names and how
they are stored) is one entry of :data:`lmforge.families.FAMILIES`, and everything here reads the entry.
Sequence-classification checkpoints (``*ForSequenceClassification``) share the backbone names and add
``score`` (decoders) or ``classifier`` and ``pre_classifier`` (encoders). An encoder checkpoint of one class
lacks the heads of others (BertForMaskedLM has no pooler, BertModel no masked-LM head): those start from
fresh initial values, as transformers starts them, and ``load_model`` names them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge import families
from lmforge.families import FAMILIES as FAMILIES
from lmforge.families import GPT2_ACTIVATIONS as GPT2_ACTIVATIONS
from lmforge.families import Fixed, HFError, Key, ModelConfig, family_of

HUB_FILES = [
    "README.md",  # the model card: its licence carries over to exports of a fine-tune
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",  # BERT's WordPiece vocabulary
]
HUB_BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # only for repos without safetensors
_HEAD = "lm_head.weight"
"""lmforge's (and transformers') output head, which a tied model shares with the embedding."""
_CLASSIFIER = "score"
"""The classification head of transformers' *ForSequenceClassification (and of lmforge's classifiers)."""


# -- configs ----------------------------------------------------------------------------------


def config_from_hf(values: dict, where: str = "config.json") -> tuple[ModelConfig, str]:
    """(config, family) from a transformers config.json (a GPTConfig for a decoder, an EncoderConfig for an
    encoder); unsupported options are an HFError."""
    if not isinstance(values, dict):
        raise HFError(f"{where}: expected a JSON object, got {type(values).__name__}")
    try:
        return _config_from_hf(values, where)
    except KeyError as err:
        raise HFError(f"{where}: has no {err.args[0]!r}; not a complete {values.get('model_type')} config") from None
    except (TypeError, ValueError) as err:
        if isinstance(err, HFError):
            raise
        raise HFError(f"{where}: {err}") from None


def _config_from_hf(values: dict, where: str) -> tuple[ModelConfig, str]:
    fam = families.family(values.get("model_type"), where)
    for entry in fam.config:
        problem = entry.refusal(values) if isinstance(entry, Fixed) else None
        if problem:
            raise HFError(f"{where}: {problem}")
    got: dict[str, Any] = {}
    for entry in fam.config:
        if isinstance(entry, Key) and entry.field is not None:
            got[entry.field] = entry.from_hf(values, got)
    problem = fam.check_import(values, got) if fam.check_import else None
    if problem:
        raise HFError(f"{where}: {problem}")
    return fam.config_class(**fam.features, **fam.fixed, **got), fam.name


def config_to_hf(config: ModelConfig, family: str | None = None) -> dict:
    """The transformers config.json values (architecture-specific part) for ``config``."""
    fam = families.family(family or family_of(config))
    values: dict[str, Any] = {"model_type": fam.name}
    for entry in fam.config:
        if isinstance(entry, Key):
            values[entry.key] = entry.to_hf(config)
        elif entry.written:
            values[entry.key] = entry.value
    return values


# -- module and tensor names --------------------------------------------------------------------


def linear_module_map(family: str, n_layer: int) -> dict[str, tuple[str, int, int]]:
    """lmforge Linear module name -> (HF module name, part index, number of parts).

    Fused modules (GPT-2's ``c_attn`` holds q, k and v: parts 0, 1, 2) have several parts; every other
    module is one part.
    """
    return families.family(family).linear_modules(n_layer)


def state_dict_to_hf(state: dict[str, Tensor], config: ModelConfig, family: str | None = None) -> dict[str, Tensor]:
    """lmforge GPT state dict -> transformers state dict (weights transposed and parts fused as the family's
    template says, e.g. GPT-2's Conv1D and ``c_attn``).

    A tied head is left out (transformers re-ties it from the embedding). Keys not in the GPT
    (e.g. a classifier's ``score.weight``) are passed through unchanged.
    """
    fam = families.family(family or family_of(config))
    state = dict(state)
    if getattr(config, "tie_embeddings", False):
        state.pop(_HEAD, None)
    out = fam.to_hf(state, config.n_layer)
    mapped = fam.tensors(config.n_layer)
    out.update({key: tensor for key, tensor in state.items() if key not in mapped})  # e.g. a classification head
    return out


def state_dict_from_hf(hf_state: dict[str, Tensor], config: ModelConfig, family: str, where: str = "checkpoint"):
    """transformers state dict -> (lmforge state dict, extra tensors such as ``score.weight``).

    Every weight of the model must be present with the right shape, but for the heads the family marks
    optional (they are left out of the state dict: the caller keeps their initial values); anything unknown
    is an HFError. A decoder's sequence classifier (``score.weight``) without an LM head gets a copy of the
    embedding as one.
    """
    fam = families.family(family)
    hf_state = {_current_name(k): v for k, v in hf_state.items() if not fam.is_buffer(k)}
    sources = fam.hf_tensors(config.n_layer)
    prefix = fam.bare_prefix
    if prefix and not any(k.startswith(prefix) for k in hf_state):  # a backbone-only checkpoint (GPT2Model)
        heads = {name for name in sources if not name.startswith(prefix)}
        hf_state = {(k if k in heads or k.startswith(fam.head_tensors) else prefix + k): v for k, v in hf_state.items()}
    expected = families.shapes(config)
    slots = fam.tensors(config.n_layer)
    out: dict[str, Tensor] = {}
    known: set[str] = set()
    headless = False
    for key, names in sources.items():
        if not all(name in expected for name in names):  # e.g. the biases of a model without them
            continue
        known.add(key)
        if key not in hf_state:
            if all(fam.is_optional(name) for name in names):  # a head of another class: it starts fresh
                continue
            if names == (_HEAD,):
                if config.tie_embeddings:
                    continue
                if f"{_CLASSIFIER}.weight" in hf_state:  # a sequence classifier has no LM head: start it from wte
                    headless = True
                    continue
                raise HFError(f"{where}: has no {key} but config.json says tie_word_embeddings=false")
            raise HFError(f"{where}: missing tensor {key!r}; is this a complete {family} checkpoint?")
        tensor = hf_state[key].t() if slots[names[0]].transpose else hf_state[key]  # (out, in) as lmforge's
        if len(names) > 1:
            sizes = [expected[name][0] for name in names]
            if tensor.dim() == 0 or tensor.shape[0] != sum(sizes):
                held = _and([name.rsplit(".", 2)[-2].removesuffix("_proj") for name in names])
                raise HFError(
                    f"{where}: tensor {key!r} has shape {tuple(hf_state[key].shape)}, which does not hold {held} "
                    f"of {' + '.join(map(str, sizes))} features; the weights do not match the config"
                )
            pieces = torch.split(tensor, sizes, dim=0)  # (size_p, in) each
        else:
            pieces = (tensor,)
        for name, piece in zip(names, pieces):
            out[name] = piece.contiguous()
    if getattr(config, "tie_embeddings", False):
        out[_HEAD] = out["wte.weight"]
    elif headless:
        out[_HEAD] = out["wte.weight"].clone()
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise HFError(
                f"{where}: tensor for {key!r} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[key])}; the weights do not match the config"
            )
    extra = {k: v for k, v in hf_state.items() if k not in known}
    unknown = [k for k in extra if not k.startswith(fam.head_tensors)]
    if unknown:
        raise HFError(f"{where}: unexpected tensors {unknown[:3]} for a {family} checkpoint; not a supported model")
    return out, extra


def _current_name(name: str) -> str:
    """A tensor's name as transformers writes it today: the oldest BERT checkpoints (bert-base-uncased's
    pytorch_model.bin) call LayerNorm's weight and bias ``gamma`` and ``beta``, which transformers renames on load."""
    if name.endswith(".gamma"):
        return name.removesuffix(".gamma") + ".weight"
    if name.endswith(".beta"):
        return name.removesuffix(".beta") + ".bias"
    return name


def _and(words: list[str]) -> str:
    """``q, k and v``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


# -- files ------------------------------------------------------------------------------------------


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return (
        path.is_dir() and (path / "config.json").is_file() and "lmforge_version" not in _read_json(path / "config.json")
    )


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f"line {err.lineno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise HFError(f"{path}: not valid JSON ({where})") from None
    if not isinstance(values, dict):
        raise HFError(f"{path}: not valid JSON for this file (expected an object, got {type(values).__name__})")
    return values


def resolve(source: str | Path, revision: str | None = None) -> Path:
    """A local folder, or a Hub id fetched with huggingface_hub (from the local cache when offline)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise HFError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", str(source)):
        raise HFError(f"{source}: no such folder, and not a Hugging Face Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id=str(source), revision=revision, allow_patterns=HUB_FILES))
        if not any(folder.glob("model*.safetensors")):  # an older repo with PyTorch .bin weights only
            folder = Path(snapshot_download(repo_id=str(source), revision=revision, allow_patterns=HUB_BIN_FILES))
        return folder
    except Exception as err:  # network, auth, missing repo or offline cache miss: one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HFError(
            f"{source}: not a local folder, and the Hugging Face Hub could not provide it ({reason}); "
            "check the id and your network, or with HF_HUB_OFFLINE=1 use a model already in the local cache"
        ) from None


def read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder: model.safetensors, a sharded index, or pytorch_model.bin."""
    for index_name, loader in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFError(f"{index}: has no weight_map; not a sharded checkpoint index")
            shards = sorted(set(weight_map.values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(_load_one(folder / shard, loader))
            return state
    if (folder / "model.safetensors").is_file():
        return _load_one(folder / "model.safetensors", "st")
    if (folder / "pytorch_model.bin").is_file():
        return _load_one(folder / "pytorch_model.bin", "bin")
    raise HFError(f"{folder}: no weights (model.safetensors, pytorch_model.bin or a sharded index)")


def _load_one(path: Path, kind: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise HFError(f"{path}: shard listed in the index is missing")
    if kind == "st":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError and friends: one line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise HFError(f"{path}: cannot be read as safetensors ({reason})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise HFError(f"{path}: cannot be read as weights-only torch file ({type(err).__name__})") from None


def load_tokenizer(folder: Path, encoder: bool = False):
    """The folder's tokenizer as an lmforge HFTokenizer (a WordPieceTokenizer for an encoder), or None when it has
    no tokenizer files."""
    from lmforge.tokenizers import HFTokenizer, WordPieceTokenizer

    if encoder:
        return WordPieceTokenizer.from_pretrained_folder(folder)
    return HFTokenizer.from_pretrained_folder(folder)


def load_model(source: str | Path, revision: str | None = None) -> tuple[Any, Any, dict]:
    """(model in fp32, tokenizer or None, info) from a Hugging Face folder or Hub id: a
    :class:`~lmforge.model.GPT` for a decoder, an :class:`~lmforge.encoder.Encoder` for an encoder.

    info: ``family``, ``source``, ``architectures``, ``extra`` (tensors beyond the model, e.g. a
    classifier's ``score.weight``), ``hf_config`` (the config.json values) and ``initialized`` (the heads the
    checkpoint lacked, which start from fresh initial values: BertForMaskedLM's pooler, say).
    """
    folder = resolve(source, revision)
    values = _read_json(folder / "config.json")
    config, family = config_from_hf(values, f"{folder / 'config.json'}")
    fam = families.family(family)
    weights = read_weights(folder)
    for name, options in fam.from_weights.items():  # BertForPreTraining's next-sentence head
        if name in weights:
            config = type(config).from_dict({**config.to_dict(), **options})
    model = families.build_model(config)
    state, extra = state_dict_from_hf(weights, config, family, where=str(folder))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    wrong = [k for k in missing if not fam.is_optional(k)] + list(unexpected)
    if wrong:  # state_dict_from_hf checked every tensor: a gap here is a bug of the family entry
        raise AssertionError(f"{family} import left {wrong[:3]} unset")
    initialized = sorted({k.split(".", 1)[0] for k in missing})  # the heads: pooler, mlm_head, ...
    if initialized:
        logging.getLogger("lmforge").info(
            "%s has no weights for %s (another head of %s): they start from fresh initial values",
            source, ", ".join(initialized), fam.display,
        )  # fmt: skip
    info = {
        "family": family,
        "source": str(source),
        "architectures": values.get("architectures") or [],
        "extra": extra,
        "hf_config": values,
        "initialized": initialized,
    }
    return model, load_tokenizer(folder, fam.encoder), info
