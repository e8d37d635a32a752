"""BERT and DistilBERT checkpoints in and out: every transformers class lmforge reads (BertModel, BertForMaskedLM,
BertForPreTraining, BertForSequenceClassification, DistilBertModel, DistilBertForMaskedLM,
DistilBertForSequenceClassification) loads with identical outputs on padded batches, from safetensors, a sharded
index or a weights-only .bin; exports load in transformers with identical logits and token ids; LoRA adapters of an
encoder classifier load in PEFT; unsupported configs are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import families, hf  # noqa: E402
from lmforge.checkpoint import Checkpoint, load_base  # noqa: E402
from lmforge.encoder import Encoder, EncoderConfig  # noqa: E402
from lmforge.families import HFError  # noqa: E402
from lmforge.tokenizers import WordPieceTokenizer  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model reads every word, then guesses the masked one!",
    "Héllo wörld: accents and CAPITALS are normalised as BERT does.",
]


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    corpus = [t for t in TEXTS for _ in range(5)] + ["the cat sat on the mat", "dogs and cats and foxes"]
    return WordPieceTokenizer.train(corpus, vocab_size=120, min_frequency=1)


def bert_config(**kw) -> transformers.BertConfig:
    values = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                  max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-7, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.BertConfig(**{**values, **kw})


def distilbert_config(**kw) -> transformers.DistilBertConfig:
    values = dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=40, max_position_embeddings=40,
                  dropout=0.0, attention_dropout=0.0)  # fmt: skip
    return transformers.DistilBertConfig(**{**values, **kw})


CLASSES = {
    "BertModel": bert_config,
    "BertForMaskedLM": bert_config,
    "BertForPreTraining": bert_config,
    "BertForSequenceClassification": bert_config,
    "DistilBertModel": distilbert_config,
    "DistilBertForMaskedLM": distilbert_config,
    "DistilBertForSequenceClassification": distilbert_config,
}


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random, LayerNorms and biases included, so that a swapped or missed tensor shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1)
                + (1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0)
            )
    return model.eval()


def hf_model(name: str, **kw) -> torch.nn.Module:
    config = CLASSES[name](**kw)
    if name.endswith("SequenceClassification"):
        config.num_labels = 3
    return _randomized(getattr(transformers, name)(config))


def save(model: torch.nn.Module, folder: Path, tokenizer: WordPieceTokenizer | None = None, **kw) -> Path:
    model.save_pretrained(folder, **kw)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def batch(tokenizer: WordPieceTokenizer | None = None, vocab: int = 128):
    """(input_ids, token_type_ids, attention_mask) of a right-padded batch of three texts, or of random ids."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, vocab, (3, 11), generator=g)
        types = torch.zeros_like(ids)
        types[:, 7:] = 1
    else:
        rows = [tokenizer.encode_pair(t, "and a second sentence" if i == 1 else None) for i, t in enumerate(TEXTS)]
        T = max(len(r[0]) for r in rows)
        ids = torch.full((3, T), tokenizer.pad_id)
        types = torch.zeros((3, T), dtype=torch.long)
        for i, (r, tt) in enumerate(rows):
            ids[i, : len(r)], types[i, : len(tt)] = torch.tensor(r), torch.tensor(tt)
        return ids, types, ids != tokenizer.pad_id
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 8:] = False
    mask[2, 4:] = False
    return ids, types, mask


def lmforge_outputs(model: Encoder, ids, types, mask) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        h = model(ids, types if model.config.type_vocab_size else None, mask, output="hidden")
        out = {"hidden": h}
        if model.mlm_head is not None:
            out["logits"] = model.mlm_logits(h)
        if model.pooler is not None:
            out["pooled"] = model.pooled(h)
        return out


