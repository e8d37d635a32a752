"""Measured energy: the RAPL and NVML counters (faked where this machine has none), wraparound, the EnergyMeter
callback over a real Lightning fit and a resume, and the model card's co2_eq_emissions from what was measured."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lmforge import energy
from lmforge.callbacks import EnergyMeter
from lmforge.errors import UserError


def _rapl(root: Path, values: dict[str, int], limit: int = 262143328850) -> None:
    for name, value in values.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "energy_uj").write_text(f"{value}\n")
        (root / name / "max_energy_range_uj").write_text(f"{limit}\n")


def test_rapl_packages_are_summed_and_subdomains_left_out(tmp_path):
    _rapl(tmp_path, {"intel-rapl:0": 1_000_000, "intel-rapl:1": 5_000_000, "intel-rapl:0:0": 7_000_000})
    counters = energy.CounterSet("rapl", rapl_root=tmp_path)
    assert counters.sources == ["rapl"]
    counters.start()
    _rapl(tmp_path, {"intel-rapl:0": 3_500_000, "intel-rapl:1": 6_000_000, "intel-rapl:0:0": 99_000_000})
    gpu, cpu = counters.since_start()
    assert gpu is None and cpu == pytest.approx(3.5)  # 2.5 J + 1 J; the DRAM/core subdomain is not counted


def test_rapl_wraparound(tmp_path):
    _rapl(tmp_path, {"intel-rapl:0": 900}, limit=1000)
    counters = energy.CounterSet("rapl", rapl_root=tmp_path)
    counters.start()
    _rapl(tmp_path, {"intel-rapl:0": 950}, limit=1000)
    counters.read()
    _rapl(tmp_path, {"intel-rapl:0": 100}, limit=1000)  # wrapped: 950 -> 1000 -> 0 -> 100
    assert counters.since_start()[1] == pytest.approx(200e-6)


def test_unreadable_counters_measure_nothing(tmp_path):
    (tmp_path / "intel-rapl:0").mkdir()  # a domain whose energy file is missing (or root only)
    counters = energy.CounterSet("auto", device=None, rapl_root=tmp_path)
    assert counters.sources == []
    counters.start()
    assert counters.since_start() == (None, None)
    summary = energy.summarize(2.0, None, None, [], pue=1.2, grid_g_per_kwh=400)
    assert summary["energy_kwh"] is None and summary["co2_g"] is None
    assert "energy not measured" in energy.describe(summary)


def test_nvml_energy_counter(monkeypatch):
    reads = iter([10_000.0, 10_000.0, 3_610_000.0])  # mJ: start, check, end

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: next(reads),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    counters = energy.CounterSet("nvml", device=0, rapl_root=Path("/nonexistent"))
    assert counters.sources == ["nvml"]
    counters.start()
    gpu, cpu = counters.since_start()
    assert gpu == pytest.approx(3600.0) and cpu is None  # 3,600,000 mJ = 3,600 J = 1 Wh


def test_summary_applies_pue_and_grid():
    out = energy.summarize(3600.0, 3.6e6, 1.8e6, ["nvml", "rapl"], pue=1.5, grid_g_per_kwh=400.0)
    assert out["gpu_kwh"] == pytest.approx(1.0) and out["cpu_kwh"] == pytest.approx(0.5)
    assert out["energy_kwh"] == pytest.approx(2.25) and out["co2_g"] == pytest.approx(900.0)
    line = energy.describe(out)
    assert "2.25 kWh (nvml + rapl, PUE 1.5)" in line and "900 g CO2eq at 400 g/kWh" in line and "60.0 min" in line


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"pue": 0.5}, "energy.pue=0.5"), ({"backend": "wattmeter"}, "energy.backend='wattmeter'"),
     ({"grid_g_per_kwh": -1}, "energy.grid_g_per_kwh=-1")],
)  # fmt: skip
def test_bad_settings_are_one_line(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        EnergyMeter(**kwargs)


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 8)), batch_size=4)


def _fit(meter: EnergyMeter, tmp_path: Path, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, callbacks=[meter], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(_Tiny())
    return trainer


def test_meter_over_a_fit_and_a_resume(tmp_path, monkeypatch, capsys):
    joules = iter([(None, 3.6e6), (None, 1.8e6)])  # what the (faked) counters counted in each run
    monkeypatch.setattr(energy.CounterSet, "since_start", lambda self: next(joules))
    monkeypatch.setattr(energy.CounterSet, "sources", property(lambda self: ["rapl"]))
    meter = EnergyMeter(pue=1.1, grid_g_per_kwh=500)
    _fit(meter, tmp_path, 3)
    first = meter.result
    assert first["cpu_kwh"] == pytest.approx(1.0) and first["energy_kwh"] == pytest.approx(1.1)
    assert first["co2_g"] == pytest.approx(550.0) and first["seconds"] > 0 and first["peak_memory_bytes"] > 0
    assert "lmforge: measured: " in capsys.readouterr().out
    resumed = EnergyMeter(pue=1.1, grid_g_per_kwh=500)
    resumed.load_state_dict(meter.state_dict())  # as a checkpoint carries it into a resumed run
    _fit(resumed, tmp_path, 2)
    assert resumed.result["cpu_kwh"] == pytest.approx(1.5)
    assert resumed.result["seconds"] > first["seconds"]


def test_card_reports_what_was_measured(tmp_path):
    from lmforge.checkpoint import Checkpoint
    from lmforge.hf_export import export_hf
    from lmforge.model import GPT, GPTConfig
    from lmforge.tokenizers import ByteTokenizer

    config = GPTConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=32)
    measured = energy.summarize(90.0, 7.2e5, None, ["nvml"], pue=1.2, grid_g_per_kwh=300.0,
                                peak_memory_bytes=3 * 2**30, peak_memory_what="torch.cuda.max_memory_allocated")  # fmt: skip
    ckpt = Checkpoint(path=tmp_path / "last.ckpt", config=config, state=GPT(config).state_dict(),
                      tokenizer=ByteTokenizer(), run={"hardware": "NVIDIA H200", "measured": measured})  # fmt: skip
    (tmp_path / "out").mkdir()
    export_hf(ckpt, tmp_path / "out")
    card = (tmp_path / "out/README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    co2 = meta["co2_eq_emissions"]
    assert co2["emissions"] == pytest.approx(0.24 * 300) and co2["training_type"] == "pre-training"
    assert co2["hardware_used"] == "NVIDIA H200" and "nvml" in co2["source"]
    assert "### Compute (measured)" in card and "| energy | 0.24 kWh (nvml counters, PUE 1.2) |" in card
    assert "| peak memory | 3.00 GiB (torch.cuda.max_memory_allocated) |" in card
    # a run that could not measure its energy says so, and claims no emissions
    ckpt.run["measured"] = energy.summarize(5.0, None, None, [], grid_g_per_kwh=300.0)
    (tmp_path / "out2").mkdir()
    export_hf(ckpt, tmp_path / "out2")
    card = (tmp_path / "out2/README.md").read_text()
    assert "co2_eq_emissions" not in card and "| energy | not measured" in card
