"""Qwen2 and Mistral as lmforge families, against tiny random transformers models built offline: import, export
through the hf exporter, greedy generation (with and without the KV cache), GGUF, and what is refused."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import VOCAB, _perturb, batch, one_line_error  # noqa: E402
from test_hf_export import save_ckpt  # noqa: E402

from lmforge import families, hf  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.export import export  # noqa: E402
from lmforge.generate import generate_ids  # noqa: E402
from lmforge.hf import HFError  # noqa: E402
from lmforge.model import GPT, GPTConfig  # noqa: E402
from lmforge.tokenizers import ByteTokenizer  # noqa: E402

WINDOW = 4
"""Mistral's sliding window: well inside the sequences of 12 (and the 26 tokens of a generation)."""
SIZES = dict(
    vocab_size=VOCAB, max_position_embeddings=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
)  # fmt: skip
# no end-of-text token: every generation runs its max_new_tokens, in transformers as in lmforge


def qwen2(tie: bool = False, **kw):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**SIZES, "tie_word_embeddings": tie, "rope_theta": 1e6, **kw})
    return _perturb(transformers.Qwen2ForCausalLM(config))


def mistral(window: int | None = WINDOW, **kw):
    torch.manual_seed(0)
    config = transformers.MistralConfig(**{**SIZES, "sliding_window": window, "rope_theta": 500.0, **kw})
    return _perturb(transformers.MistralForCausalLM(config))


MODELS = {"qwen2-untied": lambda: qwen2(), "qwen2-tied": lambda: qwen2(tie=True), "mistral": lambda: mistral()}
EACH = pytest.mark.parametrize("name", MODELS)


def logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)


def imported(tmp_path, name):
    """(transformers model, lmforge model loaded from its save_pretrained folder, info)."""
    ref = MODELS[name]()
    ref.save_pretrained(tmp_path / "ref")
    model, _, info = hf.load_model(tmp_path / "ref")
    return ref, model.eval(), info


# -- import ----------------------------------------------------------------------------------------------


@EACH
def test_import_gives_transformers_logits(tmp_path, name):
    ref, model, info = imported(tmp_path, name)
    c = model.config
    assert info["family"] == name.split("-")[0] == hf.family_of(c)
    assert (c.pos_encoding, c.norm, c.mlp, c.bias, c.kv_heads) == ("rope", "rmsnorm", "swiglu", False, 2)
    if name.startswith("qwen2"):
        assert c.has_qkv_bias and c.sliding_window is None and c.rope_theta == 1e6
        assert c.tie_embeddings is (name == "qwen2-tied")
        assert model.blocks[0].attn.q_proj.bias is not None and model.blocks[0].attn.c_proj.bias is None
    else:
        assert not c.has_qkv_bias and c.sliding_window == WINDOW and c.rope_theta == 500.0
    x = batch(T=12)
    with torch.no_grad():
        logits_close(model(x), ref(x).logits)
        model.config.attention = "torch"  # the torch fallback computes the window the same way
        logits_close(model(x), ref(x).logits)


def test_the_window_matters_and_hides_what_is_older():
    """At one layer, position i sees tokens i - W + 1 .. i only; with the window off the output changes."""
    config = GPTConfig(
        vocab_size=VOCAB, block_size=12, n_layer=1, n_head=2, n_embd=16, pos_encoding="rope", norm="rmsnorm",
        mlp="swiglu", bias=False, sliding_window=WINDOW, attention="torch",
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config).eval()
    x = batch(T=12)
    changed = x.clone()
    changed[:, : 12 - WINDOW] = (changed[:, : 12 - WINDOW] + 1) % VOCAB  # all but the last window's tokens
    with torch.no_grad():
        assert torch.equal(model(x)[:, -1], model(changed)[:, -1])
        assert not torch.allclose(model(x)[:, -2], model(changed)[:, -2])  # its window reaches a changed token
        model.config.sliding_window = None
        assert not torch.allclose(model(x)[:, -1], model(changed)[:, -1])


def test_cached_decoding_keeps_the_window(tmp_path):
    ref, model, _ = imported(tmp_path, "mistral")
    x = batch(T=12)
    cache = model.new_kv_cache(x.size(0))
    with torch.no_grad():
        steps = [model(x[:, :5], kv_cache=cache)] + [model(x[:, t : t + 1], kv_cache=cache) for t in range(5, 12)]
        logits_close(torch.cat(steps, dim=1), ref(x).logits)


# -- export ----------------------------------------------------------------------------------------------


@EACH
def test_export_loads_in_transformers(tmp_path, name):
    ref, model, _ = imported(tmp_path, name)
    out = export(save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer()), tmp_path / "hf", "hf")
    fam = families.FAMILIES[name.split("-")[0]]
    values = json.loads((out / "config.json").read_text())
    assert values["model_type"] == fam.name and values["architectures"] == [fam.causal_lm]
    assert f"| family | {fam.display} (`{fam.name}`) |" in (out / "README.md").read_text()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == fam.causal_lm
    assert back.config.tie_word_embeddings is model.config.tie_embeddings
    x = batch(T=12)
    with torch.no_grad():
        logits_close(back(x).logits, ref(x).logits)
    assert hf.load_model(out)[0].config.shape() == model.config.shape()


