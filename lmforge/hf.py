"""Hugging Face checkpoints: GPT-2 and Llama-family folders (or Hub ids) to lmforge and back.

One explicit key map per family, written out below, never ``trust_remote_code``:

========================================  ===============================================
lmforge                                   GPT-2 (``GPT2LMHeadModel``, Conv1D: weights are (in, out))
========================================  ===============================================
``wte`` / ``wpe``                         ``transformer.wte`` / ``transformer.wpe``
``blocks.{i}.ln_1`` / ``ln_2``            ``transformer.h.{i}.ln_1`` / ``ln_2``
``blocks.{i}.attn.{q,k,v}_proj``          ``transformer.h.{i}.attn.c_attn`` (q, k, v fused, in that order)
``blocks.{i}.attn.c_proj``                ``transformer.h.{i}.attn.c_proj``
``blocks.{i}.mlp.c_fc`` / ``c_proj``      ``transformer.h.{i}.mlp.c_fc`` / ``c_proj``
``ln_f``                                  ``transformer.ln_f``
``lm_head``                               ``lm_head`` (tied to ``wte``)
========================================  ===============================================

========================================  ===============================================
lmforge                                   Llama (``LlamaForCausalLM``)
========================================  ===============================================
``wte``                                   ``model.embed_tokens``
``blocks.{i}.ln_1`` / ``ln_2``            ``model.layers.{i}.input_layernorm`` / ``post_attention_layernorm``
``blocks.{i}.attn.{q,k,v}_proj``          ``model.layers.{i}.self_attn.{q,k,v}_proj``
``blocks.{i}.attn.c_proj``                ``model.layers.{i}.self_attn.o_proj``
``blocks.{i}.mlp.gate``                   ``model.layers.{i}.mlp.gate_proj``
``blocks.{i}.mlp.c_fc`` / ``c_proj``      ``model.layers.{i}.mlp.up_proj`` / ``down_proj``
``ln_f`` / ``lm_head``                    ``model.norm`` / ``lm_head``
========================================  ===============================================

lmforge's RoPE uses the same rotate-half layout as transformers' Llama, so q/k weights are copied
as they are. Sequence-classification checkpoints (``*ForSequenceClassification``) share the
backbone names and add ``score``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.errors import UserError
from lmforge.model import GPT, GPTConfig

FAMILIES = ("gpt2", "llama")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation lmforge's GELU MLP computes
# Buffers that old GPT-2 checkpoints carry; they hold no weights.
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")
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
]
HUB_BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # only for repos without safetensors


class HFError(UserError):
    """A Hugging Face folder lmforge cannot use (one line: what and what to do)."""


# -- the architectures ------------------------------------------------------------------------


def family_of(config: GPTConfig) -> str:
    """``gpt2`` or ``llama``: the transformers architecture that expresses ``config`` exactly."""
    if config.pos_encoding == "learned" and config.norm == "layernorm" and config.mlp == "gelu":
        if not config.bias:
            raise HFError("model has no biases; GPT-2 (learned positions, LayerNorm, GELU) needs bias: true")
        if config.kv_heads != config.n_head:
            raise HFError(
                f"model uses grouped-query attention (n_kv_head={config.kv_heads}), which GPT-2 cannot express"
            )
        return "gpt2"
    if config.pos_encoding == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu":
        return "llama"
    features = f"pos_encoding={config.pos_encoding}, norm={config.norm}, mlp={config.mlp}"
    raise HFError(
        f"model ({features}) is neither GPT-2 (learned, layernorm, gelu) nor Llama (rope, rmsnorm, swiglu); "
        "transformers has no architecture for this combination"
    )


def _first(values: dict, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if values.get(key) is not None:
            return values[key]
    return default


def config_from_hf(values: dict, where: str = "config.json") -> tuple[GPTConfig, str]:
    """(GPTConfig, family) from a transformers config.json; unsupported options are an HFError."""
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


def _config_from_hf(values: dict, where: str) -> tuple[GPTConfig, str]:
    model_type = values.get("model_type")

    def bad(key: str, why: str) -> HFError:
        return HFError(f"{where}: {key}={values.get(key)!r} {why}")

    if model_type == "gpt2":
        act = values.get("activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise bad(
                "activation_function", f"is not supported (lmforge's GPT-2 MLP is {' / '.join(GPT2_ACTIVATIONS)})"
            )
        if values.get("scale_attn_by_inverse_layer_idx"):
            raise bad("scale_attn_by_inverse_layer_idx", "is not supported")
        if values.get("scale_attn_weights") is False:
            raise bad("scale_attn_weights", "is not supported (lmforge always scales by 1/sqrt(head_dim))")
        n_embd = values["n_embd"]
        config = GPTConfig(
            vocab_size=values["vocab_size"],
            block_size=values.get("n_positions", values.get("n_ctx", 1024)),
            n_layer=values["n_layer"],
            n_head=values["n_head"],
            n_embd=n_embd,
            mlp_hidden=values.get("n_inner") or 4 * n_embd,
            pos_encoding="learned",
            norm="layernorm",
            norm_eps=values.get("layer_norm_epsilon", 1e-5),
            mlp="gelu",
            bias=True,
            tie_embeddings=values.get("tie_word_embeddings", True),
        )
        return config, "gpt2"
    if model_type == "llama":
        if values.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", "is not supported (Llama's SwiGLU uses silu)")
        n_embd, n_head = values["hidden_size"], values["num_attention_heads"]
        if values.get("head_dim") not in (None, n_embd // n_head):
            raise bad("head_dim", f"differs from hidden_size / num_attention_heads = {n_embd // n_head}; not supported")
        if bool(values.get("attention_bias", False)) != bool(values.get("mlp_bias", False)):
            raise bad(
                "attention_bias", f"differs from mlp_bias={values.get('mlp_bias')!r}; lmforge has one bias switch"
            )
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            key = "rope_parameters" if values.get("rope_parameters") else "rope_scaling"
            raise HFError(f"{where}: {key} uses rope_type={rope_type!r}; only the default RoPE is supported")
        if values.get("pretraining_tp", 1) != 1:
            raise bad("pretraining_tp", "is not supported (must be 1)")
        config = GPTConfig(
            vocab_size=values["vocab_size"],
            block_size=values.get("max_position_embeddings", 2048),
            n_layer=values["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=values.get("num_key_value_heads") or n_head,
            n_embd=n_embd,
            mlp_hidden=values["intermediate_size"],
            pos_encoding="rope",
            rope_theta=float(_first(rope, "rope_theta", default=values.get("rope_theta", 10000.0))),
            norm="rmsnorm",
            norm_eps=values.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            bias=bool(values.get("attention_bias", False)),
            tie_embeddings=values.get("tie_word_embeddings", False),
        )
        return config, "llama"
    raise HFError(
        f"{where}: model_type={model_type!r} is not supported; lmforge loads {' and '.join(FAMILIES)} checkpoints"
    )


def config_to_hf(config: GPTConfig, family: str | None = None) -> dict:
    """The transformers config.json values (architecture-specific part) for ``config``."""
    family = family or family_of(config)
    if family == "gpt2":
        return {
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_positions": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.mlp_width,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "tie_word_embeddings": config.tie_embeddings,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
        }
    return {
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
    }


# -- module and tensor names --------------------------------------------------------------------


def linear_module_map(family: str, n_layer: int) -> dict[str, tuple[str, int, int]]:
    """lmforge Linear module name -> (HF module name, part index, number of parts).

    GPT-2 fuses q, k and v into one ``c_attn`` (parts 0, 1, 2); every other module is one part.
    """
    if family not in FAMILIES:
        raise HFError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    out: dict[str, tuple[str, int, int]] = {}
    for i in range(n_layer):
        b = f"blocks.{i}"
        if family == "gpt2":
            h = f"transformer.h.{i}"
            for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{b}.attn.{name}"] = (f"{h}.attn.c_attn", part, 3)
            out[f"{b}.attn.c_proj"] = (f"{h}.attn.c_proj", 0, 1)
            out[f"{b}.mlp.c_fc"] = (f"{h}.mlp.c_fc", 0, 1)
            out[f"{b}.mlp.c_proj"] = (f"{h}.mlp.c_proj", 0, 1)
        else:
            h = f"model.layers.{i}"
            for name in ("q_proj", "k_proj", "v_proj"):
                out[f"{b}.attn.{name}"] = (f"{h}.self_attn.{name}", 0, 1)
            out[f"{b}.attn.c_proj"] = (f"{h}.self_attn.o_proj", 0, 1)
            out[f"{b}.mlp.gate"] = (f"{h}.mlp.gate_proj", 0, 1)
            out[f"{b}.mlp.c_fc"] = (f"{h}.mlp.up_proj", 0, 1)
            out[f"{b}.mlp.c_proj"] = (f"{h}.mlp.down_proj", 0, 1)
    out["lm_head"] = ("lm_head", 0, 1)
    return out


def _other_names(family: str, n_layer: int) -> dict[str, str]:
    """lmforge -> HF names of the non-Linear modules (embeddings and norms)."""
    if family == "gpt2":
        names = {"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f"}
        for i in range(n_layer):
            names[f"blocks.{i}.ln_1"] = f"transformer.h.{i}.ln_1"
            names[f"blocks.{i}.ln_2"] = f"transformer.h.{i}.ln_2"
        return names
    names = {"wte": "model.embed_tokens", "ln_f": "model.norm"}
    for i in range(n_layer):
        names[f"blocks.{i}.ln_1"] = f"model.layers.{i}.input_layernorm"
        names[f"blocks.{i}.ln_2"] = f"model.layers.{i}.post_attention_layernorm"
    return names


def _split_sizes(config: GPTConfig) -> list[int]:
    hs = config.head_dim
    return [config.n_head * hs, config.kv_heads * hs, config.kv_heads * hs]


def state_dict_to_hf(state: dict[str, Tensor], config: GPTConfig, family: str | None = None) -> dict[str, Tensor]:
    """lmforge GPT state dict -> transformers state dict (GPT-2's Conv1D weights transposed, q/k/v fused).

    A tied head is left out (transformers re-ties it from the embedding). Keys not in the GPT
    (e.g. a classifier's ``score.weight``) are passed through unchanged.
    """
    family = family or family_of(config)
    state = dict(state)
    out: dict[str, Tensor] = {}
    conv1d = family == "gpt2"
    fused: dict[str, list] = {}
    for name, (hf_name, part, parts) in linear_module_map(family, config.n_layer).items():
        if name == "lm_head" and config.tie_embeddings:
            state.pop("lm_head.weight", None)
            continue
        for kind in ("weight", "bias"):
            tensor = state.pop(f"{name}.{kind}", None)
            if tensor is None:
                continue
            if parts > 1:
                fused.setdefault(f"{hf_name}.{kind}", [None] * parts)[part] = tensor
            else:
                transpose = conv1d and kind == "weight" and name != "lm_head"  # GPT-2's lm_head is an nn.Linear
                out[f"{hf_name}.{kind}"] = tensor.t().contiguous() if transpose else tensor
    for key, pieces in fused.items():
        joined = torch.cat(pieces, dim=0)
        out[key] = joined.t().contiguous() if key.endswith(".weight") else joined
    for name, hf_name in _other_names(family, config.n_layer).items():
        for kind in ("weight", "bias"):
            tensor = state.pop(f"{name}.{kind}", None)
            if tensor is not None:
                out[f"{hf_name}.{kind}"] = tensor
    out.update(state)  # anything else (a classification head) keeps its name
    return out


def state_dict_from_hf(hf_state: dict[str, Tensor], config: GPTConfig, family: str, where: str = "checkpoint"):
    """transformers state dict -> (lmforge GPT state dict, extra tensors such as ``score.weight``).

    Every GPT weight must be present with the right shape; anything unknown is an HFError. A
    sequence classifier (``score.weight``) without an LM head gets a copy of the embedding as one.
    """
    hf_state = {k: v for k, v in hf_state.items() if not _IGNORED.search(k)}
    if family == "gpt2":  # GPT2Model checkpoints have no "transformer." prefix
        if not any(k.startswith("transformer.") for k in hf_state):
            hf_state = {
                (k if k in ("lm_head.weight", "score.weight") else f"transformer.{k}"): v for k, v in hf_state.items()
            }
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        expected = GPT(_meta_config(config)).state_dict()
    wanted = state_dict_to_hf({k: torch.empty(0) for k in expected}, config, family)
    out: dict[str, Tensor] = {}
    headless = False
    conv1d = family == "gpt2"
    sizes = _split_sizes(config)
    for name, (hf_name, part, parts) in linear_module_map(family, config.n_layer).items():
        for kind in ("weight", "bias"):
            if f"{name}.{kind}" not in expected:
                continue
            key = f"{hf_name}.{kind}"
            if name == "lm_head" and key not in hf_state:
                if config.tie_embeddings:
                    continue
                if "score.weight" in hf_state:  # a sequence classifier has no LM head: start it from the embedding
                    headless = True
                    continue
                raise HFError(f"{where}: has no lm_head.weight but config.json says tie_word_embeddings=false")
            if key not in hf_state:
                raise HFError(f"{where}: missing tensor {key!r}; is this a complete {family} checkpoint?")
            tensor = hf_state[key]
            if conv1d and kind == "weight" and name != "lm_head":  # GPT-2's lm_head is an nn.Linear
                tensor = tensor.t()
            if parts > 1:
                if tensor.dim() == 0 or tensor.shape[0] != sum(sizes):
                    shape = tuple(hf_state[key].shape)
                    raise HFError(
                        f"{where}: tensor {key!r} has shape {shape}, which does not hold q, k and v of "
                        f"{' + '.join(map(str, sizes))} features; the weights do not match the config"
                    )
                tensor = torch.split(tensor, sizes, dim=0)[part]
            out[f"{name}.{kind}"] = tensor.contiguous()
    for name, hf_name in _other_names(family, config.n_layer).items():
        for kind in ("weight", "bias"):
            if f"{name}.{kind}" in expected:
                key = f"{hf_name}.{kind}"
                if key not in hf_state:
                    raise HFError(f"{where}: missing tensor {key!r}; is this a complete {family} checkpoint?")
                out[f"{name}.{kind}"] = hf_state[key]
    if config.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    elif headless:
        out["lm_head.weight"] = out["wte.weight"].clone()
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise HFError(
                f"{where}: tensor for {key!r} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[key].shape)}; the weights do not match the config"
            )
    known = set(wanted) | {"lm_head.weight"}
    extra = {k: v for k, v in hf_state.items() if k not in known}
    unknown = [k for k in extra if k != "score.weight" and not k.startswith("score.")]
    if unknown:
        raise HFError(f"{where}: unexpected tensors {unknown[:3]} for a {family} checkpoint; not a supported model")
    return out, extra


def _meta_config(config: GPTConfig) -> GPTConfig:
    """The config with the torch fallbacks (building a shape-only model must not need a GPU)."""
    values = config.to_dict()
    values.update(attention="torch", loss="torch")
    return GPTConfig.from_dict(values)


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


def load_tokenizer(folder: Path):
    """The folder's tokenizer as an lmforge HFTokenizer, or None when it has no tokenizer files."""
    from lmforge.tokenizers import HFTokenizer

    return HFTokenizer.from_pretrained_folder(folder)


def load_model(source: str | Path, revision: str | None = None) -> tuple[GPT, Any, dict]:
    """(GPT in fp32, tokenizer or None, info) from a Hugging Face folder or Hub id.

    info: ``family``, ``source``, ``architectures``, ``extra`` (tensors beyond the GPT, e.g. a
    classifier's ``score.weight``) and ``hf_config`` (the config.json values).
    """
    folder = resolve(source, revision)
    values = _read_json(folder / "config.json")
    config, family = config_from_hf(values, f"{folder / 'config.json'}")
    model = GPT(config)
    state, extra = state_dict_from_hf(read_weights(folder), config, family, where=str(folder))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    info = {
        "family": family,
        "source": str(source),
        "architectures": values.get("architectures") or [],
        "extra": extra,
        "hf_config": values,
    }
    return model, load_tokenizer(folder), info
