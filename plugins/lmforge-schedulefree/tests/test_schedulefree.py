"""lmforge-schedulefree: found by name, switched between train and eval, trains gpt-tiny from YAML."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lmforge import plugins
from lmforge.model import GPTConfig
from lmforge.pretrain import PretrainModule
from lmforge.testing import assert_plugin_ok

REPO = Path(__file__).resolve().parents[3]


def test_registered_and_built_with_lmforge_decay_groups():
    (info,) = plugins.discover("optimizer")["adamw_schedulefree"]
    assert info.distribution == "lmforge-schedulefree"
    module = PretrainModule(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    opt = plugins.build("optimizer", {"name": "adamw_schedulefree", "lr": 1e-3, "weight_decay": 0.2}, module.model)
    assert type(opt).__name__ == "AdamWScheduleFree"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]


def test_follows_the_lmforge_optimizer_protocol():
    """lmforge's protocol checks (what `lmforge plugins check lmforge-schedulefree` runs): steps through
    step(closure) in train mode, a state_dict that loads weights-only, and resumed steps equal to uninterrupted ones."""
    assert_plugin_ok("optimizer", "adamw_schedulefree")
    assert_plugin_ok("optimizer", "adamw_schedulefree", lr=1e-3, warmup_steps=2, betas=[0.9, 0.99])


class ModeSpy(L.Callback):
    """Records the optimizer's mode during training and validation batches."""

    def __init__(self):
        self.train_modes, self.val_modes = [], []

    def on_train_batch_start(self, trainer, *args):
        self.train_modes.append(trainer.optimizers[0].param_groups[0]["train_mode"])

    def on_validation_batch_start(self, trainer, *args):
        self.val_modes.append(trainer.optimizers[0].param_groups[0]["train_mode"])


def test_optimizer_follows_the_module_mode():
    torch.manual_seed(0)
    module = PretrainModule(
        GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32),
        optimizer={"name": "adamw_schedulefree", "lr": 1e-3, "warmup_steps": 2},
        scheduler={"name": "constant"},
    )
    x = torch.randint(0, 64, (32, 17))
    data = DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=8)
    spy = ModeSpy()
    trainer = L.Trainer(max_steps=6, val_check_interval=3, limit_val_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[spy])  # fmt: skip
    trainer.fit(module, data, data)
    assert spy.train_modes and all(spy.train_modes)
    assert spy.val_modes and not any(spy.val_modes)


def test_gpt_tiny_trains_with_it_from_yaml(tmp_path):
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "fit", "-c", "configs/gpt-tiny.yaml", "-c",
         "plugins/lmforge-schedulefree/example.yaml", "--trainer.max_steps", "100", "--trainer.val_check_interval", "100",
         "--trainer.limit_val_batches", "4", "--data.num_workers", "0", "--data.dataset.size_bytes", "300000",
         "--trainer.default_root_dir", str(tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(next((tmp_path / "run").glob("csv/version_*/metrics.csv")))))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert train[0] > 4.0 and val[-1] < 0.5 * train[0]
