"""lmforge.hf against real transformers models: tiny random GPT-2 and Llama checkpoints built offline."""

import copy
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import hf  # noqa: E402
from lmforge.hf import HFError  # noqa: E402
from lmforge.model import GPT, GPTConfig  # noqa: E402
from lmforge.tokenizers import HFTokenizer  # noqa: E402

VOCAB = 320
TEXTS = [
    "Hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, ça va? 🙂 naïve café",
    "lmforge trains small language models with Lightning.",
] * 4
SAMPLES = ["Hello world", "  spaces  and\ttabs\n", "héllo 🙂 wörld", "The lazy fox", ""]


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, so norms and biases are not 1 and 0 and a mapping slip shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def gpt2(**kw):
    values = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    values.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    values.update(kw)
    torch.manual_seed(0)
    return _perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(**values)))


def llama(n_kv: int = 2, tie: bool = False, bias: bool = False, **kw):
    values = dict(
        vocab_size=VOCAB, max_position_embeddings=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=n_kv, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias,
        rope_theta=500.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    values.update(kw)
    torch.manual_seed(0)
    return _perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(**values)))


def batch(vocab: int = VOCAB, T: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (3, T), generator=torch.Generator().manual_seed(1))


def assert_same_logits(model, ref, atol: float = 1e-4):
    x = batch()
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.float(), atol=atol, rtol=0)


def one_line_error(exc_info, *needles: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# -- checkpoints ---------------------------------------------------------------------------------


def test_gpt2_tied(tmp_path):
    ref = gpt2()
    ref.save_pretrained(tmp_path)
    model, tokenizer, info = hf.load_model(tmp_path)
    assert info["family"] == "gpt2" and info["architectures"] == ["GPT2LMHeadModel"] and not info["extra"]
    assert model.config.tie_embeddings and model.lm_head.weight is model.wte.weight
    assert model.config.pos_encoding == "learned" and model.config.block_size == 32
    assert tokenizer is None
    assert_same_logits(model, ref)


def test_gpt2_untied_and_n_inner(tmp_path):
    ref = gpt2(tie_word_embeddings=False, n_inner=80)
    assert ref.lm_head.weight.data_ptr() != ref.transformer.wte.weight.data_ptr()
    ref.save_pretrained(tmp_path)
    model, _, _ = hf.load_model(tmp_path)
    assert not model.config.tie_embeddings and model.config.mlp_width == 80
    assert_same_logits(model, ref)


@pytest.mark.parametrize(
    "n_kv, tie, bias",
    [(4, False, False), (2, False, False), (1, False, False), (2, True, False), (4, True, True), (1, False, True)],
    ids=["mha", "gqa", "mqa", "gqa-tied", "mha-tied-bias", "mqa-bias"],
)
def test_llama(tmp_path, n_kv, tie, bias):
    ref = llama(n_kv, tie, bias)
    ref.save_pretrained(tmp_path)
    model, _, info = hf.load_model(tmp_path)
    c = model.config
    assert info["family"] == "llama" and (c.kv_heads, c.tie_embeddings, c.bias) == (n_kv, tie, bias)
    assert (c.pos_encoding, c.norm, c.mlp, c.rope_theta, c.norm_eps) == ("rope", "rmsnorm", "swiglu", 500.0, 1e-5)
    assert_same_logits(model, ref)


def test_sharded_safetensors(tmp_path):
    ref = llama()
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    model, _, _ = hf.load_model(tmp_path)
    assert_same_logits(model, ref)


def _save_bin(ref, folder, shards: int = 1):
    ref.config.save_pretrained(folder)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 2])
def test_pytorch_bin(tmp_path, shards):
    ref = gpt2()
    _save_bin(ref, tmp_path, shards)
    model, _, _ = hf.load_model(tmp_path)
    assert_same_logits(model, ref)


