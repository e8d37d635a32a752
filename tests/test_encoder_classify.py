"""Sequence classification on encoders (BERT, DistilBERT): parity with transformers' heads, BERT's framing of
the data, pretrained-beats-random, and the shipped config end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.data.classify import ClassificationDataModule
from lmforge.encoder import Encoder
from lmforge.errors import UserError
from lmforge.finetune import ClassifierModule
from lmforge.tokenizers import WordPieceTokenizer

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data"
TINY = DATA / "distilbert-tiny"
WORDS = "the a cat dog sat on mat rug red blue big small ran far".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ed", *"abcdefghijklmnopqrstuvwxyz.,"]
TEXTS = ["the cat sat on the mat.", "a big dog ran far", "red rug", "the small blue cats sat on a big red mat, far"]
PAIRS = ["a dog", "the cat ran on the rug and sat on the big blue mat", "cats", "dog"]


def hf_folder(path: Path, kind: str, num_labels: int = 3) -> tuple[Path, torch.nn.Module]:
    """A transformers BERT or DistilBERT sequence classifier with random weights (LayerNorms and biases too), and
    its WordPiece tokenizer, saved to ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    shape = dict(vocab_size=len(VOCAB), max_position_embeddings=32, num_labels=num_labels)
    if kind == "bert":
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, **shape
        )
        model, tokenizer = transformers.BertForSequenceClassification(config), transformers.BertTokenizerFast
    else:
        config = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, **shape)
        model, tokenizer = (
            transformers.DistilBertForSequenceClassification(config),
            transformers.DistilBertTokenizerFast,
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))
    model.save_pretrained(path)
    tokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return path, model.eval()


def write_csv(path: Path, rows: list[tuple[str, ...]], header: str = "text,label") -> str:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header.split(","))
        writer.writerows(rows)
    return str(path)


def datamodule(train: str, tokenizer, max_length: int = 32, **kwargs) -> ClassificationDataModule:
    dm = ClassificationDataModule(train, val=train, batch_size=len(TEXTS), **kwargs)
    dm.set_tokenizer(tokenizer, max_length)
    dm.setup("fit")
    return dm


# -- parity with transformers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_logits_equal_transformers_sequence_classifiers(tmp_path, kind):
    folder, theirs = hf_folder(tmp_path / kind, kind)
    module = ClassifierModule(base=str(folder), labels=["x", "y", "z"])
    assert module.model.mlm_head is None and module.model.nsp_head is None  # unused: no DDP complaints
    heads = {k for k in module.state_dict() if not k.startswith("model.")}
    if kind == "bert":
        assert heads == {"classifier.weight", "classifier.bias"} and module.pre_classifier is None
    else:
        assert heads == {"classifier.weight", "classifier.bias", "pre_classifier.weight", "pre_classifier.bias"}
    assert module.score is None
    their_state = theirs.state_dict()
    with torch.no_grad():  # the head, as transformers has it (load_base reads the backbone only)
        for key in heads:
            module.state_dict()[key].copy_(their_state[key])
    # A padded batch from the data module: pairs for BERT (token types 0/1), single texts for DistilBERT.
    pair = {"text_pair_field": "pair"} if kind == "bert" else {}
    rows = [(t, p, "xyz"[i % 3]) for i, (t, p) in enumerate(zip(TEXTS, PAIRS))]
    train = write_csv(tmp_path / "train.csv", rows, "text,pair,label")
    batch = next(iter(datamodule(train, module.tokenizer, **pair).val_dataloader()))
    assert not batch["attention_mask"].all()  # padded
    module.eval()
    with torch.no_grad():
        ours = module(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].long()}
        if kind == "bert":
            assert batch["token_type_ids"].max() == 1
            inputs["token_type_ids"] = batch["token_type_ids"]
        want = theirs(**inputs).logits
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


def test_heads_are_initialised_as_transformers_does(tmp_path):
    folder, _ = hf_folder(tmp_path / "d", "distilbert")
    module = ClassifierModule(base=str(folder), labels=[str(i) for i in range(50)])
    for layer in (module.pre_classifier, module.classifier):
        assert layer.bias.abs().max() == 0
        assert abs(float(layer.weight.detach().std()) - 0.02) < 0.004


def test_encoder_model_options_shorten_positions(tmp_path):
    folder, _ = hf_folder(tmp_path / "b", "bert")
    module = ClassifierModule(base=str(folder), labels=["a", "b"], model_options={"max_positions": 16, "dropout": 0.1})
    assert isinstance(module.model, Encoder)
    assert module.config.max_positions == 16 and module.model.wpe.weight.shape[0] == 16
    assert module.config.dropout == 0.1 and module.model.mlm_head is None
    with pytest.raises(UserError, match="max_positions=64 exceeds the 32 learned positions"):
        ClassifierModule(base=str(folder), labels=["a", "b"], model_options={"max_positions": 64})
    with pytest.raises(UserError, match="'block_size' cannot change.*allowed: dropout, attention, loss, max_positions"):
        ClassifierModule(base=str(folder), labels=["a", "b"], model_options={"block_size": 16})


