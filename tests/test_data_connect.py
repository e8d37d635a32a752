"""connect(): the task hands the data module its tokenizer, batch size and longest sequence (LitGPT's way).

What the user set on the data module wins; connect fills in only what is unset. A setup that Lightning runs
before the task's (and so before connect) waits, and connect completes it; dataloaders asked for while still
unconnected are a one-line error saying what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_finetune import SFT_RECORDS, quiet_trainer, save_base, write_jsonl

from lmforge.data.classify import ClassificationDataModule
from lmforge.data.examples import ExampleDataModule
from lmforge.data.pretrain import PretrainDataModule
from lmforge.data.sft import SFTDataModule
from lmforge.data.sources import CorpusError
from lmforge.errors import UserError
from lmforge.finetune import ClassifierModule, SFTModule
from lmforge.tokenizers import ByteTokenizer


def write_csv(path: Path) -> str:
    rows = [f"the {word} thing {i},{label}" for i in range(12) for word, label in (("red", "warm"), ("blue", "cold"))]
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def make(kind: str, tmp_path: Path, **kwargs) -> ExampleDataModule:
    """A data module of ``kind`` over a small training file, 0.25 of it held out for validation."""
    if kind == "sft":
        return SFTDataModule(str(write_jsonl(tmp_path / "t.jsonl", SFT_RECORDS)), val_fraction=0.25, **kwargs)
    return ClassificationDataModule(write_csv(tmp_path / "c.csv"), val_fraction=0.25, **kwargs)


KINDS = pytest.mark.parametrize("kind", ["sft", "classify"])


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@KINDS
def test_connect_fills_what_is_unset(tmp_path, kind):
    dm = make(kind, tmp_path)
    tokenizer = ByteTokenizer()
    dm.connect(tokenizer=tokenizer, batch_size=3, max_seq_length=64)
    assert dm.tokenizer is tokenizer and dm.max_length == 64 and dm.batch_size == 3
    dm.setup("fit")
    assert len(next(iter(dm.train_dataloader()))["input_ids"]) == 3
    dm.connect(max_seq_length=64)  # the same again (every stage): nothing changes, no batch size given
    assert dm.tokenizer is tokenizer and dm.batch_size == 3


@KINDS
def test_connect_keeps_what_the_user_set(tmp_path, kind):
    mine, theirs = ByteTokenizer(), ByteTokenizer()
    dm = make(kind, tmp_path, tokenizer=mine, max_length=32)
    dm.connect(tokenizer=theirs, max_seq_length=64)
    assert dm.tokenizer is mine and dm.max_length == 32
    later = make(kind, tmp_path)
    later.set_tokenizer(mine, max_length=16)
    later.connect(tokenizer=theirs, max_seq_length=64)
    assert later.tokenizer is mine and later.max_length == 16


@KINDS
def test_connect_refuses_a_max_length_beyond_the_model(tmp_path, kind):
    dm = make(kind, tmp_path, max_length=128)
    with pytest.raises(UserError) as err:
        dm.connect(tokenizer=ByteTokenizer(), max_seq_length=64)
    assert f"{kind}: data.max_length=128 exceeds the model's block_size=64" in one_line(err)


@KINDS
def test_setup_before_connect_waits_and_connect_completes_it(tmp_path, kind):
    dm = make(kind, tmp_path)
    dm.setup("fit")  # what Lightning runs before the task's setup
    assert dm.datasets == {}
    dm.connect(tokenizer=ByteTokenizer(), max_seq_length=64)
    assert set(dm.datasets) == {"train", "val", "test"}
    assert len(dm.datasets["train"]) == 18 and len(dm.datasets["val"]) == 6
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[0] > 0


@KINDS
def test_a_different_handed_tokenizer_rebuilds_the_datasets(tmp_path, kind):
    dm = make(kind, tmp_path)
    dm.connect(tokenizer=ByteTokenizer(), max_seq_length=64)
    dm.setup("fit")
    built = dm.datasets["train"]
    other = ByteTokenizer()
    dm.connect(tokenizer=other, max_seq_length=64)  # a data module reused with another base
    assert dm.tokenizer is other and dm.datasets["train"] is not built
    dm.set_tokenizer(ByteTokenizer())
    assert dm.datasets == {}  # the next setup re-tokenizes


@KINDS
def test_dataloaders_before_connect_say_what_to_do(tmp_path, kind):
    dm = make(kind, tmp_path)
    dm.setup("fit")
    with pytest.raises(CorpusError) as err:
        dm.train_dataloader()
    message = one_line(err)
    assert message.startswith(f"{kind}: no tokenizer; pass tokenizer=...") and "connect(tokenizer" in message
    dm.connect(tokenizer=ByteTokenizer())  # a tokenizer, but no max_length yet
    with pytest.raises(CorpusError) as err:
        dm.val_dataloader()
    assert one_line(err).startswith(f"{kind}: no max_length; set data.max_length")


def test_fine_tuning_tasks_hand_the_base_tokenizer_to_the_data(tmp_path):
    base = str(save_base(tmp_path / "base.ckpt"))
    sft = SFTModule(base=base)
    data = make("sft", tmp_path, batch_size=4)
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=1).fit(sft, data)
    assert data.tokenizer is sft.tokenizer and data.max_length == sft.model.config.block_size
    assert data.stats["examples"] == 18

    classifier = ClassifierModule(base=base)
    data = make("classify", tmp_path, batch_size=4)
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=1).fit(classifier, data)
    assert data.tokenizer is classifier.tokenizer and data.max_length == classifier.model.config.block_size
    assert classifier.labels == ["cold", "warm"]


def test_pretrain_connect_refuses_windows_longer_than_the_model(tmp_path):
    dm = PretrainDataModule(seq_len=64, cache_dir=str(tmp_path))
    dm.connect(tokenizer=ByteTokenizer(), batch_size=3, max_seq_length=64)
    assert dm.batch_size == 3 and dm.tokenizer is None  # pretraining builds its own tokenizer
    with pytest.raises(UserError) as err:
        dm.connect(max_seq_length=32)
    assert "data.seq_len=64 exceeds the model's block_size=32" in one_line(err)
