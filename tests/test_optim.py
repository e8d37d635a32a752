import math

import pytest
import torch

from lmforge import plugins
from lmforge.model import GPT, GPTConfig
from lmforge.optim import MuonWithAdamW, param_groups, warmup_cosine


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


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, **kw))


def test_adamw_plugin_builds_with_config_arguments():
    model = tiny_model()
    opt = plugins.build("optimizer", {"name": "adamw", "lr": 1e-3, "betas": [0.8, 0.9], "weight_decay": 0.2}, model)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]


def _train(opt_spec: dict, steps: int = 30) -> tuple[float, float, torch.optim.Optimizer]:
    model = tiny_model()
    opt = plugins.build("optimizer", opt_spec, model)
    x = torch.randint(0, 64, (8, 16))
    first = None
    for _ in range(steps):
        loss = model.loss(x, x.roll(-1, dims=1))  # a learnable, fixed batch
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss.item(), opt


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "adamw", "lr": 1e-2},
        {"name": "adam", "lr": 1e-2},
        {"name": "sgd", "lr": 0.1},
        {"name": "muon", "lr": 0.02, "adamw_lr": 1e-2},
    ],
)
def test_builtin_optimizers_fit_a_batch(spec):
    first, last, _ = _train(spec)
    assert last < 0.5 * first, (spec, first, last)


def test_muon_splits_hidden_matrices_from_the_rest():
    model = tiny_model(tie_embeddings=False)
    opt = plugins.build("optimizer", {"name": "muon"}, model)
    assert isinstance(opt, MuonWithAdamW)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not muon_ids & adamw_ids
    assert muon_ids | adamw_ids == {id(p) for p in model.parameters()}
    assert all(names[i].startswith("blocks.") and names[i].endswith("weight") for i in muon_ids)
    assert {names[i] for i in adamw_ids} >= {"wte.weight", "wpe.weight", "lm_head.weight"}
    assert len(muon_ids) == 2 * 6  # q, k, v, c_proj, c_fc, c_proj per block
    # one param_groups list: a scheduler scales both inner optimizers
    assert opt.param_groups[0] is opt.muon.param_groups[0] and opt.param_groups[-1] is opt.adamw.param_groups[-1]


def test_muon_state_round_trips():
    _, _, opt = _train({"name": "muon"}, steps=3)
    state = opt.state_dict()
    model = tiny_model()
    fresh = plugins.build("optimizer", {"name": "muon"}, model)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["muon"]["state"].keys() == state["muon"]["state"].keys()
    buf = next(iter(state["muon"]["state"].values()))["momentum_buffer"]
    torch.testing.assert_close(next(iter(fresh.state_dict()["muon"]["state"].values()))["momentum_buffer"], buf)


def test_schedulers_are_plugins():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = plugins.build("scheduler", {"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}, opt, 110)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[115] == pytest.approx(0.1)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = plugins.build("scheduler", {"name": "constant", "warmup_steps": 4}, opt2, 100)
    seen = []
    for _ in range(8):
        seen.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0])


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
