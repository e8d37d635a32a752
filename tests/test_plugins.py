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
    table = lmforge(site, "plugins").stdout
    assert table.splitlines()[0].split() == ["group", "name", "distribution", "version", "status", "target"]
    assert any(
        line.split()[:4] == ["lmforge.optimizers", "my_sgd", "lmforge-good", "1.2.3"] for line in table.splitlines()
    )
    off = json.loads(lmforge(site, "plugins", "--json", env={plugins.AUTOLOAD_ENV: "1"}).stdout)
    assert off["autoload"] is False and all(r["builtin"] for r in off["plugins"])
