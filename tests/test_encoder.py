"""The encoder: numerical parity with transformers' BERT and DistilBERT, padding, shapes, config errors."""

from __future__ import annotations

import pytest
import torch

from lmforge.encoder import Encoder, EncoderConfig
from lmforge.errors import UserError

transformers = pytest.importorskip("transformers")

V, C, L, H, FF, P = 99, 32, 2, 4, 37, 64


def bert_key_map(n_layer: int) -> dict[str, str]:
    """lmforge name -> BertForMaskedLM name (the pooler is BertModel's; BertForMaskedLM has none)."""
    names = {
        "wte.weight": "bert.embeddings.word_embeddings.weight",
        "wpe.weight": "bert.embeddings.position_embeddings.weight",
        "wtt.weight": "bert.embeddings.token_type_embeddings.weight",
        "ln_emb.weight": "bert.embeddings.LayerNorm.weight",
        "ln_emb.bias": "bert.embeddings.LayerNorm.bias",
        "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
        "mlm_head.dense.bias": "cls.predictions.transform.dense.bias",
        "mlm_head.ln.weight": "cls.predictions.transform.LayerNorm.weight",
        "mlm_head.ln.bias": "cls.predictions.transform.LayerNorm.bias",
        "mlm_head.bias": "cls.predictions.bias",
    }
    per_layer = {
        "attn.q_proj": "attention.self.query",
        "attn.k_proj": "attention.self.key",
        "attn.v_proj": "attention.self.value",
        "attn.c_proj": "attention.output.dense",
        "ln_1": "attention.output.LayerNorm",
        "mlp.c_fc": "intermediate.dense",
        "mlp.c_proj": "output.dense",
        "ln_2": "output.LayerNorm",
    }
    for i in range(n_layer):
        for ours, theirs in per_layer.items():
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{p}"] = f"bert.encoder.layer.{i}.{theirs}.{p}"
    return names


def distilbert_key_map(n_layer: int) -> dict[str, str]:
    names = {
        "wte.weight": "distilbert.embeddings.word_embeddings.weight",
        "wpe.weight": "distilbert.embeddings.position_embeddings.weight",
        "ln_emb.weight": "distilbert.embeddings.LayerNorm.weight",
        "ln_emb.bias": "distilbert.embeddings.LayerNorm.bias",
        "mlm_head.dense.weight": "vocab_transform.weight",
        "mlm_head.dense.bias": "vocab_transform.bias",
        "mlm_head.ln.weight": "vocab_layer_norm.weight",
        "mlm_head.ln.bias": "vocab_layer_norm.bias",
        "mlm_head.bias": "vocab_projector.bias",
    }
    per_layer = {
        "attn.q_proj": "attention.q_lin",
        "attn.k_proj": "attention.k_lin",
        "attn.v_proj": "attention.v_lin",
        "attn.c_proj": "attention.out_lin",
        "ln_1": "sa_layer_norm",
        "mlp.c_fc": "ffn.lin1",
        "mlp.c_proj": "ffn.lin2",
        "ln_2": "output_layer_norm",
    }
    for i in range(n_layer):
        for ours, theirs in per_layer.items():
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{p}"] = f"distilbert.transformer.layer.{i}.{theirs}.{p}"
    return names


def _load(ours: Encoder, theirs: torch.nn.Module, names: dict[str, str]) -> None:
    their_state = theirs.state_dict()
    our_state = ours.state_dict()
    assert set(names) == set(our_state), set(our_state) ^ set(names)
    with torch.no_grad():
        for mine, name in names.items():
            our_state[mine].copy_(their_state[name])


