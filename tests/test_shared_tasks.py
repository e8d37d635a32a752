"""What the decoder's and the encoder's pretraining share (lmforge.task._CorpusTaskModule,
lmforge.data.corpus.CorpusDataModule, the config checks of lmforge.model), each keeping its own messages."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from lmforge.data.mlm import MLMDataModule
from lmforge.data.pretrain import PretrainDataModule
from lmforge.data.sources import CorpusError
from lmforge.encoder import EncoderConfig
from lmforge.errors import MissingFileError, UserError
from lmforge.masked_lm import MaskedLMModule
from lmforge.model import GPTConfig
from lmforge.pretrain import PretrainModule


def test_connect_names_each_models_length_field():
    with pytest.raises(UserError) as err:
        PretrainDataModule(seq_len=64).connect(max_seq_length=32)
    assert str(err.value) == (
        "data.seq_len=64 exceeds the model's block_size=32; lower data.seq_len or raise model.config.block_size"
    )
    with pytest.raises(UserError) as err:
        MLMDataModule(seq_len=64).connect(max_seq_length=32)
    assert str(err.value) == (
        "data.seq_len=64 exceeds the model's max_positions=32; lower data.seq_len or raise model.config.max_positions"
    )


def test_constructor_checks_keep_their_order_and_words():
    with pytest.raises(UserError, match=r"^data.seq_len=0 must be positive$"):
        PretrainDataModule(seq_len=0, batch_size=0)
    with pytest.raises(UserError, match=r"^data.seq_len=4 is too short: at least 5 with nsp=True$"):
        MLMDataModule(seq_len=4, nsp=True, batch_size=0)
    for cls in (PretrainDataModule, MLMDataModule):
        with pytest.raises(UserError, match=r"^data.batch_size=0 must be positive$"):
            cls(batch_size=0, val_fraction=2.0)
        with pytest.raises(UserError, match=r"^data.val_fraction=1.0 must be between 0 and 1$"):
            cls(val_fraction=1.0)
    with pytest.raises(UserError, match=r"data.mask_fraction=0.9 and data.random_fraction=0.2"):
        MLMDataModule(mask_fraction=0.9, random_fraction=0.2)


def test_split_messages_of_each_data_module(tmp_path):
    dm = PretrainDataModule(seq_len=8, cache_dir=str(tmp_path))
    dm.token_file = SimpleNamespace(num_tokens=10)
    with pytest.raises(CorpusError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        "corpus: 10 tokens is shorter than one training window plus one validation window "
        "(18 tokens at seq_len=8); add text or lower data.seq_len"
    )
    dm = MLMDataModule(seq_len=8, cache_dir=str(tmp_path))
    dm.token_file = SimpleNamespace(num_tokens=10)
    dm.tokenizer = SimpleNamespace(cls_id=1, sep_id=2, pad_id=0, mask_id=3, eos_id=4, vocab_size=10)
    with pytest.raises(CorpusError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        "corpus: 10 tokens is shorter than one training sequence plus one validation sequence "
        "(12 tokens of text at seq_len=8); add text or lower data.seq_len"
    )


def test_describe_data_and_state():
    corpus = SimpleNamespace(hub_dataset="owner/corpus", describe=lambda: "a corpus")
    pre, mlm = PretrainDataModule(), MLMDataModule()
    pre.corpus = mlm.corpus = corpus
    assert pre.describe_data() == {
        "dataset": {"name": "embedded"},
        "hub_datasets": ["owner/corpus"],
        "description": "a corpus",
    }
    assert mlm.describe_data() == {"dataset": {"name": "embedded"}, "description": "a corpus"}
    for dm in (pre, mlm):
        assert dm.state_dict() == {"data_order": {}}


def test_checkpoint_metadata_and_shape_check():
    for module, task in ((PretrainModule(), None), (MaskedLMModule(), "masked_lm")):
        checkpoint: dict = {}
        module.on_save_checkpoint(checkpoint)
        meta = checkpoint["lmforge"]
        assert meta.get("task") == task and ("task" in meta) == (task is not None)
        assert meta["model_config"] == module.config.to_dict() and meta["tokenizer"] is None
        assert list(meta)[-4:] == ["model_config", "tokenizer", "rng", "loss_unit"]
    saved = EncoderConfig(n_layer=2).to_dict()
    module = MaskedLMModule()
    assert module._shape_changes({"lmforge": {"model_config": saved}}) == [("n_layer", 2, 4)]
    with pytest.raises(UserError) as err:
        module.on_load_checkpoint({"lmforge": {"model_config": saved}})
    assert str(err.value) == (
        "--ckpt_path: the config's model shape differs from the checkpoint's: model.config.n_layer=4 (checkpoint: 2)"
        "; use the model config it was trained with, or start without --ckpt_path"
    )
    module = PretrainModule()
    assert module._shape_changes({"lmforge": {"model_config": GPTConfig(n_embd=128).to_dict()}}) == [
        ("n_embd", 128, 256),
        ("mlp_hidden", 512, 1024),
    ]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GPTConfig(n_head=0), "model config: n_head=0 must be a positive integer"),
        (lambda: EncoderConfig(max_positions=0), "model config: max_positions=0 must be a positive integer"),
        (lambda: GPTConfig(norm="batch"), "model config: norm='batch' is not one of layernorm, rmsnorm"),
        (lambda: EncoderConfig(activation="relu"), "model config: activation='relu' is not one of gelu, gelu_tanh"),
        (lambda: GPTConfig(attention="cuda"), "model config: attention='cuda' is not one of auto, triton, torch"),
        (lambda: EncoderConfig(loss="cuda"), "model config: loss='cuda' is not one of auto, triton, torch"),
        (lambda: EncoderConfig(n_embd=10, n_head=4), "model config: n_embd=10 must be a multiple of n_head=4"),
        (lambda: GPTConfig(dropout=1.0), "model config: dropout=1.0 must be in [0, 1)"),
    ],
)
def test_config_messages(make, message):
    with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
        make()


def test_evaluate_data_file_messages(tmp_path):
    from lmforge.evaluate import read_data

    with pytest.raises(CorpusError) as err:
        read_data(str(tmp_path / "x.csv"), "generation")
    assert str(err.value) == (
        f"evaluate: {tmp_path / 'x.csv'}: unknown format '.csv'; the generation task reads a file ending in "
        ".jsonl or .json"
    )
    with pytest.raises(MissingFileError) as err:
        read_data(str(tmp_path / "d.txt"), "perplexity")
    assert str(err.value) == f"evaluate: --data {tmp_path / 'd.txt'} not found"
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(MissingFileError, match="is a folder, not a file$"):
        read_data(str(tmp_path / "d.txt"), "perplexity")
