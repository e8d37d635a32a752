"""The Hugging Face architectures lmforge reads and writes, one :class:`Family` entry each.

An entry says everything lmforge knows about a transformers architecture: its ``model_type`` and class
names, the lmforge model options that make a GPT one of it, how its ``config.json`` keys map to
:class:`~lmforge.model.GPTConfig` fields (both ways), and a template of its weight names. Everything
else derives from the entry: :mod:`lmforge.hf` (loading, and the key maps of export),
:mod:`lmforge.hf_export` (class names, the model card), :mod:`lmforge.lora` (PEFT module names,
Hugging Face aliases of LoRA targets) and the gguf exporter (llama.cpp architecture; tensor names via
gguf-py's map of transformers names). Adding an architecture is adding an entry to :data:`FAMILIES`.
Entries may share features (Qwen2 and Mistral have Llama's): the models each such entry ``claims`` are its
own (biases on q, k and v alone; a sliding window), and the rest are the entry's that claims nothing.

The weight template maps lmforge modules to transformers modules, ``{i}`` standing for the layer;
each mapping covers the module's ``weight`` and ``bias``. Both directions derive from it, as in
torchtitan's state-dict adapters: :meth:`Family.tensors` (lmforge -> transformers) and
:meth:`Family.hf_tensors` (its inverse). Two transforms are marked on the entries: ``conv1d`` (GPT-2's
Conv1D stores weights (in, out), transposed from nn.Linear's (out, in)), and fusion (entries sharing
one transformers module are its parts, concatenated along the output features in template order, as
GPT-2's ``c_attn`` holds q, k and v). A head tied to the embedding is lmforge's and transformers'
convention for every family (it is left out of a transformers checkpoint), so it is not in the table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lmforge.encoder import Encoder, EncoderConfig
from lmforge.errors import UserError
from lmforge.model import GPT, GPTConfig

ModelConfig = GPTConfig | EncoderConfig
"""The config of either kind of model lmforge builds: a decoder (:class:`~lmforge.model.GPT`) or an encoder
(:class:`~lmforge.encoder.Encoder`)."""

_REQUIRED: Any = object()
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation lmforge's GELU MLP computes


class HFError(UserError):
    """A Hugging Face folder lmforge cannot use (one line: what and what to do)."""


# -- the parts of an entry ------------------------------------------------------------------------


def _lookup(values: dict, path: str) -> tuple[bool, Any]:
    """(whether the path ``a.b`` is present, ``values[a][b]``): (False, None) where any step is missing or not
    an object."""
    for step in path.split("."):
        if not isinstance(values, dict) or step not in values:
            return False, None
        values = values[step]
    return True, values


@dataclass(frozen=True)
class Key:
    """A config.json key holding a GPTConfig value: read on import, written on export."""

    key: str
    field: str | None
    """The GPTConfig field it sets on import; None for a key only written (its value follows from others)."""
    attr: str | None = None
    """The GPTConfig attribute written on export (a field, or a property such as ``kv_heads``); default: field."""
    write: Callable[[GPTConfig], Any] | None = None
    """The value written on export as a function of the config, where no attribute holds it (instead of attr)."""
    read: tuple[str, ...] = ()
    """Where import looks, in order (``a.b``: key b of the object under a); default: the key. The first one
    set (present and not null) wins."""
    default: Any = _REQUIRED
    """On import, when none is set: a value, or a function of the fields read so far (earlier keys); when
    there is none, the key is required."""
    cast: Callable[[Any], Any] | None = None
    """Applied to the value read on import (e.g. float for a number transformers may write as an int)."""
    null: bool = False
    """A null value is set, and reads as None (Mistral's ``sliding_window: null``: no window), where
    transformers' default applies only to an absent key."""

    def from_hf(self, values: dict, got: dict[str, Any]) -> Any:
        """The field's value from config.json ``values``; KeyError(key) when required and not set."""
        for path in self.read or (self.key,):
            present, value = _lookup(values, path)
            if value is not None or (present and self.null):
                break
        else:
            if self.default is _REQUIRED:
                raise KeyError(self.key)
            value = self.default(got) if callable(self.default) else self.default
        return self.cast(value) if self.cast else value

    def to_hf(self, config: GPTConfig) -> Any:
        """The value config.json gets for ``config``."""
        return self.write(config) if self.write else getattr(config, self.attr or self.field)


@dataclass(frozen=True)
class Fixed:
    """A config.json key whose value lmforge's computation fixes (an activation, a dropout of zero)."""

    key: str
    value: Any
    """What export writes, and what import assumes when the key is not set."""
    accept: tuple[Any, ...] = ()
    """Other values import accepts (they compute the same function)."""
    why: str | None = None
    """Why import refuses any other value (the end of its error message); None: import does not check it."""
    written: bool = True
    """Whether export writes it (False for a key transformers defaults to the value anyway)."""

    def refusal(self, values: dict) -> str | None:
        """What is wrong with config.json ``values`` for this key (``key=value why``), or None."""
        value = values.get(self.key)
        if self.why is None or value is None or value in (self.value, *self.accept):
            return None
        return f"{self.key}={value!r} {self.why}"


@dataclass(frozen=True)
class Weights:
    """One lmforge module and the transformers module holding its weight and bias; ``{i}`` is the layer."""

    ours: str
    theirs: str
    linear: bool = False
    """An nn.Linear of lmforge's GPT: something LoRA can adapt."""
    conv1d: bool = False
    """transformers stores the weight transposed, (in, out), as GPT-2's Conv1D does."""


class Slot(NamedTuple):
    """Where one lmforge tensor lives in a transformers state dict."""

    hf: str
    """The transformers tensor name."""
    part: int
    """Which of the fused parts it is (0 when not fused)."""
    parts: int
    """How many lmforge tensors the transformers tensor holds, concatenated along dim 0 (out features)."""
    transpose: bool
    """Stored (in, out) by transformers."""
    linear: bool
    """Of an nn.Linear module."""


# -- the entry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One transformers architecture, as lmforge reads and writes it."""

    name: str
    """Its ``model_type`` (and the family name lmforge reports)."""
    display: str
    """Its name in prose: "GPT-2"."""
    causal_lm: str
    """The transformers class of the language model (config.json ``architectures``): the causal LM of a decoder,
    the masked LM of an encoder."""
    classifier: str
    """The transformers class of a sequence classifier (head ``score`` of a decoder; ``classifier`` and maybe
    ``pre_classifier`` of an encoder)."""
    features: Mapping[str, Any]
    """The config options that make a model this architecture (import sets them, export matches on them)."""
    config: tuple[Key | Fixed, ...]
    """The config.json keys, in the order export writes them (model_type first, always)."""
    weights: tuple[Weights, ...]
    """The weight-name template, in transformers' module order."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """Further GPTConfig fields import sets (that export requires through check_export)."""
    claims: Callable[[GPTConfig], bool] | None = None
    """Which configs with its features are this architecture's rather than that of the entry with the same
    features and no claims (Qwen2: biases on q, k and v that the rest lacks; Mistral: a sliding window);
    None: this is that entry, for every config with its features that no other entry claims."""
    check_import: Callable[[dict, dict[str, Any]], str | None] | None = None
    """What makes config.json values (and the fields read from them) unloadable, beyond the keys' own checks;
    None when nothing does."""
    check_export: Callable[[GPTConfig], str | None] | None = None
    """What this architecture cannot express about a config with its features; None when nothing."""
    buffers: tuple[str, ...] = ()
    """Regular expressions for tensor names transformers checkpoints may carry that hold no weights."""
    bare_prefix: str | None = None
    """The prefix of the backbone's names that a backbone-only checkpoint (GPT2Model) leaves out, which import
    puts back; None: such checkpoints are not accepted."""
    gguf_arch: str | None = None
    """The llama.cpp architecture (``general.architecture``) computing it; None: no GGUF export."""
    encoder: bool = False
    """A bidirectional encoder (:class:`~lmforge.encoder.EncoderConfig`); else a decoder (GPTConfig)."""
    pretraining: str | None = None
    """An encoder's transformers class with the next-sentence head too (BertForPreTraining); None: none."""
    head_tensors: tuple[str, ...] = ("score.",)
    """Prefixes of the sequence classifier's head tensors (transformers' names, outside the backbone)."""
    optional: tuple[str, ...] = ()
    """Prefixes of lmforge tensors a checkpoint may lack (heads of other classes: BertForMaskedLM has no pooler,
    BertModel no masked-LM head); import initialises them fresh, as transformers does."""
    exported: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """transformers class -> the prefixes of lmforge tensors it leaves out (BertForMaskedLM: the pooler)."""
    from_weights: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """A transformers tensor name -> config fields its presence sets (``cls.seq_relationship.weight``: nsp)."""

    @property
    def config_class(self) -> type:
        """The lmforge config this architecture's models have."""
        return EncoderConfig if self.encoder else GPTConfig

    def architecture(self, classify: bool = False, config: ModelConfig | None = None) -> str:
        """The transformers class: the language model's (an encoder's with the next-sentence head when
        ``config`` has one), or the sequence classifier's."""
        if classify:
            return self.classifier
        if self.pretraining and getattr(config, "nsp", False):
            return self.pretraining
        return self.causal_lm

    def leaves_out(self, architecture: str) -> tuple[str, ...]:
        """Prefixes of the lmforge tensors transformers' ``architecture`` has no place for."""
        return self.exported.get(architecture, ())

    def is_optional(self, name: str) -> bool:
        """Whether a checkpoint may lack the lmforge tensor ``name`` (it starts fresh)."""
        return name.startswith(self.optional)

    @property
    def conv1d(self) -> bool:
        """Whether transformers stores some of its Linear weights (in, out) (PEFT's ``fan_in_fan_out``)."""
        return any(w.conv1d for w in self.weights)

    def is_buffer(self, name: str) -> bool:
        """Whether the transformers tensor ``name`` is a buffer that holds no weights."""
        return any(re.search(pattern, name) for pattern in self.buffers)

    def tensors(self, n_layer: int) -> dict[str, Slot]:
        """lmforge tensor name -> where transformers keeps it, for every weight and bias the template can map
        (also those a given config does not have, such as biases of a model without them)."""
        block = [w for w in self.weights if "{i}" in w.ours]
        out: dict[str, Slot] = {}
        for entry in self.weights:
            if "{i}" not in entry.ours:
                self._expand(entry, None, out)
            elif entry is block[0]:  # all layers, in order, where the block's entries start
                for i in range(n_layer):
                    for b in block:
                        self._expand(b, i, out)
        return out

    def _expand(self, entry: Weights, layer: int | None, out: dict[str, Slot]) -> None:
        siblings = [w for w in self.weights if w.theirs == entry.theirs]
        ours, theirs = entry.ours.format(i=layer), entry.theirs.format(i=layer)
        for kind in ("weight", "bias"):
            transpose = entry.conv1d and kind == "weight"
            slot = Slot(f"{theirs}.{kind}", siblings.index(entry), len(siblings), transpose, entry.linear)
            out[f"{ours}.{kind}"] = slot

    def hf_tensors(self, n_layer: int) -> dict[str, tuple[str, ...]]:
        """transformers tensor name -> the lmforge tensors it holds (fused parts in order): the inverse of
        :meth:`tensors`."""
        grouped: dict[str, list[str]] = {}
        for name, slot in self.tensors(n_layer).items():
            grouped.setdefault(slot.hf, [""] * slot.parts)[slot.part] = name
        return {hf_name: tuple(names) for hf_name, names in grouped.items()}

    def linear_modules(self, n_layer: int) -> dict[str, tuple[str, int, int]]:
        """lmforge Linear module name -> (transformers module name, part index, number of parts)."""
        return {
            name.removesuffix(".weight"): (slot.hf.removesuffix(".weight"), slot.part, slot.parts)
            for name, slot in self.tensors(n_layer).items()
            if slot.linear and name.endswith(".weight")
        }

    def lora_aliases(self) -> dict[str, tuple[str, ...]]:
        """transformers Linear module names (as PEFT targets name them) -> the lmforge modules they stand for,
        named within a block, where the names differ: ``{"o_proj": ("attn.c_proj",)}``."""
        out: dict[str, tuple[str, ...]] = {}
        for entry in self.weights:
            theirs = entry.theirs.rsplit(".", 1)[-1]
            ours = entry.ours.split("{i}.", 1)[-1]
            if entry.linear and theirs != ours.rsplit(".", 1)[-1]:
                out[theirs] = (*out.get(theirs, ()), ours)
        return out

    def to_hf(self, state: dict[str, Tensor], n_layer: int, transpose: bool = True) -> dict[str, Tensor]:
        """The tensors of ``state`` the template maps, under their transformers names, fused parts concatenated;
        stored (in, out) where transformers does, unless ``transpose`` is False (llama.cpp keeps (out, in))."""
        slots = self.tensors(n_layer)
        out: dict[str, Tensor] = {}
        for hf_name, names in self.hf_tensors(n_layer).items():
            if not any(name in state for name in names):
                continue
            # (sum of parts' out, in): a fused tensor needs all of its parts
            tensor = state[names[0]] if len(names) == 1 else torch.cat([state[name] for name in names], dim=0)
            out[hf_name] = tensor.t().contiguous() if transpose and slots[names[0]].transpose else tensor
        return out


# -- the families ----------------------------------------------------------------------------------


def _gpt2_check_export(config: GPTConfig) -> str | None:
    if not config.bias:
        return "model has no biases; GPT-2 (learned positions, LayerNorm, GELU) needs bias: true"
    if config.kv_heads != config.n_head:
        return f"model uses grouped-query attention (n_kv_head={config.kv_heads}), which GPT-2 cannot express"
    if not config.has_qkv_bias:
        return "model has no q, k and v biases; GPT-2 has every bias or none"
    if config.sliding_window is not None:
        return f"model has sliding_window={config.sliding_window}; GPT-2 has no sliding-window attention"
    return None


def _llama_check_import(values: dict, got: dict[str, Any]) -> str | None:
    if bool(values.get("attention_bias", False)) != bool(values.get("mlp_bias", False)):
        return (
            f"attention_bias={values.get('attention_bias')!r} differs from mlp_bias={values.get('mlp_bias')!r}; "
            "lmforge has one bias switch"
        )
    return _rope_family_check_import(values, got)


def _rope_family_check_import(values: dict, got: dict[str, Any]) -> str | None:
    """What Llama, Qwen2 and Mistral configs share that lmforge cannot load: another head_dim, another RoPE."""
    head_dim = got["n_embd"] // got["n_head"]
    if values.get("head_dim") not in (None, head_dim):
        return (
            f"head_dim={values['head_dim']!r} differs from hidden_size / num_attention_heads = {head_dim}; "
            "not supported"
        )
    rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        key = "rope_parameters" if values.get("rope_parameters") else "rope_scaling"
        return f"{key} uses rope_type={rope_type!r}; only the default RoPE is supported"
    return None


GPT2 = Family(
    name="gpt2",
    display="GPT-2",
    causal_lm="GPT2LMHeadModel",
    classifier="GPT2ForSequenceClassification",
    features={"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu"},
    fixed={"bias": True},
    config=(
        Key("vocab_size", "vocab_size"),
        Key("n_positions", "block_size", read=("n_positions", "n_ctx"), default=1024),
        Key("n_embd", "n_embd"),
        Key("n_layer", "n_layer"),
        Key("n_head", "n_head"),
        Key("n_inner", "mlp_hidden", attr="mlp_width", default=lambda got: 4 * got["n_embd"]),
        Fixed(
            "activation_function",
            GPT2_ACTIVATIONS[0],
            accept=GPT2_ACTIVATIONS[1:],
            why=f"is not supported (lmforge's GPT-2 MLP is {' / '.join(GPT2_ACTIVATIONS)})",
        ),
        Fixed("scale_attn_by_inverse_layer_idx", False, why="is not supported", written=False),
        Key("layer_norm_epsilon", "norm_eps", default=1e-5),
        Key("tie_word_embeddings", "tie_embeddings", default=True),
        Fixed("resid_pdrop", 0.0),
        Fixed("embd_pdrop", 0.0),
        Fixed("attn_pdrop", 0.0),
        Fixed("scale_attn_weights", True, why="is not supported (lmforge always scales by 1/sqrt(head_dim))"),
    ),
    weights=(
        Weights("wte", "transformer.wte"),
        Weights("wpe", "transformer.wpe"),
        Weights("blocks.{i}.ln_1", "transformer.h.{i}.ln_1"),
        Weights("blocks.{i}.attn.q_proj", "transformer.h.{i}.attn.c_attn", linear=True, conv1d=True),
        Weights("blocks.{i}.attn.k_proj", "transformer.h.{i}.attn.c_attn", linear=True, conv1d=True),
        Weights("blocks.{i}.attn.v_proj", "transformer.h.{i}.attn.c_attn", linear=True, conv1d=True),
        Weights("blocks.{i}.attn.c_proj", "transformer.h.{i}.attn.c_proj", linear=True, conv1d=True),
        Weights("blocks.{i}.ln_2", "transformer.h.{i}.ln_2"),
        Weights("blocks.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_fc", linear=True, conv1d=True),
        Weights("blocks.{i}.mlp.c_proj", "transformer.h.{i}.mlp.c_proj", linear=True, conv1d=True),
        Weights("ln_f", "transformer.ln_f"),
        Weights("lm_head", "lm_head", linear=True),  # an nn.Linear in transformers too
    ),
    check_export=_gpt2_check_export,
    buffers=(r"(^|\.)attn\.(bias|masked_bias)$",),  # old checkpoints' causal masks
    bare_prefix="transformer.",
    gguf_arch="gpt2",
)

LLAMA = Family(
    name="llama",
    display="Llama",
    causal_lm="LlamaForCausalLM",
    classifier="LlamaForSequenceClassification",
    features={"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
    config=(
        Key("vocab_size", "vocab_size"),
        Key("max_position_embeddings", "block_size", default=2048),
        Key("hidden_size", "n_embd"),
        Key("intermediate_size", "mlp_hidden", attr="mlp_width"),
        Key("num_hidden_layers", "n_layer"),
        Key("num_attention_heads", "n_head"),
        Key("num_key_value_heads", "n_kv_head", attr="kv_heads", default=lambda got: got["n_head"]),
        Key("head_dim", None, attr="head_dim"),
        Fixed("hidden_act", "silu", why="is not supported (Llama's SwiGLU uses silu)"),
        Key("rms_norm_eps", "norm_eps", default=1e-6),
        Key(
            "rope_theta",
            "rope_theta",
            read=("rope_parameters.rope_theta", "rope_scaling.rope_theta", "rope_theta"),
            default=10000.0,
            cast=float,
        ),
        Key("rope_parameters", None, write=lambda config: {"rope_type": "default", "rope_theta": config.rope_theta}),
        Key("attention_bias", "bias", default=False, cast=bool),
        Key("mlp_bias", None, attr="bias"),
        Fixed("attention_dropout", 0.0),
        Key("tie_word_embeddings", "tie_embeddings", default=False),
        Fixed("pretraining_tp", 1, why="is not supported (must be 1)", written=False),
    ),
    weights=(
        Weights("wte", "model.embed_tokens"),
        Weights("blocks.{i}.ln_1", "model.layers.{i}.input_layernorm"),
        Weights("blocks.{i}.attn.q_proj", "model.layers.{i}.self_attn.q_proj", linear=True),
        Weights("blocks.{i}.attn.k_proj", "model.layers.{i}.self_attn.k_proj", linear=True),
        Weights("blocks.{i}.attn.v_proj", "model.layers.{i}.self_attn.v_proj", linear=True),
        Weights("blocks.{i}.attn.c_proj", "model.layers.{i}.self_attn.o_proj", linear=True),
        Weights("blocks.{i}.ln_2", "model.layers.{i}.post_attention_layernorm"),
        Weights("blocks.{i}.mlp.gate", "model.layers.{i}.mlp.gate_proj", linear=True),
        Weights("blocks.{i}.mlp.c_fc", "model.layers.{i}.mlp.up_proj", linear=True),
        Weights("blocks.{i}.mlp.c_proj", "model.layers.{i}.mlp.down_proj", linear=True),
        Weights("ln_f", "model.norm"),
        Weights("lm_head", "lm_head", linear=True),
    ),
    check_import=_llama_check_import,
    buffers=(r"rotary_emb\.inv_freq$",),  # RoPE tables of old checkpoints
    gguf_arch="llama",
)
# lmforge's RoPE uses transformers' rotate-half layout, so Llama's q and k weights are copied as they are.


def _rope_keys(block_size: int) -> tuple[Key | Fixed, ...]:
    """The config.json keys Qwen2 and Mistral share with Llama (up to rms_norm_eps, in transformers' order):
    the sizes, with no default for num_key_value_heads (theirs is a fixed number, not num_attention_heads)."""
    return (
        Key("vocab_size", "vocab_size"),
        Key("max_position_embeddings", "block_size", default=block_size),
        Key("hidden_size", "n_embd"),
        Key("intermediate_size", "mlp_hidden", attr="mlp_width"),
        Key("num_hidden_layers", "n_layer"),
        Key("num_attention_heads", "n_head"),
        Key("num_key_value_heads", "n_kv_head", attr="kv_heads"),
        Fixed("hidden_act", "silu", why="is not supported (the SwiGLU MLP uses silu)"),
        Key("rms_norm_eps", "norm_eps", default=1e-6),
    )


_ROPE_THETA = (
    Key(
        "rope_theta",
        "rope_theta",
        read=("rope_parameters.rope_theta", "rope_scaling.rope_theta", "rope_theta"),
        default=10000.0,  # transformers' default for Qwen2 and Mistral too (released Qwen2 models set 1e6)
        cast=float,
    ),
    Key("rope_parameters", None, write=lambda config: {"rope_type": "default", "rope_theta": config.rope_theta}),
)


def _qwen2_check_export(config: GPTConfig) -> str | None:
    if config.bias:
        return "model has biases everywhere but on q, k and v, which no transformers architecture expresses"
    if config.sliding_window is not None:
        return (
            f"model has q, k and v biases and sliding_window={config.sliding_window}; "
            "Qwen2's sliding window is not supported"
        )
    return None


def _mistral_check_export(config: GPTConfig) -> str | None:
    if config.bias:
        return f"model has biases and sliding_window={config.sliding_window}; Mistral has no biases"
    return None


QWEN2 = Family(
    name="qwen2",
    display="Qwen2",
    causal_lm="Qwen2ForCausalLM",
    classifier="Qwen2ForSequenceClassification",
    features=LLAMA.features,
    fixed={"bias": False, "qkv_bias": True},
    claims=lambda config: config.has_qkv_bias != config.bias,
    config=(
        *_rope_keys(32768),
        Key("tie_word_embeddings", "tie_embeddings", default=False),
        *_ROPE_THETA,
        Fixed("use_sliding_window", False, why="is not supported (lmforge's Qwen2 attends to the whole context)"),
        Fixed("attention_dropout", 0.0),
    ),
    weights=LLAMA.weights,  # with the biases of q_proj, k_proj and v_proj
    check_import=_rope_family_check_import,
    check_export=_qwen2_check_export,
    buffers=LLAMA.buffers,
    gguf_arch="qwen2",
)

MISTRAL = Family(
    name="mistral",
    display="Mistral",
    causal_lm="MistralForCausalLM",
    classifier="MistralForSequenceClassification",
    features=LLAMA.features,
    fixed={"bias": False},
    claims=lambda config: config.sliding_window is not None,  # without one it is a Llama
    config=(
        *_rope_keys(4096 * 32),
        Key("head_dim", None, attr="head_dim"),
        Key("tie_word_embeddings", "tie_embeddings", default=False),
        *_ROPE_THETA,
        Key("sliding_window", "sliding_window", default=4096, null=True),
        Fixed("attention_dropout", 0.0),
    ),
    weights=LLAMA.weights,
    check_import=_rope_family_check_import,
    check_export=_mistral_check_export,
    buffers=LLAMA.buffers,
    gguf_arch="llama",  # llama.cpp converts MistralForCausalLM as llama
)


# -- encoders -------------------------------------------------------------------------------------

_ENCODER_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
"""transformers' ``hidden_act`` / ``activation`` names -> EncoderConfig.activation (exact erf GELU, or tanh's)."""


def _encoder_activation(value: Any) -> str:
    if value not in _ENCODER_ACTIVATIONS:
        raise ValueError(f"activation {value!r} is not supported (lmforge's encoder MLP is gelu or gelu_new)")
    return _ENCODER_ACTIVATIONS[value]


def _hf_activation(config: EncoderConfig) -> str:
    return "gelu" if config.activation == "gelu" else "gelu_new"


def _bert_check_export(config: EncoderConfig) -> str | None:
    if config.type_vocab_size < 1:
        return "model has no token types (type_vocab_size=0) but a pooler; BERT has both, DistilBERT neither"
    return None


def _distilbert_check_export(config: EncoderConfig) -> str | None:
    if config.norm_eps != 1e-12:
        return f"model has norm_eps={config.norm_eps:g}; DistilBERT's LayerNorms have eps 1e-12"
    return None


_ENCODER_BUFFERS = (r"(^|\.)embeddings\.(position_ids|token_type_ids)$",)  # index tables of older checkpoints

BERT = Family(
    name="bert",
    display="BERT",
    causal_lm="BertForMaskedLM",
    classifier="BertForSequenceClassification",
    pretraining="BertForPreTraining",
    encoder=True,
    features={"norm_position": "post", "pooler": True},
    config=(
        Key("vocab_size", "vocab_size"),
        Key("hidden_size", "n_embd"),
        Key("num_hidden_layers", "n_layer"),
        Key("num_attention_heads", "n_head"),
        Key("intermediate_size", "mlp_hidden", attr="mlp_width", default=3072),
        Key("hidden_act", "activation", write=_hf_activation, default="gelu", cast=_encoder_activation),
        Key("hidden_dropout_prob", "dropout", default=0.1, cast=float),
        Key("attention_probs_dropout_prob", None, attr="dropout"),  # lmforge has one dropout rate
        Key("max_position_embeddings", "max_positions", default=512),
        Key("type_vocab_size", "type_vocab_size", default=2),
        Key("layer_norm_eps", "norm_eps", default=1e-12, cast=float),
        Fixed(
            "position_embedding_type",
            "absolute",
            why="is not supported (lmforge's BERT has learned absolute positions)",
        ),
        Fixed("is_decoder", False, why="is not supported (lmforge's BERT is a bidirectional encoder)"),
        Fixed("add_cross_attention", False, why="is not supported (no cross-attention)", written=False),
        Fixed("tie_word_embeddings", True, why="is not supported (the masked-LM decoder is the word embedding)"),
    ),
    weights=(
        Weights("wte", "bert.embeddings.word_embeddings"),
        Weights("wpe", "bert.embeddings.position_embeddings"),
        Weights("wtt", "bert.embeddings.token_type_embeddings"),
        Weights("ln_emb", "bert.embeddings.LayerNorm"),
        Weights("blocks.{i}.attn.q_proj", "bert.encoder.layer.{i}.attention.self.query", linear=True),
        Weights("blocks.{i}.attn.k_proj", "bert.encoder.layer.{i}.attention.self.key", linear=True),
        Weights("blocks.{i}.attn.v_proj", "bert.encoder.layer.{i}.attention.self.value", linear=True),
        Weights("blocks.{i}.attn.c_proj", "bert.encoder.layer.{i}.attention.output.dense", linear=True),
        Weights("blocks.{i}.ln_1", "bert.encoder.layer.{i}.attention.output.LayerNorm"),
        Weights("blocks.{i}.mlp.c_fc", "bert.encoder.layer.{i}.intermediate.dense", linear=True),
        Weights("blocks.{i}.mlp.c_proj", "bert.encoder.layer.{i}.output.dense", linear=True),
        Weights("blocks.{i}.ln_2", "bert.encoder.layer.{i}.output.LayerNorm"),
        Weights("pooler", "bert.pooler.dense", linear=True),
        Weights("mlm_head", "cls.predictions"),  # its bias; the decoder weight is the word embedding
        Weights("mlm_head.dense", "cls.predictions.transform.dense", linear=True),
        Weights("mlm_head.ln", "cls.predictions.transform.LayerNorm"),
        Weights("nsp_head", "cls.seq_relationship", linear=True),
    ),
    check_export=_bert_check_export,
    buffers=(*_ENCODER_BUFFERS, r"^cls\.predictions\.decoder\.(weight|bias)$"),  # tied copies in .bin files
    bare_prefix="bert.",
    head_tensors=("classifier.",),
    optional=("pooler.", "mlm_head.", "nsp_head."),
    exported={
        "BertForMaskedLM": ("pooler.", "nsp_head."),
        "BertForSequenceClassification": ("mlm_head.", "nsp_head."),
    },
    from_weights={"cls.seq_relationship.weight": {"nsp": True}},
)

DISTILBERT = Family(
    name="distilbert",
    display="DistilBERT",
    causal_lm="DistilBertForMaskedLM",
    classifier="DistilBertForSequenceClassification",
    encoder=True,
    features={"norm_position": "post", "pooler": False, "type_vocab_size": 0},
    fixed={"norm_eps": 1e-12},
    config=(
        Key("vocab_size", "vocab_size"),
        Key("dim", "n_embd", default=768),
        Key("n_layers", "n_layer", default=6),
        Key("n_heads", "n_head", default=12),
        Key("hidden_dim", "mlp_hidden", attr="mlp_width", default=3072),
        Key("activation", "activation", write=_hf_activation, default="gelu", cast=_encoder_activation),
        Key("dropout", "dropout", default=0.1, cast=float),
        Key("attention_dropout", None, attr="dropout"),
        Key("max_position_embeddings", "max_positions", default=512),
        Fixed("sinusoidal_pos_embds", False, why="is not supported (lmforge's DistilBERT has learned positions)"),
        Fixed("tie_word_embeddings", True, why="is not supported (the masked-LM decoder is the word embedding)"),
    ),
    weights=(
        Weights("wte", "distilbert.embeddings.word_embeddings"),
        Weights("wpe", "distilbert.embeddings.position_embeddings"),
        Weights("ln_emb", "distilbert.embeddings.LayerNorm"),
        Weights("blocks.{i}.attn.q_proj", "distilbert.transformer.layer.{i}.attention.q_lin", linear=True),
        Weights("blocks.{i}.attn.k_proj", "distilbert.transformer.layer.{i}.attention.k_lin", linear=True),
        Weights("blocks.{i}.attn.v_proj", "distilbert.transformer.layer.{i}.attention.v_lin", linear=True),
        Weights("blocks.{i}.attn.c_proj", "distilbert.transformer.layer.{i}.attention.out_lin", linear=True),
        Weights("blocks.{i}.ln_1", "distilbert.transformer.layer.{i}.sa_layer_norm"),
        Weights("blocks.{i}.mlp.c_fc", "distilbert.transformer.layer.{i}.ffn.lin1", linear=True),
        Weights("blocks.{i}.mlp.c_proj", "distilbert.transformer.layer.{i}.ffn.lin2", linear=True),
        Weights("blocks.{i}.ln_2", "distilbert.transformer.layer.{i}.output_layer_norm"),
        Weights("mlm_head.dense", "vocab_transform", linear=True),
        Weights("mlm_head.ln", "vocab_layer_norm"),
        Weights("mlm_head", "vocab_projector"),  # its bias; the weight is the word embedding
    ),
    check_export=_distilbert_check_export,
    buffers=(*_ENCODER_BUFFERS, r"^vocab_projector\.weight$"),  # the tied decoder, in older checkpoints
    bare_prefix="distilbert.",
    head_tensors=("pre_classifier.", "classifier."),
    optional=("mlm_head.",),
    exported={"DistilBertForSequenceClassification": ("mlm_head.",)},
)

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, LLAMA, QWEN2, MISTRAL, BERT, DISTILBERT)}
"""model_type -> Family: every architecture lmforge reads and writes."""


