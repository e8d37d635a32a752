"""lmforge-plugin-template: each plugin passes lmforge's protocol checks (lmforge.testing), works as documented,
and a model trained with the template's tokenizer stays usable: generate, export and fine-tune from its checkpoint."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmforge_plugin_template.exporter import load_npz
from lmforge_plugin_template.scheduler import linear_multiplier
from lmforge_plugin_template.tokenizer import WordLevelTokenizer, wordlevel

from lmforge import cli, plugins
from lmforge.checkpoint import load_checkpoint
from lmforge.errors import MissingFileError, UserError
from lmforge.testing import SampleCorpus, assert_plugin_ok

HERE = Path(__file__).resolve().parents[1]
REPO = HERE.parents[1]
STORIES = HERE / "examples" / "stories.csv"
PLUGINS = [("dataset", "csv"), ("tokenizer", "wordlevel"), ("optimizer", "adafactor"), ("scheduler", "linear"),
           ("exporter", "npz"), ("filter", "min_length")]  # fmt: skip
TINY = ["--model.config.n_layer", "1", "--model.config.n_embd", "32", "--model.config.block_size", "32",
        "--data.seq_len", "32", "--data.num_workers", "0", "--trainer.limit_val_batches", "1"]  # fmt: skip


def test_registered_under_its_names():
    for kind, name in PLUGINS:
        (info,) = plugins.discover(kind)[name]
        assert info.distribution == "lmforge-plugin-template" and info.version == "0.1.0"


@pytest.mark.parametrize("kind,name", PLUGINS)
def test_follows_the_lmforge_protocol(kind, name):
    assert_plugin_ok(kind, name)  # the dataset with its example_args (a CSV written into a temporary folder)


def test_protocol_checks_with_other_arguments():
    assert_plugin_ok("dataset", "csv", path=str(STORIES), max_rows=10)
    assert_plugin_ok("tokenizer", "wordlevel", vocab_size=16, lowercase=True)
    assert_plugin_ok("scheduler", "linear", warmup_steps=0, final_lr_ratio=0.5)
    assert_plugin_ok("exporter", "npz", dtype="float16")


def test_csv_dataset_reads_the_text_column(tmp_path):
    corpus = plugins.build("dataset", {"name": "csv", "path": str(STORIES)})
    with open(STORIES, newline="") as f:
        assert list(corpus.documents()) == [row["text"] for row in csv.DictReader(f)]
    assert corpus.num_bytes() == STORIES.stat().st_size and "stories.csv" in corpus.describe()
    with pytest.raises(UserError, match=r"has no column 'body' \(columns: id, text\); set text_column"):
        next(plugins.build("dataset", {"name": "csv", "path": str(STORIES), "text_column": "body"}).documents())
    with pytest.raises(MissingFileError, match="nope.csv does not exist"):
        plugins.build("dataset", {"name": "csv", "path": str(tmp_path / "nope.csv")})


def test_wordlevel_tokenizer_round_trips_seen_text_and_caches(tmp_path):
    corpus = SampleCorpus(["The fox jumps over the fence.\nThe dog runs!"] * 3)
    tok = wordlevel(corpus, tmp_path, vocab_size=64)
    assert [p.name for p in tmp_path.iterdir()] == [f"wordlevel-{corpus.key()}-64-1-0"]
    text = "The dog jumps over the fox.\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("The cat") == [tok.ids["The"], tok.unk_id]  # an unseen word is <unk>
    assert tok.decode([tok.eos_id, 10_000, -1]) == ""  # every id decodes, even out of range
    again = wordlevel(corpus, tmp_path, vocab_size=64)  # from the cache
    assert again.fingerprint() == tok.fingerprint() and WordLevelTokenizer.from_dict(tok.to_dict()).pieces == tok.pieces


def test_linear_schedule():
    values = [linear_multiplier(s, warmup_steps=4, total_steps=12, final_lr_ratio=0.1) for s in range(14)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0] and values[4] == 1.0
    assert values[12] == pytest.approx(0.1) and values[13] == pytest.approx(0.1)
    with pytest.raises(UserError, match="final_lr_ratio=2.0 must be between 0 and 1"):
        plugins.build("scheduler", {"name": "linear", "final_lr_ratio": 2.0}, torch.optim.SGD([torch.zeros(1)]), 10)


def lmforge_fit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "lmforge", "fit", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """gpt-tiny (shrunk) trained 4 steps on the CSV with the word-level tokenizer, Adafactor and the linear schedule."""
    tmp = tmp_path_factory.mktemp("run")
    proc = lmforge_fit(tmp, "-c", "configs/gpt-tiny.yaml", "-c", str(HERE / "example.yaml"), *TINY,
                       "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
                       "--trainer.default_root_dir", str(tmp / "run"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return tmp / "run" / "checkpoints" / "last.ckpt"


def test_generate_and_export_from_the_checkpoint(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained)  # the tokenizer comes back from its class and to_dict(), through from_dict
    assert isinstance(ckpt.tokenizer, WordLevelTokenizer)
    cli.main(["generate", str(trained), "--prompt", "Some wizard", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("Some wizard")

    cli.main(["export", str(trained), "--to", str(tmp_path / "npz"), "--format", "npz"])
    model, tokenizer = load_npz(tmp_path / "npz")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt.state.items())
    assert isinstance(tokenizer, WordLevelTokenizer) and tokenizer.fingerprint() == ckpt.tokenizer.fingerprint()

    cli.main(["export", str(trained), "--to", str(tmp_path / "st"), "--format", "safetensors"])
    cli.main(["generate", str(tmp_path / "st"), "--prompt", "Some wizard", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("Some wizard")


def test_fine_tune_from_the_checkpoint(trained, tmp_path):
    proc = lmforge_fit(tmp_path, "-c", "configs/finetune-sft.yaml", "--model.init_args.base", str(trained),
                       "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches",
                       "1", "--data.init_args.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "sft"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    tuned = load_checkpoint(tmp_path / "sft" / "checkpoints" / "last.ckpt")
    assert tuned.task == "sft" and isinstance(tuned.tokenizer, WordLevelTokenizer)


def test_min_length_filter_in_a_pipeline():
    from lmforge.data.pipeline import FilteredCorpus

    corpus = FilteredCorpus(SampleCorpus(["a long enough document", "short", "  another long one here  "]),
                            [{"name": "min_length", "min_chars": 10, "strip": True}])  # fmt: skip
    assert list(corpus.documents()) == ["a long enough document", "another long one here"]
    (step,) = corpus.report()
    assert step["name"] == "min_length" and step["dropped"] == {"too_short": 1} and step["docs_out"] == 2
    with pytest.raises(UserError, match=r"data.pipeline\[0\]: filter 'min_length' has no argument 'min_char'"):
        FilteredCorpus(SampleCorpus(), [{"name": "min_length", "min_char": 10}])
