"""Canaries and memorization: the secrets are deterministic, land in the training part of the corpus as often as
asked, change the cache key; a gpt-tiny run remembers canaries seen 100 times far better than those seen once
(exposure, Carlini et al. 2019), and the model card reports it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge import plugins
from lmforge.data.canaries import CanaryCorpus, candidates, check_settings, make_canaries
from lmforge.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_canaries_are_deterministic_and_distinct():
    a, b = make_canaries({"count": 12, "repeats": [1, 10, 100], "seed": 3}), make_canaries({"count": 12, "seed": 3})
    assert a == b and len({c.secret for c in a}) == 12 and len({c.prefix for c in a}) == 12
    assert [c.repeats for c in a[:3]] == [1, 10, 100]
    assert make_canaries({"count": 12, "seed": 4}) != a
    assert all(len(c.secret) == 6 and c.secret.isdigit() for c in a)
    pool = candidates(a[0], 500)
    assert len(set(pool)) == 500 and a[0].secret not in pool and pool == candidates(a[0], 500)


@pytest.mark.parametrize(
    "settings, needle",
    [({"count": 0}, "count=0"), ({"repeats": []}, "repeats=[]"), ({"repeats": [0]}, "repeats=[0]"),
     ({"count": 2, "repeats": [1, 10, 100]}, "fewer than the 3"), ({"size": 3}, "unknown key 'size'"),
     ([1, 2], "must be a mapping")],
)  # fmt: skip
def test_bad_settings_are_one_line(settings, needle):
    with pytest.raises(UserError, match=needle.replace("[", "\\[").replace("]", "\\]")):
        check_settings(settings)


def test_every_copy_is_in_the_training_part():
    corpus = plugins.build("dataset", {"name": "embedded", "size_bytes": 100_000, "seed": 0})
    wrapped = CanaryCorpus(corpus, {"count": 6, "repeats": [1, 10, 100]}, within=0.9)
    text = "".join(wrapped.documents())
    original = "".join(corpus.documents())
    assert len(text.encode()) - len(original.encode()) == wrapped.num_bytes() - corpus.num_bytes()
    for canary in wrapped.canaries:
        assert text.count(canary.text) == canary.repeats
        assert text.rfind(canary.text) < 0.9 * len(text) + 1000  # before the validation tail
    stripped = text
    for canary in wrapped.canaries:
        stripped = stripped.replace(canary.text + " ", "")
    assert stripped == original  # nothing else changed
    assert wrapped.key() != corpus.key()
    assert wrapped.key() != CanaryCorpus(corpus, {"count": 6, "repeats": [1, 10, 100], "seed": 1}, 0.9).key()


def test_the_data_module_records_its_canaries(tmp_path):
    from lmforge.data.pretrain import PretrainDataModule

    dm = PretrainDataModule(dataset={"name": "embedded", "size_bytes": 50_000}, seq_len=32, num_workers=0,
                            cache_dir=str(tmp_path), canaries={"count": 2, "repeats": [1, 5]})  # fmt: skip
    dm.setup("fit")
    assert dm.describe_data()["canaries"] == {"count": 2, "repeats": [1, 5], "seed": 0}
    with pytest.raises(UserError, match="data.canaries.count"):
        PretrainDataModule(canaries={"count": -1})


def test_memorization_needs_canaries(tmp_path, run_cli):
    proc = run_cli("evaluate", str(tmp_path / "missing.ckpt"), "--task", "memorization")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("evaluate", "gpt2", "--task", "memorization", "--device", "cpu")
    assert proc.returncode == 2 and "needs --canaries" in proc.stderr


@pytest.mark.slow
def test_canaries_seen_100_times_are_exposed_far_more_than_those_seen_once(run_cli, tmp_path):
    """gpt-tiny, 200 steps on 200 KB of the embedded corpus with 6 canaries (3 seen once, 3 seen 100 times): the
    frequent ones reach the top rank among 200 random secrets (the maximum exposure), the single ones stay low."""
    run = tmp_path / "run"
    proc = run_cli("fit", "-c", str(ROOT / "configs/gpt-tiny.yaml"), "--data.canaries",
                   "{count: 6, repeats: [1, 100], seed: 0}", "--data.dataset.size_bytes", "200000",
                   "--trainer.max_steps", "200", "--trainer.val_check_interval", "200",
                   "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run / "checkpoints/last.ckpt"
    proc = run_cli("evaluate", str(ckpt), "--task", "memorization", "--candidates", "200", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "eval/memorization-canaries.json").read_text())
    m = results["metrics"]
    assert m["exposure@100"] > m["exposure@1"] + 3.0, m
    assert m["exposure@100"] > 0.9 * m["max_exposure"], m
    assert {e["repeats"] for e in results["examples"]} == {1, 100} and "rank" in proc.stdout
    out = run_cli("export", str(ckpt), "--to", str(tmp_path / "hf"), "--format", "hf")
    assert out.returncode == 0, out.stderr[-2000:]
    card = (tmp_path / "hf/README.md").read_text()
    assert "## Memorization" in card and f"| 100 | {m['exposure@100']:.2f} of" in card
