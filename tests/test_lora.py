"""LoRA: LoRALinear, apply/merge, state-dict merge, and the PEFT adapter round trip (tiny random models, offline)."""

from __future__ import annotations

import copy
import json
import os
import stat
import warnings

import pytest
import torch
from torch import nn

from lmforge import lora as L
from lmforge.hf import load_model
from lmforge.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96
LLAMA_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _gpt2_config(**extra):
    return transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=1, **extra
    )


def _llama_config(**extra):
    return transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
        **extra,
    )


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """family -> folder of a tiny random transformers causal LM (GPT-2 tied, Llama GQA untied)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for family, model in (
        ("gpt2", transformers.GPT2LMHeadModel(_gpt2_config())),
        ("llama", transformers.LlamaForCausalLM(_llama_config())),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(root / family)
        out[family] = root / family
    return out


def _lmforge(folder) -> GPT:
    model, _, _ = load_model(folder)
    return model.eval()


def _hf(family: str, folder, cls: str = "ForCausalLM", **kwargs):
    name = {"gpt2": "GPT2", "llama": "Llama"}[family]
    cls = "LMHeadModel" if (family, cls) == ("gpt2", "ForCausalLM") else cls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, f"{name}{cls}").from_pretrained(folder, **kwargs)
    return model.eval()


def _train_adapters(model: nn.Module, seed: int = 1) -> None:
    """Simulate training: random B (A is already random)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in L.lora_modules(model).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.2)


def _ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def _settings(r=8, alpha=16.0, targets=("q_proj", "v_proj")) -> dict:
    return {"r": r, "alpha": alpha, "dropout": 0.0, "targets": list(targets)}


