import math
from pathlib import Path

import pytest
import torch
import yaml

from lmforge import ops
from lmforge.model import GPT, GPTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2),
    "mqa": dict(pos_encoding="rope", n_kv_head=1),
    "dropout": dict(dropout=0.1),
}


def tiny(**overrides) -> GPTConfig:
    values = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    values.update(overrides)
    return GPTConfig(**values)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_loss(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant]))
    idx = torch.randint(0, 97, (3, 17))
    assert model(idx).shape == (3, 17, 97)
    loss = model.loss(idx, torch.randint(0, 97, (3, 17)))
    assert loss.ndim == 0 and math.isfinite(loss.item())
    # an untrained model predicts close to uniform
    assert abs(loss.item() - math.log(97)) < 0.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant])).eval()
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    t = 11
    changed[:, t] = (changed[:, t] + 1) % 97
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_loss_matches_logits_cross_entropy_and_ignore_index():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    targets[0, :4] = -100
    expected = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(model.loss(idx, targets), expected)


def test_all_ignored_targets_give_zero_loss_and_zero_grads():
    model = GPT(tiny())
    idx = torch.randint(0, 97, (2, 5))
    loss = model.loss(idx, torch.full((2, 5), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def _preset(name: str, vocab_size: int) -> GPTConfig:
    values = yaml.safe_load((CONFIGS / name).read_text())["model"]["config"]
    return GPTConfig(**{**values, "vocab_size": vocab_size})


def test_gpt2_124m_preset_has_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = GPT(_preset("gpt2-124m.yaml", vocab_size=50257))
    assert model.num_parameters() == 124_439_808  # GPT-2 small, as published by OpenAI / transformers


def test_gpt2_medium_preset_has_gpt2_medium_parameter_count():
    with torch.device("meta"):
        model = GPT(_preset("gpt2-medium.yaml", vocab_size=50257))
    assert model.num_parameters() == 354_823_168


def test_llama_preset_shape():
    config = _preset("llama-small.yaml", vocab_size=32768)
    assert config.kv_heads == 4 and config.mlp_width == 2048
    with torch.device("meta"):
        model = GPT(config)
    assert model.lm_head.weight is not model.wte.weight
    assert model.num_parameters() == 125_848_320  # the '~126M' the preset's comment states
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_tied_embeddings_share_storage():
    model = GPT(tiny())
    assert model.lm_head.weight is model.wte.weight


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    config = tiny(n_layer=8, n_embd=128, vocab_size=512)
    model = GPT(config)
    proj = torch.cat(
        [b.attn.c_proj.weight.flatten() for b in model.blocks] + [b.mlp.c_proj.weight.flatten() for b in model.blocks]
    )
    other = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.blocks])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert other.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(not b.attn.q_proj.bias.any() for b in model.blocks)


def test_rope_is_relative():
    """Rotating q and k by positions m and n gives scores that depend on m - n only."""
    from lmforge.model import RotaryEmbedding

    rope = RotaryEmbedding(8, 16, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        qs = rope(q.expand(1, 1, 16, 8).clone())[0, 0, m]
        ks = rope(k.expand(1, 1, 16, 8).clone())[0, 0, n]
        return (qs * ks).sum()

    torch.testing.assert_close(score(5, 2), score(12, 9))
    assert not torch.allclose(score(5, 2), score(5, 4))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(n_embd=30), "n_embd"),
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(norm="batchnorm"), "norm"),
        (dict(pos_encoding="rope", n_embd=36, n_head=4), "n_embd"),
    ],
)
def test_config_validation_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"^model config: {key}="):
        tiny(**overrides)


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size=32"):
        GPT(tiny())(torch.zeros(1, 33, dtype=torch.long))


def test_gqa_attention_equals_repeated_kv():
    q = torch.randn(2, 4, 7, 8)
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    out = ops.attention(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True
    )
    torch.testing.assert_close(out, ref)


def test_forced_triton_attention_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = GPT(tiny(attention="triton"))
    with pytest.raises(ValueError, match=r"attention='triton' cannot run here: inputs are on cpu, not CUDA"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_packed_documents_do_not_see_each_other():
    """With RoPE (relative positions), a document packed after another gives the same outputs as alone."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding="rope", n_kv_head=2)).eval()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 14))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 9 + [1] * 14])
    with torch.no_grad():
        out = model(packed, segment_ids=segments)
        torch.testing.assert_close(out[:, :9], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 9:], model(b), atol=1e-5, rtol=1e-5)


def test_key_padding_mask_hides_padding():
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding="rope")).eval()
    x = torch.randint(0, 97, (1, 12))
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[0, :4] = False  # left padding: later positions must not depend on what the padding holds
    y = x.clone()
    y[0, :4] = (y[0, :4] + 5) % 97
    with torch.no_grad():
        a, b = model(x, key_padding_mask=keep), model(y, key_padding_mask=keep)
        torch.testing.assert_close(a[:, 4:], b[:, 4:])
        assert not torch.allclose(model(x)[:, 4:], model(y)[:, 4:])  # without the mask they would differ