def _randomize(model: torch.nn.Module) -> None:
    """Random LayerNorm gains/biases and head bias too, so a swapped or missed weight shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def _batch(padded: bool):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(1, V, (3, 12), generator=g)
    types = torch.zeros_like(idx)
    types[:, 6:] = 1
    mask = torch.ones_like(idx, dtype=torch.bool)
    if padded:
        mask[1, 8:] = False
        mask[2, 3:] = False
        idx[~mask] = 0
    return idx, types, mask


@pytest.mark.parametrize("padded", [False, True])
def test_bert_parity(padded):
    cfg = transformers.BertConfig(
        vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF,
        max_position_embeddings=P, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.BertForMaskedLM(cfg).eval()
    _randomize(theirs)
    ours = Encoder(EncoderConfig(vocab_size=V, max_positions=P, n_layer=L, n_head=H, n_embd=C, mlp_hidden=FF,
                                 pooler=False, attention="torch", loss="torch")).eval()  # fmt: skip
    _load(ours, theirs, bert_key_map(L))
    idx, types, mask = _batch(padded)
    with torch.no_grad():
        expected = theirs(input_ids=idx, token_type_ids=types, attention_mask=mask.long()).logits
        got = ours(idx, types, mask if padded else None)
    diff = (got - expected)[mask].abs().max().item()
    assert diff < 1e-4, diff


def test_bert_pooler_parity():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=H,
                                  intermediate_size=FF, max_position_embeddings=P, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.BertModel(cfg).eval()
    ours = Encoder(EncoderConfig(vocab_size=V, max_positions=P, n_layer=L, n_head=H, n_embd=C, mlp_hidden=FF)).eval()
    names = {k: v.removeprefix("bert.") for k, v in bert_key_map(L).items() if not k.startswith("mlm_head")}
    names.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
    state = ours.state_dict()
    with torch.no_grad():
        for mine, name in names.items():
            state[mine].copy_(theirs.state_dict()[name])
    idx, types, mask = _batch(True)
    with torch.no_grad():
        expected = theirs(input_ids=idx, token_type_ids=types, attention_mask=mask.long()).pooler_output
        got = ours(idx, types, mask, output="pooled")
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("padded", [False, True])
def test_distilbert_parity(padded):
    cfg = transformers.DistilBertConfig(vocab_size=V, dim=C, n_layers=L, n_heads=H, hidden_dim=FF,
                                        max_position_embeddings=P, dropout=0.0, attention_dropout=0.0,
                                        activation="gelu")  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.DistilBertForMaskedLM(cfg).eval()
    _randomize(theirs)
    ours = Encoder(EncoderConfig(vocab_size=V, max_positions=P, type_vocab_size=0, n_layer=L, n_head=H, n_embd=C,
                                 mlp_hidden=FF, pooler=False, attention="torch", loss="torch")).eval()  # fmt: skip
    _load(ours, theirs, distilbert_key_map(L))
    idx, _, mask = _batch(padded)
    with torch.no_grad():
        expected = theirs(input_ids=idx, attention_mask=mask.long()).logits
        got = ours(idx, key_padding_mask=mask if padded else None)
    diff = (got - expected)[mask].abs().max().item()
    assert diff < 1e-4, diff


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(vocab_size=V, max_positions=P, n_layer=L, n_head=H, n_embd=C)).eval()
    idx, types, _ = _batch(False)
    short = model(idx[:1, :7], types[:1, :7])  # (1, 7, V)
    padded = torch.cat((idx[:1, :7], torch.zeros(1, 5, dtype=torch.long)), dim=1)
    mask = torch.arange(12)[None] < 7
    out = model(padded, torch.cat((types[:1, :7], torch.zeros(1, 5, dtype=torch.long)), dim=1), mask)
    assert out.shape == (1, 12, V)
    assert torch.allclose(out[:, :7], short, atol=1e-5)


def test_loss_on_selected_positions_matches_full_logits():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(vocab_size=V, max_positions=P, n_layer=L, n_head=H, n_embd=C, nsp=True)).eval()
    idx, types, mask = _batch(True)
    labels = torch.full_like(idx, -100)
    labels[0, 2], labels[1, 5], labels[2, 1] = 7, 8, 9
    nsp_label = torch.tensor([0, 1, 0])
    out = model(idx, types, mask, labels=labels, next_sentence_label=nsp_label, reduction="sum")
    logits = model(idx, types, mask)  # (B, T, V)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    assert torch.allclose(out.mlm, expected, atol=1e-4)
    assert int(out.mlm_targets) == 3
    assert int(out.mlm_correct) == int((logits[labels != -100].argmax(-1) == labels[labels != -100]).sum())
    nsp_logits = model(idx, types, mask, output="nsp_logits")
    assert nsp_logits.shape == (3, 2)
    assert torch.allclose(out.nsp, torch.nn.functional.cross_entropy(nsp_logits, nsp_label, reduction="sum"))
    # gradients reach the tied embedding and the output bias
    out.mlm.backward()
    assert model.wte.weight.grad.abs().sum() > 0 and model.mlm_head.bias.grad.abs().sum() > 0


def test_pre_norm_shapes_and_meta_build():
    cfg = EncoderConfig(vocab_size=V, max_positions=P, n_layer=L, n_head=H, n_embd=C, norm_position="pre")
    with torch.device("meta"):
        model = Encoder(cfg)
    model.to_empty(device="cpu")
    model.reset_parameters()
    idx, types, mask = _batch(True)
    assert model(idx, types, mask, output="hidden").shape == (3, 12, C)
    assert model(idx, types, mask, output="pooled").shape == (3, C)
    assert model.ln_f is not None and model.nsp_head is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_embd": 30, "n_head": 4}, "model config: n_embd=30 must be a multiple of n_head=4"),
        ({"type_vocab_size": -1}, "model config: type_vocab_size=-1 must be a non-negative integer"),
        ({"norm_position": "middle"}, "model config: norm_position='middle' is not one of post, pre"),
        ({"activation": "relu"}, "model config: activation='relu' is not one of gelu, gelu_tanh"),
        ({"nsp": True, "pooler": False}, "model config: nsp=True needs pooler: true"),
        ({"dropout": 1.0}, "model config: dropout=1.0 must be in [0, 1)"),
        ({"vocab_size": 0}, "model config: vocab_size=0 must be a positive integer"),
    ],
)
def test_config_errors_are_one_line(kwargs, message):
    with pytest.raises(UserError) as err:
        EncoderConfig(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_too_long_sequence_is_one_line():
    model = Encoder(EncoderConfig(vocab_size=V, max_positions=8, n_layer=1, n_head=H, n_embd=C))
    with pytest.raises(UserError, match="longer than max_positions=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_config_round_trip():
    cfg = EncoderConfig(vocab_size=V, type_vocab_size=0, pooler=False)
    assert EncoderConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg
    assert cfg.block_size == cfg.max_positions
