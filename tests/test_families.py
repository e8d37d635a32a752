"""lmforge.families: each entry's weight template and config map, against tiny transformers models built
offline, and a family added as one registry entry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import families, hf, hf_export, lora  # noqa: E402
from lmforge.families import FAMILIES, Fixed, HFError, Key, Weights  # noqa: E402
from lmforge.model import GPT, GPTConfig  # noqa: E402

VOCAB = 96
TINY = dict(vocab_size=VOCAB, block_size=24, n_layer=2, n_head=4, n_embd=32, rope_theta=1000.0, norm_eps=1e-5)
VARIANTS = {
    "gpt2": [dict(tie_embeddings=True), dict(tie_embeddings=False, mlp_hidden=80)],
    "llama": [
        dict(bias=False, tie_embeddings=False, n_kv_head=2, mlp_hidden=48),
        dict(bias=True, tie_embeddings=True, n_kv_head=1, mlp_hidden=48),
    ],
    "qwen2": [dict(tie_embeddings=False, n_kv_head=2, mlp_hidden=48), dict(tie_embeddings=True, mlp_hidden=48)],
    "mistral": [dict(tie_embeddings=False, n_kv_head=2, mlp_hidden=48, sliding_window=4)],
}
CASES = [(name, i) for name, variants in VARIANTS.items() for i in range(len(variants))]
DECODERS = [name for name, fam in FAMILIES.items() if not fam.encoder]  # encoders: tests/test_hf_encoder.py


def lmforge_config(name: str, variant: int) -> GPTConfig:
    fam = FAMILIES[name]
    return GPTConfig(**{**TINY, **fam.features, **fam.fixed, **VARIANTS[name][variant]})


def random_state(config: GPTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A GPT state dict with every tensor random (a tied head shares the embedding's tensor)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model.state_dict()


def transformers_model(name: str, tie: bool):
    """A tiny transformers model of the family, built from its own config class (no download); every value
    the config map reads is away from its default, so that a misread key shows."""
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=24, n_embd=32, n_layer=2, n_head=4, n_inner=80, layer_norm_epsilon=1e-4,
            tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    values = dict(
        vocab_size=VOCAB, max_position_embeddings=24, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        rms_norm_eps=1e-4, rope_theta=500.0,
    )  # fmt: skip
    if name == "mistral":
        values["sliding_window"] = 4
    fam = FAMILIES[name]
    config_class = getattr(transformers, fam.causal_lm.replace("ForCausalLM", "Config"))
    return getattr(transformers, fam.causal_lm)(config_class(**values))


# -- the weight template ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, variant", CASES)
def test_template_round_trips(name, variant):
    config = lmforge_config(name, variant)
    assert families.family_of(config) == name
    state = random_state(config)
    back, extra = hf.state_dict_from_hf(hf.state_dict_to_hf(state, config, name), config, name)
    assert not extra and set(back) == set(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key
    if config.tie_embeddings:
        assert back["lm_head.weight"] is back["wte.weight"]


@pytest.mark.parametrize("name", FAMILIES)
def test_template_is_a_bijection(name):
    fam = FAMILIES[name]
    slots = fam.tensors(3)
    places = [(slot.hf, slot.part) for slot in slots.values()]
    assert len(set(places)) == len(places) == len(slots)  # no two lmforge tensors in one place
    inverse = fam.hf_tensors(3)
    assert sum(len(names) for names in inverse.values()) == len(slots)
    for hf_name, names in inverse.items():
        assert all(names), hf_name  # every part of a fused tensor is some lmforge tensor
        for part, ours in enumerate(names):
            assert slots[ours] == slots[ours]._replace(hf=hf_name, part=part, parts=len(names))
    assert all("{" not in n for n in [*slots, *inverse]), "a placeholder was left unexpanded"
    layers = [int(n.split(".")[1]) for n in slots if n.startswith("blocks.")]
    assert layers == sorted(layers)  # layer by layer, as transformers orders its modules


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("tie", [False, True])
def test_template_covers_every_transformers_weight(name, tie):
    ref = transformers_model(name, tie)
    ref_state = {k: v for k, v in ref.state_dict().items() if not FAMILIES[name].is_buffer(k)}
    config, family = hf.config_from_hf(ref.config.to_dict())
    assert family == name and config.tie_embeddings is tie
    covered = FAMILIES[name].hf_tensors(config.n_layer)
    assert set(ref_state) <= set(covered), set(ref_state) - set(covered)
    # and the export of an lmforge model of that config is exactly transformers' state dict
    ours = hf.state_dict_to_hf(random_state(config), config, name)
    assert set(ours) == set(ref_state) - ({"lm_head.weight"} if tie else set())
    for key, tensor in ours.items():
        assert tensor.shape == ref_state[key].shape, key
    assert ref.load_state_dict(ours, strict=False).unexpected_keys == []


@pytest.mark.parametrize("name", DECODERS)
def test_linear_modules_and_lora_names_come_from_the_template(name):
    fam = FAMILIES[name]
    modules = hf.linear_module_map(name, 2)
    model = GPT(lmforge_config(name, 0))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(modules) == linears
    for theirs, ours in fam.lora_aliases().items():
        for target in ours:  # every alias names Linear modules of the model, and the HF module holds them
            assert any(n.endswith("." + target) and modules[n][0].endswith("." + theirs) for n in linears), target
    assert fam.conv1d is any(w.conv1d for w in fam.weights)
    assert lora.ALIASES == lora.aliases() and "c_attn" in lora.ALIASES and "o_proj" in lora.ALIASES


def test_gguf_names_derive_from_the_template():
    gguf = pytest.importorskip("gguf")
    for fam in (f for f in FAMILIES.values() if f.gguf_arch):
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == fam.gguf_arch)
        names = gguf.TensorNameMap(arch, 2)
        for hf_name in fam.hf_tensors(2):
            mapped = names.get_type_and_name(hf_name.rpartition(".")[0])
            assert mapped is not None and mapped[0] in gguf.MODEL_TENSORS[arch], (fam.name, hf_name)


# -- the config map --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, variant", CASES)
def test_config_map_round_trips_from_lmforge(name, variant):
    config = lmforge_config(name, variant)
    values = hf.config_to_hf(config)
    assert values["model_type"] == name and list(values)[0] == "model_type"
    back, family = hf.config_from_hf(values)
    assert family == name and back.shape() == config.shape()
    assert (back.norm_eps, back.rope_theta) == (config.norm_eps, 10000.0 if name == "gpt2" else config.rope_theta)
    # transformers reads the same architecture from it
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**values))
    assert type(ref).__name__ == FAMILIES[name].causal_lm


@pytest.mark.parametrize("name", DECODERS)
def test_config_map_round_trips_from_transformers(name):
    values = transformers_model(name, tie=False).config.to_dict()
    config, _ = hf.config_from_hf(values)
    written = hf.config_to_hf(config)

    def fields(values: dict) -> dict:
        got: dict = {}
        for entry in FAMILIES[name].config:
            if isinstance(entry, Key) and entry.field is not None:
                got[entry.field] = entry.from_hf(values, got)
        return got

    assert fields(written) == fields(values)  # every field, read from transformers' file or from ours
    assert config.norm_eps == 1e-4 and config.mlp_width == (80 if name == "gpt2" else 48)
    assert config.rope_theta == (10000.0 if name == "gpt2" else 500.0)
    for entry in FAMILIES[name].config:
        if isinstance(entry, Fixed) and entry.written:
            assert written[entry.key] == entry.value
    assert hf.config_from_hf(written)[0] == config


@pytest.mark.parametrize("name", DECODERS)
def test_fixed_keys_refuse_other_values(name):
    values = hf.config_to_hf(lmforge_config(name, 0))
    for entry in FAMILIES[name].config:
        if isinstance(entry, Fixed) and entry.why is not None:
            with pytest.raises(HFError) as err:
                hf.config_from_hf({**values, entry.key: "something else"})
            assert str(err.value) == f"config.json: {entry.key}='something else' {entry.why}"


def test_unknown_model_type_is_one_line():
    with pytest.raises(HFError) as err:
        hf.config_from_hf({"model_type": "t5", "vocab_size": 10})
    assert str(err.value) == (
        "config.json: model_type='t5' is not supported; lmforge loads gpt2, llama, qwen2, mistral, bert and "
        "distilbert checkpoints"
    )
    with pytest.raises(HFError) as err:
        families.family("t5")
    assert str(err.value) == "unknown family 't5'; one of gpt2, llama, qwen2, mistral, bert, distilbert"
    with pytest.raises(HFError, match="unknown family"):
        hf.state_dict_from_hf({}, lmforge_config("llama", 0), "t5")


def test_legacy_names_derive_from_the_table():
    assert hf.FAMILIES is FAMILIES and hf.HFError is HFError and hf.family_of is families.family_of
    assert hf_export.ARCHITECTURES == {
        ("gpt2", False): "GPT2LMHeadModel",
        ("llama", False): "LlamaForCausalLM",
        ("gpt2", True): "GPT2ForSequenceClassification",
        ("llama", True): "LlamaForSequenceClassification",
        ("qwen2", False): "Qwen2ForCausalLM",
        ("qwen2", True): "Qwen2ForSequenceClassification",
        ("mistral", False): "MistralForCausalLM",
        ("mistral", True): "MistralForSequenceClassification",
        ("bert", False): "BertForMaskedLM",
        ("bert", True): "BertForSequenceClassification",
        ("distilbert", False): "DistilBertForMaskedLM",
        ("distilbert", True): "DistilBertForSequenceClassification",
    }
    assert hf_export.FAMILY_NAMES == {
        "gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "bert": "BERT",
        "distilbert": "DistilBERT",
    }  # fmt: skip
    with pytest.raises(AttributeError):
        hf_export.NO_SUCH_NAME  # noqa: B018


# -- adding a family ------------------------------------------------------------------------------------

RENAMES = {"model.": "decoder.", "self_attn.q_proj": "attention.wq", "self_attn.o_proj": "attention.wo"}


def _renamed(theirs: str) -> str:
    for old, new in RENAMES.items():
        theirs = theirs.replace(old, new)
    return theirs


@pytest.fixture
def minillama(monkeypatch) -> families.Family:
    """A made-up architecture (Llama under other names), registered for the test and removed after it."""
    fam = dataclasses.replace(
        FAMILIES["llama"],
        name="minillama",
        display="MiniLlama",
        causal_lm="MiniLlamaForCausalLM",
        classifier="MiniLlamaForSequenceClassification",
        weights=tuple(Weights(w.ours, _renamed(w.theirs), w.linear, w.conv1d) for w in FAMILIES["llama"].weights),
    )
    monkeypatch.setitem(FAMILIES, fam.name, fam)
    return fam


def test_a_family_is_one_entry(minillama):
    config = lmforge_config("llama", 0)
    values = {**hf.config_to_hf(config), "model_type": "minillama"}
    read, family = hf.config_from_hf(values)
    assert family == "minillama" and read.shape() == config.shape()
    assert hf.config_to_hf(read, "minillama") == values

    state = random_state(config)
    theirs = hf.state_dict_to_hf(state, config, "minillama")
    assert "decoder.layers.1.attention.wq.weight" in theirs and "decoder.embed_tokens.weight" in theirs
    assert not any(k.startswith("model.") for k in theirs)
    back, extra = hf.state_dict_from_hf(theirs, config, "minillama")
    assert not extra and all(torch.equal(back[k], v) for k, v in state.items())
    with pytest.raises(HFError, match="missing tensor 'decoder.layers.0.attention.wo.weight'; .* minillama"):
        hf.state_dict_from_hf({k: v for k, v in theirs.items() if "0.attention.wo" not in k}, config, "minillama")

    # LoRA: the family's module names, and its Hugging Face names as aliases of lmforge targets
    assert hf.linear_module_map("minillama", 2)["blocks.1.attn.q_proj"] == ("decoder.layers.1.attention.wq", 0, 1)
    assert lora.aliases()["wq"] == ("attn.q_proj",) and lora.ALIASES["wo"] == ("attn.c_proj",)
    wrapped = lora.apply_lora(GPT(config), r=2, targets=["wq", "wo"])
    assert wrapped == [f"blocks.{i}.attn.{m}" for i in range(2) for m in ("q_proj", "c_proj")]

    assert families.family_of(config) == "llama"  # same features: the first entry expresses it
    with pytest.raises(HFError, match="nor MiniLlama"):
        families.family_of(GPTConfig(**{**TINY, "pos_encoding": "rope", "norm": "layernorm"}))


def test_the_added_family_is_gone_after_the_test():
    assert "minillama" not in FAMILIES and "wq" not in lora.aliases()