def hf_outputs(model, ids, types, mask) -> dict[str, torch.Tensor]:
    args = {"input_ids": ids, "attention_mask": mask.long()}
    if model.config.model_type == "bert":  # DistilBERT has no token types
        args["token_type_ids"] = types
    with torch.no_grad():
        res = model(**args, output_hidden_states=True)
    out = {"hidden": res.hidden_states[-1] if hasattr(res, "hidden_states") and res.hidden_states else res[0]}
    if getattr(res, "logits", None) is not None and res.logits.dim() == 3:
        out["logits"] = res.logits
    if getattr(res, "prediction_logits", None) is not None:
        out["logits"] = res.prediction_logits
    if getattr(res, "pooler_output", None) is not None:
        out["pooled"] = res.pooler_output
    return out


def assert_close(ours: dict, theirs: dict, mask: torch.Tensor, atol: float = 1e-5) -> None:
    shared = set(ours) & set(theirs)
    assert "hidden" in shared
    for key in shared:
        a, b = ours[key], theirs[key]
        if a.dim() == 3:  # padding positions are never read: compare the real ones
            a, b = a[mask], b[mask]
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=key)


# -- import ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CLASSES))
def test_every_class_imports_with_identical_outputs(name, tmp_path, tokenizer):
    ref = hf_model(name)
    folder = save(ref, tmp_path / name, tokenizer)
    model, tok, info = hf.load_model(folder)
    model.eval()
    fam = families.family(info["family"])
    assert isinstance(model, Encoder) and isinstance(tok, WordPieceTokenizer)
    assert info["family"] == ("distilbert" if name.startswith("Distil") else "bert")
    assert info["architectures"] == [name]
    expect_fresh = {
        "BertModel": ["mlm_head"], "BertForMaskedLM": ["pooler"], "BertForPreTraining": [],
        "BertForSequenceClassification": ["mlm_head"], "DistilBertModel": ["mlm_head"], "DistilBertForMaskedLM": [],
        "DistilBertForSequenceClassification": ["mlm_head"],
    }  # fmt: skip
    assert info["initialized"] == expect_fresh[name]
    assert model.config.nsp is (name == "BertForPreTraining")
    if name.endswith("SequenceClassification"):
        assert sorted(info["extra"]) == sorted(f"{p}{k}" for p in fam.head_tensors for k in ("weight", "bias"))
    else:
        assert info["extra"] == {}
    ids, types, mask = batch()
    base = getattr(ref, ref.base_model_prefix, ref)
    ours, theirs = lmforge_outputs(model, ids, types, mask), hf_outputs(ref, ids, types, mask)
    if name in ("BertForMaskedLM",):  # no pooler of its own: compare what it has
        theirs.pop("pooled", None)
    if name == "BertForSequenceClassification" or name == "BertModel":
        theirs["pooled"] = base(input_ids=ids, token_type_ids=types, attention_mask=mask.long()).pooler_output
    assert_close(ours, theirs, mask)
    if name == "BertForPreTraining":
        with torch.no_grad():
            nsp = model(ids, types, mask, output="nsp_logits")
            ref_nsp = ref(input_ids=ids, token_type_ids=types, attention_mask=mask.long()).seq_relationship_logits
        torch.testing.assert_close(nsp, ref_nsp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["bin", "sharded", "legacy"])
def test_bin_and_sharded_weights(layout, tmp_path, tokenizer):
    ref = hf_model("BertForMaskedLM")
    folder = save(ref, tmp_path / layout, tokenizer, **({"max_shard_size": "20KB"} if layout == "sharded" else {}))
    if layout != "sharded":  # as older transformers wrote them: a pickle, the tied decoder copy and buffers included
        (folder / "model.safetensors").unlink()
        state = dict(ref.state_dict())
        assert "cls.predictions.decoder.weight" in state
        state["bert.embeddings.position_ids"] = torch.arange(40)[None]
        if layout == "legacy":  # bert-base-uncased's original file: LayerNorm gamma and beta
            state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                     for k, v in state.items()}  # fmt: skip
        torch.save(state, folder / "pytorch_model.bin")
    names = sorted(p.name for p in folder.iterdir())
    assert ("model.safetensors.index.json" in names) if layout == "sharded" else ("pytorch_model.bin" in names)
    model, _, _ = load_base(str(folder))
    ids, types, mask = batch()
    assert_close(lmforge_outputs(model.eval(), ids, types, mask), hf_outputs(ref, ids, types, mask), mask)