def _peft_load(base, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()


# -- LoRALinear --------------------------------------------------------------------------------------


def test_lora_linear_shares_base_parameters_and_computes_the_update():
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    lora = L.LoRALinear.from_linear(linear, r=4, alpha=8.0)
    assert lora.weight is linear.weight and lora.bias is linear.bias
    assert set(lora.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert lora.lora_A.shape == (4, 16) and lora.lora_B.shape == (24, 4) and lora.scaling == 2.0
    assert torch.count_nonzero(lora.lora_B) == 0 and torch.count_nonzero(lora.lora_A) > 0
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(lora(x), linear(x))
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = x @ (linear.weight + 2.0 * lora.lora_B @ lora.lora_A).T + linear.bias
    torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora(x), nn.functional.linear(x, lora.merged_weight(), lora.bias), atol=1e-5, rtol=0)
    lora.lora_B.grad = None
    lora.merged_weight().sum().backward()  # differentiable, for a fused loss on a LoRA lm_head
    assert lora.lora_B.grad is not None and lora.lora_A.grad is not None
    assert "r=4" in repr(lora) and "alpha=8" in repr(lora) and "in_features=16" in repr(lora)

    no_bias = L.LoRALinear.from_linear(nn.Linear(8, 8, bias=False), r=2, alpha=2, dropout=0.5)
    assert no_bias.bias is None and "bias" not in dict(no_bias.named_parameters())
    assert "dropout=0.5" in repr(no_bias)


# -- apply_lora / counts / gradients ------------------------------------------------------------------


def test_apply_lora_freezes_everything_but_the_adapters(hf_folders):
    model = _lmforge(hf_folders["gpt2"])
    base_total = model.num_parameters()
    idx = _ids()
    with torch.no_grad():
        before = model(idx)
    names = L.apply_lora(model, r=8, alpha=16, targets=["q_proj", "v_proj"])
    assert names == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")}
    expected = 4 * 8 * (32 + 32)
    assert L.count_parameters(model) == (expected, base_total + expected)
    assert L.describe(model) == (
        f"trainable params: {expected:,} of {base_total + expected:,} "
        f"({100 * expected / (base_total + expected):.2f}%) in 4 LoRA modules (r=8, alpha=16)"
    )
    # the base keys are unchanged; the adapters are new keys
    keys = set(model.state_dict())
    assert "blocks.0.attn.q_proj.weight" in keys and "blocks.0.attn.q_proj.lora_A" in keys
    assert set(L.lora_state_dict(model)) == {f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")}
    # a fresh LoRA (B = 0) changes nothing
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, atol=0, rtol=0)


def test_gradients_reach_only_the_adapters(hf_folders):
    model = _lmforge(hf_folders["llama"])
    L.apply_lora(model, r=4, alpha=8, dropout=0.1, targets=["c_attn", "down_proj"])
    _train_adapters(model)
    model.train()
    idx = _ids()
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_targets_aliases_and_peft_matching():
    config = GPTConfig(
        n_layer=2, n_embd=32, n_head=4, n_kv_head=2, pos_encoding="rope", norm="rmsnorm", mlp="swiglu",
        tie_embeddings=False,
    )  # fmt: skip
    kinds = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.c_proj", "mlp.c_fc", "mlp.gate", "mlp.c_proj"]
    every = [f"blocks.{i}.{k}" for i in range(2) for k in kinds] + ["lm_head"]
    assert L.apply_lora(GPT(config), targets=LLAMA_KINDS) == every
    assert (
        L.apply_lora(GPT(config), targets=["q_proj", "k_proj", "v_proj", "c_proj", "gate", "c_fc", "lm_head"]) == every
    )
    assert L.apply_lora(GPT(config), targets=["o_proj"]) == ["blocks.0.attn.c_proj", "blocks.1.attn.c_proj"]
    assert L.apply_lora(GPT(config), targets=["blocks.1.mlp.gate"]) == ["blocks.1.mlp.gate"]
    assert L.apply_lora(GPT(config), targets="up_proj") == ["blocks.0.mlp.c_fc", "blocks.1.mlp.c_fc"]


def test_errors(hf_folders):
    model = _lmforge(hf_folders["gpt2"])
    with pytest.raises(ValueError, match=r"\['qkv'\] match no Linear module.*attn\.q_proj.*lm_head.*c_attn") as err:
        L.apply_lora(model, targets=["q_proj", "qkv"])
    assert "\n" not in str(err.value)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    with pytest.raises(ValueError, match="lm_head shares its weight with wte.weight.*untie.*drop lm_head"):
        L.apply_lora(model, targets=["c_attn", "lm_head"])
    for kwargs, what in (
        ({"r": 0}, "r=0"),
        ({"r": 2.0}, "r=2.0"),
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": -1.0}, "alpha=-1.0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": -0.1}, "dropout=-0.1"),
    ):
        with pytest.raises(ValueError, match=what):
            L.apply_lora(model, **kwargs)
    with pytest.raises(ValueError, match="targets"):
        L.apply_lora(model, targets=[])
    L.apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        L.apply_lora(model, targets=["c_fc"])
    adapters = L.lora_state_dict(model)
    state = {k: v for k, v in model.state_dict().items() if k not in adapters}
    with pytest.raises(ValueError, match="lack lora_B"):
        L.merge_state(state, {"blocks.0.attn.q_proj.lora_A": adapters["blocks.0.attn.q_proj.lora_A"]}, _settings())
    with pytest.raises(ValueError, match="tied to"):
        fake = {"lm_head.lora_A": torch.zeros(8, 32), "lm_head.lora_B": torch.zeros(VOCAB, 8)}
        L.merge_state(state, fake, _settings())
    with pytest.raises(ValueError, match="tied"):
        L.save_peft_adapter(fake, model.config, _settings(), hf_folders["gpt2"].parent / "never")


# -- merging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, targets",
    [("gpt2", ["c_attn", "c_proj", "c_fc"]), ("llama", LLAMA_KINDS)],
)
def test_merge_lora_and_merge_state_equal_the_lora_model(hf_folders, family, targets):
    model = _lmforge(hf_folders[family])
    L.apply_lora(model, r=4, alpha=12.0, targets=targets)
    _train_adapters(model)
    idx = _ids()
    with torch.no_grad():
        expected = model(idx)
        base = _lmforge(hf_folders[family])(idx)
    assert (expected - base).abs().max() > 1e-2  # the adapters matter

    merged = L.merge_lora(copy.deepcopy(model))
    assert not L.lora_modules(merged)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("proj", "c_fc", "gate")))
    for name in L.lora_modules(model):
        assert all(p.requires_grad for p in merged.get_submodule(name).parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), expected, atol=1e-5, rtol=0)

    adapters = L.lora_state_dict(model)
    state = {k: v for k, v in model.state_dict().items() if k not in adapters}
    fresh = GPT(model.config)
    fresh.load_state_dict(L.merge_state(state, adapters, _settings(4, 12.0, targets)))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(idx), expected, atol=1e-5, rtol=0)
    # merge_state is pure
    torch.testing.assert_close(state["blocks.0.attn.q_proj.weight"], model.blocks[0].attn.q_proj.weight)


