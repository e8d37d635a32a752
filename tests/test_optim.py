import math

import pytest
import torch

from lmforge.model import GPT, GPTConfig
from lmforge.optim import OptimizerSpec, build_optimizer, param_groups, warmup_cosine


def test_weight_decay_only_on_linear_matrices():
    for tie in (True, False):
        model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=tie))
        decay, no_decay = param_groups(model, 0.1)
        decay_ids = {id(p) for p in decay["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        for p in decay["params"]:
            assert p.ndim == 2 and "wte" not in names[id(p)] and "wpe" not in names[id(p)]
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name or "wte" in name or "wpe" in name:
                assert id(p) not in decay_ids, name
        expected = 2 * 6 + (0 if tie else 1)  # q, k, v, c_proj, c_fc, c_proj per layer (+ untied head)
        assert len(decay["params"]) == expected
        total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
        assert total == model.num_parameters()


def test_build_optimizer_is_adamw_with_spec():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = build_optimizer(model, OptimizerSpec(lr=1e-3, betas=(0.8, 0.9), weight_decay=0.2))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert opt.param_groups[0]["weight_decay"] == 0.2


def test_warmup_then_cosine():
    f = lambda s: warmup_cosine(s, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
