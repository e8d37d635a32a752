"""A target outside the vocabulary is one clear error, checked once per batch on the host.

The loss kernels read every target's logit; an id >= vocab_size (a tokenizer larger than the model)
would read out of bounds. The training tasks check each batch while it is still on the host, in
``on_before_batch_transfer``, and tell the loss not to check again: on a GPU that second check would
read the targets back, a device sync in every step.
"""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import lmforge.kernels.utils as lce
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lmforge.errors import UserError
from lmforge.model import GPT, GPTConfig
from lmforge.pretrain import PretrainModule

TINY = dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)


def _module() -> PretrainModule:
    module = PretrainModule(GPTConfig(**TINY))
    module.configure_model()
    return module


@pytest.mark.parametrize("loss", ["auto", "torch"])
def test_model_names_the_bad_target(loss):
    model = GPT(GPTConfig(**TINY, loss=loss))
    x = torch.randint(0, 64, (2, 8))
    y = x.clone()
    y[1, 3] = 64  # == vocab_size
    with pytest.raises(ValueError, match=r"targets must be in \[0, 64\) or ignore_index=-100; got 64 at position 11"):
        model(x, y)
    y[1, 3] = -100  # ignored: fine
    assert torch.isfinite(model(x, y))


def test_batch_checked_on_host_once_and_not_again_in_the_loss(monkeypatch):
    module = _module()
    calls = []
    real = lce.check_target_range
    monkeypatch.setattr(lce, "check_target_range", lambda *a: calls.append(a[1]) or real(*a))
    x = torch.randint(0, 64, (2, 8))
    batch = module.on_before_batch_transfer((x, x.roll(-1, 1)), 0)
    assert calls == [64] and module._targets_checked
    loss_sum, count, unit = module._train_loss(batch)
    assert calls == [64], "the loss checked the targets again (a device sync per step on a GPU)"
    assert torch.isfinite(loss_sum) and int(count) == 16 and unit == 16


def test_bad_batch_is_a_user_error_naming_the_vocabulary():
    module = _module()
    x = torch.randint(0, 64, (2, 8))
    y = x.clone()
    y[0, 0] = 70
    with pytest.raises(UserError, match=r"got 70 at position 0.*model.vocab_size"):
        module.on_before_batch_transfer((x, y), 0)


def test_module_outside_a_trainer_still_checks_in_the_loss():
    module = _module()  # no batch went through on_before_batch_transfer
    x = torch.randint(0, 64, (2, 8))
    y = x.clone()
    y[0, 2] = -5
    with pytest.raises(ValueError, match="got -5 at position 2"):
        module._train_loss((x, y))


class _Data(L.LightningDataModule):
    def train_dataloader(self):
        x = torch.randint(0, 64, (4, 8))
        return DataLoader(TensorDataset(x, x.roll(-1, 1)), batch_size=2)


class _DataWithHook(_Data):
    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch


@pytest.mark.parametrize("data", [_Data, _DataWithHook])
def test_a_data_module_hook_wins_safely(data):
    module = PretrainModule(GPTConfig(**TINY))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, datamodule=data())
    # the data module's own hook replaces the module's: then the loss checks the targets itself
    assert module._targets_checked is (data is _Data)


def test_fit_with_a_data_module_does_not_warn_about_the_hook():
    """Lightning warns whenever a module defines the hook and a data module is passed; lmforge expects
    that and filters it (pytest's own warning capture would hide the filter: a fresh process)."""
    code = (
        "import torch, lightning as L; from torch.utils.data import DataLoader, TensorDataset\n"
        "from lmforge.model import GPTConfig; from lmforge.pretrain import PretrainModule\n"
        "class D(L.LightningDataModule):\n"
        "    def train_dataloader(self):\n"
        "        x = torch.randint(0, 64, (4, 8)); return DataLoader(TensorDataset(x, x), batch_size=2)\n"
        f"m = PretrainModule(GPTConfig(**{TINY!r}))\n"
        "L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,"
        " accelerator='cpu').fit(m, datamodule=D())\n"
        "assert m._targets_checked\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on_before_batch_transfer" not in done.stderr + done.stdout
