"""Masked-LM data and task: masking statistics, whole words, determinism, NSP pairs, and a fit through the CLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.mlm import IGNORE_INDEX, MaskingCollator, MLMDataModule
from lmforge.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
V, PAD, UNK, CLS, SEP, MASK = 500, 0, 1, 2, 3, 4
SPECIAL = [PAD, UNK, CLS, SEP, MASK]


def _examples(n: int, length: int = 128, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = rng.integers(5, V, size=length - 2)
        body[rng.random(body.size) < 0.02] = UNK
        out.append({"input_ids": np.concatenate(([CLS], body, [SEP])), "key": (0, i)})
    return out


def _collator(**kwargs) -> MaskingCollator:
    return MaskingCollator(V, MASK, PAD, SPECIAL, **kwargs)


def test_masking_statistics():
    examples = _examples(400)
    batch = _collator(seed=3)(examples)
    original = torch.from_numpy(np.stack([e["input_ids"] for e in examples]))
    labels, inputs = batch["labels"], batch["input_ids"]
    candidates = ~torch.isin(original, torch.tensor(SPECIAL))
    selected = labels != IGNORE_INDEX
    assert not (selected & ~candidates).any(), "a special token was selected"
    assert torch.equal(labels[selected], original[selected])
    rate = selected.sum().item() / candidates.sum().item()
    assert abs(rate - 0.15) < 0.01, rate
    n = selected.sum().item()
    masked = (inputs[selected] == MASK).sum().item() / n
    kept = (inputs[selected] == original[selected]).sum().item() / n
    randomized = 1 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1 - 1 / V * 0.1) < 0.015 and abs(randomized - 0.1) < 0.015
    assert not torch.isin(inputs[selected & (inputs != MASK)], torch.tensor(SPECIAL)).any()  # random ids not special
    assert torch.equal(inputs[~selected], original[~selected])  # nothing unselected changes
    assert "attention_mask" not in batch  # all the same length: no padding


def test_padding_is_never_selected():
    examples = [{"input_ids": np.array([CLS, *range(5, 5 + n), SEP]), "key": (0, n)} for n in (3, 40, 100)]
    batch = _collator(mlm_probability=1.0)(examples)
    mask = batch["attention_mask"]
    assert mask.sum(1).tolist() == [5, 42, 102]
    assert (batch["labels"][~mask] == IGNORE_INDEX).all() and (batch["input_ids"][~mask] == PAD).all()
    assert ((batch["labels"] != IGNORE_INDEX) == (mask & ~torch.isin(batch["input_ids"].new_tensor(
        np.stack([np.pad(e["input_ids"], (0, 102 - len(e["input_ids"]))) for e in examples])), torch.tensor(SPECIAL)))).all()  # fmt: skip


def test_deterministic_by_seed_and_key():
    examples = _examples(8)
    a, b, c = _collator(seed=1)(examples), _collator(seed=1)(examples), _collator(seed=2)(examples)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["labels"], c["labels"])
    # an example's mask depends on its key only, not on the batch it is in
    alone = _collator(seed=1)(examples[3:4])
    assert torch.equal(alone["labels"][0], a["labels"][3])


def test_whole_word_masking_keeps_words_whole():
    continuation = np.zeros(V, dtype=bool)
    continuation[300:] = True  # ids >= 300 continue the word before them
    rng = np.random.default_rng(0)
    examples = []
    for i in range(300):
        words = [[int(rng.integers(5, 300)), *rng.integers(300, V, size=int(rng.integers(0, 3))).tolist()]
                 for _ in range(30)]  # fmt: skip
        examples.append({"input_ids": np.array([CLS, *sum(words, []), SEP]), "key": (0, i)})
    collate = _collator(continuation=continuation, seed=0)
    total = chosen = 0
    for e in examples:
        ids = e["input_ids"]
        _, labels = collate.mask(ids, e["key"])
        selected = labels != IGNORE_INDEX
        starts = np.flatnonzero((ids >= 5) & (ids < 300))
        for begin, end in zip(starts, [*starts[1:], len(ids) - 1]):
            word = selected[begin:end]
            assert word.all() or not word.any(), "a word was split"
            chosen += int(word.all())
            total += 1
    assert abs(chosen / total - 0.15) < 0.015


def test_bad_fractions_are_one_line():
    with pytest.raises(UserError, match="data.mlm_probability=0 must be in"):
        _collator(mlm_probability=0)
    with pytest.raises(UserError, match="add up to at most 1"):
        _collator(mask_fraction=0.9, random_fraction=0.2)


@pytest.fixture(scope="module")
def nsp_data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    dm = MLMDataModule(dataset={"name": "embedded", "size_bytes": 100_000}, tokenizer={"name": "wordpiece",
                       "vocab_size": 256}, seq_len=48, nsp=True, cache_dir=str(cache), seed=0, num_workers=0)  # fmt: skip
    dm.setup("fit")
    return dm


def test_nsp_pairs(nsp_data):
    ds, tok = nsp_data.train_set, nsp_data.tokenizer
    items = [ds[i] for i in range(len(ds))]
    labels = np.array([e["next_sentence_label"] for e in items])
    assert abs(labels.mean() - 0.5) < 0.05, labels.mean()
    tokens = nsp_data.token_file.open()
    for i, e in enumerate(items[:200]):
        ids, types = e["input_ids"], e["token_type_ids"]
        assert len(ids) == 48 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
        seps = np.flatnonzero(ids == tok.sep_id)
        first = seps[0]  # the corpus is one document: no [SEP] inside a segment
        assert types[: first + 1].sum() == 0 and types[first + 1 :].all()
        b = ids[first + 1 : -1]
        follows = np.array_equal(tokens[i * 45 + first - 1 : i * 45 + first - 1 + len(b)], b)
        assert follows == (e["next_sentence_label"] == 0)
    batch = nsp_data.collator(items[:4])
    assert batch["next_sentence_label"].shape == (4,) and batch["token_type_ids"].max() == 1


def test_unigram_entropy_and_loader(nsp_data):
    entropy = nsp_data.unigram_entropy_nats()
    assert 2.0 < entropy < np.log(nsp_data.tokenizer.vocab_size)
    batch = next(iter(nsp_data.val_dataloader()))
    assert batch["input_ids"].shape == (len(nsp_data.val_set), 48) and "next_sentence_label" in batch


def test_connect_checks_the_length():
    dm = MLMDataModule(seq_len=600)
    with pytest.raises(UserError, match="data.seq_len=600 exceeds the model's max_positions=512"):
        dm.connect(max_seq_length=512)


def test_training_step_and_loss_accounting(nsp_data):
    from lmforge.masked_lm import MaskedLMModule

    module = MaskedLMModule(config={"vocab_size": 256, "max_positions": 48, "n_layer": 1, "n_head": 2,
                                    "n_embd": 32, "nsp": True})  # fmt: skip
    module.configure_model()
    batch = nsp_data.collator([nsp_data.train_set[i] for i in range(8)])
    loss_sum, count, unit = module._train_loss(batch)
    out = module._forward(batch, "mean")
    assert torch.allclose(loss_sum / count, out.mlm + out.nsp, atol=1e-5)  # BERT's objective for one micro-batch
    assert unit == batch["labels"].numel() and int(count) == int((batch["labels"] != -100).sum())
    sums = module._extra_step_stats()
    assert len(sums) == 5 and float(sums[4]) == 8


def _read_metrics(root: Path) -> list[dict]:
    files = sorted(root.glob("csv/*/metrics.csv"))
    assert files, f"no metrics under {root}"
    with open(files[-1], newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fit_bert_tiny_below_unigram_entropy(tmp_path):
    """`lmforge fit -c configs/bert-tiny-mlm.yaml` trains on the embedded corpus, no download, and its masked-token
    loss ends well below the unigram entropy of the tokenized corpus."""
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "lmforge", "fit", "-c", str(ROOT / "configs/bert-tiny-mlm.yaml"),
           "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [r for r in _read_metrics(tmp_path / "run") if r.get("val/loss")]
    val_loss = float(rows[-1]["val/loss"])
    assert float(rows[-1]["val/mlm_acc"]) > 0.3

    dm = MLMDataModule(dataset={"name": "embedded", "size_bytes": 1_000_000, "seed": 0},
                       tokenizer={"name": "wordpiece", "vocab_size": 256}, seq_len=64,
                       cache_dir=str(tmp_path / "cache"), num_workers=0)  # fmt: skip
    dm.setup("fit")  # reuses the run's cached tokenizer and token file
    entropy = dm.unigram_entropy_nats()
    assert val_loss < entropy - 1.0, (val_loss, entropy)
    assert (tmp_path / "run/checkpoints/tokenizer/vocab.txt").is_file()