def test_hub_id_goes_through_the_hub_cache(tmp_path, tokenizer, monkeypatch):
    folder = save(hf_model("DistilBertForMaskedLM"), tmp_path / "snap", tokenizer)
    asked = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.append((repo_id, revision, tuple(allow_patterns)))
        return str(folder)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, tok, info = load_base("someone/distilbert-tiny", revision="main")
    assert info["family"] == "distilbert" and info["kind"] == "hf" and isinstance(tok, WordPieceTokenizer)
    assert asked[0][:2] == ("someone/distilbert-tiny", "main") and "vocab.txt" in asked[0][2]


def test_tokenizer_of_a_bert_folder_equals_transformers(tmp_path, tokenizer):
    folder = save(hf_model("BertModel"), tmp_path / "bert", tokenizer)
    _, tok, _ = hf.load_model(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert tok.encode_pair(text)[0] == theirs(text)["input_ids"]
        assert tok.encode_pair(text, "a pair")[1] == theirs(text, "a pair")["token_type_ids"]


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key' is not supported"),
        ({"is_decoder": True}, "is_decoder=True is not supported"),
        ({"hidden_act": "relu"}, "activation 'relu' is not supported"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=False is not supported"),
    ],
)
def test_unsupported_bert_configs_are_one_line(change, needle, tmp_path):
    values = {**bert_config().to_dict(), **change}
    with pytest.raises(HFError) as err:
        hf.config_from_hf(values, "x/config.json")
    assert needle in str(err.value) and str(err.value).startswith("x/config.json: ") and "\n" not in str(err.value)


def test_sinusoidal_distilbert_is_refused():
    with pytest.raises(HFError, match="sinusoidal_pos_embds=True is not supported"):
        hf.config_from_hf({**distilbert_config().to_dict(), "sinusoidal_pos_embds": True})


def test_wrong_shapes_and_unknown_tensors_are_one_line(tmp_path, tokenizer):
    ref = hf_model("BertForMaskedLM")
    state = dict(ref.state_dict())
    config, family = hf.config_from_hf(ref.config.to_dict())
    bad = {**state, "bert.encoder.layer.0.attention.self.query.weight": torch.zeros(3, 3)}
    with pytest.raises(HFError, match="has shape"):
        hf.state_dict_from_hf(bad, config, family)
    with pytest.raises(HFError, match="unexpected tensors"):
        hf.state_dict_from_hf({**state, "bert.mystery.weight": torch.zeros(1)}, config, family)
    missing = {k: v for k, v in state.items() if "layer.1.output.dense" not in k}
    with pytest.raises(HFError, match="missing tensor 'bert.encoder.layer.1.output.dense"):
        hf.state_dict_from_hf(missing, config, family)


# -- export ----------------------------------------------------------------------------------------------------


def _checkpoint(config: EncoderConfig, tokenizer, task: str, tmp_path: Path, head=None, labels=None, seed=0):
    torch.manual_seed(seed)
    model = _randomized(Encoder(config), seed)
    state = model.state_dict()
    if task == "classify":
        state = {k: v for k, v in state.items() if not k.startswith(("mlm_head.", "nsp_head."))}
    ckpt = Checkpoint(path=tmp_path / "run.ckpt", config=config, state=state, tokenizer=tokenizer, task=task,
                      head=head or {}, labels=labels)  # fmt: skip
    return ckpt, model