# -- lookups ---------------------------------------------------------------------------------------


def family(name: Any, where: str | None = None) -> Family:
    """The entry for ``name``; an HFError for an unsupported one, naming the config file ``where`` if given."""
    if name in FAMILIES:
        return FAMILIES[name]
    if where is not None:
        raise HFError(
            f"{where}: model_type={name!r} is not supported; lmforge loads {_and(list(FAMILIES))} checkpoints"
        )
    raise HFError(f"unknown family {name!r}; one of {', '.join(FAMILIES)}")


def _and(words: list[str]) -> str:
    """``a, b and c``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _has_features(config: ModelConfig, fam: Family) -> bool:
    return isinstance(config, fam.config_class) and all(getattr(config, k) == v for k, v in fam.features.items())


def claimant(config: ModelConfig) -> Family | None:
    """The first entry with the features of ``config`` that claims it (see :attr:`Family.claims`), or None."""
    return next((f for f in FAMILIES.values() if f.claims and _has_features(config, f) and f.claims(config)), None)


def family_of(config: ModelConfig) -> str:
    """The name of the family whose architecture expresses ``config`` exactly; an HFError naming why none does.

    Of the entries of the config's kind (decoder or encoder) whose features ``config`` has, the first that claims
    it, else the first that claims nothing.
    """
    fam = claimant(config) or next((f for f in FAMILIES.values() if not f.claims and _has_features(config, f)), None)
    if fam is not None:
        problem = fam.check_export(config) if fam.check_export else None
        if problem:
            raise HFError(problem)
        return fam.name
    bases = [f for f in FAMILIES.values() if f.claims is None and isinstance(config, f.config_class)]
    keys = dict.fromkeys(key for fam in bases for key in fam.features)
    have = ", ".join(f"{key}={getattr(config, key)}" for key in keys)
    known = " nor ".join(f"{fam.display} ({', '.join(map(str, fam.features.values()))})" for fam in bases)
    raise HFError(f"model ({have}) is neither {known}; transformers has no architecture for this combination")


def shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Every tensor of the model ``config`` describes (a tied head under both names) and its shape.

    Built on the meta device with the torch fallbacks: no memory, no initialisation, no GPU needed.
    """
    values = config.to_dict()
    values.update(attention="torch", loss="torch")
    with torch.device("meta"):
        model = build_model(type(config).from_dict(values))
        return {name: tensor.shape for name, tensor in model.state_dict().items()}


# -- the two kinds of model ------------------------------------------------------------------------


def config_from_dict(values: dict) -> ModelConfig:
    """The config a checkpoint or export recorded (``to_dict()``): an EncoderConfig when it has an encoder's
    fields (``max_positions``, ``type_vocab_size``), else a GPTConfig."""
    if "max_positions" in values and "block_size" not in values:
        return EncoderConfig.from_dict(values)
    return GPTConfig.from_dict(values)


def build_model(config: ModelConfig) -> GPT | Encoder:
    """The model ``config`` describes: a :class:`~lmforge.encoder.Encoder` or a :class:`~lmforge.model.GPT`."""
    return Encoder(config) if isinstance(config, EncoderConfig) else GPT(config)