# -- PEFT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, targets, hf_targets, c_attn_parts",
    [
        ("gpt2", ["q_proj", "v_proj"], ["c_attn"], 2),
        ("gpt2", ["c_attn", "c_proj", "c_fc"], ["c_attn", "c_fc", "c_proj"], 3),
        ("gpt2", ["k_proj", "o_proj"], ["attn.c_proj", "c_attn"], 1),  # c_proj alone would catch mlp.c_proj
        ("llama", LLAMA_KINDS, sorted(LLAMA_KINDS), 0),
    ],
)
def test_peft_round_trip(hf_folders, tmp_path, family, targets, hf_targets, c_attn_parts):
    model = _lmforge(hf_folders[family])
    L.apply_lora(model, r=4, alpha=8.0, targets=targets)
    _train_adapters(model)
    out = L.save_peft_adapter(
        L.lora_state_dict(model), model.config, _settings(4, 8.0, targets), tmp_path / "adapter",
        base_model_name_or_path=str(hf_folders[family]),
    )  # fmt: skip
    assert out == tmp_path / "adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left
    mask = os.umask(0)
    os.umask(mask)
    for file in out.iterdir():  # the usual permissions (0644 under umask 022), not a temporary file's 0600
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["peft_type"] == "LORA" and settings["task_type"] == "CAUSAL_LM"
    assert settings["r"] == 4 and settings["lora_alpha"] == 8
    assert settings["fan_in_fan_out"] is (family == "gpt2")
    assert settings["target_modules"] == hf_targets
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    parts = c_attn_parts
    if parts:  # GPT-2's fused q/k/v: one LoRA of rank r * parts, the scaling kept by alpha_pattern
        if parts > 1:
            assert settings["rank_pattern"] == {"c_attn": 4 * parts}
            assert settings["alpha_pattern"] == {"c_attn": 8 * parts}
        else:
            assert settings["rank_pattern"] == {}
        a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
        b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
        assert a.shape == (4 * parts, 32) and b.shape == (96, 4 * parts)

    with torch.no_grad():
        expected = model(_ids())
        base = _hf(family, hf_folders[family])
        before = base(input_ids=_ids()).logits
        peft_model = _peft_load(base, out)
        got = peft_model(input_ids=_ids()).logits
    assert (got - before).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    peft_targets = peft_model.peft_config["default"].target_modules
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert n_lora == len({k.rsplit(".lora_", 1)[0] for k in tensors}), peft_targets


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_sequence_classification(hf_folders, tmp_path, family):
    model = _lmforge(hf_folders[family])
    L.apply_lora(model, r=4, alpha=16, targets=["q_proj", "v_proj"])
    _train_adapters(model)
    score = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    out = L.save_peft_adapter(
        L.lora_state_dict(model), model.config, _settings(4, 16), tmp_path / "cls",
        task_type="SEQ_CLS", modules_to_save={"score.weight": score},
    )  # fmt: skip
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["task_type"] == "SEQ_CLS" and settings["modules_to_save"] == ["score"]
    # the classifier is built from the LM checkpoint (score newly initialised), as when fine-tuning
    base = _hf(family, hf_folders[family], "ForSequenceClassification", num_labels=3, pad_token_id=0)
    peft_model = _peft_load(base, out)
    assert torch.equal(peft_model.base_model.model.score.modules_to_save["default"].weight, score)
    idx = _ids()
    with torch.no_grad():
        expected = model.hidden_states(idx)[:, -1] @ score.T  # no padding: the last token
        torch.testing.assert_close(peft_model(input_ids=idx).logits, expected, atol=1e-4, rtol=0)


def test_save_peft_adapter_refuses_an_existing_folder(hf_folders, tmp_path):
    model = _lmforge(hf_folders["llama"])
    L.apply_lora(model, r=2, alpha=4)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        L.save_peft_adapter(L.lora_state_dict(model), model.config, _settings(2, 4), tmp_path / "taken")
    with pytest.raises(ValueError, match="no llama transformers counterpart"):
        L.save_peft_adapter(
            {"wte.lora_A": torch.zeros(2, 32), "wte.lora_B": torch.zeros(96, 2)},
            model.config,
            _settings(2, 4),
            tmp_path / "x",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