def run_snippet(folder: Path) -> None:
    """The card's "How to use" code, run as written with this folder for its model id."""
    import re

    (code,) = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    ids = re.findall(r'^model_id = ("[^"\n]*")', code, re.M)
    assert ids == [json.dumps(folder.name)], code
    exec(compile(code.replace(f"model_id = {ids[0]}", f"model_id = {json.dumps(str(folder))}", 1), "card", "exec"), {})


def _export(ckpt: Checkpoint, out: Path, **kwargs) -> Path:
    import lmforge.hf_export as hf_export

    out.mkdir()
    return hf_export.export_hf(ckpt, out, **kwargs)


BERT = dict(vocab_size=128, max_positions=40, type_vocab_size=2, n_layer=2, n_head=4, n_embd=32, mlp_hidden=40)
DISTIL = dict(BERT, type_vocab_size=0, pooler=False)


@pytest.mark.parametrize("kind", ["bert", "bert-nsp", "distilbert"])
def test_masked_lm_export_loads_in_transformers_with_identical_logits(kind, tmp_path, tokenizer):
    values = {"bert": BERT, "bert-nsp": {**BERT, "nsp": True}, "distilbert": DISTIL}[kind]
    config = EncoderConfig(**values)
    ckpt, model = _checkpoint(config, tokenizer, "masked_lm", tmp_path)
    folder = _export(ckpt, tmp_path / "out")
    saved = json.loads((folder / "config.json").read_text())
    arch = {"bert": "BertForMaskedLM", "bert-nsp": "BertForPreTraining", "distilbert": "DistilBertForMaskedLM"}[kind]
    assert saved["architectures"] == [arch] and saved["pad_token_id"] == tokenizer.pad_id
    assert {"vocab.txt", "tokenizer.json", "tokenizer_config.json", "README.md"} <= {p.name for p in folder.iterdir()}
    ref = getattr(transformers, arch).from_pretrained(folder).eval()
    theirs_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids, types, mask = batch(tokenizer)
    for i, text in enumerate(TEXTS):
        pair = "and a second sentence" if i == 1 else None
        got = theirs_tok(text, pair)
        assert got["input_ids"] == tokenizer.encode_pair(text, pair)[0]
        if config.type_vocab_size:
            assert got["token_type_ids"] == tokenizer.encode_pair(text, pair)[1]
    ours, theirs = lmforge_outputs(model, ids, types, mask), hf_outputs(ref, ids, types, mask)
    assert "logits" in theirs
    assert_close(ours, theirs, mask, atol=1e-4)
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and f"`{arch}`" in card and "masked-language modelling" in card
    run_snippet(folder)
    # and back: lmforge reads its own export with the same outputs
    again, tok, info = hf.load_model(folder)
    assert info["family"] == kind.split("-")[0] and tok.encode("fox") == tokenizer.encode("fox")
    assert_close(
        lmforge_outputs(again.eval(), ids, types, mask),
        {k: v for k, v in ours.items() if k != "pooled" or kind != "bert"},
        mask,
    )


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_classifier_export_loads_in_transformers_with_identical_logits(kind, tmp_path, tokenizer):
    config = EncoderConfig(**(BERT if kind == "bert" else DISTIL))
    torch.manual_seed(3)
    C, n = config.n_embd, 3
    head = {"classifier.weight": torch.randn(n, C) * 0.3, "classifier.bias": torch.randn(n) * 0.1}
    if kind == "distilbert":
        head.update({"pre_classifier.weight": torch.randn(C, C) * 0.2, "pre_classifier.bias": torch.randn(C) * 0.1})
    labels = ["neg", "neu", "pos"]
    ckpt, model = _checkpoint(config, tokenizer, "classify", tmp_path, head=head, labels=labels)
    folder = _export(ckpt, tmp_path / "out")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and saved["num_labels"] == 3
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(ref).__name__ == families.family(kind).classifier
    ids, types, mask = batch(tokenizer)
    with torch.no_grad():
        h = model(ids, types if config.type_vocab_size else None, mask, output="hidden")
        if kind == "bert":
            x = model.pooled(h)
        else:
            x = torch.relu(
                torch.nn.functional.linear(h[:, 0], head["pre_classifier.weight"], head["pre_classifier.bias"])
            )
        ours = torch.nn.functional.linear(x, head["classifier.weight"], head["classifier.bias"])
        args = {
            "input_ids": ids,
            "attention_mask": mask.long(),
            **({"token_type_ids": types} if kind == "bert" else {}),
        }
        theirs = ref(**args).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "3 labels" in card
    run_snippet(folder)
    pipe = transformers.pipeline("text-classification", model=str(folder))
    assert pipe(TEXTS[0])[0]["label"] in labels