# -- data: BERT's framing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
@pytest.mark.parametrize("max_length", [32, 7])
def test_framing_equals_transformers_tokenizers(tmp_path, kind, max_length):
    folder, _ = hf_folder(tmp_path / kind, kind)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = WordPieceTokenizer.from_pretrained_folder(folder)
    train = write_csv(
        tmp_path / "t.csv", [(t, p, str(i % 2)) for i, (t, p) in enumerate(zip(TEXTS, PAIRS))], "text,pair,label"
    )
    for pair in (None, "pair"):
        dm = datamodule(train, ours, max_length, **({"text_pair_field": pair} if pair else {}))
        batch = next(iter(dm.val_dataloader()))
        args = (TEXTS, PAIRS) if pair else (TEXTS,)
        want = theirs(*args, truncation=True, max_length=max_length, padding=True, return_token_type_ids=True)
        assert batch["input_ids"].tolist() == want["input_ids"], (pair, max_length)
        assert batch["attention_mask"].long().tolist() == want["attention_mask"]
        assert batch["token_type_ids"].tolist() == want["token_type_ids"]
        lengths = batch["attention_mask"].sum(1)
        assert (batch["input_ids"][:, 0] == ours.cls_id).all()
        assert (batch["input_ids"][torch.arange(len(TEXTS)), lengths - 1] == ours.sep_id).all()  # the last [SEP] kept
        assert (batch["input_ids"][~batch["attention_mask"]] == ours.pad_id).all()
        if max_length == 7:
            assert dm.stats["truncated"] > 0 and batch["input_ids"].shape[1] == 7


def test_pairs_need_an_encoder_tokenizer(tmp_path):
    from lmforge.tokenizers import ByteTokenizer

    train = write_csv(tmp_path / "t.csv", [("a b", "c", "0"), ("d", "e f", "1")], "text,pair,label")
    dm = ClassificationDataModule(train, val=train, text_pair_field="pair")
    dm.set_tokenizer(ByteTokenizer(), 16)
    with pytest.raises(UserError, match="text_pair_field needs an encoder's tokenizer"):
        dm.setup("fit")


# -- pretraining pays -------------------------------------------------------------------------------------------


def _random_weights(module: ClassifierModule) -> None:
    """The encoder's weights drawn afresh as BERT initialises them (the shape and the head stay)."""
    for layer in module.model.modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.02)
            torch.nn.init.zeros_(layer.bias)
        elif isinstance(layer, torch.nn.Embedding):
            torch.nn.init.normal_(layer.weight, std=0.02)
        elif isinstance(layer, torch.nn.LayerNorm):
            layer.reset_parameters()


def test_a_pretrained_encoder_beats_random_weights(tmp_path):
    """The shipped MLM-pretrained distilbert-tiny against the same architecture from random weights, on the shipped
    acceptability data (word order: what masked-LM pretraining on the corpus teaches), same seed, data and steps."""
    import lightning as L

    results = {}
    for init in ("pretrained", "random"):
        L.seed_everything(0, verbose=False)
        module = ClassifierModule(base=str(TINY), optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
                                  scheduler={"name": "constant"})  # fmt: skip
        if init == "random":
            _random_weights(module)
        dm = ClassificationDataModule(str(DATA / "acceptability-train.csv"), val=str(DATA / "acceptability-val.csv"),
                                      batch_size=16, max_length=64)  # fmt: skip
        trainer = L.Trainer(max_steps=50, val_check_interval=50, check_val_every_n_epoch=None, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path / init)  # fmt: skip
        trainer.fit(module, dm)
        results[init] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    pre, rnd = results["pretrained"], results["random"]
    assert pre["val/acc"] >= rnd["val/acc"] + 0.15, results  # measured: 0.745 against 0.50
    assert pre["val/f1_macro"] >= rnd["val/f1_macro"] + 0.15, results
    assert pre["val/loss"] <= rnd["val/loss"] - 0.08, results  # 0.55 against 0.69 (chance: ln 2)


# -- the shipped config, end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_config_fits_exports_and_transformers_agrees(tmp_path):
    """`lmforge fit -c configs/finetune-distilbert-classify.yaml` (shortened), `lmforge test` for the per-class
    report, `lmforge export --format hf`: transformers' DistilBertForSequenceClassification gives the checkpoint's
    logits on a padded batch, and its tokenizer frames the texts as lmforge did."""
    import json
    import os
    import subprocess
    import sys

    from lmforge.checkpoint import read_lmforge_checkpoint

    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "lmforge"]
    config = ["-c", str(ROOT / "configs/finetune-distilbert-classify.yaml"), "--trainer.default_root_dir",
              str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    fit = [*run, "fit", *config, "--trainer.max_steps", "40", "--trainer.val_check_interval", "40"]
    result = subprocess.run(fit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    test = [*run, "test", *config, "--ckpt_path", str(ckpt)]
    result = subprocess.run(test, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "run/test_results.json").read_text())
    assert set(report["report"]["labels"]) == {"bad", "ok"} and len(report["report"]["confusion_matrix"]) == 2
    out = tmp_path / "hf"
    result = subprocess.run([*run, "export", str(ckpt), "--to", str(out), "--format", "hf"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(theirs).__name__ == "DistilBertForSequenceClassification"
    assert theirs.config.id2label == {0: "bad", 1: "ok"}
    their_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["The brave king counts around the teacher.", "Softly village the builds."]
    enc = their_tok(texts, padding=True, return_tensors="pt")
    module = ClassifierModule(base=str(TINY), labels=["bad", "ok"])
    module.load_state_dict(read_lmforge_checkpoint(ckpt)["state_dict"])
    module.eval()
    ours_tok = module.tokenizer
    for text, ids in zip(texts, enc["input_ids"]):
        framed = [ours_tok.cls_id, *ours_tok.encode(text), ours_tok.sep_id]
        assert ids.tolist()[: len(framed)] == framed
    with torch.no_grad():
        mine = module(enc["input_ids"], enc["attention_mask"])
        ref = theirs(**enc).logits
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-5)