def test_gpt2_base_model_without_prefix(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    base = _perturb(transformers.GPT2Model(cfg))
    base.save_pretrained(tmp_path)
    model, _, info = hf.load_model(tmp_path)
    assert info["architectures"] == ["GPT2Model"]
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(x), base(x).last_hidden_state, atol=1e-4, rtol=0)
        # the tied head is the embedding
        torch.testing.assert_close(model(x), base(x).last_hidden_state @ base.wte.weight.T, atol=1e-4, rtol=0)


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    from safetensors import safe_open

    ref = llama()
    with torch.no_grad():  # values a bf16 checkpoint holds exactly
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    model, _, _ = hf.load_model(tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same_logits(model, ref)


def test_classifier_head_is_extra(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, max_position_embeddings=32, pad_token_id=VOCAB - 1,
    )  # fmt: skip
    ref = _perturb(transformers.LlamaForSequenceClassification(cfg))
    ref.save_pretrained(tmp_path)
    assert "lm_head.weight" not in ref.state_dict()
    model, _, info = hf.load_model(tmp_path)
    assert set(info["extra"]) == {"score.weight"}
    x = batch(VOCAB - 1)  # no padding: transformers scores the last token
    with torch.no_grad():
        h = model.hidden_states(x)[:, -1]
        torch.testing.assert_close(h @ info["extra"]["score.weight"].T, ref(x).logits, atol=1e-4, rtol=0)


# -- tokenizers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tokenizers():
    """(GPT-2 style byte-level BPE with <|endoftext|>, Llama style one whose post-processor adds <s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def train(specials):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(TEXTS, trainer=trainer)
        return tok

    gpt = train(["<|endoftext|>"])
    lla = train(["<unk>", "<s>", "</s>"])
    lla.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", lla.token_to_id("<s>"))]
    )
    return gpt, lla


def test_gpt2_tokenizer_json(tmp_path, bpe_tokenizers):
    gpt2().save_pretrained(tmp_path)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizers[0], eos_token="<|endoftext|>")
    wrapped.save_pretrained(tmp_path)
    _, tokenizer, _ = hf.load_model(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.bos_id is None and tokenizer.eos_id == theirs.eos_token_id == 0
    for text in SAMPLES:
        assert tokenizer.encode(text) == theirs(text)["input_ids"]
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_llama_tokenizer_adds_bos(tmp_path, bpe_tokenizers):
    llama().save_pretrained(tmp_path)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe_tokenizers[1], bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.save_pretrained(tmp_path)
    _, tokenizer, _ = hf.load_model(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)
    assert tokenizer.bos_token == "<s>"
    for text in SAMPLES:
        ids = theirs(text)["input_ids"]
        assert ids[0] == 1
        assert [tokenizer.bos_id] + tokenizer.encode(text) == ids
        assert tokenizer.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]


def test_gpt2_vocab_and_merges(tmp_path, bpe_tokenizers):
    gpt2().save_pretrained(tmp_path)
    bpe_tokenizers[0].model.save(str(tmp_path))
    assert (tmp_path / "vocab.json").is_file() and not (tmp_path / "tokenizer.json").exists()
    _, tokenizer, _ = hf.load_model(tmp_path)  # eos from config.json's eos_token_id
    theirs = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.eos_id == 0 and tokenizer.bos_id is None
    for text in SAMPLES:
        assert tokenizer.encode(text) == theirs(text)["input_ids"]


# -- Hub ids from the local cache ------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface_hub cache in tmp_path; returns a function that puts a folder in it as owner/name."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import: the constants are what its functions use
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(folder, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(folder, repo / "snapshots" / commit)
        return repo / "snapshots" / commit

    return put


def test_hub_id_from_offline_cache(tmp_path, hub_cache):
    ref = llama(tie=True)
    ref.save_pretrained(tmp_path / "src")
    snapshot = hub_cache(tmp_path / "src", "owner/tiny-llama")
    assert hf.resolve("owner/tiny-llama") == snapshot
    model, _, info = hf.load_model("owner/tiny-llama")
    assert info["source"] == "owner/tiny-llama"
    assert_same_logits(model, ref)


def test_hub_id_bin_only_from_offline_cache(tmp_path, hub_cache):
    ref = gpt2()
    (tmp_path / "src").mkdir()
    _save_bin(ref, tmp_path / "src")
    hub_cache(tmp_path / "src", "owner/tiny-gpt2")
    model, _, _ = hf.load_model("owner/tiny-gpt2")
    assert_same_logits(model, ref)


def test_missing_hub_id_is_one_line(hub_cache):
    with pytest.raises(HFError) as err:
        hf.load_model("owner/not-there")
    one_line_error(err, "owner/not-there", "HF_HUB_OFFLINE")


def test_not_a_folder_nor_id(tmp_path):
    with pytest.raises(HFError) as err:
        hf.resolve("no such thing!")
    one_line_error(err, "no such thing!")
    with pytest.raises(HFError) as err:
        hf.resolve(tmp_path)
    one_line_error(err, str(tmp_path), "config.json")


# -- errors ----------------------------------------------------------------------------------------


def _config_only(tmp_path, values: dict):
    (tmp_path / "config.json").write_text(json.dumps(values))
    return tmp_path


GPT2_CONFIG = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 16, "n_embd": 32, "n_layer": 1, "n_head": 4}
LLAMA_CONFIG = {
    "model_type": "llama", "vocab_size": 64, "max_position_embeddings": 16, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip


@pytest.mark.parametrize(
    "values, needles",
    [
        ({"model_type": "t5", "vocab_size": 10}, ["model_type='t5'", "gpt2, llama, qwen2, mistral, bert and distilbert"]),
        ({**GPT2_CONFIG, "activation_function": "gelu"}, ["activation_function='gelu'", "gelu_new"]),
        ({**GPT2_CONFIG, "scale_attn_by_inverse_layer_idx": True}, ["scale_attn_by_inverse_layer_idx"]),
        ({**LLAMA_CONFIG, "hidden_act": "gelu"}, ["hidden_act='gelu'"]),
        (
            {**LLAMA_CONFIG, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            ["rope_parameters", "rope_type='linear'"],
        ),
        ({**LLAMA_CONFIG, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["rope_scaling", "'dynamic'"]),
        ({**LLAMA_CONFIG, "head_dim": 16}, ["head_dim=16", "hidden_size / num_attention_heads = 8"]),
        ({**LLAMA_CONFIG, "attention_bias": True, "mlp_bias": False}, ["attention_bias=True", "mlp_bias=False"]),
        ({k: v for k, v in GPT2_CONFIG.items() if k != "n_embd"}, ["'n_embd'"]),
        ({**LLAMA_CONFIG, "num_key_value_heads": 3}, ["n_kv_head=3"]),
    ],
    ids=[
        "model_type", "gelu-exact", "inverse-layer-idx", "hidden_act", "rope-parameters", "rope-scaling",
        "head_dim", "bias-mismatch", "missing-key", "bad-kv-heads",
    ],
)  # fmt: skip
def test_unsupported_config(tmp_path, values, needles):
    folder = _config_only(tmp_path, values)
    with pytest.raises(HFError) as err:
        hf.load_model(folder)
    one_line_error(err, "config.json", *needles)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2",')
    with pytest.raises(HFError) as err:
        hf.load_model(tmp_path)
    one_line_error(err, "config.json", "not valid JSON")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(HFError) as err:
        hf.load_model(tmp_path)
    one_line_error(err, "config.json", "expected an object")


def test_no_weights(tmp_path):
    folder = _config_only(tmp_path, GPT2_CONFIG)
    with pytest.raises(HFError) as err:
        hf.load_model(folder)
    one_line_error(err, str(folder), "no weights")


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    llama().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(HFError) as err:
        hf.load_model(tmp_path)
    one_line_error(err, str(tmp_path), "missing tensor", "model.layers.1.self_attn.k_proj.weight")


def test_missing_untied_head(tmp_path):
    llama().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(HFError) as err:
        hf.load_model(tmp_path)
    one_line_error(err, "lm_head.weight", "tie_word_embeddings=false")


def test_wrong_shape(tmp_path):
    llama().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(40, 32)}))
    with pytest.raises(HFError) as err:
        hf.load_model(tmp_path)
    one_line_error(err, str(tmp_path), "blocks.0.mlp.c_fc.weight", "(40, 32)", "(48, 32)")


def test_wrong_shape_fused_gpt2(tmp_path):
    gpt2().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(32, 90)}))
    with pytest.raises(HFError) as err:
        hf.load_model(tmp_path)
    one_line_error(err, "transformer.h.0.attn.c_attn.weight", "(32, 90)")


def test_unexpected_tensor(tmp_path):
    gpt2().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.update({"transformer.h.0.crossattention.q_attn.weight": torch.zeros(2)}))
    with pytest.raises(HFError) as err:
        hf.load_model(tmp_path)
    one_line_error(err, "unexpected tensors", "crossattention")


def test_corrupt_safetensors(tmp_path):
    gpt2().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HFError) as err:
        hf.load_model(tmp_path)
    one_line_error(err, "model.safetensors", "cannot be read")


def test_missing_shard(tmp_path):
    llama().save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(HFError) as err:
        hf.load_model(tmp_path)
    one_line_error(err, "shard listed in the index is missing")


# -- lmforge -> transformers ---------------------------------------------------------------------

ROUND_TRIP = {
    "gpt2-tied": dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "gpt2-untied": dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False),
    "llama-gqa": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2),
    "llama-mqa-tied-bias": dict(
        pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=True, tie_embeddings=True, n_kv_head=1
    ),
}


def lmforge_gpt(**kw) -> GPT:
    values = dict(vocab_size=96, block_size=24, n_layer=2, n_head=4, n_embd=32, rope_theta=1000.0, norm_eps=1e-5)
    values.update(kw)
    torch.manual_seed(0)
    return _perturb(GPT(GPTConfig(**values)))


def to_transformers(model: GPT):
    values = hf.config_to_hf(model.config)
    config = transformers.AutoConfig.for_model(**values)
    torch.manual_seed(1)
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    result = ref.load_state_dict(hf.state_dict_to_hf(model.state_dict(), model.config), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    assert set(result.missing_keys) <= tied and not result.unexpected_keys, result
    return ref


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_round_trip_to_transformers(name):
    model = lmforge_gpt(**ROUND_TRIP[name])
    ref = to_transformers(model)
    assert type(ref).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM")
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=0)
    # and back: the same config and tensors
    config, family = hf.config_from_hf(hf.config_to_hf(model.config))
    assert config.shape() == model.config.shape() and family == hf.family_of(model.config)
    back, extra = hf.state_dict_from_hf(hf.state_dict_to_hf(model.state_dict(), model.config), config, family)
    assert not extra
    for key, tensor in model.state_dict().items():
        assert torch.equal(back[key], tensor), key


def test_state_dict_to_hf_keeps_extra_tensors():
    model = lmforge_gpt(**ROUND_TRIP["llama-gqa"])
    score = torch.randn(3, 32)
    out = hf.state_dict_to_hf({**model.state_dict(), "score.weight": score}, model.config)
    assert out["score.weight"] is score
    back, extra = hf.state_dict_from_hf(out, model.config, "llama")
    assert set(extra) == {"score.weight"}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=False), "bias"),
        (dict(pos_encoding="learned", norm="layernorm", mlp="gelu", n_kv_head=2), "grouped-query"),
        (dict(pos_encoding="rope", norm="layernorm", mlp="swiglu"), "pos_encoding=rope, norm=layernorm"),
        (dict(pos_encoding="learned", norm="rmsnorm", mlp="swiglu"), "neither GPT-2"),
    ],
)
def test_family_of_unexpressible(overrides, needle):
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32, **overrides)
    with pytest.raises(HFError) as err:
        hf.family_of(config)
    one_line_error(err, needle)


def test_linear_module_map():
    gpt = hf.linear_module_map("gpt2", 1)
    assert gpt["blocks.0.attn.k_proj"] == ("transformer.h.0.attn.c_attn", 1, 3)
    assert gpt["lm_head"] == ("lm_head", 0, 1)
    lla = hf.linear_module_map("llama", 2)
    assert lla["blocks.1.mlp.gate"] == ("model.layers.1.mlp.gate_proj", 0, 1)
    assert lla["blocks.1.attn.c_proj"] == ("model.layers.1.self_attn.o_proj", 0, 1)
    with pytest.raises(HFError, match="unknown family"):
        hf.linear_module_map("t5", 1)