def test_pre_norm_encoder_has_no_transformers_architecture(tmp_path, tokenizer):
    config = EncoderConfig(**{**BERT, "norm_position": "pre"})
    ckpt, _ = _checkpoint(config, tokenizer, "masked_lm", tmp_path)
    with pytest.raises(HFError, match="neither BERT"):
        _export(ckpt, tmp_path / "out")


def test_round_trip_is_exact(tmp_path, tokenizer):
    ref = hf_model("BertForPreTraining")
    folder = save(ref, tmp_path / "in", tokenizer)
    model, _, info = hf.load_model(folder)
    back = hf.state_dict_to_hf(model.state_dict(), model.config, "bert")
    theirs = {k: v for k, v in ref.state_dict().items() if not families.family("bert").is_buffer(k)}
    assert set(back) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(back[key], tensor), key


# -- LoRA ------------------------------------------------------------------------------------------------------


def test_lora_on_an_encoder_classifier_exports_a_peft_adapter(tmp_path, tokenizer, recwarn):
    peft = pytest.importorskip("peft")
    from lmforge import lora

    config = EncoderConfig(**BERT)
    torch.manual_seed(5)
    head = {"classifier.weight": torch.randn(2, config.n_embd) * 0.3, "classifier.bias": torch.randn(2) * 0.1}
    base_ckpt, model = _checkpoint(config, tokenizer, "classify", tmp_path, head=head, labels=["a", "b"])
    base_folder = _export(base_ckpt, tmp_path / "base")
    model.mlm_head = None  # as a classifier has it: no masked-LM head
    names = lora.apply_lora(model, r=4, alpha=8.0, targets=["query", "value", "dense"])
    # "dense" is what PEFT means by it too: every BERT Linear so named, the pooler's included
    assert "blocks.0.attn.q_proj" in names and "blocks.1.mlp.c_fc" in names and "pooler" in names
    with torch.no_grad():
        for module in lora.lora_modules(model).values():
            module.lora_B.normal_(std=0.3)
    adapters = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    settings = {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["query", "value", "dense"]}
    (tmp_path / "adapter").mkdir()
    lora.write_peft_adapter(adapters, config, settings, tmp_path / "adapter", task_type="SEQ_CLS", modules_to_save=head)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["classifier"] and written["task_type"] == "SEQ_CLS"
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_folder)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    model.eval()
    ids, types, mask = batch(tokenizer)
    with torch.no_grad():
        ours = torch.nn.functional.linear(model.pooled(model(ids, types, mask, output="hidden")), head["classifier.weight"],
                                          head["classifier.bias"])  # fmt: skip
        theirs = peft_model(input_ids=ids, token_type_ids=types, attention_mask=mask.long()).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    assert not [w for w in recwarn if "adapter keys" in str(w.message)]  # PEFT adapted exactly lmforge's modules
    assert sorted(written["target_modules"]) == written["target_modules"] and "dense" not in written["target_modules"]


