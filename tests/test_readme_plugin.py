"""The README's "Writing a plugin" example, exactly as printed, installed with pip, checked against its protocol
and trained with; the outputs the README shows for it are what the commands print."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import plugins
from lmforge.model import GPT, GPTConfig
from lmforge.testing import assert_plugin_ok

ROOT = Path(__file__).resolve().parents[1]


def readme_files() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- example: (\S+) -->\n```\w+\n(.*?)```", text, re.S)
    return dict(blocks)


def readme_outputs() -> dict[str, str]:
    """The commands of the README's example block and the output shown after each one's ``#``."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("pip install ./lmforge-lion") :]
    lines = block[: block.index("```")].splitlines()
    return {line.split("#")[0].strip(): line.split("#", 1)[1].strip() for line in lines if "#" in line}


def test_readme_plugin_example_installs_and_trains(tmp_path, monkeypatch):
    files = readme_files()
    assert set(files) == {"lmforge-lion/pyproject.toml", "lmforge-lion/lmforge_lion.py"}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(tmp_path / "lmforge-lion")],
        check=True, capture_output=True,
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    (info,) = plugins.discover("optimizer")["lion"]
    assert (info.distribution, info.version) == ("lmforge-lion", "0.1.0")

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    opt = plugins.build("optimizer", {"name": "lion", "lr": 3e-3}, model)
    x = torch.randint(0, 64, (8, 16))
    losses = []
    for _ in range(30):
        loss = model.loss(x, x.roll(-1, dims=1))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]

    assert_plugin_ok("optimizer", "lion")  # the protocol checks of `lmforge plugins check`
    with pytest.raises(plugins.PluginError, match=r"^optimizer 'lion': lr='fast' is not a float$"):
        plugins.validate("optimizer", {"name": "lion", "lr": "fast"})  # the annotations are checked

    env = {**os.environ, "PYTHONPATH": str(site), "LMFORGE_CACHE": str(tmp_path / "cache")}
    env.pop(plugins.AUTOLOAD_ENV, None)
    shown = readme_outputs()
    listing = subprocess.run([sys.executable, "-m", "lmforge", "plugins"], capture_output=True, text=True, env=env)
    (row,) = [line for line in listing.stdout.splitlines() if "lion" in line]
    assert row.split() == shown["lmforge plugins | grep lion"].split()
    check = subprocess.run([sys.executable, "-m", "lmforge", "plugins", "check", "lmforge-lion"], capture_output=True,
                           text=True, env=env)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.splitlines()[0] == shown["lmforge plugins check lmforge-lion"]
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "fit", "-c", str(ROOT / "configs/gpt-tiny.yaml"),
         "--model.optimizer", "{name: lion, lr: 3e-4}", "--trainer.max_steps", "3", "--data.num_workers", "0",
         "--data.dataset.size_bytes", "60000", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "3 steps" in proc.stdout
