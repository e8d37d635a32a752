"""The plugin system with real entry-point discovery: throwaway distributions on sys.path, no mocks."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmforge import plugins
from lmforge.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "gpt-tiny.yaml")
FAST = [
    "--data.dataset.size_bytes", "60000", "--model.config.n_layer", "1", "--model.config.n_embd", "32",
    "--model.config.block_size", "32", "--data.seq_len", "32", "--trainer.limit_val_batches", "1",
    "--data.num_workers", "0", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
]  # fmt: skip


def make_dist(site: Path, dist: str, version: str, entries: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
    """An installed distribution as pip would leave it: modules plus a .dist-info with entry_points.txt."""
    site.mkdir(parents=True, exist_ok=True)
    for name, code in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, names in entries.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in names.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


GOOD = """
import os
import torch
MARK = os.environ.get("LMFORGE_TEST_MARK")
if MARK:
    open(MARK + ".imported", "w").close()

def my_sgd(model, lr=0.1, momentum=0.0):
    if MARK:
        open(MARK + ".built", "w").write(repr(lr))
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
"""


TYPED = """
from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch

if TYPE_CHECKING:
    from somewhere_else import Unresolvable


def typed(
    model,
    lr: float = 0.1,
    steps: int = 1,
    flag: bool = False,
    mode: Literal["a", "b"] = "a",
    path: pathlib.Path | None = None,
    sizes: list[int] = [],
    betas: tuple[float, float] = (0.9, 0.99),
    dims: tuple[int, ...] = (),
    table: dict[str, float] = {},
    label: Optional[str] = None,
    anything: Any = None,
    odd: Unresolvable = None,
    plain=None,
):
    return torch.optim.SGD(model.parameters(), lr=lr)
"""

KEYS = """
class Corpus:
    def __init__(self, key):
        self._key = key
    def key(self):
        return self._key
    def documents(self):
        return iter(["some text"])
    def num_bytes(self):
        return 9

def slash():
    return Corpus("a/b")
def empty():
    return Corpus("")
def long():
    return Corpus("x" * 129)
def number():
    return Corpus(42)