@pytest.mark.slow
def test_fit_export_and_load_in_transformers(tmp_path):
    """`lmforge fit` a tiny BERT with masked-LM and next-sentence heads, `lmforge export --format hf` (and lmforge's
    own safetensors format) its checkpoint: transformers' BertForPreTraining gives the logits lmforge gives, and
    the exports load back as fine-tuning bases."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "lmforge"]
    fit = [*run, "fit", "-c", str(root / "configs/bert-tiny-mlm.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
           "--trainer.max_steps", "30", "--trainer.val_check_interval", "30", "--trainer.enable_progress_bar", "false",
           "--data.nsp", "true", "--model.config.nsp", "true", "--data.dataset.size_bytes", "200000"]  # fmt: skip
    result = subprocess.run(fit, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    for fmt in ("hf", "safetensors"):
        cmd = [*run, "export", str(ckpt), "--to", str(tmp_path / fmt), "--format", fmt]
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    model, tokenizer, info = load_base(str(ckpt))
    assert info["family"] == "bert" and model.config.nsp
    ref = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = their_tok(["the old man walked to the sea", "a fox"], ["and then he slept", "ran"], padding=True,
                    return_tensors="pt")  # fmt: skip
    assert (
        enc["input_ids"][0].tolist()[
            : len(tokenizer.encode_pair("the old man walked to the sea", "and then he slept")[0])
        ]
        == tokenizer.encode_pair("the old man walked to the sea", "and then he slept")[0]
    )
    mask = enc["attention_mask"].bool()
    model.eval()
    with torch.no_grad():
        theirs = ref(**enc)
        logits = model(enc["input_ids"], enc["token_type_ids"], mask)
        nsp = model(enc["input_ids"], enc["token_type_ids"], mask, output="nsp_logits")
    torch.testing.assert_close(logits[mask], theirs.prediction_logits[mask], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(nsp, theirs.seq_relationship_logits, atol=1e-4, rtol=1e-5)
    for fmt in ("hf", "safetensors"):
        again, tok, got = load_base(str(tmp_path / fmt))
        assert isinstance(again, Encoder) and got["family"] == "bert" and tok.encode("fox") == tokenizer.encode("fox")
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(enc["input_ids"], enc["token_type_ids"], mask)[mask], logits[mask])


def test_the_family_templates_agree_with_the_hand_written_name_maps():
    """families.py's BERT and DistilBERT templates give, name for name, the maps tests/test_encoder.py writes out by
    hand (from reading transformers' modules) for its parity tests."""
    from test_encoder import bert_key_map, distilbert_key_map

    for name, hand in (("bert", bert_key_map(3)), ("distilbert", distilbert_key_map(3))):
        template = {ours: slot.hf for ours, slot in families.family(name).tensors(3).items()}
        config = EncoderConfig(**{**(BERT if name == "bert" else DISTIL), "n_layer": 3})
        present = {k: v for k, v in template.items() if k in families.shapes(config)}
        assert {k: present[k] for k in hand} == hand
        extra = set(present) - set(hand)  # what BertForMaskedLM lacks: the pooler (and next-sentence head)
        assert extra == ({"pooler.weight", "pooler.bias"} if name == "bert" else set())


def test_gguf_refuses_an_encoder_in_one_line():
    exporter = pytest.importorskip("lmforge_gguf.exporter")
    with pytest.raises(exporter.GGUFError, match="holds an encoder .*export encoders with --format hf"):
        exporter.choose_arch(EncoderConfig(**BERT))


def test_generate_and_evaluate_refuse_an_encoder_in_one_line(tmp_path, tokenizer):
    from lmforge import commands
    from lmforge.errors import UserError

    folder = save(hf_model("DistilBertForMaskedLM"), tmp_path / "distil", tokenizer)
    with pytest.raises(UserError, match="bidirectional encoder \\(distilbert\\).*generate runs decoder"):
        commands.generate_command([str(folder), "--prompt", "hello", "--device", "cpu"])
    data = tmp_path / "ppl.jsonl"
    data.write_text('{"text": "hello there"}\n')
    with pytest.raises(UserError, match="bidirectional encoder"):
        commands.evaluate_command([str(folder), "--task", "perplexity", "--data", str(data), "--device", "cpu"])
