"""``lmforge plugins check DIST`` and lmforge.testing: lmforge's own plugins, the packages in plugins/ and a plugin
of each kind that breaks its protocol in one way (each named in one FAIL line), on real installed distributions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmforge import plugins, testing
from lmforge.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

BROKEN = '''
import random
import sys
import uuid

import torch
from torch.optim.lr_scheduler import LambdaLR


class Corpus:
    def __init__(self):
        self._key = uuid.uuid4().hex  # a new key at every build: the token cache would never be reused
    def key(self):
        return self._key
    def documents(self):
        return iter(["some text"])
    def num_bytes(self):
        return 9


def unstable_key():
    return Corpus()


class NotText(Corpus):
    def __init__(self):
        self._key = "fixed"
    def documents(self):
        return iter(["fine", b"bytes"])


def bytes_documents():
    return NotText()


def needs_a_file(path: str):
    return NotText()


class BigIds:
    vocab_size, eos_id = 10, 9
    def encode(self, text):
        return [min(ord(c), 200) for c in text]
    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]
    def decode(self, ids):
        return "".join(chr(i) for i in ids)
    def fingerprint(self):
        return "big"
    def to_dict(self):
        return {}
    @classmethod
    def from_dict(cls, values):
        return cls()
    def save(self, directory):
        pass


def big_ids(corpus, cache_dir):
    return BigIds()


class Token:
    """Not a tensor, number or string: torch.load(weights_only=True) refuses it."""


class Pickled(torch.optim.SGD):
    def state_dict(self):
        state = super().state_dict()
        state["token"] = Token()
        return state


def pickled_state(model, lr: float = 0.1):
    return Pickled(model.parameters(), lr=lr)


class Amnesiac(torch.optim.SGD):
    """Momentum it does not save: resumed steps differ from uninterrupted ones."""
    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.velocity = {}
    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                v = self.velocity.setdefault(p, torch.zeros_like(p))
                v.mul_(0.9).add_(p.grad)
                p.add_(v, alpha=-group["lr"])
        return loss


def forgets_momentum(model, lr: float = 0.05):
    return Amnesiac(model.parameters(), lr)


class Jitter:
    def __init__(self):
        self.seed = random.random()
    def __call__(self, step):
        return 1.0 / (1 + step) + self.seed * 0 + random.random() * 0.01


def jittery(optimizer, total_steps):
    return LambdaLR(optimizer, Jitter())


def beside(checkpoint, out_dir):
    (out_dir / "model.bin").write_text("x")
    checkpoint.with_suffix(".sha256").write_text("written beside the checkpoint, not into out_dir")


def nothing(checkpoint, out_dir):
    pass
'''


def make_dist(site: Path, dist: str, version: str, entries: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
    site.mkdir(parents=True, exist_ok=True)
    for name, code in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, names in entries.items():
        lines += [f"[{group}]", *(f"{name} = {target}" for name, target in names.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


EXPECTED_FAILURES = {
    "unstable_key": "FAIL lmforge.datasets unstable_key: key: key() differs between two builds with the same arguments",
    "bytes_documents": "FAIL lmforge.datasets bytes_documents: documents: documents() yielded bytes as document 1, not a str",
    "needs_a_file": "FAIL lmforge.datasets needs_a_file: arguments: dataset 'needs_a_file' needs the argument 'path'; "
    "declare sample arguments as needs_a_file.example_args (a dict, or a callable (folder) -> dict), or pass them",
    "big_ids": "FAIL lmforge.tokenizers big_ids: encode: encode('Hello, world! The qu') returned the id 72, outside "
    "0..vocab_size-1 (10)",
    "exits": "FAIL lmforge.tokenizers exits: load: failed to load: SystemExit: it called sys.exit(4)",
    "pickled_state": "FAIL lmforge.optimizers pickled_state: state_dict weights-only: its state_dict() does not load "
    "with torch.load(weights_only=True), as lmforge reads checkpoints",
    "forgets_momentum": "FAIL lmforge.optimizers forgets_momentum: resume: after resuming from its state_dict, two "
    "steps give other weights than uninterrupted ones",
    "jittery": "FAIL lmforge.schedulers jittery: resume: after resuming from its state_dict, step 11 has lr",
    "beside": "FAIL lmforge.exporters beside: folder: the export wrote tiny.sha256 beside the checkpoint; write only "
    "into out_dir",
    "nothing": "FAIL lmforge.exporters nothing: export: exporter 'nothing' wrote nothing",
}  # fmt: skip


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    groups = {"dataset": "lmforge.datasets", "tokenizer": "lmforge.tokenizers", "optimizer": "lmforge.optimizers",
              "scheduler": "lmforge.schedulers", "exporter": "lmforge.exporters"}  # fmt: skip
    kinds = {"unstable_key": "dataset", "bytes_documents": "dataset", "needs_a_file": "dataset", "big_ids": "tokenizer",
             "pickled_state": "optimizer", "forgets_momentum": "optimizer", "jittery": "scheduler",
             "beside": "exporter", "nothing": "exporter"}  # fmt: skip
    entries: dict[str, dict[str, str]] = {}
    for name, kind in kinds.items():
        entries.setdefault(groups[kind], {})[name] = f"broken_kinds:{name}"
    entries["lmforge.tokenizers"]["exits"] = "exits_at_import:build"
    make_dist(site, "lmforge-broken-kinds", "0.1", entries,
              {"broken_kinds": BROKEN, "exits_at_import": "import sys\nsys.exit(4)\n"})  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(plugins.AUTOLOAD_ENV, raising=False)
    monkeypatch.setattr(plugins, "autoload_override", None)
    yield site
    for name in ("broken_kinds", "exits_at_import"):
        sys.modules.pop(name, None)


def lmforge(*args: str, site: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop(plugins.AUTOLOAD_ENV, None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_lmforge_builtins_pass():
    results = testing.check_distribution("lmforge")
    names = {(info.kind, info.name) for info, _ in results}
    assert {("dataset", "files"), ("tokenizer", "hf"), ("optimizer", "muon"), ("scheduler", "cosine"),
            ("exporter", "hf"), ("exporter", "safetensors")} <= names  # fmt: skip
    failed = [testing.summary_line(info, r) for info, r in results if not all(x.ok for x in r)]
    assert not failed


@pytest.mark.parametrize("dist", ["lmforge-hf-datasets", "lmforge-schedulefree", "lmforge-gguf"])
def test_the_plugins_in_plugins_folder_pass(dist, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    for info, results in testing.check_distribution(dist):
        assert all(r.ok for r in results), testing.summary_line(info, results)
        assert {r.check for r in results} >= {"load", "arguments", "build" if info.kind != "exporter" else "export"}


def test_check_command_passes_the_template():
    proc = lmforge("plugins", "check", "lmforge-plugin-template")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[:3] for line in lines[:-1]] == [
        ["PASS", "lmforge.datasets", "csv:"], ["PASS", "lmforge.tokenizers", "wordlevel:"],
        ["PASS", "lmforge.optimizers", "adafactor:"], ["PASS", "lmforge.schedulers", "linear:"],
        ["PASS", "lmforge.exporters", "npz:"], ["PASS", "lmforge.filters", "min_length:"],
    ]  # fmt: skip
    assert "checkpoint round trip, folder round trip" in lines[1]
    assert lines[-1] == "lmforge-plugin-template 0.1.0: 6 of 6 plugins passed"


def test_check_command_names_each_broken_plugin_in_one_line(site):
    proc = lmforge("plugins", "check", "lmforge-broken-kinds", site=site)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "lmforge-broken-kinds 0.1: 0 of 10 plugins passed"
    by_name = {line.split()[2].rstrip(":"): line for line in lines[:-1]}
    assert set(by_name) == set(EXPECTED_FAILURES)
    for name, start in EXPECTED_FAILURES.items():
        assert by_name[name].startswith(start), by_name[name]


def test_check_results_in_python(site):
    results = testing.check_plugin("optimizer", "pickled_state")
    assert [r.check for r in results] == ["load", "example_args", "arguments", "build", "steps",
                                          "state_dict weights-only"]  # fmt: skip
    assert [r.ok for r in results] == [True] * 5 + [False]
    assert "it would call broken_kinds.Token" in results[-1].reason
    with pytest.raises(AssertionError, match=r"^FAIL optimizer 'pickled_state': state_dict weights-only: "):
        testing.assert_plugin_ok("optimizer", "pickled_state")
    # arguments passed replace example_args; the missing one no longer fails the check of arguments
    assert testing.check_plugin("dataset", "needs_a_file", path="x.txt")[-1].check == "documents"


def test_unknown_distribution_is_one_line():
    proc = lmforge("plugins", "check", "lmforge-nope")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("lmforge: error: plugins check: no installed distribution 'lmforge-nope'; distributions ")
    assert "lmforge-plugin-template" in line
    with pytest.raises(UserError, match="declares no lmforge plugin"):
        testing.distribution_plugins("pytest")