@EACH
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_greedy_generation_matches_transformers(tmp_path, name, use_cache):
    ref, model, _ = imported(tmp_path, name)
    rows = [[5, 17, 200, 3, 99, 41], [7, 250, 12], [64, 1, 300, 18, 77]]
    for ids in rows:
        x = torch.tensor([ids])
        with torch.no_grad():
            theirs = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20)
        assert generate_ids(model, [ids], max_new_tokens=20, use_cache=use_cache) == [theirs[0, len(ids) :].tolist()]
    # left-padded together: the window counts slots, padding included, in transformers as in lmforge
    width = max(map(len, rows))
    x = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        theirs = ref.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0)
    assert generate_ids(model, rows, max_new_tokens=20, use_cache=use_cache) == theirs[:, width:].tolist()


def test_lora_targets_use_the_transformers_names():
    for name in ("qwen2", "mistral"):
        modules = hf.linear_module_map(name, 2)
        assert modules["blocks.1.attn.q_proj"] == ("model.layers.1.self_attn.q_proj", 0, 1)
        assert modules["blocks.0.attn.c_proj"] == ("model.layers.0.self_attn.o_proj", 0, 1)
        assert families.FAMILIES[name].lora_aliases()["o_proj"] == ("attn.c_proj",)


# -- GGUF ----------------------------------------------------------------------------------------------


def test_gguf_qwen2_keeps_q_k_v_biases_unpermuted(tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("lmforge_gguf")
    ref, model, _ = imported(tmp_path, "qwen2-untied")
    out = export(save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer()), tmp_path / "gguf", "gguf", dtype="f32")
    (file,) = out.iterdir()
    reader = gguf.GGUFReader(file)
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["qwen2.rope.freq_base"].contents() == 1e6
    tensors = {t.name: t for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= set(tensors)
    assert not any(n.endswith(("attn_output.bias", "ffn_up.bias", "ffn_down.bias")) for n in tensors)
    attn = ref.model.layers[1].self_attn
    for ours, theirs in (("attn_q", attn.q_proj), ("attn_k", attn.k_proj)):  # rotate-half RoPE: as they are
        for kind in ("weight", "bias"):
            data = torch.from_numpy(tensors[f"blk.1.{ours}.{kind}"].data.copy()).reshape(getattr(theirs, kind).shape)
            assert torch.equal(data, getattr(theirs, kind).detach()), (ours, kind)


def test_gguf_mistral_only_with_a_window_as_long_as_the_context(tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("lmforge_gguf")
    _, model, _ = imported(tmp_path, "mistral")
    ckpt = save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer())
    with pytest.raises(UserError) as err:
        export(ckpt, tmp_path / "gguf", "gguf")
    one_line_error(err, "sliding_window=4 is shorter than the context (block_size=32)", "llama.cpp's llama")
    model.config.sliding_window = model.config.block_size  # never binds: llama.cpp computes the same
    out = export(save_ckpt(tmp_path / "full.ckpt", model, ByteTokenizer()), tmp_path / "gguf", "gguf")
    (file,) = out.iterdir()
    assert gguf.GGUFReader(file).fields["general.architecture"].contents() == "llama"


# -- configs: what is read, written and refused -------------------------------------------------------


def test_config_maps_round_trip():
    for ref in (qwen2(), qwen2(tie=True), mistral()):
        config, family = hf.config_from_hf(ref.config.to_dict())
        written = hf.config_to_hf(config)
        assert written["model_type"] == family and hf.config_from_hf(written) == (config, family)
        theirs = transformers.AutoConfig.for_model(**written)
        assert type(transformers.AutoModelForCausalLM.from_config(theirs)).__name__ == ref.__class__.__name__


def test_mistral_sliding_window_null_and_absent():
    values = mistral().config.to_dict()
    assert hf.config_from_hf({**values, "sliding_window": None})[0].sliding_window is None  # no window: a Llama
    assert hf.family_of(hf.config_from_hf({**values, "sliding_window": None})[0]) == "llama"
    absent = {k: v for k, v in values.items() if k != "sliding_window"}
    assert hf.config_from_hf(absent)[0].sliding_window == transformers.MistralConfig().sliding_window == 4096


@pytest.mark.parametrize(
    "values, needles",
    [
        ({"use_sliding_window": True}, ["use_sliding_window=True is not supported"]),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0}}, ["rope_type='yarn'"]),
        ({"head_dim": 16}, ["head_dim=16 differs"]),
        ({"hidden_act": "gelu"}, ["hidden_act='gelu' is not supported"]),
    ],
)
def test_qwen2_refusals_are_one_line(values, needles):
    with pytest.raises(HFError) as err:
        hf.config_from_hf({**qwen2().config.to_dict(), **values})
    one_line_error(err, *needles)


@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(bias=True, qkv_bias=False), "biases everywhere but on q, k and v"),
        (dict(qkv_bias=True, sliding_window=8), "Qwen2's sliding window is not supported"),
        (dict(bias=True, sliding_window=8), "Mistral has no biases"),
        (dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, sliding_window=8), "GPT-2 has no"),
        (dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=False), "GPT-2 has every"),
    ],
)
def test_what_no_family_expresses(options, needle):
    llama = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    with pytest.raises(HFError) as err:
        hf.family_of(GPTConfig(**{**llama, **options}))
    one_line_error(err, needle)


def test_new_fields_keep_older_checkpoints_and_are_checked():
    saved = GPTConfig(bias=False).to_dict()
    del saved["qkv_bias"], saved["sliding_window"]  # a config saved before the fields existed
    assert GPTConfig.from_dict(saved).shape() == GPTConfig(bias=False, qkv_bias=False).shape()
    assert GPTConfig(bias=False).shape() != GPTConfig(bias=False, qkv_bias=True).shape()
    for key, value in (("qkv_bias", "yes"), ("sliding_window", 0), ("sliding_window", True)):
        with pytest.raises(UserError, match=f"model config: {key}="):
            GPTConfig(**{key: value})