def fine():
    return Corpus("v1.0_abc-" + "f" * 119)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path (in this process and in subprocesses) holding throwaway plugin distributions."""
    site = tmp_path / "site"
    make_dist(
        site, "lmforge-good", "1.2.3", {"lmforge.optimizers": {"my_sgd": "good_plugin:my_sgd"}}, {"good_plugin": GOOD}
    )
    make_dist(
        site, "lmforge-broken", "0.0.1",
        {"lmforge.optimizers": {"broken": "broken_plugin:build"}},
        {"broken_plugin": "raise ImportError('needs the flux capacitor')\n"},
    )  # fmt: skip
    make_dist(
        site, "lmforge-badproto", "2.0",
        {
            "lmforge.optimizers": {"no_model": "bad_plugin:no_model", "not_callable": "bad_plugin:CONSTANT"},
            "lmforge.tokenizers": {"half_tok": "bad_plugin:half_tokenizer"},
        },
        {"bad_plugin": """
            CONSTANT = 42
            def no_model(lr=0.1):
                return None
            class Half:
                vocab_size = 10
                eos_id = 0
            def half_tokenizer(corpus, cache_dir):
                return Half()
        """},
    )  # fmt: skip
    make_dist(site, "lmforge-dup-a", "1.0", {"lmforge.optimizers": {"dup": "good_plugin:my_sgd"}}, {})
    make_dist(site, "lmforge-dup-b", "3.1", {"lmforge.optimizers": {"dup": "good_plugin:my_sgd"}}, {})
    make_dist(
        site, "lmforge-exits", "0.3",
        {"lmforge.optimizers": {"exits": "exits_plugin:build"}, "lmforge.datasets": {"boom": "boom_plugin:build"}},
        {"exits_plugin": "import sys\nsys.exit(3)\n",
         "boom_plugin": "class Boom(BaseException):\n    pass\nraise Boom('not even an Exception')\n"},
    )  # fmt: skip
    make_dist(site, "lmforge-typed", "1.0", {"lmforge.optimizers": {"typed": "typed_plugin:typed"}},
              {"typed_plugin": TYPED})  # fmt: skip
    make_dist(
        site, "lmforge-keys", "1.0",
        {"lmforge.datasets": {f"{k}_key": f"keys_plugin:{k}" for k in ("slash", "empty", "long", "number", "fine")}},
        {"keys_plugin": KEYS},
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(plugins.AUTOLOAD_ENV, raising=False)
    monkeypatch.setattr(plugins, "autoload_override", None)
    return site


def lmforge(site: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    full_env = {**os.environ, "PYTHONPATH": str(site), "LMFORGE_CACHE": str(site.parent / "cache")}
    full_env.pop(plugins.AUTOLOAD_ENV, None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=full_env, cwd=cwd or site.parent
    )


def model():
    return GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))


def test_builtins_are_declared_as_entry_points_of_lmforge():
    for kind, name in [("optimizer", "adamw"), ("optimizer", "muon"), ("dataset", "embedded"), ("dataset", "files"),
                       ("tokenizer", "bytes"), ("tokenizer", "bpe"), ("scheduler", "cosine"), ("exporter", "safetensors")]:  # fmt: skip
        (info,) = plugins.discover(kind)[name]
        assert info.distribution == "lmforge" and info.builtin


def test_third_party_plugin_is_discovered_and_built_by_name(site, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_TEST_MARK", str(tmp_path / "mark"))
    (info,) = plugins.discover("optimizer")["my_sgd"]
    assert (info.distribution, info.version, info.value) == ("lmforge-good", "1.2.3", "good_plugin:my_sgd")
    opt = plugins.build("optimizer", {"name": "my_sgd", "lr": 0.25}, model())
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.25


def test_plugin_used_from_a_config_in_training(site, tmp_path):
    mark = tmp_path / "mark"
    proc = lmforge(site, "fit", "-c", TINY, *FAST, "--model.optimizer", "{name: my_sgd, lr: 0.05}",
                   env={"LMFORGE_TEST_MARK": str(mark)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert Path(str(mark) + ".built").read_text() == "0.05"
    assert "3 steps" in proc.stdout


def test_listing_and_importing_lmforge_import_no_plugin_until_used(site, tmp_path):
    mark = tmp_path / "mark"
    code = (
        "import sys, lmforge, lmforge.plugins as p; p.discover('optimizer'); p.names('dataset');"
        "print(sorted(m for m in sys.modules if m.endswith('_plugin') or m.startswith('lmforge_')))"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "LMFORGE_TEST_MARK": str(mark)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "[]"
    assert not Path(str(mark) + ".imported").exists()


def test_broken_plugin_is_reported_and_lmforge_still_runs(site):
    with pytest.raises(
        plugins.PluginError, match=r"'broken'.*lmforge-broken 0\.0\.1 failed to load: ImportError: needs the flux"
    ):
        plugins.build("optimizer", {"name": "broken"}, model())
    assert isinstance(plugins.build("optimizer", {"name": "adamw"}, model()), torch.optim.AdamW)
    proc = lmforge(site, "fit", "-c", TINY, *FAST)
    assert proc.returncode == 0, proc.stderr


def test_protocol_violations_name_the_missing_requirement(site):
    with pytest.raises(plugins.PluginError, match=r"breaks the protocol: it takes no 'model' parameter"):
        plugins.build("optimizer", {"name": "no_model"}, model())
    with pytest.raises(plugins.PluginError, match=r"breaks the protocol: it is not callable"):
        plugins.validate("optimizer", {"name": "not_callable"})
    with pytest.raises(plugins.PluginError, match=r"lacks encode, encode_batch, decode, fingerprint, to_dict, save"):
        plugins.build("tokenizer", {"name": "half_tok"}, None, Path("."))


def test_two_distributions_claiming_one_name_is_an_error_naming_both(site):
    with pytest.raises(plugins.PluginError, match=r"'dup' is claimed by two distributions") as err:
        plugins.find("optimizer", "dup")
    assert "lmforge-dup-a 1.0" in str(err.value) and "lmforge-dup-b 3.1" in str(err.value)


def test_unknown_name_and_wrong_arguments_are_explained(site):
    with pytest.raises(
        plugins.PluginError, match=r"unknown optimizer 'adamww'; did you mean 'adamw'\? Available: .*my_sgd"
    ):
        plugins.validate("optimizer", {"name": "adamww"})
    with pytest.raises(plugins.PluginError, match=r"optimizer 'adamw' has no argument 'lrr'; did you mean 'lr'\?"):
        plugins.validate("optimizer", {"name": "adamw", "lrr": 1e-3})
    with pytest.raises(plugins.PluginError, match=r"tokenizer 'hf' needs the argument 'path'"):
        plugins.validate("tokenizer", {"name": "hf"})


def test_config_errors_name_the_plugin_before_training(site):
    proc = lmforge(site, "fit", "-c", TINY, *FAST, "--model.optimizer", "{name: adamw, lrr: 0.1}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "lmforge: error: optimizer 'adamw' has no argument 'lrr'; did you mean 'lr'?"
    )
    assert "Epoch" not in proc.stdout


def test_autoload_off_hides_third_party_plugins(site, monkeypatch):
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "1")
    assert "my_sgd" not in plugins.names("optimizer") and "adamw" in plugins.names("optimizer")
    with pytest.raises(plugins.PluginError, match="third-party plugins are off"):
        plugins.find("optimizer", "my_sgd")
    proc = lmforge(site, "fit", "-c", TINY, *FAST, "--plugin_autoload", "false", "--model.optimizer", "{name: my_sgd}")
    assert proc.returncode == 2 and "unknown optimizer 'my_sgd'" in proc.stderr


def test_plugins_command_lists_everything(site):
    proc = lmforge(site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {(r["group"], r["name"], r["distribution"]): r for r in json.loads(proc.stdout)["plugins"]}
    good = rows[("lmforge.optimizers", "my_sgd", "lmforge-good")]
    assert good["status"] == "ok" and good["version"] == "1.2.3" and not good["builtin"]
    broken = rows[("lmforge.optimizers", "broken", "lmforge-broken")]
    assert broken["status"].startswith("error:") and "flux capacitor" in broken["status"]
    assert "takes no 'model'" in rows[("lmforge.optimizers", "no_model", "lmforge-badproto")]["status"]
    assert "lmforge-dup-b" in rows[("lmforge.optimizers", "dup", "lmforge-dup-a")]["status"]
    assert rows[("lmforge.datasets", "embedded", "lmforge")]["builtin"]
    table = lmforge(site, "plugins", "--load").stdout
    assert table.splitlines()[0].split() == ["group", "name", "distribution", "version", "status", "target"]
    assert any(
        line.split() == ["lmforge.optimizers", "my_sgd", "lmforge-good", "1.2.3", "ok", "good_plugin:my_sgd"]
        for line in table.splitlines()
    )
    off = json.loads(lmforge(site, "plugins", "--json", env={plugins.AUTOLOAD_ENV: "1"}).stdout)
    assert off["autoload"] is False and all(r["builtin"] for r in off["plugins"])


# -- `lmforge plugins`: the metadata alone, fast; --load imports -----------------------------------------------


def test_plugins_listing_reads_metadata_only_and_answers_fast(site, tmp_path):
    """No plugin module, no torch, no Lightning imported; under a second in-process (the broken and exiting
    plugins listed like the others, the clash flagged)."""
    mark = tmp_path / "mark"
    code = (
        "import sys, time; t = time.perf_counter(); from lmforge.cli import main; main(['plugins']); "
        "elapsed = time.perf_counter() - t; "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning') or m.endswith('_plugin')); "
        "print('ELAPSED', elapsed); print('LOADED', loaded)"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "LMFORGE_TEST_MARK": str(mark)}
    env.pop(plugins.AUTOLOAD_ENV, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["group", "name", "distribution", "version", "target", "status"]
    rows = {tuple(line.split()[:5]) for line in lines[2:]}
    assert ("lmforge.optimizers", "my_sgd", "lmforge-good", "1.2.3", "good_plugin:my_sgd") in rows
    assert ("lmforge.optimizers", "exits", "lmforge-exits", "0.3", "exits_plugin:build") in rows
    assert ("lmforge.optimizers", "broken", "lmforge-broken", "0.0.1", "broken_plugin:build") in rows
    dup = [line for line in lines if line.split()[1:3] == ["dup", "lmforge-dup-a"]]
    assert dup and dup[0].endswith("name also claimed by lmforge-dup-b")
    assert "LOADED []" in lines
    assert float(next(line for line in lines if line.startswith("ELAPSED")).split()[1]) < 1.0
    assert not Path(str(mark) + ".imported").exists()


def test_plugin_that_exits_or_raises_base_exception_at_import_is_reported(site):
    statuses = {(st.info.name, st.info.distribution): st for st in plugins.inspect_all()}
    exits = statuses[("exits", "lmforge-exits")]
    assert exits.info.version == "0.3" and exits.status == "error: SystemExit: it called sys.exit(3)"
    assert statuses[("boom", "lmforge-exits")].status == "error: Boom: not even an Exception"
    with pytest.raises(plugins.PluginError, match=r"'exits' \(exits_plugin:build\) from lmforge-exits 0\.3 failed"):
        plugins.build("optimizer", {"name": "exits"}, model())
    with pytest.raises(plugins.PluginError, match="failed to load: Boom"):
        plugins.validate("dataset", {"name": "boom"})
    assert isinstance(plugins.build("optimizer", {"name": "adamw"}, model()), torch.optim.AdamW)  # the registry lives
    proc = lmforge(site, "plugins", "--load")
    assert proc.returncode == 0, proc.stderr
    (row,) = [line for line in proc.stdout.splitlines() if line.split()[1:2] == ["exits"]]
    assert row.split()[2:4] == ["lmforge-exits", "0.3"] and "error: SystemExit: it called sys.exit(3)" in row


def test_config_naming_an_exiting_plugin_is_one_line(site):
    proc = lmforge(site, "fit", "-c", TINY, *FAST, "--model.optimizer", "{name: exits}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "lmforge: error: optimizer plugin 'exits' (exits_plugin:build) from lmforge-exits 0.3 failed to load: "
        "SystemExit: it called sys.exit(3)"
    )


# -- arguments checked by type ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,spec,message",
    [
        ("optimizer", {"name": "adamw", "lr": [1, 2]}, "optimizer 'adamw': lr=[1, 2] is not a float"),
        ("scheduler", {"name": "cosine", "warmup_steps": "lots"}, "scheduler 'cosine': warmup_steps='lots' is not an int"),
        ("scheduler", {"name": "cosine", "warmup_steps": True}, "scheduler 'cosine': warmup_steps=True is not an int"),
        ("scheduler", {"name": "cosine", "decay_steps": 1.5}, "scheduler 'cosine': decay_steps=1.5 is not an int or null"),
        ("optimizer", {"name": "adamw", "betas": [0.9]}, "optimizer 'adamw': betas=[0.9] is not a list of 2 values (float, float)"),
        ("optimizer", {"name": "sgd", "nesterov": "yes"}, "optimizer 'sgd': nesterov='yes' is not a bool"),
        ("tokenizer", {"name": "hf", "path": 3}, "tokenizer 'hf': path=3 is not a str"),
        ("dataset", {"name": "files", "paths": ["a"], "decode_errors": "ignore"},
         "dataset 'files': decode_errors='ignore' is not one of 'replace', 'strict'"),
        ("optimizer", {"name": "adamw", "lr": "3e-4"}, "optimizer 'adamw': lr='3e-4' is not a float (YAML reads 3e-4 as a string"),
    ],
)  # fmt: skip
def test_builtin_arguments_are_checked_by_type(kind, spec, message):
    with pytest.raises(plugins.PluginError) as err:
        plugins.validate(kind, spec)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_values_that_fit_the_annotations_pass():
    plugins.validate("optimizer", {"name": "adamw", "lr": 1, "betas": [0.9, 0.95], "eps": 1e-8})  # int for float
    plugins.validate("optimizer", {"name": "adamw", "betas": (0.9, 0.95)})  # a tuple from Python
    plugins.validate("scheduler", {"name": "cosine", "decay_steps": None, "min_lr_ratio": 0})
    plugins.validate("tokenizer", {"name": "hf", "path": "tok", "eos_token": "</s>"})


def test_annotations_of_a_plugin_module_with_postponed_evaluation(site):
    """``from __future__ import annotations``, and one name that only exists under TYPE_CHECKING: the others
    are still resolved and checked; the unresolvable one (and unannotated ones) pass."""
    ok = {
        "lr": 2, "steps": 3, "flag": True, "mode": "b", "path": "a/b.txt", "sizes": [1, 2], "betas": [1, 0.5],
        "dims": [1, 2, 3], "table": {"x": 1.5}, "label": None, "anything": object(), "odd": "whatever", "plain": [1],
    }  # fmt: skip
    plugins.validate("optimizer", {"name": "typed", **ok})
    bad = {
        "lr": ("x", "a float"), "steps": (2.0, "an int"), "flag": (1, "a bool"), "mode": ("c", "one of 'a', 'b'"),
        "path": (3, "a path or null"), "sizes": ([1, "2"], "a list of int"),
        "betas": ([1, 2, 3], "a list of 2 values (float, float)"), "dims": ("1, 2", "a list of int"),
        "table": ({"x": "y"}, "a dict of str to float"), "label": (7, "a str or null"),
    }  # fmt: skip
    for key, (value, expected) in bad.items():
        with pytest.raises(plugins.PluginError) as err:
            plugins.validate("optimizer", {"name": "typed", key: value})
        assert str(err.value) == f"optimizer 'typed': {key}={value!r} is not {expected}"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("{name: adamw, lr: [1, 2]}", "optimizer 'adamw': lr=[1, 2] is not a float"),
        ("{name: cosine, warmup_steps: lots}", "scheduler 'cosine': warmup_steps='lots' is not an int"),
    ],
)
def test_wrong_argument_types_stop_fit_before_training_in_one_line(spec, message):
    key = "--model.optimizer" if "adamw" in spec else "--model.scheduler"
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "fit", "-c", TINY, key, spec], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"lmforge: error: {message}"
    assert "Traceback" not in proc.stderr and "TypeError" not in proc.stderr
    assert "Epoch" not in proc.stdout


# -- dataset keys ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,shown",
    [("slash_key", "'a/b'"), ("empty_key", "''"), ("long_key", "'xxxx"), ("number_key", "42")],
)
def test_dataset_key_is_checked_when_built(site, name, shown):
    with pytest.raises(plugins.PluginError) as err:
        plugins.build("dataset", {"name": name})
    text = str(err.value)
    assert f"key() returned {shown}" in text and "\n" not in text
    assert text.endswith(
        "a corpus key names cache files, so it must be a non-empty str of letters, digits, '.', '_' and '-', "
        "at most 128 characters (e.g. the first 32 hex digits of a sha256 of the content)"
    )
    if name == "long_key":
        assert "(129 characters)" in text


def test_valid_dataset_keys_pass(site):
    assert plugins.build("dataset", {"name": "fine_key"}).key().startswith("v1.0_abc-")
    assert plugins.corpus_key_problem(plugins.build("dataset", {"name": "embedded", "size_bytes": 1000}).key()) is None
